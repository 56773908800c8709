"""Method (a): the hosted text forced onto the audio by Whisper's own alignment (CTranslate2 `Whisper.align`).

This is what faster-whisper does for its word timestamps (`find_alignment`): the decoder reads the text
tokens against the encoded audio, its alignment heads' cross-attention gives a monotonic token-to-frame
path (dynamic time warping), and a word starts at the frame where its first token starts. The difference
here is that the tokens are the hosted text's, not the model's own transcription, so nothing is decoded.

Whisper sees 30 s at a time, so the text has to be split across 30 s windows:
1. Windows are cut in pauses (the energy VAD's gaps) so that no word straddles a cut: the latest pause of
   at least `MIN_CUT_PAUSE` s in the window's last half, else the longest one there, else a hard cut.
2. The words for a window are estimated from its speech time (speaking rate = the text's spoken length
   over the chunk's speech time), with an overshoot margin: more words than can be in the window.
3. After aligning, the words the model could not place squash into the window's last frames; a word
   counts as placed when it starts before the window's last speech ends. The unplaced ones open the next
   window. If every candidate was placed while text remains (the estimate was short), the window is
   aligned again with a larger margin on the same encoder output (the encoder is the expensive part).
Word edges are then snapped to speech (see `timing`) and made monotonic.

Cost: the encoder is ~3/4 of the CPU (one 30 s window each; measured in bench/align_words.py), the
alignment passes the rest (their decoder reads every candidate token, hence the modest overshoot). The last
window of a chunk is encoded at its own length instead of padded to 30 s (CTranslate2's encoder takes it;
on the benchmark corpus the errors were the same), so a 10 s voicemail costs a third of a window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.alignment.inputs import align_input
from worker.alignment.normalise import spoken_weight
from worker.alignment.speech import SAMPLE_RATE, Audio, SpeechRegions
from worker.alignment.timing import cap_durations, interpolate, monotonic, snap_to_speech
from worker.alignment.types import Aligned, AlignmentFailed, AlignmentResult, FailureReason, Word

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

METHOD = "whisper_align"
WINDOW_SECONDS = 30.0
MIN_WINDOW_SECONDS = 15.0
MIN_CUT_PAUSE = 0.25
OVERSHOOT = 1.3  # candidate words = estimate x this + OVERSHOOT_WORDS
OVERSHOOT_WORDS = 6
MAX_TOKENS = 400  # Whisper's decoder holds 448 positions, the start sequence included
RETRIES = 2
PLACED_MARGIN = 0.08  # a word starting later than (last speech end - this) was squashed, not placed
_PUNCTUATION = "\"'\u201c\u201d\u2018\u2019«»()[]{}¿¡.,;:!?…-\u2013\u2014/"


@dataclass(frozen=True)
class _Piece:
    """A hosted word's tokens: the first `core` are the word itself, the rest its trailing punctuation."""

    tokens: list[int]
    core: int


def plan_windows(
    regions: SpeechRegions,
    duration: float,
    *,
    window: float = WINDOW_SECONDS,
    min_window: float = MIN_WINDOW_SECONDS,
) -> list[tuple[float, float]]:
    """Window bounds `[(t0, t1), ...]` covering `[0, duration]`, each ≤ `window` s, cut in pauses."""
    bounds: list[tuple[float, float]] = []
    t0 = 0.0
    while duration - t0 > window:
        gaps = regions.pauses(t0 + min_window, t0 + window)
        long_gaps = [g for g in gaps if g[1] - g[0] >= MIN_CUT_PAUSE]
        if long_gaps:
            gap = long_gaps[-1]
        elif gaps:
            gap = max(gaps, key=lambda g: g[1] - g[0])
        else:
            gap = (t0 + window, t0 + window)
        cut = round((gap[0] + gap[1]) / 2, 3)
        bounds.append((t0, cut))
        t0 = cut
    bounds.append((t0, duration))
    return bounds


class WhisperAligner:
    """Aligns hosted text to a chunk's audio with a loaded faster-whisper model's alignment heads."""

    method = METHOD

    def __init__(self, model: WhisperModel, *, language: str = "en", trim_last: bool = True) -> None:
        from faster_whisper.tokenizer import Tokenizer

        self._model = model
        self._trim_last = trim_last
        multilingual = bool(model.model.is_multilingual)
        self._tokenizer = Tokenizer(
            model.hf_tokenizer, multilingual, task="transcribe", language=language if multilingual else None
        )
        self._frames_per_second = int(model.frames_per_second)
        self._tokens_per_second = int(model.tokens_per_second)
        self._window_frames = int(model.feature_extractor.nb_max_frames)

    def align(self, audio: Audio, text: str) -> AlignmentResult:
        """Word times for `text` on `audio` (16 kHz mono), in the audio's time; failure as a value."""
        given = align_input(audio, text, METHOD)
        if isinstance(given, AlignmentFailed):
            return given
        words, samples, regions = given.words, given.samples, given.regions
        try:
            return self._align(words, samples, regions)
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for bad shapes and memory
            return AlignmentFailed(FailureReason.MODEL_ERROR, f"{type(exc).__name__}: {exc}"[:300], METHOD)

    def _pieces(self, words: list[str]) -> list[_Piece]:
        pieces = []
        for word in words:
            core = word.strip(_PUNCTUATION)
            if not core:
                pieces.append(_Piece([], 0))
                continue
            tokens = self._tokenizer.encode(" " + core)
            trail = word[len(word.rstrip(_PUNCTUATION)) :]
            pieces.append(_Piece(tokens + (self._tokenizer.encode(trail) if trail else []), len(tokens)))
        return pieces

    def _align(self, words: list[str], samples: np.ndarray[Any, Any], regions: SpeechRegions) -> Aligned:
        started = time.process_time()
        duration = len(samples) / SAMPLE_RATE
        features = self._model.feature_extractor(samples)
        pieces = self._pieces(words)
        weights = [spoken_weight(w) for w in words]
        rate = sum(weights) / max(regions.speech_seconds, 1e-3)  # spoken letters per second of speech
        windows = plan_windows(regions, duration)
        known: dict[int, tuple[float, float]] = {}
        cursor = 0
        retries = 0
        encode_cpu = align_cpu = 0.0
        for index, (t0, t1) in enumerate(windows):
            if cursor >= len(words):
                break
            last = index == len(windows) - 1
            speech_end = regions.last_speech_end(t0, t1)
            if speech_end is None:
                continue
            mark = time.process_time()
            encoded, frames = self._encode(features, t0, t1, pad=not (last and self._trim_last))
            encode_cpu += time.process_time() - mark
            mark = time.process_time()
            expected = rate * regions.speech_between(t0, t1)
            margin = OVERSHOOT
            for attempt in range(RETRIES + 1):
                end = len(words) if last else self._take(weights, cursor, expected * margin)
                placed = self._align_window(encoded, frames, pieces, cursor, end, t0)
                accepted = {
                    k: span for k, span in placed.items() if last or span[0] < speech_end - PLACED_MARGIN
                }
                tokenised = [k for k in range(cursor, end) if pieces[k].tokens]
                # Every candidate placed while text remains: the estimate was short, not the text.
                short = not last and end < len(words) and bool(tokenised) and tokenised[-1] in accepted
                if not short or attempt == RETRIES:
                    break
                retries += 1
                margin *= 1.6
            align_cpu += time.process_time() - mark
            known.update(accepted)
            cursor = max(accepted, default=cursor - 1) + 1
        timed = interpolate(words, known, start=regions.spans[0][0], end=regions.spans[-1][1])
        timed = monotonic(snap_to_speech(cap_durations(timed), regions), duration)
        return Aligned(
            words=tuple(timed),
            method=METHOD,
            stats={
                "windows": len(windows),
                "retries": retries,
                "placed": len(known),
                "interpolated": len(words) - len(known),
                "cpu_seconds": round(time.process_time() - started, 3),
                "encode_cpu_seconds": round(encode_cpu, 3),
                "align_cpu_seconds": round(align_cpu, 3),
            },
        )

    def _take(self, weights: list[int], cursor: int, budget: float) -> int:
        """End index of the words from `cursor` whose spoken length fits `budget` (plus a few more)."""
        total = 0.0
        end = cursor
        while end < len(weights) and total < budget:
            total += weights[end]
            end += 1
        return min(len(weights), end + OVERSHOOT_WORDS)

    def _encode(self, features: np.ndarray[Any, Any], t0: float, t1: float, *, pad: bool) -> tuple[Any, int]:
        from faster_whisper.audio import pad_or_trim

        f0 = round(t0 * self._frames_per_second)
        f1 = min(round(t1 * self._frames_per_second), features.shape[-1])
        frames = max(2, min(f1 - f0, self._window_frames))
        length = self._window_frames if pad else frames + frames % 2
        window = pad_or_trim(features[:, f0:f1], length)
        return self._model.encode(window), frames

    def _align_window(
        self, encoded: Any, frames: int, pieces: list[_Piece], begin: int, end: int, t0: float
    ) -> dict[int, tuple[float, float]]:
        """Chunk times of words `begin..end` forced onto one encoded window (untokenised words skipped)."""
        tokens: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (word index, first token, end of its core tokens)
        for k in range(begin, end):
            piece = pieces[k]
            if not piece.tokens:
                continue
            if len(tokens) + len(piece.tokens) > MAX_TOKENS:
                break
            spans.append((k, len(tokens), len(tokens) + piece.core))
            tokens.extend(piece.tokens)
        if not tokens:
            return {}
        result = self._model.model.align(
            encoded, self._tokenizer.sot_sequence, [tokens], frames, median_filter_width=7
        )[0]
        text_indices = np.array([pair[0] for pair in result.alignments])
        time_indices = np.array([pair[1] for pair in result.alignments])
        jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
        jump_times = time_indices[jumps] / self._tokens_per_second
        out: dict[int, tuple[float, float]] = {}
        for k, first, core_end in spans:
            if core_end >= len(jump_times):
                break
            out[k] = (t0 + float(jump_times[first]), t0 + float(jump_times[core_end]))
        return out


def align_with_whisper(
    model: WhisperModel, audio: Audio, text: str, *, language: str = "en"
) -> AlignmentResult:
    """One-shot `WhisperAligner(model).align(audio, text)`."""
    return WhisperAligner(model, language=language).align(audio, text)


__all__ = ["METHOD", "WhisperAligner", "Word", "align_with_whisper", "plan_windows"]
