"""Hosted words as written, and the canonical tokens used to compare them with what a local model heard.

`split_words` is the one definition of "a hosted word": a whitespace-separated piece of the hosted text,
kept exactly (punctuation and case included). Every alignment returns one timed word per piece.

`canonical_tokens` turns a word sequence into lowercase comparison tokens, each remembering the word it
came from, so that spellings of the same speech compare equal:
- case and punctuation go ("Hello," == "hello"); hyphens and slashes split words ("forty-two");
- contractions expand ("it's" == "it is"), a few spellings fold ("ok" == "okay", "mr" == "mister");
- `$`, `%` and `&` become words ("$240" == "240 dollars");
- every number becomes one token per digit, whether written with digits or words: "42", "forty two" and
  "forty-two" are `4 2`; "555-0134", "5 5 5, 0 1 3 4" and "five five five zero one three four" are the
  same seven digits; "nineteen ninety" and "1990" are `1 9 9 0`. Per-digit tokens make a number's grouping
  irrelevant, which is where hosted and local transcripts differ most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Number words and their values (tests/speech.py's WER normaliser reads them too).
NUMBER_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}
NUMBER_TEENS = {
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
}
NUMBER_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NUMBER_WORDS = {**NUMBER_UNITS, **NUMBER_TEENS, **NUMBER_TENS}
_CONTRACTIONS = {
    "i'm": "i am",
    "it's": "it is",
    "that's": "that is",
    "there's": "there is",
    "what's": "what is",
    "he's": "he is",
    "she's": "she is",
    "we're": "we are",
    "you're": "you are",
    "they're": "they are",
    "let's": "let us",
    "i'll": "i will",
    "we'll": "we will",
    "you'll": "you will",
    "it'll": "it will",
    "can't": "can not",
    "don't": "do not",
    "doesn't": "does not",
    "didn't": "did not",
    "isn't": "is not",
    "aren't": "are not",
    "wasn't": "was not",
    "won't": "will not",
    "wouldn't": "would not",
    "couldn't": "could not",
    "shouldn't": "should not",
    "haven't": "have not",
    "i've": "i have",
    "we've": "we have",
    "you've": "you have",
    "i'd": "i would",
    "we'd": "we would",
    "you'd": "you would",
}
_SPELLINGS = {"ok": "okay", "mr": "mister", "mrs": "missus", "dr": "doctor", "cannot": "can not"}
_SYMBOLS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at "}
_ORDINAL = re.compile(r"^(\d+)(st|nd|rd|th)$")
_CURRENCY = re.compile(r"^\$(\d[\d,]*(?:\.\d+)?)$")
_NUMBER = re.compile(r"^\d[\d,]*(?:\.\d+)?$")
_NOT_WORD = re.compile(r"[^a-z0-9'.$,]+")
DIGIT_WEIGHT = 4  # letters a spoken digit takes, roughly ("five", "zero"): for speaking-time estimates


@dataclass(frozen=True)
class Token:
    """A canonical comparison token and the index of the word it came from."""

    text: str
    word: int


def split_words(text: str) -> list[str]:
    """The hosted words: whitespace-separated pieces of `text`, exactly as written."""
    return text.split()


def _digit_tokens(number: str) -> list[str]:
    """'1,000.5' -> 1 0 0 0 point 5."""
    whole, _, fraction = number.replace(",", "").partition(".")
    out = list(whole)
    if fraction:
        out.append("point")
        out.extend(fraction)
    return out


def _pieces(word: str) -> list[str]:
    """One written word as plain lowercase pieces: symbols spelled, contractions expanded, digits split."""
    text = word.lower().replace("\u2019", "'").replace("\u2018", "'")
    for symbol, spelled in _SYMBOLS.items():
        text = text.replace(symbol, spelled)
    out: list[str] = []
    for raw in re.split(r"[\s\-\u2013\u2014/]+", text):
        piece = _NOT_WORD.sub("", raw).strip("'.,")
        if not piece:
            continue
        if match := _CURRENCY.match(piece):
            out.extend([*_digit_tokens(match.group(1)), "dollars"])
        elif match := _ORDINAL.match(piece):
            out.extend(_digit_tokens(match.group(1)))
        elif _NUMBER.match(piece):
            out.extend(_digit_tokens(piece))
        else:
            piece = piece.replace(".", "").replace(",", "").replace("$", "")
            expanded = _CONTRACTIONS.get(piece)
            if expanded is None:
                piece = piece.replace("'", "")
                expanded = _SPELLINGS.get(piece, piece)
            out.extend(p for p in expanded.split() if p)
    return out


def _number_run(tokens: list[str], i: int) -> tuple[int, int] | None:
    """The value and end index of the spelled number starting at `tokens[i]`, or None.

    One number per run of words that a person reads as one: "twenty five" is 25, "five five" is two
    numbers, "nineteen ninety" is 19 then 90 (both give the same digits either way).
    """
    if tokens[i] not in _NUMBER_WORDS:
        return None
    total = current = 0
    last = ""
    j = i
    while j < len(tokens):
        tok = tokens[j]
        if tok in NUMBER_UNITS and last not in ("unit", "teen"):
            current += NUMBER_UNITS[tok]
            last = "unit"
        elif (tok in NUMBER_TEENS or tok in NUMBER_TENS) and last not in ("unit", "teen", "ten"):
            current += _NUMBER_WORDS[tok]
            last = "teen" if tok in NUMBER_TEENS else "ten"
        elif tok == "hundred" and last in ("unit", "teen", "ten"):
            current *= 100
            last = "hundred"
        elif tok in ("thousand", "million") and last in ("unit", "teen", "ten", "hundred"):
            total += current * _SCALES[tok]
            current = 0
            last = "scale"
        elif tok == "and" and last in ("hundred", "scale") and j + 1 < len(tokens):
            if tokens[j + 1] not in _NUMBER_WORDS:
                break
        else:
            break
        j += 1
    return total + current, j


def canonical_tokens(words: list[str]) -> list[Token]:
    """Comparison tokens of a word sequence, each tagged with its word's index (see the module doc)."""
    flat: list[str] = []
    owners: list[int] = []
    for index, word in enumerate(words):
        for piece in _pieces(word):
            flat.append(piece)
            owners.append(index)
    out: list[Token] = []
    i = 0
    while i < len(flat):
        run = _number_run(flat, i)
        if run is None:
            out.append(Token(flat[i], owners[i]))
            i += 1
            continue
        value, j = run
        digits = list(str(value))
        span = owners[i:j]
        for k, digit in enumerate(digits):
            # Spread a spelled number's digits over the words that spelled it, in order.
            out.append(Token(digit, span[min(len(span) - 1, k * len(span) // len(digits))]))
        i = j
    return out


def spoken_weight(word: str) -> int:
    """Roughly how long a word takes to say, in letters (digits count as spelled-out words)."""
    return 1 + sum(DIGIT_WEIGHT if p.isdigit() else len(p) for p in _pieces(word))
