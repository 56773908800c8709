"""C1: billed seconds ÷ submitted seconds on voicemails with typical silence, and what trimming costs in WER.

Target: ≤ 0.7, with the local engine's WER on what voxq sends no worse than +1 point vs the untrimmed file.
Corpus: generated at run time by bench._voicemails (espeak-ng, `apt-get install -y espeak-ng`; nothing
downloaded, nothing committed): `VOXQ_BENCH_C1_VOICEMAILS` voicemails (default 20) for each seed of
`VOXQ_BENCH_C1_SEEDS` (default "1,2"), 8 voices at 140-185 words/min, 2-4 sentences with names and
numbers, a 0.3-2.5 s lead-in, a 2-9 s tail, 0.2-2.2 s pauses between sentences, room tone throughout.
- billed: the files go through the real pipeline (embedded stack, one worker, fake provider with OpenAI's
  billing: audio tokens = ceil(10 x seconds sent)); billed = sum of jobs.billed_seconds, submitted = sum of
  the files' durations;
- WER: the local engine (`LocalProvider.transcribe_sync`, Whisper base int8, beam 5, its Silero VAD on)
  on the untrimmed file vs on exactly what the pipeline sends (worker.audio.prepare_audio's FLAC chunks),
  against the spoken text, normalised as the tests do (tests/speech.py: case, punctuation, numbers);
  WER = total word edits ÷ total reference words. Twice: with the language detected (a batch without
  `language`) and with `language="en"` (a batch that sets it). Whisper's language detection on synthetic
  voices sometimes picks another language for a whole file (every word wrong), on either side, by a coin
  flip that any small change of the audio can turn: the `en` figure measures the trim without those.
- uncertainty: the difference's 95% interval from a paired bootstrap over files (4,000 resamples).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import host_facts
from bench._harness import BenchStack, accounting, env_int, publish, verdict, wait_ready
from bench._voicemails import Voicemail, corpus

SECTION = "c1_silence"
BOOTSTRAP = 4000


@dataclass
class Scored:
    """One voicemail's word counts: reference words and edits untrimmed / as sent, per language mode."""

    vm: Voicemail
    words: int
    edits: dict[str, tuple[int, int]]


def seeds() -> list[int]:
    """The corpus seeds of this run."""
    return [int(s) for s in os.environ.get("VOXQ_BENCH_C1_SEEDS", "1,2").split(",") if s.strip()]


def edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) after the tests' normaliser."""
    import jiwer

    from tests.speech import normalise

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not hyp:
        return len(ref.split()), len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def transcribe(provider: Any, flacs: list[bytes], language: str | None) -> str:
    """The local engine's text for these FLAC pieces, joined."""
    from core.providers.base import TranscriptionRequest

    out = []
    for i, data in enumerate(flacs):
        request = TranscriptionRequest(
            audio=data,
            filename=f"p{i}.flac",
            content_type="audio/flac",
            model="local",
            audio_seconds=0.0,
            language=language,
        )
        out.append(provider.transcribe_sync(request).text)
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


def paired_interval(scored: list[Scored], mode: str) -> tuple[float, float, float]:
    """WER difference (as sent - untrimmed, points) and its 95% paired-bootstrap interval over files."""
    diff = np.array([s.edits[mode][1] - s.edits[mode][0] for s in scored], dtype=np.float64)
    words = np.array([s.words for s in scored], dtype=np.float64)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(scored), (BOOTSTRAP, len(scored)))
    boot = 100 * diff[picks].sum(axis=1) / words[picks].sum(axis=1)
    return (
        100 * diff.sum() / words.sum(),
        float(np.percentile(boot, 2.5)),
        float(np.percentile(boot, 97.5)),
    )


def score(files: list[Voicemail], flacs: list[bytes], tmp: Path) -> list[Scored]:
    """Transcribe every file untrimmed and as sent, with language detected and with `en`."""
    from worker.local_engine import LocalProvider

    provider = LocalProvider()
    provider.load()
    out = []
    for vm, data in zip(files, flacs, strict=True):
        pieces = sent_pieces(data, tmp)
        result: dict[str, tuple[int, int]] = {}
        words = 0
        for mode, language in (("auto", None), ("en", "en")):
            full, words = edits(vm.text, transcribe(provider, [data], language))
            trimmed, _ = edits(vm.text, transcribe(provider, pieces, language))
            result[mode] = (full, trimmed)
        out.append(Scored(vm=vm, words=words, edits=result))
        print(f"{vm.name}: {words} words, edits {result}", flush=True)
    return out


def main() -> None:
    """Measure and write the `c1_silence` section of docs/benchmarks.md."""
    facts = host_facts("faster-whisper", "ctranslate2", "av", "numpy")
    t0 = time.perf_counter()
    per_seed = env_int("VOXQ_BENCH_C1_VOICEMAILS", 20)
    files = [vm for seed in seeds() for vm in corpus(per_seed, seed)]
    flacs = [vm.flac() for vm in files]
    stack = BenchStack().start()
    try:
        job_ids = stack.jobs(flacs)
        with stack.worker(
            queues="ingest,transcribe.high,transcribe,transcribe.low", concurrency=2, name="c1"
        ):
            wait_ready(stack, "c1")
            stack.submit(job_ids)
            stack.wait_done(len(job_ids), timeout=900)
        billed = float(stack.count("SELECT sum(billed_seconds) FROM jobs"))
        submitted = float(stack.count("SELECT sum(duration_seconds) FROM jobs"))
        speech = float(stack.count("SELECT sum(speech_seconds) FROM jobs"))
        acct = accounting(stack)
        statuses = stack.status_counts()
        scored = score(files, flacs, stack.dir / "c1.flac")
    finally:
        stack.stop()
    ratio = billed / submitted
    total_words = sum(s.words for s in scored)
    rows: dict[str, dict[str, float]] = {}
    for mode in ("auto", "en"):
        full = sum(s.edits[mode][0] for s in scored)
        trimmed = sum(s.edits[mode][1] for s in scored)
        diff, lo, hi = paired_interval(scored, mode)
        rows[mode] = {
            "full": 100 * full / total_words,
            "trim": 100 * trimmed / total_words,
            "diff": diff,
            "lo": lo,
            "hi": hi,
            "lost": sum(1 for s in scored if s.edits[mode][0] >= 0.8 * s.words),
            "lost_trim": sum(1 for s in scored if s.edits[mode][1] >= 0.8 * s.words),
        }
    ok_en = ratio <= 0.7 and rows["en"]["diff"] <= 1.0
    ok_auto = ratio <= 0.7 and rows["auto"]["diff"] <= 1.0
    changed = [s for s in scored if any(a != b for a, b in s.edits.values())]
    changed.sort(key=lambda s: -max(abs(b - a) for a, b in s.edits.values()))
    table = [
        f"| `{s.vm.name}` | {s.vm.voice} | {s.vm.speed} | {s.vm.lead:.1f} / {s.vm.tail:.1f} | {s.words} "
        f"| {s.edits['auto'][0]} → {s.edits['auto'][1]} | {s.edits['en'][0]} → {s.edits['en'][1]} |"
        for s in changed[:15]
    ]
    mode_rows = [
        f"| {label} | {rows[m]['full']:.2f}% | {rows[m]['trim']:.2f}% | {rows[m]['diff']:+.2f} "
        f"[{rows[m]['lo']:+.2f}, {rows[m]['hi']:+.2f}] | {rows[m]['lost']:.0f} / {rows[m]['lost_trim']:.0f} |"
        for m, label in (("auto", "language detected"), ("en", "language `en`"))
    ]
    publish(
        SECTION,
        [
            "## C1 billed vs submitted seconds with typical voicemail silence (`bench/c1_silence.py`)",
            "",
            f"{len(files)} generated voicemails ({per_seed} for each corpus seed {seeds()}, "
            "bench/_voicemails.py: espeak-ng, 8 voices, 140-185 words/min, 0.3-2.5 s lead-in, 2-9 s tail, "
            "0.2-2.2 s pauses between sentences, room tone throughout), "
            f"{total_words} reference words; fake provider billing.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| submitted / speech kept / billed seconds | {submitted:.1f} / {speech:.1f} / {billed:.1f} |",
            f"| billed ÷ submitted (target ≤ 0.70) | {ratio:.3f} |",
            f"| verdict, language `en` (trim effect alone) | {verdict(ok_en)} |",
            f"| verdict, language detected | {verdict(ok_auto)} |",
            "",
            "Local-engine WER, untrimmed file vs what voxq sends (target: ≤ +1 point); difference with its "
            "95% paired-bootstrap interval over files; files lost whole (≥ 80% of words wrong: Whisper "
            "detected another language or decoded nothing), untrimmed / as sent:",
            "",
            "| language | WER untrimmed | WER as sent | difference, points [95% interval] | files lost |",
            "|---|---|---|---|---|",
            *mode_rows,
            "",
            f"Files whose edits differ ({len(changed)} of {len(files)}; largest first, at most 15):",
            "",
            "| file | voice | words/min | lead / tail s | words | edits detected: untrimmed → sent "
            "| edits `en`: untrimmed → sent |",
            "|---|---|---|---|---|---|---|",
            *table,
            "",
            f"- statuses: {statuses}; rows: {acct}",
            "",
        ],
        facts,
        t0,
    )


if __name__ == "__main__":
    main()
