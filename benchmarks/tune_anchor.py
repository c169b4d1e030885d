"""tune-user's ``anchor`` (an L2 pull of the tuned tokens toward the starting embedding) on a small synthetic world.

For each seed (pair draws and tune-user's seed), N pairs of every unseen user of the world, the embedder's embedding
(averaged over groups of 4 pairs, as in benchmarks/tune_user.py) and tune-user from it at each anchor, all scored
like the demo (win rate, reward gain, drift off the data in sd). Reports per N and anchor: mean and lowest win rate,
mean reward gain, mean and largest drift, how many users ended below the embedder's own reward gain, how many kept
their start, and the mean penalty ``mean(((tokens - start) / rms(start))^2)``.

    python benchmarks/tune_anchor.py [--anchors 0,0.1,1] [--seeds 0,1,2] [--ns 4,16] [--runs runs/tune_anchor]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ppd_train.adapter import load_adapter
from ppd_train.dpo_data import DPOData
from ppd_train.embedding import UserEmbedding
from ppd_train.evaluate import evaluate_users
from ppd_train.stage_c import PPDBinding
from ppd_train.sweep import world_config
from ppd_train.synthetic import DemoConfig, train_world
from ppd_train.tune import TuneConfig, UserTuner

# tests/helpers.py's small-k4 world: small enough to train in a few CPU minutes
SMALL = {"seen_users": 24, "unseen_users": 8, "unseen_mixtures": 3, "pairs_per_user": 24, "pretrain_steps": 500,
         "eval_samples": 12, "sample_steps": 12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anchors", default="0,0.1,1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ns", default="4,16")
    p.add_argument("--world-seed", type=int, default=1)
    p.add_argument("--runs", default="runs/tune_anchor")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = world_config(DemoConfig(), {"seed": args.world_seed, "world": SMALL},
                       Path(args.runs) / f"small-k4-s{args.world_seed}")
    t0 = time.perf_counter()
    tw = train_world(cfg, log=lambda *_: None, show_progress=False)
    print(f"world trained/reused in {time.perf_counter() - t0:.0f} s", flush=True)
    world, binding = tw.world, PPDBinding(tw.unet, load_adapter(tw.adapter_path))
    anchors = [float(a) for a in args.anchors.split(",")]
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        per: dict[str, list[dict]] = {"embedder": [], **{f"anchor={a:g}": [] for a in anchors}}
        for seed in [int(x) for x in args.seeds.split(",")]:
            embs: dict[str, dict[str, UserEmbedding]] = {k: {} for k in per}
            extra: dict[str, dict[str, dict]] = {k: {} for k in per}
            for k, uid in enumerate(world.unseen):
                g = torch.Generator().manual_seed(seed * 7919 + 104729 * n + k)
                ew, el, caps = world.pairs(uid, n, g)
                data = DPOData(ew, el, caps, torch.zeros(n, dtype=torch.long), world.text, world.pooled, [uid])
                groups = [world.embedder().embed_tokens(list(ew[i:i + 4]), list(el[i:i + 4]))
                          for i in range(0, n - 3, 4)]
                start = UserEmbedding(torch.stack(groups).mean(0), tw.embeddings[uid].embedder, {"user_id": uid})
                embs["embedder"][uid] = start
                for a in anchors:
                    tune = TuneConfig(anchor=a, seed=seed, t_min=cfg.train.t_min, t_max=cfg.train.t_max)
                    tuner = UserTuner(binding, data, tune, start)
                    t1 = time.perf_counter()
                    tokens, report = tuner.run(show_progress=False)
                    embs[f"anchor={a:g}"][uid] = UserEmbedding(tokens, start.embedder)
                    with torch.no_grad():
                        penalty = float(tuner.tokens.penalty())
                    extra[f"anchor={a:g}"][uid] = {"start_kept": report["start_kept"], "penalty": penalty,
                                                   "seconds": time.perf_counter() - t1}
            for name, users in embs.items():
                m = evaluate_users(binding, world.conditions(), users, world.reward, set(), cfg.world.eval_samples,
                                   steps=cfg.world.sample_steps, fidelity=world.fidelity)
                for uid, r in m["users"].items():
                    per[name].append({"seed": seed, "user": uid, **r, **extra[name].get(uid, {})})
            print(f"N={n} seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
        base_gain = {(r["seed"], r["user"]): r["reward_gain"] for r in per["embedder"]}
        for name, rs in per.items():
            row = {"N": n, "method": name, "users": len(rs),
                   "win": statistics.fmean(r["win_rate"] for r in rs), "min_win": min(r["win_rate"] for r in rs),
                   "gain": statistics.fmean(r["reward_gain"] for r in rs),
                   "drift": statistics.fmean(r["drift_sd"] for r in rs), "max_drift": max(r["drift_sd"] for r in rs),
                   "below_embedder": sum(r["reward_gain"] < base_gain[r["seed"], r["user"]] for r in rs),
                   "start_kept": sum(bool(r.get("start_kept")) for r in rs),
                   "penalty": statistics.fmean(r.get("penalty", 0.0) for r in rs),
                   "seconds": statistics.fmean(r.get("seconds", 0.0) for r in rs)}
            rows.append(row)
            print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}, indent=2))


if __name__ == "__main__":
    main()
