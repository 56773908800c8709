"""Benchmarks: `python -m bench` runs all (`python -m bench local_rtf` one); results in docs/benchmarks.md.

A benchmark is a module in this package with a `main() -> None`. Each owns one section of
docs/benchmarks.md between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and rewrites only that
section (`write_section`), so benchmarks never overwrite each other's results.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
_HEADER = (
    "# Benchmarks\n\n"
    "Written by `make bench` (`python -m bench`); each section belongs to one benchmark in `bench/` and is\n"
    "replaced when that benchmark runs again. Timings on shared machines are noisy: compare ratios\n"
    "measured in the same run, not absolute numbers across runs.\n"
)


def write_section(name: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md, leaving the others untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    lock_path = REPO_ROOT / ".voxq" / "benchmarks.lock"  # .voxq/ is git-ignored
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else _HEADER
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def host_facts(*packages: str) -> dict[str, str]:
    """Date, CPU, cores, load and package versions: what a reader needs to judge a timing."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    facts = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(cores),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
    }
    for package in packages:
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = "not installed"
    return facts
