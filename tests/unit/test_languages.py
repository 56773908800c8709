"""Language names to ISO-639-1 codes (issue #16, item 22b)."""

from __future__ import annotations

import httpx
import pytest

from core.languages import CODES, WHISPER_NAMES, iso_language
from core.providers.base import TranscriptionRequest
from core.providers.openai import OpenAIProvider


@pytest.mark.parametrize(
    ("given", "code"),
    [
        ("english", "en"),
        ("English", "en"),
        (" german ", "de"),
        ("haitian creole", "ht"),
        ("castilian", "es"),  # an alias Whisper accepts
        ("en", "en"),
        ("en-US", "en"),
        ("pt_BR", "pt"),
        ("jw", "jv"),  # Whisper's code for Javanese is not ISO's
        ("javanese", "jv"),
        ("cantonese", "yue"),  # no two-letter code exists
        ("klingon", None),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_names_and_codes_become_iso_codes(given: object, code: str | None) -> None:
    assert iso_language(given) == code


def test_every_whisper_language_has_a_code() -> None:
    assert len(WHISPER_NAMES) == 100  # faster-whisper's multilingual `supported_languages`
    assert all(iso_language(name) == code for name, code in WHISPER_NAMES.items())
    assert all(len(code) == 2 for code in CODES - {"haw", "yue"})


def _answer(body: dict[str, object], **request: object) -> str | None:
    import asyncio

    async def run() -> str | None:
        transport = httpx.MockTransport(lambda _req: httpx.Response(200, json=body))
        async with httpx.AsyncClient(transport=transport) as client:
            provider = OpenAIProvider(client, base_url="http://p/v1", api_key="k", timeout=5.0)
            fields: dict[str, object] = {
                "audio": b"x",
                "filename": "a.flac",
                "content_type": "audio/flac",
                "model": "whisper-1",
                "audio_seconds": 1.0,
                "want_timestamps": True,
            }
            fields.update(request)
            result = await provider.transcribe(TranscriptionRequest(**fields))  # type: ignore[arg-type]
            return result.language

    return asyncio.run(run())


def test_the_provider_answer_carries_an_iso_code() -> None:
    assert _answer({"text": "hallo", "language": "german", "segments": []}) == "de"
    assert _answer({"text": "hi", "language": "English"}) == "en"
    # No language, or one nobody knows: the language the request asked for, if any.
    assert _answer({"text": "hi"}, language="fr") == "fr"
    assert _answer({"text": "hi", "language": "klingon"}) is None
