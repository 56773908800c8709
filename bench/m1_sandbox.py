"""M1: what the media sandbox (core/sandbox.py) costs per file, against parsing in-process.

For the probe (API) and the decode (worker), each on typical uploads: the CPU and wall time of one call
in this process and through the sandbox (arguments and result through a pipe, a warm child), median of
`VOXQ_BENCH_M1_ROUNDS` (20) calls after one warm-up; plus what starting a child costs once. The WAV/FLAC
rows show what keeping bounded headers in-process saves (`api.probe.bounded_header`; the worker's dr_flac
path for 16 kHz mono FLAC); the MP3/Ogg rows are what every other upload now pays.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import write_section

ROUNDS = int(os.environ.get("VOXQ_BENCH_M1_ROUNDS", "20"))


def _tone(seconds: float, rate: int, channels: int) -> Any:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * np.random.default_rng(1).standard_normal(len(t))) * 32767
    return np.tile(x.astype(np.int16), (channels, 1))


def _encode(fmt: str, codec: str, seconds: float, rate: int, channels: int) -> bytes:
    import av

    layout = "stereo" if channels == 2 else "mono"
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        pcm = _tone(seconds, rate, channels)
        for i in range(0, pcm.shape[1], rate):
            block = pcm[:, i : i + rate]
            frame = av.AudioFrame.from_ndarray(block.T.reshape(1, -1).copy(), format="s16", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def _median(fn: Callable[[], object]) -> tuple[float, float]:
    """(median CPU ms of this process, median wall ms) of `fn` over ROUNDS calls."""
    fn()
    cpu, wall = [], []
    for _ in range(ROUNDS):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    """Measure and write the `m1_sandbox` section of docs/benchmarks.md."""
    from api import probe as api_probe
    from core.sandbox import MediaSandbox
    from worker.audio import codecs

    files = {
        "WAV 16 kHz mono, 5 MB (P4's upload)": _encode("wav", "pcm_s16le", 160, 16000, 1),
        "FLAC 16 kHz mono, 15 s (P1's voicemail)": _encode("flac", "flac", 15, 16000, 1),
        "MP3 44.1 kHz stereo, 60 s": _encode("mp3", "mp3", 60, 44100, 2),
        "Ogg/Opus 48 kHz mono, 60 s": _encode("ogg", "libopus", 60, 48000, 1),
    }
    box = MediaSandbox(processes=1, memory_bytes=1024**3, warm=("api.probe", "worker.audio.codecs"))
    started = time.perf_counter()
    box.run(os.getpid, cpu_seconds=5, timeout=120)
    spawn_ms = (time.perf_counter() - started) * 1000
    rows = []
    try:
        for name, data in files.items():
            here_p = _median(lambda d=data: api_probe.probe_here(io.BytesIO(d)))  # type: ignore[misc]
            box_p = _median(
                lambda d=data: box.run(api_probe._probe_bytes_child, d, cpu_seconds=20, timeout=60)  # type: ignore[misc]
            )
            here_d = _median(lambda d=data: codecs.decode_here(d, max_seconds=21600, memory_seconds=120))  # type: ignore[misc]
            box_d = _median(
                lambda d=data: box.run(  # type: ignore[misc]
                    codecs.decode_here, d, max_seconds=21600, memory_seconds=120, cpu_seconds=60, timeout=120
                )
            )
            in_process = api_probe.bounded_header(data[: api_probe.HEADER_BYTES])
            where = "in process" if in_process else "sandbox"
            rows.append(
                f"| {name} | {len(data) / 1e6:.2f} | {here_p[0]:.2f} | {box_p[0]:.2f} / {box_p[1]:.2f} | "
                f"{where} | {here_d[0]:.1f} | {box_d[0]:.1f} / {box_d[1]:.1f} |"
            )
    finally:
        box.close()
    body = (
        "## M1 media sandbox: cost per file (`bench/m1_sandbox.py`)\n\n"
        f"Median of {ROUNDS} calls after a warm-up; CPU of this process (the caller) and wall time. "
        f"Starting one child (a fresh interpreter importing PyAV and numpy) took {spawn_ms:.0f} ms, once "
        "per child (children are reused).\n\n"
        "| file | MB | probe in process: CPU ms | probe via sandbox: caller CPU ms / wall ms "
        "| the API probes it | decode in process: CPU ms | decode via sandbox: caller CPU ms / wall ms |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_section("m1_sandbox", body)
    print(body)


if __name__ == "__main__":
    main()
