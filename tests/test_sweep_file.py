"""Sweep files: one recipe for every world, so a world may set only its seed and world.* keys."""

from __future__ import annotations

import pytest

from ppd_train.config import ConfigError
from ppd_train.sweep import load_sweep, markdown, world_config
from ppd_train.synthetic import DemoConfig


def test_worlds_change_only_seed_and_world(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[worlds]]\nname = "a"\nseed = 4\nworld = { k_styles = 6 }\n\n[[worlds]]\nname = "b"\n')
    worlds = load_sweep(path)
    assert [n for n, _ in worlds] == ["a", "b"]
    base = DemoConfig()
    base.train.lr = 1e-3  # the recipe comes from the base config, for every world
    cfg = world_config(base, worlds[0][1], tmp_path / "a")
    assert (cfg.seed, cfg.world.k_styles, cfg.world.n_captions, cfg.train.lr) == (4, 6, 8, 1e-3)
    assert cfg.out_dir == str(tmp_path / "a") and world_config(base, worlds[1][1], tmp_path).seed == base.seed


@pytest.mark.parametrize("text, message", [
    ('[[worlds]]\nname = "a"\ntrain = { lr = 1.0 }\n', "varies only seed and world"),
    ('[[worlds]]\nname = "a"\n[[worlds]]\nname = "a"\n', "must be unique"),
    ('[[worlds]]\nname = "../x"\n', "letters, digits"),
    ('title = "no worlds"\n', "no worlds"),
    ('[[worlds]]\nname = "a"\nworld = { k_style = 3 }\n', "Unknown config key"),
])
def test_bad_sweep_files_are_refused(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        for _, change in load_sweep(path):
            world_config(DemoConfig(), change, tmp_path / "w")


def test_markdown_table_has_one_row_per_world():
    row = {"world": "w", "seed": 0, "K": 4, "captions": 8, "seen": 48, "unseen": 16, "pairs/user": 32,
           "mix share": 0.3125, "seen win": 0.95, "unseen win": 0.875, "gain": 0.2, "drift sd": 0.3,
           "lowest user": 0.5, "users < 50%": 0.0, "monotone": "yes", "< 50%: pairs / adapter": "2 / 1",
           "< 50% flagged": "3 of 3", "< 50%: other draws win": "2 of 3", "flagged": "40 of 64", "step": 300,
           "time s": 100.0, "targets": "met"}
    lines = markdown([row, {**row, "world": "v"}]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| w | 0 | 4 | 8 | 48 | 16 | 32 | 31% | 95% | 88% |")
    assert "| yes | 2 / 1 | 3 of 3 | 2 of 3 | 40 of 64 | 300 |" in lines[2]


def test_sweep_row_counts_the_failures_and_reads_older_metrics():
    from ppd_train.sweep import _row
    from ppd_train.synthetic import DemoConfig

    m = {"seen": {"win_rate": 1.0}, "unseen": {"win_rate": 0.9}, "all": {"reward_gain": 0.2, "drift_sd": 0.3,
         "min_win_rate": 0.0, "below_half": 0.05}, "interpolation": {"monotone": True}, "selected": {"step": 5},
         "seconds": 1.0, "missed": [], "users": {f"u{i}": {} for i in range(20)},
         "failures": {"below_half": 1, "pairs_say_too_little": 1, "adapter_wrong": 0, "failing_flagged": 1,
                      "other_draws_win": 1, "flagged": 7, "flagged_failing": 1}}
    row = _row("w", DemoConfig(), m)
    assert (row["< 50%: pairs / adapter"], row["< 50% flagged"], row["< 50%: other draws win"], row["flagged"]) == (
        "1 / 0", "1 of 1", "1 of 1", "7 of 20")
    del m["failures"]["other_draws_win"]  # a world finished before the redraws existed
    assert _row("w", DemoConfig(), m)["< 50%: other draws win"] == "- of 1"
    del m["failures"]  # a world finished before the diagnosis existed
    row = _row("w", DemoConfig(), m)
    assert (row["< 50%: pairs / adapter"], row["< 50% flagged"]) == ("- / -", "- of -")
