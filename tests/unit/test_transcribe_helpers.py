"""Pure helpers of the transcribe stage and worker signals."""

from __future__ import annotations

import uuid

from worker.derived import derived_key
from worker.pieces import PROMPT_TAIL_CHARS, compose_prompt
from worker.signals import consumed_queues


def test_prompt_is_batch_prompt_then_the_previous_chunks_tail() -> None:
    assert compose_prompt(None, None) is None
    assert compose_prompt("Names: Zoë, Øyvind.", None) == "Names: Zoë, Øyvind."
    assert compose_prompt(None, "  hello there ") == "hello there"
    long_text = " ".join(f"word{i}" for i in range(200))
    prompt = compose_prompt("Vocabulary.", long_text)
    assert prompt is not None
    head, tail = prompt.split("\n")
    assert head == "Vocabulary."
    assert len(tail) <= PROMPT_TAIL_CHARS and long_text.endswith(tail)
    assert tail.split(" ")[0].startswith("word")  # cut at a word boundary, not mid-word
    assert f" {tail.split(' ')[0]} " in f" {long_text} "


def test_derived_keys_are_per_tenant_and_job() -> None:
    tenant, job = uuid.uuid4(), uuid.uuid4()
    assert derived_key(tenant, job) == f"{tenant}/derived/{job}.flac"
    assert derived_key(tenant, job, 7) == f"{tenant}/derived/{job}/00007.flac"


def test_consumed_queues_reads_celery_arguments() -> None:
    assert consumed_queues(["celery", "-A", "worker.app", "worker", "-Q", "ingest,local"]) == [
        "ingest",
        "local",
    ]
    assert consumed_queues(["celery", "worker", "--queues=local"]) == ["local"]
    assert consumed_queues(["celery", "worker", "-Qtranscribe"]) == ["transcribe"]
    assert consumed_queues(["celery", "worker"]) == []
