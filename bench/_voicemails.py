"""A generated voicemail corpus for C1: espeak-ng speech, several voices and speeds, typical silence.

Made at run time (nothing committed): `corpus(n, seed)` speaks `n` voicemails with espeak-ng (Debian
package `espeak-ng`; `apt-get install -y espeak-ng`) and returns 16 kHz mono int16 samples and the exact
text spoken. Each voicemail is 2-4 sentences drawn from templates with names and numbers (seeded, so the
same `seed` gives the same corpus for a given espeak-ng version), spoken sentence by sentence by one of
`VOICES` at a speed of 140-185 words per minute, with what voicemails have around and between them:
- a lead-in of 0.3-2.5 s before the caller speaks and a tail of 2-9 s after (the recorder runs on);
- a pause of 0.2-2.2 s between sentences (the caller thinking), so inner pauses get trimmed too;
- room tone over the whole recording: Gaussian noise at an amplitude of 0.001-0.004 (-60 to -48 dBFS),
  plus a faint 50 Hz hum on some.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

RATE = 16_000
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-gb-scotland", "en-us+m3", "en-029", "en-gb+f2"]

_NAMES = [
    "Maria",
    "John",
    "Sarah",
    "David",
    "Emily",
    "Michael",
    "Linda",
    "Robert",
    "Anna",
    "James",
    "Kate",
    "Peter",
    "Susan",
    "Rachel",
    "Carlos",
    "Nina",
    "Oliver",
    "Grace",
    "Daniel",
    "Laura",
]
_PLACES = [
    "the dental office",
    "the garage",
    "the city library",
    "Green Valley Insurance",
    "the school office",
    "Sunrise Pharmacy",
    "the bank",
    "the leasing office",
    "Swift Deliveries",
    "the clinic",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_THINGS = ["package", "order", "invoice", "policy", "ticket", "account", "appointment", "reservation"]
_OPENERS = [
    "Hi {name}, this is {caller} from {place}.",
    "Hello {name}, it's {caller} calling from {place}.",
    "Good morning, this message is for {name}.",
    "Hey {name}, it's {caller}.",
    "Good afternoon, this is {caller} with {place}.",
]
_BODIES = [
    "Your {thing} number {digits} is ready for pickup.",
    "We need to move your appointment to {day} at {hour}.",
    "The total comes to {amount} dollars and we close at {hour} tonight.",
    "I am calling about your {thing} from last {day}.",
    "There is a small problem with the paperwork we sent you.",
    "The meeting moved to room {room} on the second floor.",
    "Please bring {count} copies of the signed form with you.",
    "We tried to deliver your {thing} today but nobody was home.",
    "Your reference number is {digits}.",
    "The doctor can see you on {day} morning if that works for you.",
    "I left the keys with your neighbour next door.",
    "We found the receipt and everything looks fine now.",
]
_CLOSERS = [
    "Please call me back at {phone}.",
    "You can reach me at extension {room}.",
    "Thanks, and have a good day.",
    "Call us back when you have a minute.",
    "Talk to you soon, bye.",
    "If that does not work, call us at {phone}.",
]


@dataclass(frozen=True)
class Voicemail:
    """One generated voicemail: samples (16 kHz mono int16), the text spoken and how it was made."""

    name: str
    samples: npt.NDArray[np.int16]
    text: str
    voice: str
    speed: int
    lead: float
    tail: float
    pauses: list[float]
    noise: float

    @property
    def seconds(self) -> float:
        """Length of the recording."""
        return len(self.samples) / RATE

    def flac(self) -> bytes:
        """The recording as 16 kHz mono FLAC (what a user would upload)."""
        from worker.audio import encode_flac

        return encode_flac(self.samples)


def _digits(rng: np.random.Generator, n: int) -> str:
    return " ".join(str(int(d)) for d in rng.integers(0, 10, n))


def _sentences(rng: np.random.Generator) -> list[str]:
    def pick(items: list[str]) -> str:
        return items[int(rng.integers(len(items)))]

    fields = {
        "name": pick(_NAMES),
        "caller": pick(_NAMES),
        "place": pick(_PLACES),
        "day": pick(_DAYS),
        "thing": pick(_THINGS),
        "digits": _digits(rng, 4),
        "hour": str(int(rng.integers(1, 12))),
        "amount": str(int(rng.integers(20, 900))),
        "room": str(int(rng.integers(2, 40))),
        "count": str(int(rng.integers(2, 6))),
        "phone": f"5 5 5, {_digits(rng, 4)}",
    }
    n_body = int(rng.integers(1, 3))
    bodies = [str(b) for b in rng.choice(_BODIES, size=n_body, replace=False)]
    return [s.format(**fields) for s in [pick(_OPENERS), *bodies, pick(_CLOSERS)]]


def _speak(text: str, voice: str, speed: int) -> npt.NDArray[np.float64]:
    """espeak-ng's speech of `text` at 16 kHz, leading/trailing digital silence removed."""
    from worker.local_engine import decode_audio

    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "C1's corpus needs espeak-ng (Debian: apt-get install -y espeak-ng; `make bench` does it)"
        )
    with tempfile.TemporaryDirectory(prefix="voxq-c1-") as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        samples = decode_audio(wav.read_bytes()).astype(np.float64)
    voiced = np.flatnonzero(np.abs(samples) > 1e-3)
    return samples[voiced[0] : voiced[-1] + 1] if len(voiced) else samples


def make_voicemail(index: int, seed: int) -> Voicemail:
    """Voicemail number `index` of the corpus with this seed."""
    rng = np.random.default_rng([seed, index])
    voice = VOICES[int(rng.integers(len(VOICES)))]
    speed = int(rng.integers(140, 186))
    sentences = _sentences(rng)
    lead, tail = float(rng.uniform(0.3, 2.5)), float(rng.uniform(2.0, 9.0))
    pauses = [float(rng.uniform(0.2, 2.2)) for _ in sentences[1:]]
    parts = [np.zeros(int(lead * RATE))]
    for i, sentence in enumerate(sentences):
        if i:
            parts.append(np.zeros(int(pauses[i - 1] * RATE)))
        parts.append(_speak(sentence, voice, speed))
    parts.append(np.zeros(int(tail * RATE)))
    speech = np.concatenate(parts)
    noise = float(rng.uniform(0.001, 0.004))
    room = rng.normal(0, noise, len(speech))
    if rng.random() < 0.3:
        room += 0.002 * np.sin(2 * np.pi * 50 * np.arange(len(speech)) / RATE)
    samples = np.clip(0.8 * speech + room, -1, 1)
    return Voicemail(
        name=f"vm{seed}-{index:03d}",
        samples=(samples * 32767).astype(np.int16),
        text=" ".join(sentences),
        voice=voice,
        speed=speed,
        lead=lead,
        tail=tail,
        pauses=pauses,
        noise=noise,
    )


def corpus(n: int, seed: int = 1) -> list[Voicemail]:
    """`n` voicemails of the corpus with this seed."""
    return [make_voicemail(i, seed) for i in range(n)]


def wav_bytes(samples: npt.NDArray[np.int16]) -> bytes:
    """16-bit PCM WAV of these samples (for listening to a case)."""
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
    return buf.getvalue()
