"""Regenerate the bundled samples: `python samples/generate.py` (needs espeak-ng, sox and ffmpeg).

Four short voicemails and one podcast clip with two voices, spoken by espeak-ng, saved as compact 16 kHz
mono files in a mix of formats. manifest.json records the exact text spoken (the reference transcript)
and how each file was made; README.md lists the same texts for people.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = 16_000

# name, format, voice, text, leading silence s, trailing silence s, noise amplitude
VOICEMAILS = [
    (
        "voicemail-dentist",
        "flac",
        "en-us",
        "Hi Rachel, this is Doctor Evans from Maple Street Dental. We need to move your cleaning to "
        "Thursday at 2 30. If that does not work, call us at 5 5 5, 0 1 4 7.",
        0.0,
        0.0,
        0.0,
    ),
    (
        "voicemail-delivery",
        "mp3",
        "en-us",
        "Hello, this is Carlos from Swift Deliveries. We tried to drop off package number 6 2 8 4 today "
        "but nobody was home. We will try again tomorrow before noon.",
        1.5,
        1.2,
        0.004,
    ),
    (
        "voicemail-landlord",
        "ogg",
        "en-gb",
        "Hello Priya, it's Martin, your landlord. The plumber is coming on Monday at 9 to fix the kitchen "
        "sink. The rent for next month is 1200 pounds, as we agreed.",
        0.8,
        1.5,
        0.0,
    ),
    (
        "voicemail-school",
        "mp3",
        "en-us",
        "Hi, this is Grace from Lincoln Elementary. Your son Daniel left his jacket in room 14. "
        "The office is open until 4 if you want to pick it up.",
        0.0,
        0.0,
        0.003,
    ),
]

# The podcast: two hosts taking turns, with pauses between turns.
PODCAST_NAME = "podcast-clip"
PODCAST_FORMAT = "ogg"
PODCAST_PAUSE_SECONDS = 0.9
PODCAST_TURNS = [
    ("en-us", "Welcome back to Small Business Hour. I'm Jordan, and with me as always is Olivia."),
    ("en-gb", "Thanks Jordan. Today we are talking about voicemail, which sounds boring, but stay with us."),
    ("en-us", "A bakery owner wrote in last week. She gets about 80 voicemails a day during the holidays."),
    (
        "en-gb",
        "And nobody has time to listen to all of them. Most are simple orders or questions about hours.",
    ),
    ("en-us", "So she started sending the recordings to a transcription service and reading them instead."),
    ("en-gb", "Reading is much faster. You can skim 50 messages in the time it takes to play 5 of them."),
    (
        "en-us",
        "The tricky part is names and phone numbers. Those are exactly the words you cannot get wrong.",
    ),
    ("en-gb", "Right. If the number is off by one digit, you have lost the customer."),
    ("en-us", "Her advice is to keep the original audio, and check the numbers when the stakes are high."),
    ("en-gb", "That is good advice for any business. Jordan, what did she say about the cost?"),
    ("en-us", "She pays about 3 dollars a day, which is less than one hour of her time each week."),
    ("en-gb", "Not bad at all. After the break, we will talk about pricing for bigger teams. Stay with us."),
]


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


def _seconds(path: Path) -> float:
    out = subprocess.run(["soxi", "-D", str(path)], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def _speak(voice: str, text: str, out: Path, lead: float = 0.0, trail: float = 0.0) -> None:
    raw = out.with_suffix(".raw.wav")
    _run("espeak-ng", "-v", voice, "-w", str(raw), text)
    _run("sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out), "pad", str(lead), str(trail))
    raw.unlink()


def _add_noise(clean: Path, out: Path, amplitude: float) -> None:
    noise = clean.with_suffix(".noise.wav")
    _run(
        "sox", "-R", "-n", "-r", str(RATE), "-c", "1", "-b", "16", str(noise),
        "synth", str(_seconds(clean)), "whitenoise", "vol", str(amplitude),
    )  # fmt: skip
    _run("sox", "-R", "-m", str(clean), str(noise), "-b", "16", str(out))


def _encode(wav: Path, out: Path) -> None:
    """Encode compactly: FLAC lossless, MP3 at 32 kb/s, Ogg Vorbis at quality 0 (all 16 kHz mono)."""
    codec = {
        "flac": ["-c:a", "flac", "-compression_level", "8"],
        "mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
        "ogg": ["-c:a", "libvorbis", "-q:a", "0"],
    }[out.suffix.lstrip(".")]
    _run(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-ar", str(RATE), "-ac", "1",
        *codec, "-map_metadata", "-1", "-fflags", "+bitexact", str(out),
    )  # fmt: skip


def main() -> None:
    """Write every sample and manifest.json."""
    manifest = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, fmt, voice, text, lead, trail, noise in VOICEMAILS:
            wav = tmp / f"{name}.wav"
            _speak(voice, text, wav, lead, trail)
            if noise:
                noisy = tmp / f"{name}.noisy.wav"
                _add_noise(wav, noisy, noise)
                wav = noisy
            out = HERE / f"{name}.{fmt}"
            _encode(wav, out)
            manifest.append(
                {
                    "file": out.name,
                    "kind": "voicemail",
                    "format": fmt,
                    "seconds": round(_seconds(wav), 2),
                    "voice": voice,
                    "leading_silence_s": lead,
                    "trailing_silence_s": trail,
                    "noise_amplitude": noise,
                    "text": text,
                }
            )

        pieces: list[str] = []
        pause = tmp / "pause.wav"
        _run(
            "sox",
            "-n",
            "-r",
            str(RATE),
            "-c",
            "1",
            "-b",
            "16",
            str(pause),
            "trim",
            "0",
            str(PODCAST_PAUSE_SECONDS),
        )
        for index, (voice, text) in enumerate(PODCAST_TURNS):
            turn = tmp / f"turn{index:02d}.wav"
            _speak(voice, text, turn)
            pieces += [str(turn), str(pause)]
        podcast_wav = tmp / "podcast.wav"
        _run("sox", *pieces[:-1], str(podcast_wav))
        out = HERE / f"{PODCAST_NAME}.{PODCAST_FORMAT}"
        _encode(podcast_wav, out)
        manifest.append(
            {
                "file": out.name,
                "kind": "podcast",
                "format": PODCAST_FORMAT,
                "seconds": round(_seconds(podcast_wav), 2),
                "voice": "en-us and en-gb, alternating turns",
                "leading_silence_s": 0.0,
                "trailing_silence_s": 0.0,
                "noise_amplitude": 0.0,
                "text": " ".join(text for _, text in PODCAST_TURNS),
                "turns": [{"voice": voice, "text": text} for voice, text in PODCAST_TURNS],
            }
        )
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (HERE / "README.md").write_text(readme(manifest))


def readme(manifest: list[dict[str, object]]) -> str:
    """README.md: what each sample is and the exact text spoken (its reference transcript)."""
    lines = [
        "# Sample audio",
        "",
        "Bundled audio for `make demo`: four short voicemails and a podcast clip with two voices,",
        "spoken by espeak-ng and saved as 16 kHz mono FLAC, MP3 (32 kb/s) and Ogg Vorbis.",
        "`manifest.json` holds the same reference texts in machine-readable form;",
        "`python samples/generate.py` regenerates everything (needs espeak-ng, sox and ffmpeg).",
        "",
        "| file | kind | seconds | voice | made with |",
        "|---|---|---|---|---|",
    ]
    for e in manifest:
        extras = [f"{e['leading_silence_s']} s silence before"] if e["leading_silence_s"] else []
        if e["trailing_silence_s"]:
            extras.append(f"{e['trailing_silence_s']} s after")
        if e["noise_amplitude"]:
            extras.append(f"white noise at {e['noise_amplitude']}")
        made = ", ".join(extras) or "clean"
        lines.append(f"| `{e['file']}` | {e['kind']} | {e['seconds']} | {e['voice']} | {made} |")
    lines += ["", "## Reference transcripts (the exact espeak-ng input)", ""]
    for e in manifest:
        lines += [f"### {e['file']}", ""]
        turns = e.get("turns")
        if isinstance(turns, list):
            lines += [f"- *{t['voice']}*: {t['text']}" for t in turns]
        else:
            lines.append(str(e["text"]))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
