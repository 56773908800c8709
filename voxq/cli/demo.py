"""`voxq demo` (what `make demo` runs): the embedded stack, the bundled samples, transcripts and costs.

Starts the same stack `voxq dev` runs (voxq.devstack), submits samples/ through the HTTP API as any
client would, waits with a progress bar, prints each transcript and a cost table, then stops the stack.
Podcast samples go in a podcast-profile batch (timestamps `segment` by default): their first subtitle cues
(SRT, from the align stage) are printed under their transcript.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from voxq.client import TERMINAL_JOB_STATUSES, ApiError, VoxqClient

if TYPE_CHECKING:
    from voxq.devstack import DevStack

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples"
TERMINAL_JOB = frozenset(TERMINAL_JOB_STATUSES)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo`."""
    demo = sub.add_parser(
        "demo", help="start the embedded stack, transcribe samples/, print transcripts and costs"
    )
    demo.add_argument(
        "--data-dir",
        default=None,
        help="keep the stack's data here (default: a fresh temporary directory, removed afterwards)",
    )
    demo.add_argument("--samples", default=str(SAMPLES_DIR), help="folder with manifest.json and audio")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every transcript")
    demo.set_defaults(handler=run_demo)


@dataclass
class Sample:
    """One bundled file and its reference text."""

    path: Path
    kind: str
    text: str


def load_samples(folder: Path) -> list[Sample]:
    """The samples listed in `folder/manifest.json`, in its order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        Sample(folder / item["file"], item.get("kind", "auto"), item.get("text", "")) for item in manifest
    ]


def progress_line(batch: dict[str, Any], started: float) -> str:
    """`[#####.....] 3/5 done  ...` for one poll of the batch."""
    counts = batch.get("counts") or {}
    total = int(batch.get("total_jobs") or sum(counts.values()) or 0)
    done = sum(int(counts.get(s, 0)) for s in TERMINAL_JOB)
    width = 30
    filled = int(width * done / total) if total else 0
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, "
        f"{counts.get('processing', 0)} processing, {counts.get('queued', 0)} queued  "
        f"${Decimal(str(batch.get('cost_usd', 0))):.4f}  {time.monotonic() - started:5.1f}s"
    )


def cost_table(jobs: list[dict[str, Any]]) -> str:
    """Per model: files, audio seconds, billed seconds, USD; then the total."""
    rows: dict[str, list[Any]] = {}
    for job in jobs:
        model = job.get("model") or f"({job['status']})"
        row = rows.setdefault(model, [0, 0.0, 0.0, Decimal(0)])
        row[0] += 1
        row[1] += float(job.get("duration_seconds") or 0.0)
        row[2] += float(job.get("billed_seconds") or 0.0)
        row[3] += Decimal(str(job.get("cost_usd") or 0))
    header = f"{'model':<28}{'files':>6}{'audio s':>10}{'billed s':>10}{'USD':>12}"
    lines = [header, "-" * len(header)]
    totals = [0, 0.0, 0.0, Decimal(0)]
    for model, (files, audio, billed, usd) in sorted(rows.items()):
        lines.append(f"{model:<28}{files:>6}{audio:>10.1f}{billed:>10.1f}{usd:>12.6f}")
        totals = [totals[0] + files, totals[1] + audio, totals[2] + billed, totals[3] + usd]
    lines.append("-" * len(header))
    lines.append(f"{'total':<28}{totals[0]:>6}{totals[1]:>10.1f}{totals[2]:>10.1f}{totals[3]:>12.6f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _data_dir(given: str | None) -> Iterator[Path]:
    if given:
        yield Path(given)
        return
    Path(".voxq").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="demo-", dir=".voxq"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(args: argparse.Namespace) -> int:
    """Start the stack, transcribe the samples over HTTP, print transcripts and costs, stop the stack."""
    from core.errors import ConfigError
    from voxq.devstack import DevStack
    from voxq.embedded import free_port

    samples = load_samples(Path(args.samples))
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the stack cleanly on SIGTERM too
    with _data_dir(args.data_dir) as data_dir:
        stack = DevStack(
            data_dir,
            api_port=free_port(),
            flower_port=free_port(),
            with_flower=False,
            say=lambda msg: print(f"  {msg}", flush=True),
        )
        try:
            print("Starting the embedded stack (Postgres, Valkey, SeaweedFS, API, workers)…", flush=True)
            try:
                info = stack.start()
            except ConfigError as exc:
                print(f"voxq demo: {exc}", file=sys.stderr)
                return 1
            print(f"Data and logs in {info.data_dir}" + ("" if args.data_dir else " (removed afterwards)"))
            chain = os.environ.get("VOXQ_PRIMARY_MODEL", "")
            fallbacks = os.environ.get("VOXQ_FALLBACK_MODELS")
            print(f"Model chain: {', '.join(m for m in [chain, *(fallbacks or '').split(',')] if m)}")
            return _transcribe(info.api_url, info.api_key, samples, args.timeout, stack)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        finally:
            print("Stopping the stack…", flush=True)
            stack.stop()


def _wait_healthy(client: VoxqClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ApiError):
            if client.health().get("status") == "ok":
                return
        time.sleep(0.2)
    raise RuntimeError("the API did not become healthy")


def _transcribe(api_url: str, api_key: str, samples: list[Sample], timeout: float, stack: DevStack) -> int:
    with VoxqClient(api_url, api_key) as client:
        _wait_healthy(client, 60)
        # Podcasts in a podcast-profile batch: subtitle cues (timestamps `segment`) come with them.
        groups = [
            ("auto", [s for s in samples if s.kind != "podcast"]),
            ("podcast", [s for s in samples if s.kind == "podcast"]),
        ]
        batch_ids: list[str] = []
        for profile, files in groups:
            if not files:
                continue
            batch_id = str(client.create_batch(name=f"voxq demo ({profile})", profile=profile)["id"])
            jobs = client.upload_files(batch_id, [s.path for s in files])
            total_bytes = sum(s.path.stat().st_size for s in files)
            print(f"Uploaded {len(jobs)} files ({total_bytes / 1024:.0f} KiB) to {profile} batch {batch_id}")
            submitted = client.submit(batch_id)
            for rejected in submitted.get("rejected", []):
                print(f"  rejected {rejected['job_id']}: {rejected['code']} {rejected['message']}")
            batch_ids.append(batch_id)
        started = time.monotonic()
        tty = sys.stdout.isatty()
        shown = [""]

        def on_update(batch: dict[str, Any]) -> None:
            stack.supervise_once()  # the demo is the stack's supervisor while it waits
            line = progress_line(batch, started)
            if tty:
                print("\r" + line, end="", flush=True)
            elif line.split("  $")[0] != shown[0].split("  $")[0]:
                print(line, flush=True)  # a log, not a terminal: one line per change
            shown[0] = line

        try:
            for batch_id in batch_ids:
                client.wait(batch_id, poll_seconds=0.5, timeout=timeout, on_update=on_update)
        except TimeoutError:
            print(f"\ntimed out after {timeout:.0f}s; logs in {stack.log_dir}", file=sys.stderr)
            return 1
        if tty:
            print()
        return _report(client, batch_ids, time.monotonic() - started)


FIRST_CUES = 4  # subtitle cues shown per podcast


def first_cues(client: VoxqClient, job_id: str, timeout: float = 120.0) -> str:
    """The first SRT cues of a job once its alignment is done (or what the transcript has after `timeout`)."""
    try:
        client.wait_timings(job_id, timeout=timeout, poll_seconds=0.5)
        srt = client.transcript(job_id, "srt")
    except ApiError as exc:
        return f"(no subtitles: {exc.code})"
    return "\n\n".join(srt.strip().split("\n\n")[:FIRST_CUES])


def _report(client: VoxqClient, batch_ids: list[str], elapsed: float) -> int:
    jobs = sorted(
        (j for batch_id in batch_ids for j in client.iter_jobs(batch_id)),
        key=lambda j: str(j.get("filename")),
    )
    podcasts = {str(j["id"]) for j in client.iter_jobs(batch_ids[-1])} if len(batch_ids) > 1 else set()
    failed = 0
    print()
    for job in jobs:
        head = f"== {job['filename']}  ({float(job.get('duration_seconds') or 0):.1f} s, {job['status']}"
        if job.get("model"):
            head += f", {job['model']}"
        if job.get("deduplicated_from"):
            head += ", reused an identical file's transcript"
        print(head + ")")
        if job["status"] == "succeeded":
            text = client.transcript(str(job["id"]), "txt").strip()
            print(textwrap.fill(text, width=100, initial_indent="   ", subsequent_indent="   "))
            if str(job["id"]) in podcasts:
                print("\n-- first subtitle cues (SRT) --")
                print(first_cues(client, str(job["id"])))
        else:
            failed += 1
            error = job.get("error") or {}
            print(f"   failed: {error.get('code')}: {error.get('message')}")
        print()
    print(cost_table(jobs))
    audio = sum(float(j.get("duration_seconds") or 0) for j in jobs)
    print(f"\n{len(jobs)} files, {audio:.1f} s of audio transcribed in {elapsed:.1f} s")
    return 1 if failed else 0
