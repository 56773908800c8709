"""`voxq submit|status|download|usage` (over the API, `VOXQ_API_URL`/`VOXQ_API_KEY`), `keys`, `sweep-uploads`.

`keys` is an operator command: it talks to the database directly (VOXQ_DATABASE_URL), because the API
has no endpoint that mints keys. Progress goes to stderr; ids and transcripts go to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

FORMATS = ("txt", "json", "srt", "vtt")
# Files `voxq submit DIR` skips: not audio anyone means to send.
SKIPPED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `submit`, `status`, `download`, `usage`, `keys` and `sweep-uploads`."""
    submit = sub.add_parser("submit", help="upload audio files or folders as one batch and queue them")
    submit.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders (searched recursively)")
    submit.add_argument("--profile", choices=("voicemail", "podcast", "auto"), default="auto")
    submit.add_argument("--language", help="ISO-639-1 code, e.g. en")
    submit.add_argument("--name", help="a name for the batch")
    submit.add_argument("--priority", choices=("high", "normal", "low"), default="normal")
    submit.add_argument(
        "--prefer",
        choices=("cost", "speed"),
        default="cost",
        help="when a model is rate limited: wait for it (cost), or move on to the next model (speed)",
    )
    submit.add_argument("--prompt", help="vocabulary hints for the model")
    submit.add_argument(
        "--timestamps",
        choices=("none", "segment", "word"),
        default=None,
        help="subtitle cues (and word times) for any model's text (default: segment for podcasts, else none)",
    )
    submit.add_argument(
        "--routing",
        choices=("chain", "cheapest"),
        default=None,
        help="chain: the models in order (default); cheapest: per file, the cheapest model that meets the "
        "batch's needs (--timestamps, --diarize), then the others by price",
    )
    submit.add_argument("--diarize", action="store_true", help="prefer models that label speakers")
    submit.add_argument("--wait", action="store_true", help="wait until every job has finished")
    submit.add_argument("--out", type=Path, help="write one transcript per input here (implies --wait)")
    submit.add_argument("--format", choices=FORMATS, default="txt", help="transcript format for --out")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    submit.add_argument(
        "--presign-above",
        type=int,
        default=None,
        metavar="BYTES",
        help="files of at least this size go straight to S3 via a presigned PUT (default 64 MB)",
    )
    submit.set_defaults(handler=run_submit)

    status = sub.add_parser("status", help="show a batch or a job")
    status.add_argument("id", metavar="ID", help="a batch id or a job id")
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    status.set_defaults(handler=run_status)

    download = sub.add_parser("download", help="print a job's transcript, or write a batch's transcripts")
    download.add_argument("id", metavar="ID", help="a job id (to stdout) or a batch id (to --out)")
    download.add_argument("--format", choices=FORMATS, default="txt")
    download.add_argument("--out", type=Path, help="folder to write transcripts into")
    download.set_defaults(handler=run_download)

    usage = sub.add_parser("usage", help="cost report for your tenant")
    usage.add_argument("--from", dest="start", help="ISO date or datetime (default: 30 days ago)")
    usage.add_argument("--to", dest="end", help="ISO date or datetime (a date includes that day)")
    usage.add_argument("--group-by", choices=("day", "model", "batch"), default="day")
    usage.add_argument("--json", action="store_true", help="print the API's JSON")
    usage.set_defaults(handler=run_usage)

    keys = sub.add_parser("keys", help="create, list and revoke API keys (operator; uses the database)")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if new); shown once")
    create.add_argument("--tenant", required=True, help="tenant name")
    create.add_argument("--name", help="a label for the key")
    create.set_defaults(handler=run_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (prefixes only)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(handler=run_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key", metavar="ID_OR_PREFIX")
    revoke.set_defaults(handler=run_keys_revoke)

    sweep = sub.add_parser(
        "sweep-uploads",
        help="remove leftovers of uploads killed mid-way and ended jobs' derived audio (operator; S3 and the "
        "database; beat runs it hourly)",
    )
    sweep.add_argument("--older-than-hours", type=float, default=24.0)
    sweep.set_defaults(handler=run_sweep_uploads)


# -- progress -------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a few plain lines otherwise)."""

    def __init__(self, stream: IO[str] | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last_draw = 0.0
        self._last_line = ""

    def draw(self, done: float, total: float, label: str, *, force: bool = False) -> None:
        """Show `done/total` with a label; throttled to a few redraws per second."""
        now = time.monotonic()
        if not force and now - self._last_draw < (0.1 if self.tty else 2.0):
            return
        self._last_draw = now
        share = min(1.0, done / total) if total else 1.0
        filled = int(share * self.width)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {share * 100:5.1f}% {label}"
        if line == self._last_line:
            return
        self._last_line = line
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _mb(n: float) -> str:
    return f"{n / 1_000_000:.1f} MB"


# -- helpers --------------------------------------------------------------------------------------


def collect_inputs(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, name relative to what was given) for each file; folders recursively, hidden files skipped."""
    found: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = file.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or file.name in SKIPPED_NAMES:
                    continue
                found.append((file, rel))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {raw}")
    return found


def transcript_path(out: Path, rel: Path, fmt: str, used: set[Path]) -> Path:
    """Where the transcript of input `rel` goes under `out` (unique even when names repeat)."""
    candidate = out / rel.with_suffix(f".{fmt}")
    number = 2
    while candidate in used:
        candidate = out / rel.with_name(f"{rel.stem}-{number}.{fmt}")
        number += 1
    used.add(candidate)
    return candidate


def _client(presign_above: int | None = None) -> Any:
    from voxq.client import DEFAULT_PRESIGN_THRESHOLD, VoxqClient

    return VoxqClient(presign_threshold=presign_above or DEFAULT_PRESIGN_THRESHOLD)


def _fail(message: str) -> int:
    print(f"voxq: {message}", file=sys.stderr)
    return 1


# -- commands -------------------------------------------------------------------------------------


def run_submit(args: argparse.Namespace) -> int:
    """Upload the inputs as one batch, submit it, optionally wait and write transcripts."""
    from voxq.client import ApiError

    try:
        inputs = collect_inputs(args.paths)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    if not inputs:
        return _fail("no files to submit")
    total_bytes = sum(p.stat().st_size for p, _ in inputs)
    bar = ProgressBar()
    sent = 0

    def on_bytes(n: int) -> None:
        nonlocal sent
        sent += n
        bar.draw(sent, total_bytes, f"uploading {_mb(sent)} / {_mb(total_bytes)}")

    try:
        with _client(args.presign_above) as client:
            batch = client.create_batch(
                name=args.name,
                profile=args.profile,
                language=args.language,
                priority=args.priority,
                prefer=args.prefer,
                prompt=args.prompt,
                timestamps=args.timestamps,
                routing=args.routing,
                diarize=True if args.diarize else None,
            )
            jobs = client.upload_files(
                batch["id"], [p for p, _ in inputs], progress=on_bytes, skip_rejected=True
            )
            bar.draw(
                total_bytes, total_bytes, f"uploaded {_mb(total_bytes)} in {len(jobs)} files", force=True
            )
            bar.finish()
            refused = [(rel, job) for (_, rel), job in zip(inputs, jobs, strict=True) if job["id"] is None]
            for rel, job in refused:
                print(
                    f"voxq: skipped {rel}: {job['error']['code']} ({job['error']['message']})",
                    file=sys.stderr,
                )
            if len(refused) == len(jobs):
                return _fail("no file was accepted")
            submitted = client.submit(batch["id"])
            for rejected in submitted.get("rejected", []):
                print(f"voxq: rejected {rejected['job_id']}: {rejected['code']}", file=sys.stderr)
            print(batch["id"])
            print(
                f"batch {batch['id']}: {submitted['queued']} of {len(jobs)} files queued",
                file=sys.stderr,
            )
            accepted = [(item, job) for item, job in zip(inputs, jobs, strict=True) if job["id"] is not None]
            if not (args.wait or args.out):
                return 1 if refused else 0
            final = client.wait(batch["id"], timeout=args.timeout, on_update=_job_progress(bar))
            bar.finish()
            failed = final["counts"].get("failed", 0) + final["counts"].get("skipped", 0) + len(refused)
            if args.out:
                written = _write_transcripts(
                    client, args.out, args.format, [i for i, _ in accepted], [j for _, j in accepted]
                )
                print(f"wrote {written} transcripts to {args.out}", file=sys.stderr)
            print(
                f"batch {batch['id']} {final['status']}: {final['counts'].get('succeeded', 0)} succeeded, "
                f"{failed} failed/skipped, cost ${final['cost_usd']:.6f}",
                file=sys.stderr,
            )
            return 1 if failed else 0
    except ApiError as exc:
        bar.finish()
        return _fail(f"{exc.code}: {exc.detail}")
    except TimeoutError as exc:
        return _fail(str(exc))


def _job_progress(bar: ProgressBar) -> Any:
    def update(batch: dict[str, Any]) -> None:
        counts = batch["counts"]
        done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled", "skipped"))
        total = batch["total_jobs"]
        bar.draw(done, total, f"jobs {done}/{total} done, cost so far ${batch['cost_usd']:.6f}", force=True)

    return update


def _write_transcripts(
    client: Any, out: Path, fmt: str, inputs: Sequence[tuple[Path, Path]], jobs: Sequence[dict[str, Any]]
) -> int:
    from voxq.client import ApiError

    used: set[Path] = set()
    written = 0
    for (_, rel), job in zip(inputs, jobs, strict=True):
        target = transcript_path(out, rel, fmt, used)
        try:
            if fmt != "txt":
                client.wait_timings(job["id"])  # cues and words follow the text by seconds
            text = client.transcript(job["id"], fmt)
        except ApiError as exc:
            print(f"voxq: no transcript for {rel}: {exc.code}", file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written += 1
    return written


def _find(client: Any, ident: str) -> tuple[str, dict[str, Any]]:
    """('batch'|'job', body) for an id that is either."""
    from voxq.client import ApiError

    try:
        return "batch", client.get_batch(ident)
    except ApiError as exc:
        if exc.status not in (404, 422):
            raise
    return "job", client.get_job(ident)


ESTIMATE_NOTE = (
    "estimated: priced from list prices, not from the provider's usage (a model the price table does "
    "not know, or a call whose bill is unsettled until `voxq billing settle`)"
)


def cost_text(body: dict[str, Any]) -> str:
    """A batch's or job's cost, the estimated part said apart from the billed part."""
    estimated = float(body.get("estimated_usd") or 0.0)
    if not estimated:
        return f"cost ${body['cost_usd']:.6f}"
    billed = float(body.get("billed_usd", body["cost_usd"] - estimated))
    return f"cost ${body['cost_usd']:.6f} (billed ${billed:.6f} + estimated ${estimated:.6f})"


def run_status(args: argparse.Namespace) -> int:
    """Print a batch's or a job's status."""
    from voxq.client import ApiError

    try:
        with _client() as client:
            kind, body = _find(client, args.id)
    except ApiError as exc:
        return _fail(f"{exc.code}: {exc.detail}")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if kind == "batch":
        counts = ", ".join(f"{k} {v}" for k, v in body["counts"].items() if v)
        print(
            f"batch {body['id']} {body['status']}  {body['progress'] * 100:.0f}% of {body['total_jobs']} jobs"
        )
        print(f"  {counts or 'no jobs'}")
        print(
            f"  audio {body['audio_seconds']:.1f}s  billed {body['billed_seconds']:.1f}s  {cost_text(body)}"
        )
        if body.get("routing", "chain") != "chain":
            print(f"  routing {body['routing']}" + ("  diarize" if body.get("diarize") else ""))
        if body.get("routes"):
            print("  routes " + ", ".join(f"{model} {n}" for model, n in body["routes"].items()))
    else:
        print(f"job {body['id']} {body['status']}  {body['filename'] or ''}")
        print(
            f"  duration {body['duration_seconds'] or 0:.1f}s  model {body['model'] or '-'}  "
            f"attempts {body['attempts']}  {cost_text(body)}"
        )
        if body.get("route_model"):
            print(f"  route {body['route_model']}: {body.get('route_reason') or ''}")
        if body.get("error"):
            print(f"  error {body['error']['code']}: {body['error']['message'] or ''}")
        if body.get("deduplicated_from"):
            print(f"  reused the transcript of job {body['deduplicated_from']}")
    if body.get("estimated_usd"):
        print(f"  {ESTIMATE_NOTE}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    """A job's transcript to stdout (or --out), or every finished job of a batch into --out."""
    from voxq.client import ApiError

    try:
        with _client() as client:
            kind, body = _find(client, args.id)
            if kind == "job":
                text = client.transcript(body["id"], args.format)
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    stem = Path(body["filename"] or body["id"]).stem or body["id"]
                    (args.out / f"{stem}.{args.format}").write_text(text, encoding="utf-8")
                else:
                    sys.stdout.write(text if text.endswith("\n") else text + "\n")
                return 0
            if not args.out:
                return _fail("downloading a batch needs --out DIR")
            used: set[Path] = set()
            written = 0
            for job in client.iter_jobs(body["id"], status="succeeded"):
                rel = Path(job["filename"] or job["id"]).name or job["id"]
                target = transcript_path(args.out, Path(rel), args.format, used)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(client.transcript(job["id"], args.format), encoding="utf-8")
                written += 1
            print(f"wrote {written} transcripts to {args.out}", file=sys.stderr)
            return 0
    except ApiError as exc:
        return _fail(f"{exc.code}: {exc.detail}")


def run_usage(args: argparse.Namespace) -> int:
    """Print the cost report."""
    from voxq.client import ApiError

    try:
        with _client() as client:
            report = client.usage(start=args.start, end=args.end, group_by=args.group_by)
    except ApiError as exc:
        return _fail(f"{exc.code}: {exc.detail}")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.group_by:<38} {'billed USD':>12} {'estimated USD':>14} {'total USD':>12} "
        f"{'billed s':>10} {'records':>8}"
    )
    for row in report["rows"]:
        billed = row.get("billed_usd", row["cost_usd"] - row["estimated_usd"])
        print(
            f"{row['key']:<38} {billed:>12.6f} {row['estimated_usd']:>14.6f} {row['cost_usd']:>12.6f} "
            f"{row['billed_seconds']:>10.1f} {row['records']:>8}"
        )
    estimated = report.get("total_estimated_usd", sum(r["estimated_usd"] for r in report["rows"]))
    billed = report.get("total_billed_usd", report["total_usd"] - estimated)
    print(
        f"{'total':<38} {billed:>12.6f} {estimated:>14.6f} {report['total_usd']:>12.6f} "
        f"{report['total_billed_seconds']:>10.1f}"
    )
    if estimated:
        print(ESTIMATE_NOTE)
    return 0


def run_keys_create(args: argparse.Namespace) -> int:
    """Create a key and print it (the only time it is shown)."""
    from core import auth
    from core.db import session_scope

    with session_scope() as session:
        issued = auth.create_key(session, args.tenant, args.name)
    print(issued.plaintext)
    print(
        f"key {issued.prefix}… (id {issued.id}) for tenant {issued.tenant_name}; "
        "store it now, it is not shown again",
        file=sys.stderr,
    )
    if issued.webhook_secret is not None:
        print(
            f"new tenant: its webhook signing secret (verify X-Voxq-Signature with it; shown once):\n"
            f"{issued.webhook_secret}",
            file=sys.stderr,
        )
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    """List keys by prefix, with their state."""
    from core import auth
    from core.db import session_scope

    with session_scope() as session:
        keys = auth.list_keys(session, args.tenant)
    for line in _key_lines(keys):
        print(line)
    return 0


def _key_lines(keys: Sequence[Any]) -> Iterator[str]:
    yield f"{'id':<36}  {'prefix':<10}  {'tenant':<20}  {'state':<8}  {'last used':<20}  name"
    for key in keys:
        state = "revoked" if key.revoked_at else "active"
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if key.last_used_at else "never"
        yield (
            f"{key.id:<36}  {key.prefix:<10}  {key.tenant_name:<20}  {state:<8}  {used:<20}  {key.name or ''}"
        )


def run_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id or prefix."""
    from core import auth
    from core.db import session_scope

    with session_scope() as session:
        revoked = auth.revoke_key(session, args.key)
    if not revoked:
        return _fail(f"no active key {args.key!r}")
    print(f"revoked {args.key}", file=sys.stderr)
    return 0


def run_sweep_uploads(args: argparse.Namespace) -> int:
    """Remove what uploads killed mid-way left under `incoming/`, and derived audio of ended jobs (operator;
    uses S3 and the database)."""
    from datetime import timedelta

    from core.storage import Storage
    from worker.upload_sweep import DERIVED_MIN_AGE, sweep_storage

    age = timedelta(hours=args.older_than_hours)
    result = sweep_storage(Storage(), incoming_older_than=age, derived_older_than=min(age, DERIVED_MIN_AGE))
    print(
        f"aborted {result.aborted_multipart_uploads} multipart uploads, "
        f"deleted {result.deleted_incoming} temporary objects, "
        f"deleted {result.deleted_derived} derived audio objects of ended jobs"
    )
    return 0
