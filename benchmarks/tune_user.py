"""Tuning a new user from all their pairs, measured in the synthetic world (docs/tune-user.md).

For every unseen user of each world (never trained on, not in the library) and N pairs of that user, four embeddings:

  (a) embedder  the pair-difference embedder alone: its embedding of each group of 4 pairs (the size the adapter was
                trained with), averaged over the N / 4 groups (N = 4: the paper's embedding)
  (b) tuned     tune-user from (a), mode tokens
  (c) mix       tune-user's mixing weights only, over the library (the adapter's trained users), from the library mean
  (d) mix+tuned tune-user from (c), mode tokens (with (c): mode mix+tokens)

each scored like the demo (the base model, Stage C or with ``--base sdxl`` SDXL, sampled with and without the user
from the same noise): win rate, reward gain, fidelity (style drift in data sds, residual ratio), and tune-user's
seconds per user. The worlds are trained (or reused from ``--runs``) with the demo's recipe, exactly as
``ppd-train demo --sweep`` does.

    python benchmarks/tune_user.py [--worlds default-s0,k6-c6-u12] [--ns 4,8,16,32] [--out tune_user.json]
    python benchmarks/tune_user.py --base sdxl --worlds default-s0 --runs runs/sweep-sdxl
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
from ppd_train.evaluate import evaluate_users, group_summary
from ppd_train.stage_c import PPDBinding
from ppd_train.sweep import load_sweep, world_config
from ppd_train.synthetic import DemoConfig, check_world, diagnose_users, train_world
from ppd_train.tune import TuneConfig, UserTuner

METHODS = ("embedder", "tuned", "mix", "mix+tuned")


def embedder_tokens(world, ew: torch.Tensor, el: torch.Tensor, group: int) -> torch.Tensor:
    emb = world.embedder()
    parts = [emb.embed_tokens(list(ew[i:i + group]), list(el[i:i + group])) for i in range(0, len(ew) - group + 1,
                                                                                        group)]
    return torch.stack(parts).mean(0)


def failing_users(cfg: DemoConfig, tw, binding: PPDBinding, heldout: set[str]) -> list[str]:
    """Every user (seen or not) the demo's evaluation puts below 50%."""
    m = evaluate_users(binding, tw.world.conditions(), tw.embeddings, tw.world.reward, set(tw.world.seen) - heldout,
                       cfg.world.eval_samples, steps=cfg.world.sample_steps, heldout=heldout)
    diagnose_users(tw.world, tw.embeddings, m["users"])
    return [u for u, r in m["users"].items() if r["win_rate"] < 0.5]


def run_world(name: str, cfg: DemoConfig, ns: list[int], tune: TuneConfig, max_users: int,
              on_rows=None, which: str = "unseen") -> list[dict]:
    tw = train_world(cfg, log=lambda *_: None, show_progress=False)
    world = tw.world
    adapter = load_adapter(tw.adapter_path)
    binding = PPDBinding(tw.unet, adapter)
    heldout = set(adapter.config.training.get("heldout_users", []))
    library = [tw.embeddings[u] for u in world.seen if u not in heldout]
    tune = TuneConfig(**{**tune.__dict__, "t_min": cfg.train.t_min, "t_max": cfg.train.t_max})
    if which == "failing":
        users = failing_users(cfg, tw, binding, heldout)
        print(f"{name}: {len(users)} users below 50%: {', '.join(users)}", flush=True)
    else:
        # as many mixtures of trained users as new users (the world lists its mixtures first)
        mixes = [u for u in world.unseen if u.startswith("mix")]
        new = [u for u in world.unseen if not u.startswith("mix")]
        users = [u for pair in zip(new, mixes) for u in pair] + new[len(mixes):] + mixes[len(new):]
    users = users[:max_users]
    group = cfg.world.n_embed_pairs
    rows = []
    for n in ns:
        embs: dict[str, dict[str, UserEmbedding]] = {m: {} for m in METHODS}
        secs: dict[str, list[float]] = {m: [] for m in METHODS}
        gains: dict[str, list[float]] = {m: [] for m in METHODS}
        for k, uid in enumerate(users):
            g = torch.Generator().manual_seed(cfg.seed * 7919 + 104729 * n + k)
            ew, el, caps = world.pairs(uid, n, g)
            data = DPOData(ew, el, caps, torch.zeros(n, dtype=torch.long), world.text, world.pooled, [uid], {},
                           world.time_ids(n) if cfg.world.base == "sdxl" else None, cfg.world.base)
            t0 = time.perf_counter()
            start = UserEmbedding(embedder_tokens(world, ew, el, group), library[0].embedder, {"user_id": uid})
            secs["embedder"].append(time.perf_counter() - t0)
            embs["embedder"][uid] = start
            for method, first, lib, mode in (("tuned", start, [], "tokens"), ("mix", None, library, "mix")):
                t0 = time.perf_counter()
                tuner = UserTuner(binding, data, TuneConfig(**{**tune.__dict__, "mode": mode}), first, lib)
                tokens, report = tuner.run(show_progress=False)
                embs[method][uid] = tuner.embedding(tokens, report, uid)
                secs[method].append(time.perf_counter() - t0)
                gains[method].append(report["val_before"].get("loss", float("nan")) -
                                     report["val_after"].get("loss", float("nan")))
            t0 = time.perf_counter()
            tuner = UserTuner(binding, data, TuneConfig(**{**tune.__dict__, "mode": "tokens"}), embs["mix"][uid])
            tokens, report = tuner.run(show_progress=False)
            embs["mix+tuned"][uid] = tuner.embedding(tokens, report, uid)
            secs["mix+tuned"].append(time.perf_counter() - t0 + secs["mix"][-1])
            gains["mix+tuned"].append(report["val_before"].get("loss", 0.0) - report["val_after"].get("loss", 0.0))
        for method in METHODS:
            m = evaluate_users(binding, world.conditions(), embs[method], world.reward, set(), cfg.world.eval_samples,
                               steps=cfg.world.sample_steps, fidelity=world.fidelity)
            s = group_summary(list(m["users"].values()))
            rows.append({"world": name, "N": n, "method": method, "users": len(users), "win_rate": s["win_rate"],
                         "min_win_rate": s["min_win_rate"], "reward_gain": s["reward_gain"],
                         "drift_sd": s["drift_sd"], "noise_ratio": s["noise_ratio"],
                         "seconds_median": statistics.median(secs[method]), "seconds_max": max(secs[method]),
                         "val_loss_drop": statistics.fmean(gains[method]) if gains[method] else 0.0})
            print(_line(rows[-1]), flush=True)
            if on_rows is not None:
                on_rows(rows)
    binding.detach()
    return rows


def _line(r: dict) -> str:
    return (f"{r['world']:12s} N={r['N']:<3d} {r['method']:10s} win {r['win_rate']:6.1%} "
            f"(lowest {r['min_win_rate']:4.0%})"
            f"  gain {r['reward_gain']:+.3f}  drift {r['drift_sd']:+.2f} sd  noise {r['noise_ratio']:.2f}x"
            f"  {r['seconds_median']:5.1f} s/user (max {r['seconds_max']:.1f})")


def markdown(rows: list[dict]) -> str:
    """One line per world and N: win rate and reward gain of each method, then (b)'s fidelity and seconds per user."""
    head = ("| world | N | " + " | ".join(f"{m} win / gain" for m in METHODS) +
            " | tuned drift sd / noise | s per user (b, median / max) |")
    lines = [head, "|" + "---|" * (len(METHODS) + 4)]
    keys = sorted({(r["world"], r["N"]) for r in rows}, key=lambda k: (k[0], k[1]))
    by = {(r["world"], r["N"], r["method"]): r for r in rows}
    for world, n in keys:
        cells = [f"{by[world, n, m]['win_rate']:.0%} / {by[world, n, m]['reward_gain']:+.2f}" for m in METHODS]
        t = by[world, n, "tuned"]
        lines.append(f"| {world} | {n} | " + " | ".join(cells) +
                     f" | {t['drift_sd']:.2f} / {t['noise_ratio']:.2f} | {t['seconds_median']:.1f} / "
                     f"{t['seconds_max']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="configs/sweep.toml")
    p.add_argument("--worlds", default="default-s0,k6-c6-u12,k8-c4-u96", help="comma-separated world names")
    p.add_argument("--runs", default="runs/sweep", help="where the worlds are trained (reused when finished)")
    p.add_argument("--ns", default="4,8,16,32")
    p.add_argument("--max-users", type=int, default=16, help="users per world (at most)")
    p.add_argument("--users", choices=("unseen", "failing"), default="unseen",
                   help="unseen: the world's new users; failing: every user the demo puts below 50%% "
                        "(docs/world-sweep.md, 'Why a user fails')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TuneConfig key, e.g. lr=0.1")
    p.add_argument("--base", choices=("stage_c", "sdxl"), default=None,
                   help="the worlds' base model (default: as the sweep file says, else Stage C); give an SDXL run "
                        "its own --runs folder")
    p.add_argument("--out", default="")
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print the markdown table of earlier results")
    args = p.parse_args()
    if args.table:
        print(markdown([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return
    from ppd_train.config import load_config

    tune = load_config(TuneConfig, None, args.set)
    torch.set_num_threads(1)
    worlds = dict(load_sweep(args.sweep))
    ns = [int(x) for x in args.ns.split(",")]
    rows: list[dict] = []
    t0 = time.perf_counter()

    def write(new: list[dict]) -> None:  # after every table row: a long run that is stopped keeps what it measured
        if args.out:
            result = {"tune": tune.__dict__, "rows": rows + new, "seconds": time.perf_counter() - t0,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}
            Path(args.out).write_text(json.dumps(result, indent=2))

    cfgs = []
    for name in args.worlds.split(","):
        change = worlds[name]
        if args.base:
            change = {**change, "world": {**change.get("world", {}), "base": args.base}}
        cfgs.append((name, world_config(DemoConfig(), change, Path(args.runs) / name)))
        check_world(cfgs[-1][1].world)  # every world before the first runs (SDXL holds at most 4 styles)
    for name, cfg in cfgs:
        rows += run_world(name, cfg, ns, tune, args.max_users, write, args.users)
    print(markdown(rows))


if __name__ == "__main__":
    main()
