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

And the ceiling no truth-free measure can pass: the **oracle**, the exact posterior mean of the truth given the pairs,
``E[cos(d, p) | pairs]``, computed with what no real measure has (the true K, the encoder inverted, the exact prior and
label model: the taste is uniform on the sphere, constrained by every pair to ``dz . p > 0``). Its AUC is the best any
score computed from the pairs can reach (N <= 8: beyond that the Monte Carlo posterior gets too few samples).

For each K and N: the mean of each, its correlation with the truth across users, the AUC for finding users whose
pairs do not agree with their taste (cos < 0.5, the demo's ``embedding_agrees`` cut;
AUC 0.5 = chance), and the share flagged (confidence < LOW_CONFIDENCE).

    python benchmarks/confidence_sim.py [--users 400] [--out confidence_sim.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ppd_train.confidence import LOW_CONFIDENCE, pair_confidence
from ppd_train.synthetic import AGREE_COS


def agreement(e: torch.Tensor) -> float:
    n = e.shape[0]
    gram = e @ e.T
    total = gram.diagonal().mean()
    shared = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    snr = max(float(shared), 0.0) / max(float(total - shared), 1e-12)
    return n * snr / (1 + n * snr)


def oracle(dz: torch.Tensor, d: torch.Tensor, sphere: torch.Tensor) -> float:
    """E[cos(d, p) | the pairs] with p uniform on the sphere (``sphere``: unit samples ``[M, K]``) and every pair
    saying ``dz_i . p > 0``: the posterior is the prior restricted to that cone (nan: too few samples inside)."""
    inside = sphere[((sphere @ dz.T) > 0).all(1)]
    return float((inside @ (d / d.norm())).mean()) if len(inside) >= 50 else float("nan")


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
    p.add_argument("--oracle-samples", type=int, default=1_000_000)
    p.add_argument("--out", default="")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'K':>2s} {'N':>3s} {'cos(d,p)':>8s} {'share<.5':>8s} | {'agreement':>9s} {'corr':>5s} {'AUC':>5s} | "
          f"{'confidence':>10s} {'corr':>5s} {'AUC':>5s} {'flagged':>7s} | {'oracle':>6s} {'corr':>5s} {'AUC':>5s}")
    for k in map(int, args.ks.split(",")):
        enc = torch.randn(32, k, generator=g) / math.sqrt(k)
        sphere = torch.randn(args.oracle_samples, k, generator=g)
        sphere = sphere / sphere.norm(dim=1, keepdim=True)
        for n in map(int, args.ns.split(",")):
            truth, agree, conf, orc = [], [], [], []
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
                orc.append(oracle(dz, d, sphere) if n <= 8 else float("nan"))
            t, a, c, o = torch.tensor(truth), torch.tensor(agree), torch.tensor(conf), torch.tensor(orc)
            bad = t < AGREE_COS  # the pairs do not agree with the taste (the demo's "pairs say too little")
            row = {"K": k, "N": n, "truth_cos": float(t.mean()), "weak_share": float(bad.float().mean()),
                   "agreement": float(a.mean()), "agreement_corr": corr(a, t), "agreement_auc": auc_low(a, bad),
                   "confidence": float(c.mean()), "confidence_corr": corr(c, t), "confidence_auc": auc_low(c, bad),
                   "flagged": float((c < LOW_CONFIDENCE).float().mean())}
            if not o.isnan().any():
                row.update(oracle=float(o.mean()), oracle_corr=corr(o, t), oracle_auc=auc_low(o, bad))
            rows.append(row)
            print(f"{k:2d} {n:3d} {row['truth_cos']:8.2f} {row['weak_share']:8.0%} | {row['agreement']:9.2f} "
                  f"{row['agreement_corr']:+5.2f} {row['agreement_auc']:5.2f} | {row['confidence']:10.2f} "
                  f"{row['confidence_corr']:+5.2f} {row['confidence_auc']:5.2f} {row['flagged']:7.0%} | "
                  + (f"{row['oracle']:6.2f} {row['oracle_corr']:+5.2f} {row['oracle_auc']:5.2f}" if "oracle" in row
                     else f"{'-':>6s} {'-':>5s} {'-':>5s}"), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"users": args.users, "low_confidence": LOW_CONFIDENCE, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
