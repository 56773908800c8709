"""worker.grouping: which jobs share a transcribe task, and the model chain a batch uses."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

from pydantic import SecretStr

from core.settings import Settings
from worker.grouping import GroupItem, group_key, job_route, model_chain, plan_groups
from worker.store.batches import BatchOptions

TENANT = uuid.uuid4()


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {
        "openai_api_key": SecretStr("sk-test"),
        "group_max_files": 4,
        "group_max_seconds": 100.0,
        "short_file_seconds": 30.0,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def batch(**kw: object) -> BatchOptions:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "tenant_id": TENANT,
        "profile": "auto",
        "language": None,
        "prompt": None,
        "models": None,
        "priority": "normal",
        "budget_usd": Decimal(0),
    }
    values.update(kw)
    return BatchOptions(**values)  # type: ignore[arg-type]


def item(b: BatchOptions, seconds: float, chain: tuple[str, ...] = ("m1", "m2")) -> GroupItem:
    return GroupItem(job_id=uuid.uuid4(), tenant_id=b.tenant_id, batch=b, chain=chain, seconds=seconds)


def test_short_files_pack_up_to_max_files() -> None:
    b = batch()
    items = [item(b, 5.0) for _ in range(10)]
    plans = plan_groups(items, settings())
    assert [len(p.members) for p in plans] == [4, 4, 2]
    assert [m[0] for p in plans for m in p.members] == [i.job_id for i in items]  # order kept
    assert all(p.duration_class == "short" and p.batch_id == b.id for p in plans)


def test_packing_stops_at_max_seconds_and_a_huge_file_goes_alone() -> None:
    b = batch()
    items = [item(b, 40.0), item(b, 40.0), item(b, 40.0), item(b, 5000.0), item(b, 40.0)]
    plans = plan_groups(items, settings())
    assert [[round(s) for _, s in p.members] for p in plans] == [[40, 40], [40], [5000], [40]]
    assert {p.duration_class for p in plans} == {"long"}
    assert all(sum(s for _, s in p.members) <= 100 or len(p.members) == 1 for p in plans)


def test_different_options_never_share_a_group() -> None:
    base = batch()
    other_lang = batch(language="de")
    other_prompt = batch(prompt="names: Zoë")
    high = batch(priority="high")
    items = [item(base, 5), item(other_lang, 5), item(other_prompt, 5), item(high, 5), item(base, 5, ("x",))]
    plans = plan_groups(items, settings())
    assert len(plans) == 5
    assert {p.priority for p in plans} == {"normal", "high"}


def test_same_options_across_batches_share_a_group() -> None:
    a, b = batch(), batch()
    plans = plan_groups([item(a, 5), item(b, 5)], settings())
    assert len(plans) == 1 and plans[0].batch_id is None and len(plans[0].members) == 2


def test_short_and_long_are_separate_classes() -> None:
    b = batch()
    plans = plan_groups([item(b, 5), item(b, 50)], settings())
    assert sorted(p.duration_class for p in plans) == ["long", "short"]


def test_model_chain_is_local_only_without_a_key() -> None:
    assert model_chain(["gpt-4o-mini-transcribe"], settings(openai_api_key=None)) == ["local"]
    assert model_chain(None, settings(openai_api_key=SecretStr(""))) == ["local"]


def test_model_chain_uses_batch_models_else_settings_without_duplicates() -> None:
    s = settings(primary_model="a", fallback_models=["b", "a", "local"])
    # chain entries name their provider: a bare name no provider declares is OpenAI's
    assert model_chain(None, s) == ["openai:a", "openai:b", "local"]
    assert model_chain(["z", "z", "openai:z", "local"], s) == ["openai:z", "local"]


def test_routing_and_diarize_join_the_group_key() -> None:
    base = batch()
    keys = {
        group_key(item(b, 5), "short")
        for b in (
            base,
            batch(routing="cheapest"),
            batch(diarize=True),
            batch(routing="cheapest", diarize=True),
        )
    }
    assert len(keys) == 4
    assert len(plan_groups([item(base, 5), item(batch(routing="cheapest"), 5)], settings())) == 2


CHEAP_MODELS = """
[providers.openai.models.cheap-words]
price = { per_minute = "0.001", min_billed_seconds = 30 }
capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"] }
"""


def test_job_route_orders_the_chain_per_file(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(CHEAP_MODELS)
    s = settings(
        providers_file=str(path),
        primary_model="gpt-4o-mini-transcribe",
        fallback_models=["whisper-1", "cheap-words"],
    )
    chain = ("openai:gpt-4o-mini-transcribe", "openai:whisper-1", "openai:cheap-words")
    assert tuple(model_chain(None, s)) == chain
    as_configured = job_route(batch(), 60.0, s)
    assert (as_configured.chain, as_configured.reason) == (chain, "chain order")
    words = job_route(batch(routing="cheapest", timestamps="word"), 60.0, s)
    assert words.chain == ("openai:cheap-words", "openai:whisper-1", "openai:gpt-4o-mini-transcribe")
    assert (
        words.reason
        == "cheapest meeting timestamps=word: openai:cheap-words $0.0010 < openai:whisper-1 $0.0060"
    )
    # a 3 s file pays cheap-words' 30 s minimum: whisper-1 is cheaper for it
    short = job_route(batch(routing="cheapest", timestamps="word"), 3.0, s)
    assert short.model == "openai:whisper-1"
    # the podcast profile's default timestamps (segment) count as a need
    assert job_route(batch(routing="cheapest", profile="podcast"), 60.0, s).model == "openai:cheap-words"
    assert job_route(batch(routing="cheapest"), 60.0, s).model == "openai:cheap-words"  # cheapest, no needs
    assert job_route(batch(routing="cheapest"), 60.0, settings(openai_api_key=None)).chain == ("local",)
