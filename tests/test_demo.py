"""The synthetic world end to end on small worlds, with the demo's own recipe and targets: PPD must personalise seen
and unseen users, interpolate monotonically and stay on the data (fidelity), on more than one world."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import SMALL_WORLDS

from ppd_train.cli import main
from ppd_train.evaluate import drift_sd
from ppd_train.synthetic import DemoConfig, World, WorldConfig


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in SMALL_WORLDS])
def test_small_world_meets_the_demo_targets(small_world, name):
    tmp_path, sweep_file, row = small_world(name)
    threads = torch.get_num_threads()
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert row["targets"] == "met", table
    # the targets, spelled out
    assert row["seen win"] >= 0.9 and row["unseen win"] >= 0.8 and row["monotone"] == "yes", table
    assert 0 < row["gain"] and row["drift sd"] <= DemoConfig().targets.max_drift_sd, table
    metrics = json.loads((tmp_path / "sweep" / name / "metrics.json").read_text())
    seed, world = SMALL_WORLDS[name]
    assert metrics["config"]["seed"] == seed and metrics["config"]["world"]["k_styles"] == world.get("k_styles", 4)
    assert {m["group"] for m in metrics["users"].values()} == {"seen", "heldout", "unseen"}
    assert metrics["selected"]["metric"] == "val_users_implicit_acc" and metrics["missed"] == []
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep" / name / "plot.png").stat().st_size > 10_000

    # The same command again reuses the world's base model and finished run (nothing is retrained), and --check
    # exits 0 only because every target is met.
    assert main(["demo", "--sweep", str(sweep_file), "--out", str(tmp_path / "sweep"), "--quiet",
                 "--check"]) == 0
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["seen win"], r["unseen win"], r["step"]) for r in again] == [
        (row["seen win"], row["unseen win"], row["step"])]
    torch.set_num_threads(threads)


def test_world_fidelity_measures_distance_off_the_data():
    world = World(WorldConfig(k_styles=3), seed=0)
    g = torch.Generator().manual_seed(0)
    caps = torch.randint(world.cfg.n_captions, (4000,), generator=g)
    data = world.sample_data(caps, g)
    fid = world.fidelity(data, caps)
    assert abs(fid["style_energy"].mean().item() - 1.5) < 0.1  # K / 2 nats for N(0, 1) styles
    assert abs(fid["residual"].mean().item() - 1.0) < 0.05  # the data's own noise
    moved = data + 2.0 * world.directions[1][None, :, None, None]  # 2 sd along one style
    gap = world.fidelity(moved, caps)["style_energy"].mean().item() - fid["style_energy"].mean().item()
    assert abs(drift_sd(gap) - 2.0) < 0.1
    noisy = data + 0.3 * torch.randn(data.shape, generator=g)  # as much extra noise again
    assert abs(world.fidelity(noisy, caps)["residual"].mean().item() - math.sqrt(2)) < 0.05
