"""Task arguments carry ids and small enums only: Flower, the broker and worker logs show them, so no
filenames, transcripts, prompts, URLs or secrets may travel in a task message."""

from __future__ import annotations

import inspect
import re
import uuid
from typing import Any

import pytest
from celery import Celery

from core import names
from core.statuses import Priority

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Parameters that are not ids but are safe to show: small enums and counters, and a worker's name.
SMALL_ARGS = {"priority": "str", "attempt": "int", "worker": "str | None"}
ID_ANNOTATIONS = {"str", "str | None", "list[str]"}

# Sent by beat, with no arguments.
SCHEDULED_ONLY = {names.TASK_HEARTBEAT, names.TASK_SWEEP, names.TASK_SWEEP_STORAGE}


def voxq_tasks() -> dict[str, Any]:
    import worker.tasks  # noqa: F401  (registers the tasks)
    from worker.app import app

    return {name: task for name, task in app.tasks.items() if name.startswith("voxq.")}


def test_every_task_name_is_a_constant() -> None:
    constants = {v for k, v in vars(names).items() if k.startswith("TASK_")}
    assert set(voxq_tasks()) <= constants


def test_task_signatures_take_ids_and_small_enums_only() -> None:
    tasks = voxq_tasks()
    assert tasks
    for name, task in tasks.items():
        signature = inspect.signature(task.run)
        for param in signature.parameters.values():
            where = f"{name}({param.name})"
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{where}: tasks take keyword-only arguments"
            annotation = str(param.annotation)
            if param.name.endswith(("_id", "_ids")):
                assert annotation in ID_ANNOTATIONS, f"{where}: ids travel as strings, not {annotation}"
            else:
                assert param.name in SMALL_ARGS, (
                    f"{where}: only ids and {sorted(SMALL_ARGS)} may be task arguments"
                )
                assert annotation == SMALL_ARGS[param.name], f"{where}: {annotation}"


def test_beat_schedule_sends_no_arguments() -> None:
    from worker.app import app

    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in SCHEDULED_ONLY
        assert not entry.get("args") and not entry.get("kwargs")


def _check_value(task: str, key: str, value: object) -> None:
    if key.endswith("_ids"):
        assert isinstance(value, list) and value, (task, key)
        for item in value:
            assert isinstance(item, str) and UUID_RE.match(item), (task, key, item)
    elif key.endswith("_id"):
        assert isinstance(value, str) and UUID_RE.match(value), (task, key, value)
    elif key == "priority":
        assert value in {p.value for p in Priority}, (task, key, value)
    elif key == "attempt":
        assert isinstance(value, int) and not isinstance(value, bool), (task, key, value)
    else:
        raise AssertionError(f"{task} was sent an unexpected argument {key!r}")


def test_dispatchers_send_ids_and_small_enums_only(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = []

    def record(self: Celery, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        sent.append((name, tuple(args or ()), dict(kwargs or {}), options.get("queue", "")))

    # Record instead of publishing: this checks the message content, not the broker.
    monkeypatch.setattr(Celery, "send_task", record)
    import api.enqueue
    import worker.dispatch

    ids = [uuid.uuid4() for _ in range(120)]
    assert api.enqueue.enqueue_jobs(ids, priority="high") == 3
    worker.dispatch.send_prepare(ids[:3], priority="low")
    worker.dispatch.send_group(ids[0], priority="normal")
    worker.dispatch.send_local(ids[1], ids[2])
    worker.dispatch.send_webhook(ids[3], attempt=2, countdown=1.5)
    worker.dispatch.send_align(ids[4], str(ids[5]))
    api.enqueue.enqueue_alignment(ids[6], str(ids[7]))

    tasks = voxq_tasks()
    seen = set()
    for name, args, kwargs, queue in sent:
        assert name in tasks, name
        assert args == (), f"{name}: positional arguments"
        assert queue in names.ALL_QUEUES
        for key, value in kwargs.items():
            _check_value(name, key, value)
        # And what was sent is what the task accepts.
        inspect.signature(tasks[name].run).bind(**kwargs)
        seen.add(name)
    # Every task that is not beat-scheduled has a dispatcher exercised here.
    assert seen == set(tasks) - SCHEDULED_ONLY


def test_prepare_tasks_go_to_their_priority_ingest_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def record(self: Celery, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        sent.append(options["queue"])

    monkeypatch.setattr(Celery, "send_task", record)
    import api.enqueue
    import worker.dispatch

    ids = [uuid.uuid4()]
    api.enqueue.enqueue_jobs(ids, priority="high")
    api.enqueue.enqueue_jobs(ids, priority="normal")
    worker.dispatch.send_prepare(ids, priority="high")
    worker.dispatch.send_prepare(ids, priority="low")
    assert sent == [names.QUEUE_INGEST_HIGH, names.QUEUE_INGEST, names.QUEUE_INGEST_HIGH, names.QUEUE_INGEST]
