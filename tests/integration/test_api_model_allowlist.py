"""Tenants may only name models the operator configured (issue #16 item 18).

The session API server runs with the default chain (gpt-4o-mini-transcribe, gpt-4o-transcribe, local) and
no `VOXQ_ALLOWED_MODELS`: any other name is refused with 422 `model_not_allowed`, on both ways to give
options (a JSON batch and the one-file form), before any row or object exists.
"""

from __future__ import annotations

from sqlalchemy import func, select

from core.db import session_scope
from core.models import Batch
from tests.api_helpers import ApiServer, make_key, sine_wav, tenant_objects


def test_a_batch_naming_an_unconfigured_model_is_refused(api: ApiServer) -> None:
    with api.client(make_key("models")) as c:
        refused = c.post("/v1/batches", json={"models": ["gpt-4o-transcribe", "my-finetune:v2"]})
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        body = refused.json()
        assert body["code"] == "model_not_allowed"
        assert "my-finetune:v2" in body["detail"]
        form = c.post(
            "/v1/jobs", files=[("file", ("a.wav", sine_wav(0.5)))], data={"models": "gpt-4o-transcribe,evil"}
        )
        assert form.status_code == 422, form.text
        assert form.json()["code"] == "model_not_allowed"
        with session_scope() as session:
            assert session.scalar(select(func.count()).select_from(Batch)) == 0
        assert tenant_objects("models") == []
        # the configured chain, in any order or subset, is accepted
        ok = c.post("/v1/batches", json={"models": ["local", "gpt-4o-transcribe"]})
        assert ok.status_code == 201, ok.text
        assert ok.json()["models"] == ["local", "gpt-4o-transcribe"]
