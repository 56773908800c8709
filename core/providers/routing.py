"""Routing by need: the order in which a job's candidate models are tried, and why (issue #17).

A batch asks for `timestamps` (none/segment/word), `diarize` and a `language`, and names a routing
policy. The candidates are the job's model chain as the worker computes it (worker.grouping.model_chain:
retired models already left out); `route` only orders them, it never adds or drops one:

- `chain` (the default): the chain exactly as configured, today's behaviour.
- `cheapest`: the models that meet the batch's needs first, by the expected cost of THIS file, then the
  others by the same cost as fallbacks, the local engine (`local`, `local:<weights>`) last. Ties keep the
  configured order.

"Meets the needs" is what the catalogue's capabilities promise natively: `timestamps = "word"` needs a
model that answers word timings (`segment` needs segment or word timings), `diarize` one that labels
speakers. A model without them stays usable as a fallback: voxq's alignment (issue #18) computes
timings locally when a model gives none. No capability declares languages, so `language` orders nothing
(kept in `Needs` so a reason can say what was asked). A model the catalogue does not declare has the
default capabilities (no timestamps, no diarization).

The expected cost of a file is the model's per-minute price x max(seconds, min_billed_seconds) / 60: a
providers-file PriceSpec's own per-minute (or per-hour) price and minimum; a price-table model's
per-minute list price (for token-priced models that is the table's per-minute estimate); a token-only
PriceSpec its audio tokens at its audio-input price; `price = "zero"` (self-hosted) and `local` cost 0;
a model nobody prices the table's default per-minute price (as core.pricing estimates it).

Pure: (catalogue, price table, candidates, needs, policy, seconds) in, a `Route` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from core.pricing import MILLION, SIXTY, PriceTable, is_local_model
from core.providers.config import OPENAI, Catalogue, ModelConfig, PriceSpec

Policy = Literal["chain", "cheapest"]
ROUTING_POLICIES: tuple[str, ...] = ("chain", "cheapest")
CHAIN_ORDER = "chain order"
_TIMESTAMP_RANK = {"none": 0, "segment": 1, "word": 2}
_ZERO = Decimal(0)


@dataclass(frozen=True)
class Needs:
    """What a batch asks of the model that transcribes it."""

    timestamps: str = "none"  # none | segment | word
    diarize: bool = False
    language: str | None = None

    def describe(self) -> str:
        """The needs that order models, as a reason says them ("" when none does)."""
        parts = []
        if self.timestamps != "none":
            parts.append(f"timestamps={self.timestamps}")
        if self.diarize:
            parts.append("diarize")
        return ", ".join(parts)


@dataclass(frozen=True)
class Route:
    """A job's chain in the order it is tried, and why the first model is first."""

    chain: tuple[str, ...]
    reason: str

    @property
    def model(self) -> str | None:
        """The model tried first (None for an empty chain)."""
        return self.chain[0] if self.chain else None


def meets(model: ModelConfig | None, needs: Needs) -> bool:
    """Whether the model natively gives what the batch needs (an undeclared model: default capabilities)."""
    caps = model.capabilities if model is not None else None
    timestamps = caps.timestamps if caps is not None else "none"
    if _TIMESTAMP_RANK.get(timestamps, 0) < _TIMESTAMP_RANK.get(needs.timestamps, 0):
        return False
    return not needs.diarize or (caps is not None and caps.diarization)


def expected_cost(
    catalogue: Catalogue,
    entry: str,
    seconds: float,
    prices: PriceTable,
    default_provider: str = OPENAI,
) -> tuple[Decimal, float]:
    """(USD, billed seconds) one request of `seconds` of audio to this chain entry is expected to cost."""
    seconds = max(float(seconds), 0.0)
    ref = catalogue.resolve(entry, default_provider)
    if ref is None:
        return _ZERO, seconds
    model = catalogue.model(ref)
    price = model.price if model is not None else "table"
    if price == "zero":
        return _ZERO, seconds
    if isinstance(price, PriceSpec):
        billed = max(seconds, float(price.min_billed_seconds))
        if price.minute_price is not None:
            return price.minute_price * Decimal(str(billed)) / SIXTY, billed
        audio_price = price.audio_input_per_million or _ZERO
        tokens = Decimal(str(billed)) * prices.audio_tokens_per_second
        return tokens * audio_price / MILLION, billed
    table = prices.prices_for(ref.model)
    per_minute = table.per_minute if table is not None and table.per_minute is not None else None
    unit = per_minute if per_minute is not None else prices.default_per_minute
    return unit * Decimal(str(seconds)) / SIXTY, seconds


def _money(usd: Decimal) -> str:
    """$ with 6 decimals, trailing zeros dropped down to 4 ("$0.0010", "$0.000667", "$0")."""
    if usd == 0:
        return "$0"
    text = f"{usd:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(4, '0')}"


def route(
    catalogue: Catalogue,
    candidates: list[str],
    needs: Needs,
    policy: str,
    audio_seconds: float,
    *,
    prices: PriceTable,
    default_provider: str = OPENAI,
) -> Route:
    """The candidates in the order `policy` tries them for a file of `audio_seconds` (module docstring).
    The candidates are already today's: retired models are left out by the chain's rules."""
    if policy != "cheapest":
        return Route(tuple(candidates), CHAIN_ORDER)
    hosted = [(i, e) for i, e in enumerate(candidates) if not is_local_model(e)]
    local = [e for e in candidates if is_local_model(e)]
    costs = {e: expected_cost(catalogue, e, audio_seconds, prices, default_provider) for _, e in hosted}

    def fits(entry: str) -> bool:
        ref = catalogue.resolve(entry, default_provider)
        return meets(catalogue.model(ref) if ref is not None else None, needs)

    def by_cost(items: list[tuple[int, str]]) -> list[str]:
        return [e for _, e in sorted(items, key=lambda item: (costs[item[1]][0], item[0]))]

    good = by_cost([(i, e) for i, e in hosted if fits(e)])
    rest = by_cost([(i, e) for i, e in hosted if not fits(e)])
    chain = tuple(good + rest + local)
    return Route(chain, _reason(needs, good, rest, local, costs, audio_seconds))


def _reason(
    needs: Needs,
    good: list[str],
    rest: list[str],
    local: list[str],
    costs: dict[str, tuple[Decimal, float]],
    seconds: float,
) -> str:
    """Short and stable: what was asked, the chosen model and its cost against the runner-up."""

    def said(entry: str) -> str:
        usd, billed = costs[entry]
        minimum = f" ({billed:g} s minimum)" if billed > seconds else ""
        return f"{entry} {_money(usd)}{minimum}"

    asked = needs.describe()
    if good:
        head, pool = f"cheapest meeting {asked}" if asked else "cheapest", good
    elif rest:
        head, pool = f"none meets {asked}; cheapest", rest
    else:
        return f"cheapest: {local[0]} (no hosted model)" if local else "cheapest: no model"
    chosen = said(pool[0])
    if len(pool) > 1:
        return f"{head}: {chosen} < {said(pool[1])}"
    return f"{head}: {chosen} (the only one)"
