"""`voxq providers check`: try every configured provider and model with one short bundled sample.

For each provider (those the default chain uses and those the providers file lists): `GET /models` when it
has one (a 404 is fine: many self-hosted servers have none), then one transcription of the sample per
configured model (a retired model is listed, never called). One table row per model: reachable, latency,
the text returned (truncated), timestamps present, usage returned, list price per audio hour. Exit 1 when
a provider the default chain uses fails (unreachable, refused, no key, or a model of it failed), 2 when the
configuration itself is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

import httpx

from core.errors import ConfigError
from core.providers.base import ProviderError, TranscriptionRequest, TranscriptionResult
from core.providers.config import (
    Catalogue,
    ModelRef,
    PriceSpec,
    ProviderConfig,
    api_key,
    load_catalogue,
    usable,
)
from core.providers.retirement import configured_refs, default_chain, is_retired, utc_today
from core.settings import Settings, get_settings

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "voicemail-dentist.flac"
SAMPLE_SECONDS = 11.24
TEXT_CHARS = 40


@dataclass
class Row:
    """One line of the table."""

    provider: str
    model: str
    reachable: str
    latency: str = "-"
    text: str = "-"
    timestamps: str = "-"
    usage: str = "-"
    price: str = "-"
    ok: bool = True


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `providers check`."""
    providers = sub.add_parser("providers", help="the configured transcription providers")
    providers_sub = providers.add_subparsers(dest="providers_command", metavar="SUBCOMMAND")
    check = providers_sub.add_parser(
        "check",
        help="reach each provider and transcribe one short sample with each configured model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--sample", type=Path, default=SAMPLE, help="audio file to send (default: a voicemail)"
    )
    check.add_argument("--seconds", type=float, default=None, help="the sample's duration (pricing)")
    check.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    check.set_defaults(handler=run_check)

    def usage(_args: argparse.Namespace) -> int:
        providers.print_help()
        return 2

    providers.set_defaults(handler=usage)


def price_per_hour(catalogue: Catalogue, ref: ModelRef, settings: Settings) -> str:
    """The model's list price per audio hour, as the table shows it."""
    from core.pricing import load_price_table

    model = catalogue.model(ref)
    if model is None:
        return "?"
    if model.price == "zero":
        return "$0.00"
    minimum = 0.0
    if isinstance(model.price, PriceSpec):
        minute, minimum = model.price.minute_price, model.price.min_billed_seconds
        if minute is None:
            return "tokens"
    else:
        table = load_price_table(settings.price_table_version, settings.price_table_dir)
        prices = table.prices_for(ref.model)
        minute = prices.per_minute if prices is not None else None
    if minute is None:
        return "?"
    hour = round(Decimal(minute) * 60, 6).normalize()
    return f"${hour:f}" + (f" (min {minimum:g} s)" if minimum else "")


def checked_providers(catalogue: Catalogue, settings: Settings, today: date) -> tuple[list[str], set[str]]:
    """(providers to check in order, providers the default chain uses)."""
    in_chain: list[str] = []
    for name in default_chain(catalogue, settings, today):
        ref = catalogue.resolve(name)
        if ref is not None and ref.provider not in in_chain:
            in_chain.append(ref.provider)
    others = [p for p in catalogue.providers if p in catalogue.declared and p not in in_chain]
    return in_chain + others, set(in_chain)


async def _models_endpoint(client: httpx.AsyncClient, provider: ProviderConfig, key: str | None) -> str:
    headers = {**provider.headers, **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        response = await client.get(f"{provider.base_url}/models", headers=headers, timeout=15.0)
    except httpx.HTTPError as exc:
        return f"no ({type(exc).__name__})"
    if response.status_code == 200:
        return "yes"
    if response.status_code == 404:
        return "yes (no /models)"
    return f"no (HTTP {response.status_code})"


def _timestamps(result: TranscriptionResult) -> str:
    if not result.segments:
        return "none"
    return "word" if any(seg.get("words") for seg in result.segments) else "segment"


async def _try_model(
    client: httpx.AsyncClient,
    provider: ProviderConfig,
    ref: ModelRef,
    audio: bytes,
    seconds: float,
    args: object,
) -> Row:
    from core.providers.openai import OpenAIProvider
    from worker.entries import response_format

    settings = get_settings()
    catalogue = load_catalogue(settings)
    model = catalogue.model(ref)
    wants = model is None or model.capabilities.timestamps != "none"
    caller = OpenAIProvider(
        client,
        base_url=provider.base_url,
        api_key=api_key(provider, settings),
        timeout=float(getattr(args, "timeout", 120.0)),
        headers=provider.headers,
    )
    request = TranscriptionRequest(
        audio=audio,
        filename="sample" + Path(str(getattr(args, "sample", SAMPLE))).suffix,
        content_type="application/octet-stream",
        model=ref.model,
        audio_seconds=seconds,
        want_timestamps=wants,
        response_format=response_format(model, wants),  # what the model's capabilities offer
    )
    row = Row(provider.name, ref.model, "yes", price=price_per_hour(catalogue, ref, settings))
    started = time.monotonic()
    try:
        result = await caller.transcribe(request)
    except ProviderError as exc:
        row.latency = f"{time.monotonic() - started:.2f}s"
        row.text, row.ok = f"ERROR {exc.code}: {exc.message}"[:TEXT_CHARS], False
        return row
    row.latency = f"{time.monotonic() - started:.2f}s"
    text = " ".join(result.text.split())
    row.text = repr(text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…")
    row.timestamps = _timestamps(result)
    row.usage = str(result.usage.get("type", "yes")) if result.usage else "no"
    return row


async def check_all(
    settings: Settings, audio: bytes, seconds: float, args: object
) -> tuple[list[Row], set[str]]:
    """Every provider's rows, and the names of the default chain's providers that failed."""
    catalogue = load_catalogue(settings)
    today = utc_today()
    names, in_chain = checked_providers(catalogue, settings, today)
    refs = configured_refs(catalogue, settings, today)
    rows: list[Row] = []
    failed: set[str] = set()
    async with httpx.AsyncClient() as client:
        for name in names:
            provider = catalogue.providers[name]
            models = [r for r in refs if r.provider == name]
            provider_rows = await _check_provider(client, catalogue, provider, models, audio, seconds, args)
            if not all(r.ok for r in provider_rows):
                failed.add(name)
            rows += provider_rows
    return rows, failed & in_chain


async def _check_provider(
    client: httpx.AsyncClient,
    catalogue: Catalogue,
    provider: ProviderConfig,
    models: list[ModelRef],
    audio: bytes,
    seconds: float,
    args: object,
) -> list[Row]:
    settings = get_settings()
    if not usable(provider, settings):
        return [Row(provider.name, "*", f"no key (${provider.api_key_env} unset)", ok=False)]
    reachable = await _models_endpoint(client, provider, api_key(provider, settings))
    if reachable.startswith("no"):
        return [Row(provider.name, "*", reachable, ok=False)]
    rows = []
    for ref in models:
        if is_retired(catalogue.model(ref), utc_today()):
            rows.append(Row(provider.name, ref.model, "retired: not called"))
            continue
        row = await _try_model(client, provider, ref, audio, seconds, args)
        row.reachable = reachable
        rows.append(row)
    return rows or [Row(provider.name, "(no models configured)", reachable)]


def print_table(rows: list[Row]) -> None:
    """The rows as an aligned text table."""
    header = ("provider", "model", "reachable", "latency", "text", "timestamps", "usage", "$/audio h")
    cells = [header] + [
        (r.provider, r.model, r.reachable, r.latency, r.text, r.timestamps, r.usage, r.price) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run_check(args: argparse.Namespace) -> int:
    """Check every provider; exit 1 when a provider of the default chain fails."""
    settings = get_settings()
    try:
        load_catalogue(settings)
    except ConfigError as exc:
        print(f"voxq providers check: {exc}", file=sys.stderr)
        return 2
    audio = Path(args.sample).read_bytes()
    seconds = (
        args.seconds if args.seconds is not None else (SAMPLE_SECONDS if args.sample == SAMPLE else 10.0)
    )
    rows, failed = asyncio.run(check_all(settings, audio, seconds, args))
    print_table(rows)
    if failed:
        print(f"FAILED: provider(s) of the default chain: {', '.join(sorted(failed))}")
        return 1
    print("ok: every provider of the default chain answered")
    return 0
