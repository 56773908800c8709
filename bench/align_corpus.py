"""The alignment benchmark's corpus: podcast-like espeak-ng episodes whose every sentence start is known.

Made at run time (nothing committed, nothing downloaded): `corpus(seed)` speaks `EPISODES` episodes
with espeak-ng (Debian package `espeak-ng`; `apt-get install -y espeak-ng`), each 1-4 minutes, one or two
speakers (voices from `VOICES`, 150-190 words per minute), sentence by sentence, joined with silences of
known length, so each sentence's true start is the sample where its speech begins. Half of the episodes
get noise: white noise at 12-20 dB SNR or a low rumble with hum at 10-15 dB (seeded numpy noise).

Every sentence is kept in three spellings:
- `spoken`: what espeak-ng says, with fillers ("um,", "you know,") and numbers as words ("forty two");
- `hosted`: what the fake text-only provider returns: the same with fillers dropped and numbers as digits
  ("42"), the small edits a hosted model makes;
- `imperfect` (per episode): the hosted text with 10% of its words changed (half replaced by another
  word, a quarter dropped, a quarter with an extra word after them), seeded.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

RATE = 16_000
EPISODES = 10
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-gb-scotland", "en-us+m3", "en-029", "en-gb+f2"]

_ONES = "zero one two three four five six seven eight nine".split()  # noqa: SIM905
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()  # noqa: SIM905
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()  # noqa: SIM905

_NAMES = ["Maria", "John", "Sarah", "David", "Emily", "Michael", "Linda", "Robert", "Anna", "James", "Kate"]
_TOPICS = [
    "gardening",
    "the local election",
    "electric bikes",
    "sourdough",
    "the budget",
    "chess openings",
    "jazz records",
    "the new library",
    "running shoes",
    "solar panels",
    "city buses",
    "board games",
]
_PLACES = ["Boston", "the old harbour", "the market", "Lisbon", "the university", "the county fair"]
_FILLERS = ["um,", "uh,", "you know,", "well,", "like,"]
_SWAPS = [
    "table",
    "orange",
    "quickly",
    "river",
    "window",
    "seven",
    "purple",
    "engine",
    "basket",
    "music",
    "yellow",
    "garden",
    "pencil",
    "rocket",
    "silver",
    "coffee",
    "mountain",
    "paper",
    "simple",
    "north",
]
_TEMPLATES = [
    "Welcome back to the show, I am {name} and today we talk about {topic}.",
    "We had {n} listeners write in about {topic} last week.",
    "My guest today is {name2}, who spent {n} years working in {place}.",
    "So tell me, how did you first get into {topic}?",
    "It started when I was {small} years old and my uncle took me to {place}.",
    "That sounds like quite a story.",
    "The first thing people get wrong is the price, which is about {n} dollars.",
    "Honestly, I think most of the advice online is simply wrong.",
    "We tested {small} different models over {n} days.",
    "The best one lasted {n} hours on a single charge.",
    "Let us take a short break and come back to that.",
    "A listener called {name2} asked whether {topic} is worth the money.",
    "The short answer is yes, but only if you plan ahead.",
    "In {year} the rules changed and everything became harder.",
    "There were {n} people at the meeting in {place}.",
    "I remember the day we opened, it was raining all morning.",
    "Can you give our listeners one practical tip?",
    "Start small, keep notes, and do not buy everything at once.",
    "Our budget this year is {big} dollars, up from last year.",
    "That is all for today, thanks for listening.",
    "The next episode comes out on {day}.",
    "You can write to us at the address on our website.",
    "Room {small} on the second floor is where we record every week.",
    "It took {n} minutes to get there by bus.",
    "Nobody expected the results to be that clear.",
    "We will put the numbers in the show notes.",
]  # fmt: skip
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("forty two", "three thousand five hundred")."""
    if n < 10:
        return _ONES[n]
    if n < 20:
        return _TEENS[n - 10]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def year_words(year: int) -> str:
    """How a year is read ("nineteen ninety", "two thousand and eight")."""
    if 2000 <= year < 2010:
        return "two thousand and " + _ONES[year - 2000]
    return number_words(year // 100) + " " + number_words(year % 100)


@dataclass(frozen=True)
class Sentence:
    """One sentence of an episode: its spellings and where its speech starts and ends (seconds)."""

    spoken: str
    hosted: str
    voice: str
    start: float
    end: float


@dataclass(frozen=True)
class Episode:
    """One generated episode: 16 kHz mono float32 samples, its sentences and how it was made."""

    name: str
    samples: npt.NDArray[np.float32]
    sentences: list[Sentence]
    imperfect: list[list[str]]  # per sentence, the words of the imperfect text
    noise: str

    @property
    def seconds(self) -> float:
        """Length of the recording."""
        return len(self.samples) / RATE

    def hosted_text(self) -> str:
        """The fake provider's text for the whole episode."""
        return " ".join(s.hosted for s in self.sentences)

    def imperfect_text(self) -> str:
        """The text with 10% of its words changed."""
        return " ".join(" ".join(words) for words in self.imperfect if words)

    def first_word_indices(self, variant: str) -> list[int | None]:
        """Index (in the variant's word list) of each sentence's first word; None if it has no words."""
        lists = [s.hosted.split() for s in self.sentences] if variant == "hosted" else self.imperfect
        out: list[int | None] = []
        index = 0
        for words in lists:
            out.append(index if words else None)
            index += len(words)
        return out


def _fill(template: str, rng: np.random.Generator) -> tuple[str, str]:
    """(spoken, hosted) spellings of one template."""

    def pick(items: list[str]) -> str:
        return items[int(rng.integers(len(items)))]

    n, small, big = int(rng.integers(12, 99)), int(rng.integers(2, 10)), int(rng.integers(1200, 9800))
    year = int(rng.integers(1975, 2009))
    common = {"name": pick(_NAMES), "name2": pick(_NAMES), "topic": pick(_TOPICS), "place": pick(_PLACES),
              "day": pick(_DAYS)}  # fmt: skip
    spoken = template.format(**common, n=number_words(n), small=number_words(small), big=number_words(big),
                             year=year_words(year))  # fmt: skip
    hosted = template.format(**common, n=n, small=small, big=f"{big:,}", year=year)
    words = spoken.split()
    if rng.random() < 0.4 and len(words) > 3:
        at = int(rng.integers(1, len(words) - 1))
        words.insert(at, pick(_FILLERS))
    return " ".join(words), hosted


def _imperfect(words: list[str], rng: np.random.Generator, rate: float = 0.10) -> list[str]:
    """`words` with `rate` of them changed: replaced (1/2), dropped (1/4) or followed by a stray word."""
    out: list[str] = []
    for word in words:
        if rng.random() >= rate:
            out.append(word)
            continue
        roll = rng.random()
        swap = _SWAPS[int(rng.integers(len(_SWAPS)))]
        if roll < 0.5:
            tail = word[len(word.rstrip(".,?!")) :]
            out.append(swap + tail)
        elif roll < 0.75:
            continue
        else:
            out.extend([word, swap])
    return out


def speak(text: str, voice: str, speed: int) -> npt.NDArray[np.float32]:
    """espeak-ng's speech of `text` at 16 kHz, its leading and trailing digital silence removed."""
    from worker.local_engine import decode_audio

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the alignment corpus needs espeak-ng (Debian: apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory(prefix="voxq-align-") as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        samples = decode_audio(wav.read_bytes())
    voiced = np.flatnonzero(np.abs(samples) > 1e-3)
    return samples[voiced[0] : voiced[-1] + 1] if len(voiced) else samples


def _noise(samples: npt.NDArray[np.float64], kind: str, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Noise of `kind` for these samples, scaled to an SNR against their speech power."""
    speech_power = float(np.mean(samples[np.abs(samples) > 1e-3] ** 2))
    if kind == "white":
        noise = rng.normal(0, 1, len(samples))
        snr_db = float(rng.uniform(12, 20))
    else:  # a low rumble (integrated white noise, high-passed a little) and mains hum
        noise = np.cumsum(rng.normal(0, 1, len(samples)))
        noise -= np.convolve(noise, np.ones(801) / 801, mode="same")
        noise += 3 * np.std(noise) * np.sin(2 * np.pi * 50 * np.arange(len(samples)) / RATE)
        snr_db = float(rng.uniform(10, 15))
    noise *= np.sqrt(speech_power / 10 ** (snr_db / 10) / float(np.mean(noise**2)))
    return noise


def make_episode(index: int, seed: int, minutes: float) -> Episode:
    """Episode number `index` of the corpus with this seed, about `minutes` long."""
    rng = np.random.default_rng([seed, index])
    voices = [str(v) for v in rng.choice(VOICES, size=int(rng.integers(1, 3)), replace=False)]
    speeds = [int(rng.integers(150, 191)) for _ in voices]
    parts: list[npt.NDArray[np.float64]] = [np.zeros(int(rng.uniform(0.5, 2.0) * RATE))]
    at = len(parts[0])
    sentences: list[Sentence] = []
    speaker, left_in_turn = 0, int(rng.integers(1, 5))
    while at < minutes * 60 * RATE:
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        spoken, hosted = _fill(template, rng)
        speech = speak(spoken, voices[speaker], speeds[speaker]).astype(np.float64)
        sentences.append(Sentence(spoken, hosted, voices[speaker], at / RATE, (at + len(speech)) / RATE))
        parts.append(speech)
        at += len(speech)
        left_in_turn -= 1
        if left_in_turn == 0:
            speaker, left_in_turn = (speaker + 1) % len(voices), int(rng.integers(1, 5))
            pause = float(rng.uniform(0.4, 1.5))
        else:
            pause = float(rng.uniform(0.15, 1.0))
        parts.append(np.zeros(int(pause * RATE)))
        at += int(pause * RATE)
    parts.append(np.zeros(int(1.0 * RATE)))
    samples = 0.7 * np.concatenate(parts)
    noise = ("white", "rumble")[index % 4 // 2] if index % 2 else "clean"
    if noise == "clean":  # room tone, -60 dBFS
        samples += rng.normal(0, 0.001, len(samples))
    else:
        samples += _noise(samples, noise, rng)
    imperfect = [_imperfect(s.hosted.split(), rng) for s in sentences]
    return Episode(
        name=f"ep{seed}-{index:02d}",
        samples=np.clip(samples, -1, 1).astype(np.float32),
        sentences=sentences,
        imperfect=imperfect,
        noise=noise,
    )


def corpus(seed: int = 1, episodes: int = EPISODES) -> list[Episode]:
    """The episodes of the corpus with this seed: 1 to 4 minutes each, about 20 minutes for 10."""
    minutes = [1.0, 2.5, 1.5, 4.0, 2.0, 3.0, 1.0, 2.5, 1.5, 1.5]
    return [make_episode(i, seed, minutes[i % len(minutes)]) for i in range(episodes)]
