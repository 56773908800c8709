"""Grouping: which prepared jobs are transcribed together by one task.

Jobs share a group when they share (tenant, profile, language, prompt, routed model chain, routing,
diarize, priority) and a duration class: `short` (trimmed audio < `short_file_seconds`) or `long`. Each
group is packed up to `group_max_files` jobs or `group_max_seconds` of audio (a single job longer than
that goes alone), so the broker's per-task overhead is paid once per group and the task can keep many
requests in flight at once.
Packing happens within one `prepare` task's jobs (≤ 50, from one API call): waiting for other tasks' jobs
would add latency for little gain, since one API call already brings many files.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from core.dedupe import NO_MODEL
from core.pricing import load_price_table
from core.providers.config import OPENAI, load_catalogue
from core.providers.retirement import runtime_chain, runtime_provider, utc_today
from core.providers.routing import Needs, Route, route
from core.settings import Settings
from core.statuses import effective_timestamps
from worker.store.batches import BatchOptions
from worker.store.groups import GroupPlan

SHORT = "short"
LONG = "long"


@dataclass(frozen=True)
class GroupItem:
    """A prepared job waiting for a group."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    batch: BatchOptions
    chain: tuple[str, ...]  # the job's routed chain (`job_route`)
    seconds: float  # trimmed audio, what will be sent
    route_reason: str | None = None


def model_chain(batch_models: list[str] | None, settings: Settings, today: date | None = None) -> list[str]:
    """The models to try for a batch, in order, without duplicates, as `provider:model` entries (or
    `local`): the batch's own, else the primary model then the fallbacks; models retired on `today`
    (default: UTC today) and models of providers that cannot be called (no key) left out; `[local]` when no
    hosted model is left. The one place that says it (grouping, dedupe, the chain runner, the worker's
    start-up checks); the rules are `core.providers.retirement.runtime_chain`."""
    catalogue = load_catalogue(settings)
    return runtime_chain(catalogue, settings, batch_models, today or utc_today())


def chain_entries(models: Iterable[str], settings: Settings) -> list[str]:
    """Model names as chain entries, to compare with a chain: a transcript's models (bare names, as
    `jobs.model` records them) as `provider:model` (resolved as the catalogue says); `local`, `local:*` and
    `none` as written."""
    catalogue = load_catalogue(settings)
    return [str(ref) if (ref := catalogue.resolve(m)) is not None and m != NO_MODEL else m for m in models]


def job_route(batch: BatchOptions, seconds: float, settings: Settings, today: date | None = None) -> Route:
    """A job's chain in the order its batch's `routing` tries it for `seconds` of trimmed audio, and why
    (core.providers.routing over `model_chain`'s candidates).

    Deterministic in (batch options, seconds, configuration, day): prepare routes a job with its trimmed
    seconds and stores the first model and the reason on the job; the transcribe stage and dedupe
    compute the same route again from the job's stored `speech_seconds`, so no chain is stored."""
    day = today or utc_today()
    catalogue = load_catalogue(settings)
    provider = runtime_provider(catalogue, settings, day)
    needs = Needs(
        timestamps=effective_timestamps(batch.profile, batch.timestamps).value,
        diarize=batch.diarize,
        language=batch.language,
    )
    return route(
        catalogue,
        model_chain(batch.models, settings, day),
        needs,
        batch.routing,
        seconds,
        prices=load_price_table(settings.price_table_version, settings.price_table_dir or None),
        default_provider=provider.name if provider is not None else OPENAI,
    )


def group_key(item: GroupItem, duration_class: str) -> str:
    """A stable key for the options a group's jobs share."""
    parts = [
        str(item.tenant_id),
        item.batch.profile,
        item.batch.language,
        item.batch.prompt,
        list(item.chain),
        item.batch.priority,
        item.batch.routing,
        item.batch.diarize,
    ]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]
    return f"{duration_class}:{digest}"


def plan_groups(items: list[GroupItem], settings: Settings) -> list[GroupPlan]:
    """Pack items into groups (first fit, in submission order)."""
    open_groups: dict[str, list[GroupItem]] = {}
    seconds: dict[str, float] = {}
    done: list[tuple[str, str, list[GroupItem]]] = []
    for item in items:
        cls = SHORT if item.seconds < settings.short_file_seconds else LONG
        key = group_key(item, cls)
        members = open_groups.get(key)
        if members is not None and (
            len(members) >= settings.group_max_files
            or seconds[key] + item.seconds > settings.group_max_seconds
        ):
            done.append((key, cls, members))
            members = None
        if members is None:
            members = open_groups[key] = []
            seconds[key] = 0.0
        members.append(item)
        seconds[key] += item.seconds
    for key, members in open_groups.items():
        done.append((key, key.split(":", 1)[0], members))
    plans: list[GroupPlan] = []
    for key, cls, members in done:
        batch_ids = {m.batch.id for m in members}
        plans.append(
            GroupPlan(
                tenant_id=members[0].tenant_id,
                batch_id=next(iter(batch_ids)) if len(batch_ids) == 1 else None,
                key=key,
                duration_class=cls,
                members=[(m.job_id, m.seconds) for m in members],
                chain=list(members[0].chain),
                priority=members[0].batch.priority,
                routes=[(m.chain[0] if m.chain else None, m.route_reason) for m in members],
            )
        )
    return plans
