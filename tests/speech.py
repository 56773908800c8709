"""Speech fixtures and word error rate: the committed espeak-ng clips, their references, a text normaliser.

The normaliser makes "555-0134", "5 5 5, 0 1 3 4" and "five five five zero one three four" equal, and
"$240" equal to "240 dollars", so WER measures recognition, not formatting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jiwer

from worker.alignment.normalise import NUMBER_TEENS, NUMBER_TENS, NUMBER_UNITS

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "speech"

_CONTRACTIONS = {
    "i'm": "i am",
    "it's": "it is",
    "that's": "that is",
    "we're": "we are",
    "you're": "you are",
    "they're": "they are",
    "let's": "let us",
    "i'll": "i will",
    "we'll": "we will",
    "you'll": "you will",
    "can't": "cannot",
    "don't": "do not",
    "won't": "will not",
    "i've": "i have",
    "we've": "we have",
}
_NUMBER_WORDS = {**NUMBER_UNITS, **NUMBER_TEENS, **NUMBER_TENS}


@dataclass(frozen=True)
class SpeechFixture:
    """One committed clip and the exact text espeak-ng spoke."""

    path: Path
    text: str
    seconds: float
    leading_silence_s: float
    trailing_silence_s: float


def load_fixtures() -> list[SpeechFixture]:
    """The committed speech fixtures, in file order."""
    entries = json.loads((FIXTURES_DIR / "references.json").read_text())
    return [
        SpeechFixture(
            path=FIXTURES_DIR / e["file"],
            text=e["text"],
            seconds=e["seconds"],
            leading_silence_s=e["leading_silence_s"],
            trailing_silence_s=e["trailing_silence_s"],
        )
        for e in entries
    ]


def _words_to_digits(tokens: list[str]) -> list[str]:
    """Turn runs of number words into digit strings ("four thousand five hundred and twelve" -> "4512")."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in _NUMBER_WORDS:
            out.append(tokens[i])
            i += 1
            continue
        total = current = 0
        last = ""
        j = i
        while j < len(tokens):
            tok = tokens[j]
            if tok in NUMBER_UNITS:
                # "five five" is two numbers (digits read one by one), "twenty five" is one.
                if last in ("unit", "teen"):
                    break
                current += NUMBER_UNITS[tok]
                last = "unit"
            elif tok in NUMBER_TEENS or tok in NUMBER_TENS:
                if last in ("unit", "teen", "ten"):
                    break
                current += _NUMBER_WORDS[tok]
                last = "teen" if tok in NUMBER_TEENS else "ten"
            elif tok == "hundred" and last in ("unit", "teen", "ten"):
                current *= 100
                last = "hundred"
            elif tok == "thousand" and last in ("unit", "teen", "ten", "hundred"):
                total += current * 1000
                current = 0
                last = "thousand"
            elif (
                tok == "and"
                and last in ("hundred", "thousand")
                and j + 1 < len(tokens)
                and tokens[j + 1] in _NUMBER_WORDS
            ):
                pass
            else:
                break
            j += 1
        out.append(str(total + current))
        i = j
    return out


def normalise(text: str) -> str:
    """Lowercase words without punctuation, contractions expanded, numbers as merged digit strings."""
    text = text.lower()
    text = re.sub(r"\$(\d[\d,]*)", r"\1 dollars", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"\b([ap])\.\s?m\.?", r"\1m", text)  # p.m. -> pm
    text = text.replace("\u2019", "'")
    tokens = re.sub(r"[^a-z0-9' ]+", " ", text).split()
    expanded: list[str] = []
    for tok in tokens:
        expanded.extend(_CONTRACTIONS.get(tok, tok).split())
    tokens = _words_to_digits([t.strip("'") for t in expanded if t.strip("'")])
    # Adjacent digit groups are one number however they were grouped ("555 0134" == "5550134").
    merged: list[str] = []
    for tok in tokens:
        if tok.isdigit() and merged and merged[-1].isdigit():
            merged[-1] += tok
        else:
            merged.append(tok)
    return " ".join(merged)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER of hypotheses against references after `normalise` on both sides."""
    return float(jiwer.wer([normalise(r) for r in references], [normalise(h) or "" for h in hypotheses]))
