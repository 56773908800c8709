"""Property-based run over /openapi.json with a valid key: no 5xx, and answers match the document.

Every schemathesis check runs (server errors, status codes, content types, response schemas, ignored
auth, negative data rejection, ...) except `positive_data_acceptance`: the API refuses some
schema-valid text on purpose (NUL characters and lone surrogates cannot be stored in Postgres).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.api_helpers import ApiServer, make_key, sine_wav

EXAMPLES_PER_OPERATION = 40


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_and_no_contract_breaks(api: ApiServer) -> None:
    key = make_key("fuzz")
    headers = {"Authorization": f"Bearer {key}"}
    with api.client(key) as c:  # real ids, so generated requests also reach past the 404s
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        files = [("file", ("a.wav", sine_wav(0.5), "audio/wav"))]
        job_id = c.post(f"/v1/batches/{batch_id}/files", files=files).json()["jobs"][0]["id"]
    real = {"batch_id": batch_id, "job_id": job_id}
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18  # every route is in the document, so every route is fuzzed
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy(), use_real_ids=st.booleans())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case, use_real_ids: bool) -> None:
            if use_real_ids and case.path_parameters:
                case.path_parameters = {k: real.get(k, v) for k, v in case.path_parameters.items()}
            response = case.call_and_validate(
                base_url=api.url, headers=headers, excluded_checks=[positive_data_acceptance], timeout=30
            )
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        run()
    assert len(statuses) == len(operations)
    assert all(code < 500 for codes in statuses.values() for code in codes)
    # the run got past validation too, not only 4xx answers
    assert sum(1 for codes in statuses.values() if any(code < 300 for code in codes)) >= 12, statuses
