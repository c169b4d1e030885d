"""The synthetic world end to end at a reduced size: PPD must really personalise, for seen and unseen users."""

from __future__ import annotations

import json

import torch

from ppd_train.cli import main
from ppd_train.synthetic import DemoConfig, WorldConfig, run_demo

# A smaller world than the default (24 seen users x 24 pairs, 8 unseen, 250 steps) so the suite stays fast. Results
# are deterministic on CPU for a fixed seed; the README reports the default world over several seeds.
REDUCED = dict(threads=2, world=WorldConfig(seen_users=24, unseen_users=8, unseen_mixtures=3, pairs_per_user=24,
                                            pretrain_steps=500, eval_samples=12, sample_steps=12))


def test_reduced_demo_meets_targets(tmp_path):
    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), seed=1, **REDUCED)
    cfg.train.max_steps = 250
    cfg.train.tensorboard = False
    threads = torch.get_num_threads()
    metrics = run_demo(cfg, log=lambda *a: None, show_progress=False)
    assert metrics["seen"]["win_rate"] >= 0.9, metrics["seen"]
    assert metrics["unseen"]["win_rate"] >= 0.8, metrics["unseen"]
    assert metrics["seen"]["reward_gain"] > 0 and metrics["unseen"]["reward_gain"] > 0
    assert metrics["interpolation"]["monotone"], metrics["interpolation"]
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(saved["users"]) == set(metrics["users"]) and saved["config"]["world"]["seen_users"] == 24
    assert (tmp_path / "demo" / "plot.png").stat().st_size > 10_000

    # Rerunning the same command reuses the base model and finds the finished run: nothing is retrained.
    args = ["seed=1", "threads=2", "world.seen_users=24", "world.unseen_users=8", "world.unseen_mixtures=3",
            "world.pairs_per_user=24", "world.pretrain_steps=500", "world.eval_samples=12", "world.sample_steps=12",
            "train.max_steps=250", "train.tensorboard=false"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"] + [x for a in args for x in ("--set", a)]) == 0
    again = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert again["users"] == saved["users"]
    torch.set_num_threads(threads)
