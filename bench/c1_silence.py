"""C1: billed seconds ÷ submitted seconds on voicemails with typical silence, and what trimming costs in WER.

Target: ≤ 0.7, with the local engine's WER on what voxq sends no worse than +1 point vs the untrimmed file.
Files: the spoken voicemails of tests/fixtures/speech (espeak; references.json has their texts), each
padded the way voicemail recordings are: `LEAD` s of room tone before the message and `TAIL` s after it
(the recorder runs on after the caller stops talking), room tone = Gaussian noise at amplitude 0.002.
- billed: the padded files go through the real pipeline (embedded stack, one worker, fake provider with
  OpenAI's billing: audio tokens = ceil(10 x seconds sent)); billed = sum of jobs.billed_seconds,
  submitted = sum of the padded files' durations;
- WER: the local engine (`LocalProvider.transcribe_sync`, Whisper base int8) on the untrimmed padded file
  vs on exactly what the pipeline sends (worker.audio.prepare_audio's FLAC chunks), against the reference
  texts; words lower-cased, punctuation dropped; WER = total word edits ÷ total reference words.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from bench import REPO_ROOT, host_facts
from bench._harness import BenchStack, accounting, publish, verdict, wait_ready

SECTION = "c1_silence"
SPEECH = REPO_ROOT / "tests" / "fixtures" / "speech"
LEAD, TAIL, ROOM_TONE = 1.5, 6.0, 0.002
RATE = 16_000


def padded(path: Path, seed: int) -> bytes:
    """The voicemail with room tone before and after, as 16 kHz mono FLAC."""
    from core.local_engine import decode_audio
    from worker.audio import encode_flac

    speech = decode_audio(path.read_bytes())
    rng = np.random.default_rng(seed)
    lead = rng.normal(0, ROOM_TONE, int(LEAD * RATE))
    tail = rng.normal(0, ROOM_TONE, int(TAIL * RATE))
    samples = np.concatenate([lead, speech, tail])
    return encode_flac((np.clip(samples, -1, 1) * 32767).astype(np.int16))


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def edits(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def transcribe(provider: object, flacs: list[bytes]) -> str:
    """The local engine's text for these FLAC pieces, joined."""
    from core.providers.base import TranscriptionRequest

    out = []
    for i, data in enumerate(flacs):
        request = TranscriptionRequest(
            audio=data, filename=f"p{i}.flac", content_type="audio/flac", model="local", audio_seconds=0.0
        )
        out.append(provider.transcribe_sync(request).text)  # type: ignore[attr-defined]
    return " ".join(out)


def sent_pieces(data: bytes, tmp: Path) -> list[bytes]:
    """What the pipeline would send for this file: its trimmed FLAC chunks."""
    from core.settings import get_settings
    from worker.audio import prepare_audio

    tmp.write_bytes(data)
    settings = get_settings()
    prepared = prepare_audio(
        tmp, max_seconds=settings.max_audio_seconds, max_chunk_seconds=settings.max_chunk_seconds
    )
    try:
        return [chunk.flac for chunk in prepared.iter_chunks()]
    finally:
        prepared.close()


def main() -> None:
    """Measure and write the `c1_silence` section of docs/benchmarks.md."""
    facts = host_facts("faster-whisper", "ctranslate2", "av", "numpy")
    t0 = time.perf_counter()
    refs = json.loads((SPEECH / "references.json").read_text())
    files = [padded(SPEECH / r["file"], i) for i, r in enumerate(refs)]
    stack = BenchStack().start()
    try:
        job_ids = stack.jobs(files)
        with stack.worker(
            queues="ingest,transcribe.high,transcribe,transcribe.low", concurrency=2, name="c1"
        ):
            wait_ready(stack, "c1")
            stack.submit(job_ids)
            stack.wait_done(len(job_ids), timeout=600)
        billed = float(stack.count("SELECT sum(billed_seconds) FROM jobs"))
        submitted = float(stack.count("SELECT sum(duration_seconds) FROM jobs"))
        speech = float(stack.count("SELECT sum(speech_seconds) FROM jobs"))
        acct = accounting(stack)
        statuses = stack.status_counts()
        from core.local_engine import LocalProvider

        provider = LocalProvider()
        provider.load()
        ref_words = hyp_full_edits = hyp_trim_edits = hyp_orig_edits = 0
        rows = []
        for r, data in zip(refs, files, strict=True):
            ref = words(r["text"])
            full = words(transcribe(provider, [data]))
            trimmed = words(transcribe(provider, sent_pieces(data, stack.dir / "c1.flac")))
            original = words(transcribe(provider, [(SPEECH / r["file"]).read_bytes()]))
            e_full, e_trim, e_orig = edits(ref, full), edits(ref, trimmed), edits(ref, original)
            hyp_orig_edits += e_orig
            ref_words += len(ref)
            hyp_full_edits += e_full
            hyp_trim_edits += e_trim
            rows.append(f"| `{r['file']}` | {len(ref)} | {e_orig} | {e_full} | {e_trim} |")
    finally:
        stack.stop()
    ratio = billed / submitted
    wer_full = 100 * hyp_full_edits / ref_words
    wer_trim = 100 * hyp_trim_edits / ref_words
    wer_orig = 100 * hyp_orig_edits / ref_words
    ok = ratio <= 0.7 and wer_trim <= wer_full + 1
    publish(
        SECTION,
        [
            "## C1 billed vs submitted seconds with typical voicemail silence (`bench/c1_silence.py`)",
            "",
            f"{len(refs)} spoken voicemails (tests/fixtures/speech), each padded with {LEAD} s of room tone "
            f"before and {TAIL} s after (noise amplitude {ROOM_TONE}); fake provider billing.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| submitted / speech kept / billed seconds | {submitted:.1f} / {speech:.1f} / {billed:.1f} |",
            f"| billed ÷ submitted (target ≤ 0.70) | {ratio:.3f} |",
            f"| local-engine WER padded untrimmed → as sent (target ≤ +1 point) | {wer_full:.1f}% → "
            f"{wer_trim:.1f}% |",
            f"| local-engine WER of the original recordings (no padding, for scale) | {wer_orig:.1f}% |",
            f"| verdict | {verdict(ok)} |",
            "",
            f"One WER point is {ref_words / 100:.1f} words of {ref_words}: Whisper's decoding of a file "
            "changes with a few hundred ms of context either way; a few words are within noise.",
            "",
            "| file | reference words | edits original | edits padded, untrimmed | edits padded, as sent |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"- statuses: {statuses}; rows: {acct}",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
