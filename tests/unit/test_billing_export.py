"""The provider's usage export is read in the shapes billing gateways produce."""

from __future__ import annotations

import json

import pytest

from core.billing import BilledRequest, parse_export

ROWS = [
    {"request_id": "a", "model": "whisper-1", "usage": {"type": "duration", "seconds": 3}, "ts": 1.0},
    {"request_id": "b", "model": "gpt-4o-mini-transcribe", "usage": {"type": "tokens", "input_tokens": 5}},
]
EXPECTED = [
    BilledRequest("a", "whisper-1", {"type": "duration", "seconds": 3}),
    BilledRequest("b", "gpt-4o-mini-transcribe", {"type": "tokens", "input_tokens": 5}),
]


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(ROWS),
        json.dumps({"data": ROWS, "since": 0}),
        "\n".join(json.dumps(r) for r in ROWS) + "\n",
    ],
    ids=["json-list", "data-object", "json-lines"],
)
def test_export_shapes(raw: str) -> None:
    assert parse_export(raw) == EXPECTED


def test_an_empty_export_lists_nothing() -> None:
    assert parse_export("") == [] and parse_export("[]") == []


def test_a_line_without_request_id_is_refused() -> None:
    with pytest.raises(ValueError, match="request_id"):
        parse_export(json.dumps([{"model": "whisper-1", "usage": {}}]))
