"""Worker processes move what startup left alive out of the garbage collector's full scans (P1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

# Run in a fresh interpreter: freezing is process-wide and must not leak into the test process.
_CHECK = """
import gc, os, sys
{send}
frozen = gc.get_freeze_count()
scanned = {{id(o) for o in gc.get_objects()}}  # the frozen objects are in no generation
import worker.transcribe, worker.prepare, sqlalchemy.orm
for module in (worker.transcribe, worker.prepare, sqlalchemy.orm):
    assert id(vars(module)) not in scanned, module
later = [[i] for i in range(1000)]  # objects created afterwards are still collected as usual
assert any(id(x) == id(later[0]) for x in gc.get_objects())
print(frozen, len(scanned))
sys.stdout.flush()
os._exit(0)  # the runtime's loop thread and connections die with the process
"""


def _run(send: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHECK.format(send=send))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    frozen, scanned = (int(x) for x in out.stdout.split()[-2:])
    return frozen, scanned


_AFTER_TASK_IMPORTS = "import worker.app, worker.signals, worker.prepare, worker.transcribe\n"


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(
            # The main process, before a prefork pool forks or a threads pool starts.
            "import worker.app, worker.signals\n"
            "from celery.signals import worker_init\n"
            "assert 'worker.transcribe' not in sys.modules\n"
            "worker_init.send(sender=None)",
            id="worker_init imports the task modules and freezes them",
        ),
        pytest.param(
            _AFTER_TASK_IMPORTS
            + "from celery.signals import worker_process_init\nworker_process_init.send(sender=None)",
            id="prefork child init freezes what the child added",
        ),
        pytest.param(
            _AFTER_TASK_IMPORTS + "from celery.signals import worker_ready\nworker_ready.send(sender=None)",
            id="worker_ready freezes the process running a threads pool",
        ),
    ],
)
def test_worker_signal_freezes_startup_objects(send: str) -> None:
    frozen, scanned = _run(send)
    assert frozen > 50_000
    assert scanned < frozen / 4


def test_worker_init_sets_the_collector_thresholds_which_forked_children_keep() -> None:
    code = textwrap.dedent(
        """
        import gc, os, sys
        import worker.app, worker.signals
        from celery.signals import worker_init
        assert gc.get_threshold() == (700, 10, 10)
        worker_init.send(sender=None)
        print(*gc.get_threshold())
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # a prefork child
            print(*gc.get_threshold())
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from worker.signals import COLLECTOR_THRESHOLDS

    expected = " ".join(str(x) for x in COLLECTOR_THRESHOLDS)
    assert out.stdout.split("\n")[-3:-1] == [expected, expected]
