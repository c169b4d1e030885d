"""Does the embedding confidence say when the pairs say too little? Measured where the truth is known.

Simulated users of the synthetic world's family: a unit taste vector ``p`` over K style directions; a pair is two
samples whose style difference ``dz ~ N(0, 2 I)`` is labelled by the taste (preferred = higher ``dz . p``) and seen
through a fixed random encoder (K -> 32, plus a little noise), as the pair-difference embedder sees it. For N pairs
the truth is ``cos(d, p)``, d = the summed style difference: how well the pairs' evidence points at the taste (the
adapter follows it: docs/world-sweep.md, "Why a user fails").

Two truth-free measures of the same pairs, printed side by side:
  * agreement (the baseline): how much the pairs' evidence vectors share, ``mean_{i!=j} e_i.e_j / mean |e_i|^2``
    turned into a reliability for N pairs (Spearman-Brown);
  * confidence (ppd_train.confidence, what `embed` saves): the certainty of a Bradley-Terry posterior over the taste.

For each K and N: the mean of each, its correlation with the truth across users, the AUC for finding users whose
evidence is weak (cos < 0.3; 0.5 = chance), and the share flagged (confidence < LOW_CONFIDENCE).

    python benchmarks/confidence_sim.py [--users 400] [--out confidence_sim.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ppd_train.confidence import LOW_CONFIDENCE, pair_confidence


def agreement(e: torch.Tensor) -> float:
    n = e.shape[0]
    gram = e @ e.T
    total = gram.diagonal().mean()
    shared = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    snr = max(float(shared), 0.0) / max(float(total - shared), 1e-12)
    return n * snr / (1 + n * snr)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def auc_low(score: torch.Tensor, bad: torch.Tensor) -> float:
    """P(a bad user scores lower than a good one): 1 = the measure finds them, 0.5 = chance."""
    pos, neg = score[bad], score[~bad]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] < neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--ns", default="4,8,16,32")
    p.add_argument("--out", default="")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'K':>2s} {'N':>3s} {'cos(d,p)':>8s} {'share<.3':>8s} | {'agreement':>9s} {'corr':>5s} {'AUC':>5s} | "
          f"{'confidence':>10s} {'corr':>5s} {'AUC':>5s} {'flagged':>7s}")
    for k in map(int, args.ks.split(",")):
        enc = torch.randn(32, k, generator=g) / math.sqrt(k)
        for n in map(int, args.ns.split(",")):
            truth, agree, conf = [], [], []
            for _ in range(args.users):
                pref = torch.randn(k, generator=g)
                pref = pref / pref.norm()
                dz = math.sqrt(2) * torch.randn(n, k, generator=g)
                dz = dz * torch.where(dz @ pref >= 0, 1.0, -1.0)[:, None]
                e = dz @ enc.T + 0.05 * torch.randn(n, 32, generator=g)
                d = dz.sum(0)
                truth.append(float(d @ pref / d.norm()))
                agree.append(agreement(e) if n > 1 else 0.0)
                conf.append(pair_confidence(e)["confidence"])
            t, a, c = torch.tensor(truth), torch.tensor(agree), torch.tensor(conf)
            bad = t < 0.3
            row = {"K": k, "N": n, "truth_cos": float(t.mean()), "weak_share": float(bad.float().mean()),
                   "agreement": float(a.mean()), "agreement_corr": corr(a, t), "agreement_auc": auc_low(a, bad),
                   "confidence": float(c.mean()), "confidence_corr": corr(c, t), "confidence_auc": auc_low(c, bad),
                   "flagged": float((c < LOW_CONFIDENCE).float().mean())}
            rows.append(row)
            print(f"{k:2d} {n:3d} {row['truth_cos']:8.2f} {row['weak_share']:8.0%} | {row['agreement']:9.2f} "
                  f"{row['agreement_corr']:+5.2f} {row['agreement_auc']:5.2f} | {row['confidence']:10.2f} "
                  f"{row['confidence_corr']:+5.2f} {row['confidence_auc']:5.2f} {row['flagged']:7.0%}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"users": args.users, "low_confidence": LOW_CONFIDENCE, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
