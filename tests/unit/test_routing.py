"""Routing by need (core/providers/routing.py): which candidate is tried first for a file, and why."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal

import pytest

from core.pricing import load_price_table
from core.providers.config import Catalogue, build_catalogue
from core.providers.routing import Needs, expected_cost, route

pytestmark = pytest.mark.unit

PROVIDERS = """
[providers.b]
base_url = "http://b.example/v1"
[providers.b.models.whisper-large-v3-turbo]
price = { per_hour = "0.04", min_billed_seconds = 10 }
capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"] }

[providers.c]
base_url = "http://c.example/v1"
[providers.c.models.floor]
price = { per_minute = "0.001", min_billed_seconds = 30 }
capabilities = { timestamps = "segment", response_formats = ["json", "verbose_json"] }
[providers.c.models.plain]
price = { per_minute = "0.002" }
[providers.c.models.twin]
price = { per_minute = "0.002" }
[providers.c.models.speakers]
price = { per_minute = "0.01" }
capabilities = { timestamps = "segment", diarization = true, response_formats = ["json", "diarized_json"] }
[providers.c.models.tokens]
price = { audio_input_per_million = "1.00", output_per_million = "2.00" }

[providers.gpu]
base_url = "http://gpu.example/v1"
[providers.gpu.models.whisper-base]
price = "zero"
capabilities = { timestamps = "segment", response_formats = ["json", "verbose_json"] }
"""
MINI = "openai:gpt-4o-mini-transcribe"  # table: $0.003/min, no timestamps
WHISPER = "openai:whisper-1"  # table: $0.006/min, word timestamps
TURBO = "b:whisper-large-v3-turbo"  # $0.04/h = $0.000667/min, 10 s minimum, word timestamps
FLOOR = "c:floor"  # $0.001/min, 30 s minimum, segment timestamps
PLAIN = "c:plain"  # $0.002/min, no minimum, no timestamps


def catalogue() -> Catalogue:
    return build_catalogue(tomllib.loads(PROVIDERS), origin="test providers")


@dataclass(frozen=True)
class Case:
    name: str
    candidates: list[str]
    policy: str
    seconds: float
    needs: Needs
    chain: list[str]
    reason: str


CASES = [
    Case(
        "chain keeps the configured order exactly",
        [WHISPER, TURBO, MINI, "local"],
        "chain",
        60.0,
        Needs(timestamps="word"),
        [WHISPER, TURBO, MINI, "local"],
        "chain order",
    ),
    Case(
        "cheapest without needs: the cheapest per minute, the rest by price, local last",
        ["local", WHISPER, MINI, TURBO],
        "cheapest",
        60.0,
        Needs(),
        [TURBO, MINI, WHISPER, "local"],
        f"cheapest: {TURBO} $0.000667 < {MINI} $0.0030",
    ),
    Case(
        "word timestamps: models that give words first, a cheaper one without them after",
        [MINI, PLAIN, WHISPER, TURBO],
        "cheapest",
        60.0,
        Needs(timestamps="word"),
        [TURBO, WHISPER, PLAIN, MINI],
        f"cheapest meeting timestamps=word: {TURBO} $0.000667 < {WHISPER} $0.0060",
    ),
    Case(
        "a 6 s file: the 10 s minimum is billed, still cheapest",
        [WHISPER, TURBO],
        "cheapest",
        6.0,
        Needs(timestamps="word"),
        [TURBO, WHISPER],
        f"cheapest meeting timestamps=word: {TURBO} $0.000111 (10 s minimum) < {WHISPER} $0.0006",
    ),
    Case(
        "a long file: the minimum does not matter, the lower price wins",
        [PLAIN, FLOOR],
        "cheapest",
        120.0,
        Needs(),
        [FLOOR, PLAIN],
        f"cheapest: {FLOOR} $0.0020 < {PLAIN} $0.0040",
    ),
    Case(
        "a short file: the 30 s minimum flips the choice to the dearer price without one",
        [PLAIN, FLOOR],
        "cheapest",
        6.0,
        Needs(),
        [PLAIN, FLOOR],
        f"cheapest: {PLAIN} $0.0002 < {FLOOR} $0.0005 (30 s minimum)",
    ),
    Case(
        "segment timestamps: a word model meets them too; self-hosted at zero cost first",
        [WHISPER, MINI, "gpu:whisper-base", FLOOR],
        "cheapest",
        60.0,
        Needs(timestamps="segment"),
        ["gpu:whisper-base", FLOOR, WHISPER, MINI],
        f"cheapest meeting timestamps=segment: gpu:whisper-base $0 < {FLOOR} $0.0010",
    ),
    Case(
        "diarization nobody meets: every model by price, said so",
        [WHISPER, MINI],
        "cheapest",
        60.0,
        Needs(diarize=True),
        [MINI, WHISPER],
        f"none meets diarize; cheapest: {MINI} $0.0030 < {WHISPER} $0.0060",
    ),
    Case(
        "diarization one model meets: it goes first though dearer",
        [MINI, "c:speakers", WHISPER],
        "cheapest",
        60.0,
        Needs(timestamps="segment", diarize=True),
        ["c:speakers", MINI, WHISPER],
        "cheapest meeting timestamps=segment, diarize: c:speakers $0.0100 (the only one)",
    ),
    Case(
        "ties keep the configured order",
        ["c:twin", PLAIN],
        "cheapest",
        60.0,
        Needs(),
        ["c:twin", PLAIN],
        f"cheapest: c:twin $0.0020 < {PLAIN} $0.0020",
    ),
    Case(
        "bare names (today's single-provider chains) resolve to the default provider",
        ["whisper-1", "gpt-4o-mini-transcribe"],
        "cheapest",
        60.0,
        Needs(timestamps="word"),
        ["whisper-1", "gpt-4o-mini-transcribe"],
        "cheapest meeting timestamps=word: whisper-1 $0.0060 (the only one)",
    ),
    Case(
        "only the local engine",
        ["local"],
        "cheapest",
        60.0,
        Needs(timestamps="word"),
        ["local"],
        "cheapest: local (no hosted model)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_route(case: Case) -> None:
    prices = load_price_table("2026-11")
    got = route(catalogue(), case.candidates, case.needs, case.policy, case.seconds, prices=prices)
    assert (list(got.chain), got.reason) == (case.chain, case.reason)
    assert got.model == case.chain[0]


def test_expected_cost_of_each_kind_of_price() -> None:
    prices = load_price_table("2026-11")
    cat = catalogue()
    assert expected_cost(cat, TURBO, 6.0, prices) == (Decimal("0.04") / 60 * 10 / 60, 10.0)
    assert expected_cost(cat, MINI, 30.0, prices) == (Decimal("0.0015"), 30.0)
    assert expected_cost(cat, "gpu:whisper-base", 30.0, prices) == (Decimal(0), 30.0)
    assert expected_cost(cat, "local", 30.0, prices) == (Decimal(0), 30.0)
    # a token-only price: audio tokens (10 per second in the table's bounds) at its audio-input price
    assert expected_cost(cat, "c:tokens", 60.0, prices) == (Decimal("0.0006"), 60.0)
    # a model nobody prices: the table's default per-minute price
    assert expected_cost(cat, "openai:mystery", 60.0, prices) == (Decimal("0.006"), 60.0)
