"""Align (queue `align`): word timestamps and subtitle cues for a succeeded job's transcript.

Runs after completion when the batch asks for `timestamps` (segment or word), or when
`POST /v1/jobs/{id}/align` asks again; the transcript's text never changes here.

1. Read the job and transcript (worker.store.transcripts), only while the transcript's alignment is
   `pending` with this task's token.
2. Give each chunk of the job's plan (the time map's chunks, in trimmed time) the transcript segments that
   fall in it (by their midpoint in original time): a text-only model wrote one segment per chunk.
3. A chunk whose segments all carry the model's own word times (whisper-1 verbose_json, the local model)
   keeps them, carried onto the text's own spelling (`spelled_as_text`): no audio, no alignment. Any
   other chunk is aligned on its audio with worker.alignment (method (a), `whisper_align`, on the local
   model): the job's upload is fetched and decoded again (its derived FLACs may have been swept) and the
   chunk's trimmed audio rebuilt from the time map, then the words are shifted into the original file's
   time with the time map (`chunk_clock`).
4. Cues (core.subtitles.build_segments: ≤ ~7 s, ≤ 2 lines of 42) are built from each chunk's words; a
   chunk whose alignment failed keeps its own segment as one cue. The document stored is
   `{status, timestamps, source, method, segments, words (timestamps=word only), chunks, reason,
   detail, cpu_seconds}`: `aligned` when every chunk has word times, `partial` when some do, `failed`
   when none do (srt/vtt then use the transcript's chunk cues, flagged). Failure is never raised: the
   text stays and the reason is in the document (no transcript text in it, nor in logs).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.settings import get_settings
from core.statuses import AlignmentStatus, Timestamps
from core.storage import Storage, parse_s3_uri
from core.subtitles import Segment, Word, build_segments, segments_from_json, words_from_json
from worker import audio
from worker.store.transcripts import AlignInput, read_for_alignment, save_alignment

if TYPE_CHECKING:
    from worker.alignment import Aligner

log = logging.getLogger(__name__)

MEMORY_SECONDS = 120.0  # as prepare: longer audio is decoded to a temp file, not held in memory
SUPERSEDED = "superseded"


@dataclass
class ChunkText:
    """One chunk of the job's plan (trimmed-time bounds) and the transcript segments inside it."""

    index: int
    start: float
    end: float
    segments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The chunk's text, its segments' texts joined."""
        return " ".join(str(s.get("text") or "").strip() for s in self.segments).strip()


def chunk_texts(segments: list[dict[str, Any]], tmap: audio.TimeMap) -> list[ChunkText]:
    """The plan's chunks, each with the segments (original time) whose midpoint falls inside it."""
    bounds = tmap.chunks or ([(0.0, tmap.trimmed_seconds)] if tmap.trimmed_seconds > 0 else [])
    chunks = [ChunkText(i, a, b) for i, (a, b) in enumerate(bounds)]
    if not chunks:
        return []
    ends = [tmap.to_original(b, end=True) for _, b in bounds]
    for seg in segments:
        if not (isinstance(seg, dict) and segments_from_json([seg])):
            continue
        middle = (float(seg["start"]) + float(seg["end"])) / 2
        index = next((i for i, end in enumerate(ends) if middle < end), len(chunks) - 1)
        chunks[index].segments.append(seg)
    return [c for c in chunks if c.text]


def model_words(segments: list[dict[str, Any]]) -> list[Word] | None:
    """The model's own word times (original time) when every segment carries them; else None."""
    if not segments or not all(isinstance(s.get("words"), list) and s["words"] for s in segments):
        return None
    return words_from_json([w for s in segments for w in s["words"]]) or None


def spelled_as_text(text: str, own: list[Word]) -> list[Word]:
    """The model's word times carried onto the text's own words (its spelling and punctuation, which
    cues break on): matched like alignment method (b) (`match_words`), the rest interpolated; the
    model's words as they are when the two hardly match."""
    from worker.alignment.normalise import split_words
    from worker.alignment.timing import interpolate, monotonic
    from worker.alignment.words import MIN_MATCHED, match_words

    hosted = split_words(text)
    match = match_words(hosted, own) if hosted else None
    if match is None or match.matched_share < MIN_MATCHED:
        return own
    return monotonic(interpolate(hosted, match.known, start=own[0].start, end=own[-1].end))


@dataclass
class _Outcome:
    """One chunk's words (original time) and cues, or why it has none."""

    chunk: ChunkText
    source: str  # "aligned" | "model" | "failed"
    words: list[Word] = field(default_factory=list)
    cues: list[Segment] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None
    cpu_seconds: float = 0.0

    def summary(self, tmap: audio.TimeMap) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.chunk.index,
            "start": tmap.to_original(self.chunk.start),
            "end": tmap.to_original(self.chunk.end, end=True),
            "source": self.source,
            "words": len(self.words),
        }
        if self.reason:
            out["reason"] = self.reason
        return out


class _Audio:
    """The job's audio, fetched and decoded on first use (only chunks without the model's words need it)."""

    def __init__(self, data: AlignInput, tmap: audio.TimeMap, tmp: str) -> None:
        self._data, self._tmap, self._tmp = data, tmap, tmp
        self._prepared: audio.PreparedAudio | None = None

    def chunk(self, start: float, end: float) -> audio.Int16Array:
        """The chunk's trimmed samples, rebuilt from the original audio with the time map."""
        if self._prepared is None:
            decoded = audio.decode_to_pcm(
                self._download(),
                max_seconds=get_settings().max_audio_seconds,
                tmp_dir=self._tmp,
                memory_seconds=MEMORY_SECONDS,
            )
            self._prepared = audio.PreparedAudio(decoded, self._tmap, self._tmap.trimmed_seconds)
        return self._prepared.trimmed_pcm(start, end)

    def _download(self) -> str:
        target = f"{self._tmp}/source"
        storage = Storage()
        with open(target, "wb") as fh:
            if self._data.source_uri:
                bucket, key = parse_s3_uri(self._data.source_uri)
                storage.download_to(key, fh, bucket=bucket)
            elif self._data.object_key:
                storage.download_to(self._data.object_key, fh)
            else:
                raise FileNotFoundError("the job has no audio object")
        return target

    def close(self) -> None:
        if self._prepared is not None:
            self._prepared.close()


def _aligner(language: str | None) -> Aligner:
    from worker.alignment import make_aligner
    from worker.local_engine import get_local_provider

    code = language.lower() if language and len(language) == 2 else None
    return make_aligner(get_local_provider().load(), language=code)


def _align_chunk(chunk: ChunkText, source: _Audio, aligner: Aligner, tmap: audio.TimeMap) -> _Outcome:
    """Align one chunk's text on its audio and shift the words into original time."""
    from worker.alignment import Aligned, chunk_clock, shift_words

    started = time.process_time()
    result = aligner.align(source.chunk(chunk.start, chunk.end), chunk.text)
    cpu = time.process_time() - started
    if not isinstance(result, Aligned):
        return _Outcome(chunk, "failed", reason=result.reason.value, detail=result.detail, cpu_seconds=cpu)
    words = shift_words(result.words, chunk_clock(tmap.to_original, chunk.start))
    return _Outcome(chunk, "aligned", words=words, cpu_seconds=cpu)


def _failed_all(chunks: list[ChunkText], reason: str, detail: str) -> list[_Outcome]:
    return [_Outcome(c, "failed", reason=reason, detail=detail) for c in chunks]


def align_chunks(data: AlignInput, tmap: audio.TimeMap) -> list[_Outcome]:
    """Each chunk's outcome: the model's words, aligned words, or a failure (never raised)."""
    chunks = chunk_texts(data.segments, tmap)
    outcomes: list[_Outcome] = []
    with tempfile.TemporaryDirectory(prefix="voxq-align-") as tmp:
        source = _Audio(data, tmap, tmp)
        aligner: Aligner | None = None
        try:
            for position, chunk in enumerate(chunks):
                own = model_words(chunk.segments)
                if own is not None:
                    outcomes.append(_Outcome(chunk, "model", words=spelled_as_text(chunk.text, own)))
                    continue
                try:
                    aligner = aligner or _aligner(data.language)
                    outcomes.append(_align_chunk(chunk, source, aligner, tmap))
                except Exception as exc:  # audio gone or undecodable, model missing: the rest fail alike
                    reason = "model_error" if aligner is None else "audio_unavailable"
                    log.warning("alignment of job %s failed: %s", data.job_id, type(exc).__name__)
                    detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                    outcomes.extend(_failed_all(chunks[position:], reason, detail))
                    break
        finally:
            source.close()
    for outcome in outcomes:
        end = tmap.to_original(outcome.chunk.end, end=True)
        if outcome.words:
            outcome.cues = build_segments(outcome.words, duration=end)
        else:
            outcome.cues = segments_from_json(outcome.chunk.segments)
    return outcomes


def alignment_document(data: AlignInput, outcomes: list[_Outcome], tmap: audio.TimeMap) -> dict[str, Any]:
    """The transcript's alignment document from the chunks' outcomes (see the module doc)."""
    from worker.alignment import DEFAULT_METHOD

    timed = [o for o in outcomes if o.source != "failed"]
    failed = [o for o in outcomes if o.source == "failed"]
    if not timed:
        status = AlignmentStatus.FAILED
    elif failed:
        status = AlignmentStatus.PARTIAL
    else:
        status = AlignmentStatus.ALIGNED
    sources = sorted({o.source for o in timed})
    doc: dict[str, Any] = {
        "status": status.value,
        "timestamps": data.timestamps.value,
        "source": "+".join(sources) if sources else None,
        "method": DEFAULT_METHOD if any(o.source == "aligned" for o in outcomes) else None,
        "segments": [cue.to_dict() for o in outcomes for cue in o.cues] if timed else [],
        "words": (
            [w.to_dict() for o in timed for w in o.words] if data.timestamps == Timestamps.WORD else []
        ),
        "chunks": [o.summary(tmap) for o in outcomes],
        "cpu_seconds": round(sum(o.cpu_seconds for o in outcomes), 3),
    }
    if failed:
        doc["reason"], doc["detail"] = failed[0].reason, failed[0].detail
    elif not outcomes:
        doc["reason"], doc["detail"] = "empty_text", "the transcript has no words to time"
    return doc


def align_job(job_id: uuid.UUID, token: str) -> str:
    """Time the job's transcript and store the result under `token`; its status, or `superseded`."""
    data = read_for_alignment(job_id, token)
    if data is None:
        return SUPERSEDED
    tmap = audio.TimeMap.from_json(data.time_map)
    try:
        outcomes = align_chunks(data, tmap)
        doc = alignment_document(data, outcomes, tmap)
    except Exception as exc:  # a bug must not leave the transcript pending forever
        log.exception("alignment of job %s failed unexpectedly", job_id)
        doc = {
            "status": AlignmentStatus.FAILED.value,
            "timestamps": data.timestamps.value,
            "reason": "internal_error",
            "detail": type(exc).__name__,
            "segments": [],
            "words": [],
        }
    if not save_alignment(job_id, token, doc):
        return SUPERSEDED
    log.info("job %s aligned: %s", job_id, doc["status"], extra={"job_id": str(job_id)})
    return str(doc["status"])
