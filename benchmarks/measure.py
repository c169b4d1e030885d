"""Time, peak memory and operation counts, measured the same way by every benchmark.

Time: wall time of one call, synchronising CUDA on both sides so device work is counted. Peak memory: the CUDA
allocator's peak, or on a CPU the process's peak resident set size. A CPU peak cannot be reset, so a benchmark that
compares peaks runs each variant in a fresh process (``in_fresh_process``) and subtracts the peak it had before.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def interleaved(variants: Sequence[K], repeats: int, run: Callable[[K], T]) -> dict[K, list[T]]:
    """``run`` each variant ``repeats`` times in the order A B C A B C ..., results grouped by variant."""
    out: dict[K, list[T]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            out[v].append(run(v))
    return out


def spread(values: Sequence[float]) -> dict:
    """Median, min and max of repeated measurements (what every benchmark reports)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 1) -> str:
    """``median (min-max)`` of a ``spread``."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB (NaN where the platform cannot say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def in_fresh_process(script: str, args: list[str]) -> dict:
    """Run ``script args --result FILE`` in a new Python and return the JSON object it wrote to FILE."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        subprocess.run([sys.executable, script, *args, "--result", path], check=True)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        elif not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(non-view aten ops, host-device syncs) that one call of ``fn`` dispatches."""
    with _CountOps() as counter:
        fn()
    return counter.ops, counter.syncs
