"""The adapter's optimizer step alone: the trainer's AdamW (fused where torch has the kernel), its 8-bit AdamW
(``optimizer = "adamw8bit"``) and torch's other AdamW implementations, on a real PPD adapter for Stage C lite or full
(152 M / 539 M parameters). The step is a small part of a DPO step (``dpo_step.py`` times both).

Each run of a variant is a fresh process, the variants interleaved (A B C D A B C D ...) ``--repeats`` times; peak
memory (CUDA allocator, or peak resident set size on a CPU) is measured above what the process held before building
the adapter, so it includes the parameters, their gradients, the optimizer state and whatever the step allocates.
Median (min-max) over the runs of each run's median step time, and ratios against the trainer's default.

    python benchmarks/optimizer_step.py [--kind lite|full] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from measure import fmt, in_fresh_process, interleaved, peak_memory_mib, spread, timed  # noqa: E402  (same folder)

from ppd_train.adapter import KNOWN_STAGE_C, AdapterConfig, ModelInfo, PPDAdapter
from ppd_train.optim import adamw, make_optimizer

# trainer = ppd_train.optim.adamw (fused where available, the default), 8-bit = optimizer "adamw8bit"
VARIANTS = ("trainer", "8-bit", "for-each", "single-tensor")


def run(variant: str, kind: str, steps: int, device: torch.device) -> dict:
    before = peak_memory_mib(device)
    width, heads, blocks = KNOWN_STAGE_C[kind]
    info = ModelInfo((width,) * blocks, (heads,) * blocks)
    adapter = PPDAdapter(AdapterConfig.for_model(info, embed_dim=896, num_tokens=29)).to(device)
    params = list(adapter.parameters())
    if variant == "trainer":
        opt = adamw(params, 1e-5, 0.01)
    elif variant == "8-bit":
        opt = make_optimizer("adamw8bit", params, 1e-5, 0.01)
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
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs of each variant, interleaved")
    ap.add_argument("--out", default="optimizer_step.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # run by the parent in a fresh process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant:
        with open(args.result, "w") as f:
            json.dump(run(args.variant, args.kind, args.steps, device), f)
        return
    common = ["--kind", args.kind, "--steps", str(args.steps)]
    runs = interleaved(VARIANTS, args.repeats, lambda v: in_fresh_process(__file__, [*common, "--variant", v]))
    rows = [{"variant": v, "fused": got[0]["fused"], "params_mb": got[0]["params_mb"],
             **{k: spread([r[k] for r in got]) for k in ("step_s", "peak_mb")}} for v, got in runs.items()]
    ours = rows[0]
    print(f"Optimizer step on the PPD adapter for Stage C '{args.kind}' ({ours['params_mb']:.0f} MiB of float32 "
          f"parameters), {device}, median (min-max) of {args.repeats} interleaved runs of {args.steps} steps")
    print(f"{'variant':14s} {'fused':>5s} {'step s':>22s} {'peak MiB':>20s} {'time / trainer':>14s} "
          f"{'peak / trainer':>14s}")
    for r in rows:
        r["time_ratio"] = r["step_s"]["median"] / ours["step_s"]["median"]
        r["peak_ratio"] = r["peak_mb"]["median"] / ours["peak_mb"]["median"]
        print(f"{r['variant']:14s} {str(r['fused']):>5s} {fmt(r['step_s'], 3):>22s} {fmt(r['peak_mb'], 0):>20s} "
              f"{r['time_ratio']:14.2f} {r['peak_ratio']:14.2f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "optimizer_step", "kind": args.kind, "device": str(device), "repeats": args.repeats,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
