"""Method (b): transcribe locally with word timestamps, then match the hosted words to the local ones.

The local model's words carry times but may be wrong; the hosted words are right but carry no times.
Both go through `normalise.canonical_tokens` (case, punctuation, numbers digit by digit) and are aligned
token by token with the fewest edits (`align_tokens`: Levenshtein over whole sequences, a numpy row at a
time). A global alignment, not difflib's longest-block-first matching: with a repeated phrase (a podcast's
"thanks for listening") difflib can match the wrong occurrence and leave minutes of words unmatched between,
which happened on this benchmark's corpus. Then (`match_words`, pure):
- a hosted token paired with an equal local token gives its word that local word's times;
- a hosted token paired with a different one (the models heard different words there: a misheard name)
  gives its word that local word's times too, as a weaker vouch used only when the word has no equal one;
- hosted words with no local counterpart (a word the local model missed) are interpolated between their
  timed neighbours; local words with no hosted counterpart (fillers) are ignored.
Edges are then snapped to the energy VAD's speech and made monotonic, as in method (a).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from worker.alignment.inputs import align_input
from worker.alignment.normalise import canonical_tokens
from worker.alignment.speech import SAMPLE_RATE, Audio, as_float32
from worker.alignment.timing import cap_durations, interpolate, monotonic, snap_to_speech
from worker.alignment.types import Aligned, AlignmentFailed, AlignmentResult, FailureReason, Word

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

METHOD = "local_words"
MIN_MATCHED = 0.3  # below this share of hosted tokens matched, the texts are not about the same audio
MAX_CELLS = 25_000_000  # the token grid's cells (4 bytes each): a 600 s chunk needs about 9 million


class TooLong(ValueError):
    """Raised when two token lists are too long to align in one grid."""


@dataclass(frozen=True)
class WordMatch:
    """Times for the hosted words that the local words vouch for, and how much matched."""

    known: dict[int, tuple[float, float]]
    matched_tokens: int
    hosted_tokens: int

    @property
    def matched_share(self) -> float:
        """Share of the hosted tokens found equal in the local words."""
        return self.matched_tokens / self.hosted_tokens if self.hosted_tokens else 0.0


_SUBSTITUTE, _SIMILAR, _GAP = 10, 6, 10  # edit costs: a swap of words with the same first letter is cheaper


def align_tokens(a: list[str], b: list[str]) -> list[tuple[int | None, int | None]]:
    """The fewest-edits alignment of two token lists: `(i, j)` paired, `(i, None)` and `(None, j)` not.

    Levenshtein distance (a swap costs as much as a gap, a swap of two words with the same first letter a
    little less, so "maria" pairs with "mariah" rather than with its neighbour), filled a row at a time
    with numpy (the row's chain of insertions is a running minimum), then traced back from the end.
    """
    vocab: dict[str, int] = {}
    av = np.array([vocab.setdefault(t, len(vocab)) for t in a], dtype=np.int64)
    bv = np.array([vocab.setdefault(t, len(vocab)) for t in b], dtype=np.int64)
    af = np.array([ord(t[0]) if t else 0 for t in a], dtype=np.int64)
    bf = np.array([ord(t[0]) if t else 0 for t in b], dtype=np.int64)
    n, m = len(av), len(bv)
    if (n + 1) * (m + 1) > MAX_CELLS:
        raise TooLong(f"{n} x {m} tokens is more than one chunk's alignment grid holds")
    cost = np.empty((n + 1, m + 1), dtype=np.int32)
    steps = np.arange(m + 1, dtype=np.int32) * _GAP
    cost[0] = steps

    def swap(i: int) -> np.ndarray[tuple[int], np.dtype[np.int32]]:
        return np.where(bv == av[i], 0, np.where(bf == af[i], _SIMILAR, _SUBSTITUTE)).astype(np.int32)

    for i in range(1, n + 1):
        prev = cost[i - 1]
        row = np.empty(m + 1, dtype=np.int32)
        row[0] = i * _GAP
        row[1:] = np.minimum(prev[:-1] + swap(i - 1), prev[1:] + _GAP)
        # Insertions: row[j] = min over k <= j of row[k] + (j - k) gaps.
        cost[i] = np.minimum.accumulate(row - steps) + steps
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        here = cost[i, j]
        if i > 0 and j > 0:
            same, similar = av[i - 1] == bv[j - 1], af[i - 1] == bf[j - 1]
            diagonal = cost[i - 1, j - 1] + (0 if same else _SIMILAR if similar else _SUBSTITUTE)
        if i > 0 and j > 0 and here == diagonal:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and here == cost[i - 1, j] + _GAP:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    pairs.reverse()
    return pairs


def match_words(hosted: list[str], local: list[Word]) -> WordMatch:
    """Times of hosted words from the local words they line up with (see the module doc); pure."""
    h_tokens = canonical_tokens(hosted)
    l_tokens = canonical_tokens([w.word for w in local])
    equal: dict[int, tuple[float, float]] = {}
    similar: dict[int, tuple[float, float]] = {}
    matched = 0
    for hi, lj in align_tokens([t.text for t in h_tokens], [t.text for t in l_tokens]):
        if hi is None or lj is None:
            continue
        same = h_tokens[hi].text == l_tokens[lj].text
        matched += same
        spans = equal if same else similar
        word, heard = h_tokens[hi].word, local[l_tokens[lj].word]
        old = spans.get(word)
        spans[word] = (heard.start, heard.end) if old is None else (old[0], max(old[1], heard.end))
    return WordMatch(known={**similar, **equal}, matched_tokens=matched, hosted_tokens=len(h_tokens))


def local_words(model: WhisperModel, samples: Audio, *, language: str, beam_size: int) -> list[Word]:
    """The local model's own words with times (faster-whisper, its Silero VAD on)."""
    segments, _ = model.transcribe(
        as_float32(samples),
        language=language,
        beam_size=beam_size,
        word_timestamps=True,
        vad_filter=True,
        condition_on_previous_text=False,
    )  # the temperature fallback stays: without it, base looped on a noisy episode (a 22 s error)
    return [Word(w.word.strip(), float(w.start), float(w.end)) for seg in segments for w in (seg.words or [])]


class TranscriptAligner:
    """Aligns hosted text to a chunk's audio through a local transcription with word timestamps."""

    method = METHOD

    def __init__(self, model: WhisperModel, *, language: str = "en", beam_size: int = 1) -> None:
        self._model = model
        self._language = language
        self._beam_size = beam_size

    def align(self, audio: Audio, text: str) -> AlignmentResult:
        """Word times for `text` on `audio` (16 kHz mono), in the audio's time; failure as a value."""
        given = align_input(audio, text, METHOD)
        if isinstance(given, AlignmentFailed):
            return given
        words, samples, regions = given.words, given.samples, given.regions
        started = time.process_time()
        try:
            heard = local_words(self._model, samples, language=self._language, beam_size=self._beam_size)
        except Exception as exc:  # CTranslate2/PyAV errors of many types
            return AlignmentFailed(FailureReason.MODEL_ERROR, f"{type(exc).__name__}: {exc}"[:300], METHOD)
        try:
            match = match_words(words, heard)
        except TooLong as exc:
            return AlignmentFailed(FailureReason.TOO_LONG, str(exc), METHOD)
        if match.matched_share < MIN_MATCHED:
            return AlignmentFailed(
                FailureReason.TEXT_MISMATCH,
                f"only {match.matched_share:.0%} of the text matched what the local model heard",
                METHOD,
            )
        duration = len(samples) / SAMPLE_RATE
        timed = interpolate(words, match.known, start=regions.spans[0][0], end=regions.spans[-1][1])
        timed = monotonic(snap_to_speech(cap_durations(timed), regions), duration)
        return Aligned(
            words=tuple(timed),
            method=METHOD,
            stats={
                "local_words": len(heard),
                "matched_share": round(match.matched_share, 3),
                "interpolated": len(words) - len(match.known),
                "cpu_seconds": round(time.process_time() - started, 3),
            },
        )
