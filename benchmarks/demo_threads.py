"""Torch threads for the demo on a small CPU, idle and loaded: one training step of the default synthetic world.

On a 2-core machine a tiny Stage C gains little from a second thread, and when another process is busy a second
thread waits for a core at every parallel region. This measures one DPO step of the demo (its world, batch and
Trainer) with 1 and 2 threads, idle and with a CPU-burning process alongside, interleaved (every repeat runs all four
cases, so drift hits them alike); medians with the spread (min-max). ``--demo`` also times the whole default
``ppd-train demo`` with a burner alongside, for each thread count.

    python benchmarks/demo_threads.py [--repeats 5] [--steps 10] [--demo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from ppd_train.synthetic import DemoConfig, World, build_dataset
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.train import Trainer

BURN = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"


@contextmanager
def burner(on: bool):
    """A process that keeps one core busy (bounded to an hour, stopped on exit)."""
    proc = subprocess.Popen([sys.executable, "-c", BURN]) if on else None
    try:
        if proc:
            time.sleep(0.5)
        yield
    finally:
        if proc:
            proc.kill()
            proc.wait()


def step_seconds(trainer: Trainer, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    trainer.train_step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def demo_seconds(threads: int, out: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ppd_train", "demo", "--out", out, "--quiet", "--set", f"threads={threads}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--demo", action="store_true", help="also time the whole default demo, loaded, per thread count")
    ap.add_argument("--out", default="demo_threads.json")
    args = ap.parse_args()
    cfg = DemoConfig()
    world = World(cfg.world, cfg.seed)
    data, _, views = build_dataset(world, cfg.seed)
    unet = build_tiny_stage_c(seed=0, width=cfg.world.width, clip_dim=cfg.world.width)
    cases = [(load, threads) for load in ("idle", "loaded") for threads in (1, 2)]
    times: dict[str, list[float]] = {f"{load}/{threads}": [] for load, threads in cases}
    with tempfile.TemporaryDirectory() as tmp:
        train = cfg.train
        train.out_dir, train.tensorboard = tmp, False
        trainer = Trainer(train, unet, data, views, "bench", show_progress=False)
        for _ in range(args.repeats):
            for load, threads in cases:
                with burner(load == "loaded"):
                    times[f"{load}/{threads}"].append(step_seconds(trainer, threads, args.steps))
        trainer.detach()
    cores = len(__import__("os").sched_getaffinity(0))
    print(f"one demo DPO step (batch {train.batch_size}), {cores} cores, median of {args.repeats} (min-max)")
    base = statistics.median(times["idle/1"])
    for key, ts in times.items():
        print(f"  {key:9s} threads: {statistics.median(ts) * 1000:7.1f} ms ({min(ts) * 1000:.1f}-{max(ts) * 1000:.1f})"
              f"  x{statistics.median(ts) / base:.2f} of idle/1")
    result: dict = {"benchmark": "demo_threads", "cores": cores, "step_seconds": times}
    if args.demo:
        result["demo_seconds_loaded"] = {}
        for threads in (1, 2):
            with tempfile.TemporaryDirectory() as out, burner(True):
                s = demo_seconds(threads, out)
            result["demo_seconds_loaded"][threads] = s
            print(f"  whole default demo, loaded, {threads} thread(s): {s:.0f} s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
