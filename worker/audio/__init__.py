"""Audio normalisation: decode, bound, fingerprint, trim silence, chunk at silences, encode FLAC.

Everything here is CPU work on a local file or bytes; no network, no database. The stages, each in its
own module (import the names from here):

1. `codecs`: `decode_to_pcm` decodes to 16 kHz mono s16 (bounded by `max_seconds`, fingerprinted as it
   goes); `encode_flac` / `decode_flac` write and read the FLAC voxq sends.
2. `speech`: `frame_levels_db` and `find_speech`, an energy VAD over 30 ms frames that keeps speech runs
   with a little padding and collapses long pauses.
3. `timemap`: `TimeMap` maps trimmed time back to the original file; `map_segments` moves a provider's
   segments and words there.
4. `chunks`: `plan_chunks` cuts the trimmed audio at pauses into chunks ≤ `max_chunk_seconds`;
   `prepare_audio` runs stages 1-4 and `PreparedAudio.iter_chunks` encodes the chunks one at a time.
"""

from __future__ import annotations

from worker.audio.chunks import (
    MAX_UPLOAD_BYTES,
    EncodedChunk,
    PreparedAudio,
    plan_chunks,
    prepare_audio,
    split_quietest,
)
from worker.audio.codecs import (
    FLAC_CONTENT_TYPE,
    FLAC_FILENAME,
    SAMPLE_RATE,
    DecodedAudio,
    FloatArray,
    Int16Array,
    PcmFile,
    ProbeInfo,
    Samples,
    decode_flac,
    decode_to_pcm,
    encode_flac,
    flac_streaminfo,
)
from worker.audio.speech import (
    ABS_FLOOR_DB,
    FRAME_SAMPLES,
    FRAME_SECONDS,
    LEAD_PAD_SECONDS,
    MIN_SPEECH_FRAMES,
    PAD_SECONDS,
    TAIL_PAD_SECONDS,
    find_speech,
    frame_levels_db,
    percentiles,
    speech_threshold_db,
)
from worker.audio.timemap import TimeMap, build_time_map, map_segments

__all__ = [
    "ABS_FLOOR_DB",
    "FLAC_CONTENT_TYPE",
    "FLAC_FILENAME",
    "FRAME_SAMPLES",
    "FRAME_SECONDS",
    "LEAD_PAD_SECONDS",
    "MAX_UPLOAD_BYTES",
    "MIN_SPEECH_FRAMES",
    "PAD_SECONDS",
    "SAMPLE_RATE",
    "TAIL_PAD_SECONDS",
    "DecodedAudio",
    "EncodedChunk",
    "FloatArray",
    "Int16Array",
    "PcmFile",
    "PreparedAudio",
    "ProbeInfo",
    "Samples",
    "TimeMap",
    "build_time_map",
    "decode_flac",
    "decode_to_pcm",
    "encode_flac",
    "find_speech",
    "flac_streaminfo",
    "frame_levels_db",
    "map_segments",
    "percentiles",
    "plan_chunks",
    "prepare_audio",
    "speech_threshold_db",
    "split_quietest",
]
