"""`voxq dev` refuses a port another process listens on before it starts anything (a real socket)."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxq.devstack import DevStack


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    import socket

    from core.errors import ConfigError
    from voxq.embedded import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = DevStack(tmp_path / "data", api_port=free_port(), flower_port=port, env={"PATH": "/bin"})
        with pytest.raises(ConfigError, match=f"port {port} for the Flower is in use"):
            stack.start()
    assert not (tmp_path / "data" / "postgres").exists()  # nothing was started
