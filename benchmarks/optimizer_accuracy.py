"""How closely ``optimizer = "adamw8bit"`` follows float32 AdamW (torch's), step by step, on the same gradients.

Both optimizers get identical gradient streams (the gradients do not depend on the weights, so the paths never
couple) and each step's update of every value is compared: the relative error |d8 - d32| / |d32| (its median and
90th percentile over the values, and the L2 error of the whole update, each averaged over the steps), the largest
step ratio |d8| / |d32| and the largest |d8 - d32| and |d8| in units of lr. Gradient streams, each a
64x1024 tensor (256 blocks of 256 values), several seeds, ``--steps`` steps:

- ``ordinary``: per-value scales log-normal (sd 1: about two decades inside a block), a signal per value plus unit
  noise each step, so moments cross zero;
- ``six-decades``: per-value scales spread log-uniformly over six decades (1e-6 to 1) inside every block, each value
  keeping its sign (times 1 + 0.5 u, u uniform in [-1, 1]): the case where a code without dynamic range takes huge
  steps;
- ``six-decades-noisy``: the same scales with ``ordinary``'s signal plus noise;
- ``below-eps``: six decades from 1e-4 down to 1e-10, so the smallest gradients lie far below AdamW's eps (1e-8)
  and float32 AdamW moves them by a tiny fraction of lr; the 8-bit steps must stay as tiny.

And ``regression``: the trajectory test of tests/test_optim.py (a real least-squares fit, gradients depend on the
weights), the relative L2 distance of the 8-bit weights from AdamW's after ``--steps`` steps.

    python benchmarks/optimizer_accuracy.py [--seeds 5] [--steps 100] [--out optimizer_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ppd_train.optim import AdamW8bit

LR = 1e-3
KEYS = ("median_rel_error", "p90_rel_error", "l2_rel_error", "max_step_ratio", "max_error_lr", "max_step_lr")
STREAMS = ("ordinary", "six-decades", "six-decades-noisy", "below-eps")


def gradients(kind: str, seed: int, steps: int, shape=(64, 1024)):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "ordinary":
        scale = torch.randn(n, generator=g).exp()
    else:
        top, decades = (0.0, 6.0) if kind != "below-eps" else (-4.0, 6.0)
        scale = 10 ** (top - decades * torch.rand(n, generator=g))
    signal = torch.randn(n, generator=g) * 0.5
    sign = torch.randint(0, 2, (n,), generator=g) * 2.0 - 1
    for _ in range(steps):
        if kind in ("six-decades", "below-eps"):
            yield (scale * sign * (1 + 0.5 * (2 * torch.rand(n, generator=g) - 1))).view(shape)
        else:
            yield (scale * (signal + torch.randn(n, generator=g))).view(shape)


def compare(kind: str, seed: int, steps: int) -> dict:
    p32 = torch.nn.Parameter(torch.zeros(64, 1024))
    p8 = torch.nn.Parameter(torch.zeros(64, 1024))
    o32 = torch.optim.AdamW([p32], lr=LR, weight_decay=0.0)
    o8 = AdamW8bit([p8], lr=LR, weight_decay=0.0)
    rel, ratio, l2, err, big = [], [], [], [], []
    for grad in gradients(kind, seed, steps):
        before32, before8 = p32.detach().clone(), p8.detach().clone()
        p32.grad, p8.grad = grad.clone(), grad.clone()
        o32.step()
        o8.step()
        d32, d8 = (p32.detach() - before32).double(), (p8.detach() - before8).double()
        moved = d32 != 0
        step_rel = (d8 - d32).abs()[moved] / d32.abs()[moved]
        rel.append(torch.stack([step_rel.median(), step_rel.quantile(0.9)]))
        ratio.append((d8.abs()[moved] / d32.abs()[moved]).max().item())
        l2.append(((d8 - d32).norm() / d32.norm()).item())
        err.append((d8 - d32).abs().max().item() / LR)
        big.append(d8.abs().max().item() / LR)
    per_step = torch.stack(rel).mean(dim=0)
    return {"median_rel_error": per_step[0].item(), "p90_rel_error": per_step[1].item(),
            "l2_rel_error": sum(l2) / len(l2), "max_step_ratio": max(ratio), "max_error_lr": max(err),
            "max_step_lr": max(big)}


def regression(seed: int, steps: int) -> float:
    def fit(make):
        torch.manual_seed(seed)
        w = torch.nn.Parameter(torch.zeros(96, 70))
        target = torch.randn(96, 70)
        opt = make([w])
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            x = torch.randn(16, 96, generator=g)
            opt.zero_grad()
            ((x @ w - x @ target - 1) ** 2).mean().backward()
            opt.step()
        return w.detach()

    ref = fit(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    ours = fit(lambda p: AdamW8bit(p, lr=1e-2, weight_decay=0.01))
    return ((ours - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--streams", default=",".join(STREAMS), help="a comma-separated subset of " + ", ".join(STREAMS))
    ap.add_argument("--out", default="optimizer_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"8-bit AdamW vs float32 AdamW, {args.seeds} seeds x {args.steps} steps, lr {LR}; per stream the worst seed "
          "(median over seeds in brackets)")
    print(f"{'stream':18s} {'median rel err':>18s} {'p90 rel err':>18s} {'L2 rel err':>18s} {'max |d8|/|d32|':>18s} "
          f"{'max |d8-d32|/lr':>18s} {'max |d8|/lr':>18s}")
    for kind in args.streams.split(","):
        per_seed = [compare(kind, seed, args.steps) for seed in range(args.seeds)]
        row = {"stream": kind, "seeds": per_seed}
        cells = []
        for key in KEYS:
            values = sorted(s[key] for s in per_seed)
            row[key] = {"worst": values[-1], "median": values[len(values) // 2]}
            cells.append(f"{values[-1]:8.4f} ({values[len(values) // 2]:.4f})")
        rows.append(row)
        print(f"{kind:18s} " + " ".join(f"{c:>18s}" for c in cells))
    reg = [regression(seed, args.steps) for seed in range(args.seeds)]
    print(f"regression: weights' relative L2 distance from AdamW after {args.steps} steps: "
          + ", ".join(f"{r:.4f}" for r in reg))
    with open(args.out, "w") as f:
        json.dump({"benchmark": "optimizer_accuracy", "seeds": args.seeds, "steps": args.steps, "lr": LR,
                   "rows": rows, "regression_rel_l2": reg}, f, indent=2)


if __name__ == "__main__":
    main()
