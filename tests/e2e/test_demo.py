"""`make demo`'s command end to end: embedded stack, samples over HTTP, local model, transcripts, costs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

MIN_WORD_RECALL = 0.6  # Whisper base on espeak speech: names and digits may differ, most words may not


def _words(text: str) -> set[str]:
    """Lower-case words of five letters or more (short words and numbers vary in formatting)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 5}


def _sections(output: str) -> dict[str, tuple[str, str]]:
    """(heading details, transcript text) printed under each `== filename (details)` heading."""
    found: dict[str, tuple[str, str]] = {}
    for match in re.finditer(r"^== (\S+)  \((.*?)\)\n((?:   .*\n)+)", output, re.MULTILINE):
        found[match.group(1)] = (match.group(2), match.group(3))
    return found


def _srt_seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest.replace(",", "."))


def test_voxq_demo_transcribes_every_sample_and_prints_costs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXQ_", "OPENAI_", "FLOWER_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "voxq.cli", "demo", "--timeout", "400"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=560,
    )
    output = proc.stdout
    assert proc.returncode == 0, output[-3000:] + proc.stderr[-3000:]
    assert "Model chain: local\n" in output  # no OPENAI_API_KEY: the offline model only

    manifest = json.loads((REPO_ROOT / "samples" / "manifest.json").read_text())
    sections = _sections(output)
    assert set(sections) == {item["file"] for item in manifest}
    for item in manifest:
        reference = _words(item["text"])
        details, text = sections[item["file"]]
        heard = _words(text)
        recall = len(reference & heard) / len(reference)
        assert recall >= MIN_WORD_RECALL, f"{item['file']}: {recall:.0%} of {sorted(reference)} in {heard}"
        seconds, status, model = details.split(", ")[:3]
        assert abs(float(seconds.removesuffix(" s")) - item["seconds"]) <= 0.1
        assert status == "succeeded" and model.startswith("local")

    # A podcast's first subtitle cues: numbered, in order, each at most ~7 s (the align stage's cues).
    cues = re.search(r"^-- first subtitle cues \(SRT\) --\n((?:.*\n)+?)\n(?:==|model)", output, re.MULTILINE)
    assert cues, output[-3000:]
    times = re.findall(r"^(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)$", cues.group(1), re.M)
    assert [int(n) for n, _, _ in times] == list(range(1, 5)), cues.group(1)
    seconds = [(_srt_seconds(a), _srt_seconds(b)) for _, a, b in times]
    assert all(0 <= a < b <= a + 7.0 for a, b in seconds) and seconds == sorted(seconds)

    # The cost table: one local-model row for every file, zero USD, and the total.
    row = re.search(r"^(local\S*)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", output, re.MULTILINE)
    assert row, output[-1500:]
    assert int(row.group(2)) == len(manifest)
    assert abs(float(row.group(3)) - sum(item["seconds"] for item in manifest)) < 1.0
    assert float(row.group(5)) == 0.0
    assert re.search(rf"^total\s+{len(manifest)}\s", output, re.MULTILINE)

    # The stack was stopped and its temporary data removed.
    data_dir = re.search(r"^Data and logs in (\S+) \(removed afterwards\)$", output, re.MULTILINE)
    assert data_dir and not Path(data_dir.group(1)).exists()
    assert "stopped api (" in output and "stopped worker (" in output
