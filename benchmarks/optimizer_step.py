"""The adapter's optimizer step: the trainer's AdamW (fused where torch has the kernel) vs torch's other AdamW
implementations, on a real PPD adapter for Stage C lite or full (152 M / 539 M parameters).

Each variant runs in a fresh process; peak memory (CUDA allocator, or peak resident set size on a CPU) is measured
above what the process held before building the adapter, so it includes the parameters, their gradients, the two
AdamW moments and whatever the step itself allocates. Median step time and ratios against the trainer's choice.

    python benchmarks/optimizer_step.py [--kind lite|full] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from measure import in_fresh_process, peak_memory_mib, timed  # noqa: E402  (same folder)

from ppd_train.adapter import KNOWN_STAGE_C, AdapterConfig, PPDAdapter, StageCInfo
from ppd_train.train import adamw

VARIANTS = ("trainer", "for-each", "single-tensor")  # trainer = ppd_train.train.adamw (fused where available)


def run(variant: str, kind: str, steps: int, device: torch.device) -> dict:
    before = peak_memory_mib(device)
    width, heads, blocks = KNOWN_STAGE_C[kind]
    info = StageCInfo((width,) * blocks, (heads,) * blocks)
    adapter = PPDAdapter(AdapterConfig.for_stage_c(info, embed_dim=896, num_tokens=29)).to(device)
    params = list(adapter.parameters())
    if variant == "trainer":
        opt = adamw(params, 1e-5, 0.01)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=variant == "for-each")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the moments
    times = [timed(opt.step, device) for _ in range(steps)]
    return {"variant": variant, "fused": bool(opt.defaults.get("fused")), "step_s": statistics.median(times),
            "peak_mb": peak_memory_mib(device) - before,
            "params_mb": sum(p.numel() * p.element_size() for p in params) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="lite", choices=sorted(KNOWN_STAGE_C))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="optimizer_step.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # run by the parent in a fresh process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant:
        with open(args.result, "w") as f:
            json.dump(run(args.variant, args.kind, args.steps, device), f)
        return
    rows = [in_fresh_process(__file__, ["--kind", args.kind, "--steps", str(args.steps), "--variant", v])
            for v in VARIANTS]
    ours = rows[0]
    print(f"AdamW step on the PPD adapter for Stage C '{args.kind}' ({ours['params_mb']:.0f} MiB of float32 "
          f"parameters), {device}, median of {args.steps}")
    print(f"{'variant':14s} {'fused':>5s} {'step s':>8s} {'peak MiB':>9s} {'time / trainer':>14s} "
          f"{'peak / trainer':>14s}")
    for r in rows:
        r["time_ratio"], r["peak_ratio"] = r["step_s"] / ours["step_s"], r["peak_mb"] / ours["peak_mb"]
        print(f"{r['variant']:14s} {str(r['fused']):>5s} {r['step_s']:8.3f} {r['peak_mb']:9.0f} "
              f"{r['time_ratio']:14.2f} {r['peak_ratio']:14.2f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "optimizer_step", "kind": args.kind, "device": str(device), "rows": rows}, f,
                  indent=2)


if __name__ == "__main__":
    main()
