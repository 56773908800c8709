"""Run every benchmark in bench/ (a module with `main()`), or only the named ones: `python -m bench NAME`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import bench


def available() -> list[str]:
    """Names of the benchmark modules in this package."""
    names = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_"):
            continue
        if callable(getattr(importlib.import_module(f"bench.{info.name}"), "main", None)):
            names.append(info.name)
    return sorted(names)


def run(argv: list[str]) -> int:
    """Run the named benchmarks (all when none are named); return a process exit code."""
    names = argv or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    failed = []
    for name in names:
        print(f"== bench {name}", flush=True)
        started = time.perf_counter()
        try:
            importlib.import_module(f"bench.{name}").main()
        except Exception:  # one broken benchmark must not cost the others' results
            traceback.print_exc()
            failed.append(name)
            print(f"== bench {name} FAILED after {time.perf_counter() - started:.1f}s", flush=True)
            continue
        print(f"== bench {name} done in {time.perf_counter() - started:.1f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
