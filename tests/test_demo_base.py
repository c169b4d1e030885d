"""The demo's pre-trained base model: its steps per base, and a run folder never trains on a base made for another
world (issue 27: the tiny SDXL needed 3x the pre-training of the tiny Stage C)."""

from __future__ import annotations

import json
import shutil

import pytest

from ppd_train.cli import main
from ppd_train.synthetic import PRETRAIN_FILE, PRETRAIN_STEPS, WorldConfig, pretrain_steps

MICRO = ["world.seen_users=4", "world.unseen_users=2", "world.unseen_mixtures=1", "world.pairs_per_user=8",
         "world.embedding_views=2", "world.pretrain_steps=3", "world.pretrain_batch=8", "world.eval_samples=2",
         "world.sample_steps=2", "world.redraws=0", "train.max_steps=2", "train.batch_size=4", "train.val_draws=1"]


def _demo(out, *extra: str) -> int:
    sets = MICRO + list(extra)
    return main(["demo", "--out", str(out), "--quiet"] + [a for kv in sets for a in ("--set", kv)])


def test_both_bases_pretrain_2400_steps_unless_set():
    assert PRETRAIN_STEPS == 2400
    assert pretrain_steps(WorldConfig()) == 2400
    assert pretrain_steps(WorldConfig(base="sdxl")) == 2400
    assert pretrain_steps(WorldConfig(base="sdxl", pretrain_steps=5)) == 5


def test_a_reused_base_must_have_been_pretrained_for_this_world(tmp_path, capsys):
    out = tmp_path / "run"
    assert _demo(out) == 0
    recorded = json.loads((out / "base_stage_c" / PRETRAIN_FILE).read_text())
    assert recorded["pretrain_steps"] == 3 and recorded["seed"] == 0 and recorded["base"] == "stage_c"
    assert "pre-train base Stage C: step 3/3," in capsys.readouterr().out

    assert _demo(out) == 0  # the same world: reused
    assert "reusing the pre-trained one" in capsys.readouterr().out

    assert _demo(out, "world.noise_scale=0.5") == 2  # another world: refused, nothing retrained
    err = capsys.readouterr().err
    assert "pre-trained for another world (noise_scale 0.3 -> 0.5)" in err and "another --out" in err
    assert _demo(out, "world.pretrain_steps=4") == 2
    assert "pretrain_steps 3 -> 4" in capsys.readouterr().err
    assert json.loads((out / "base_stage_c" / PRETRAIN_FILE).read_text()) == recorded

    # keys only the users or the evaluation read do not touch the base
    assert _demo(out, "world.eval_samples=3") == 0

    (out / "base_stage_c" / PRETRAIN_FILE).write_text("[1, 2]")
    assert _demo(out) == 2
    assert "unreadable" in capsys.readouterr().err

    (out / "base_stage_c" / PRETRAIN_FILE).unlink()  # a folder from before the record: reused, and said so
    assert _demo(out) == 0
    assert "made before bases recorded their pre-training" in capsys.readouterr().out


def test_an_adapter_is_never_trained_on_under_a_new_base(tmp_path, capsys):
    out = tmp_path / "run"
    assert _demo(out) == 0
    shutil.rmtree(out / "base_stage_c")
    assert _demo(out) == 2
    err = capsys.readouterr().err
    assert "holds an adapter trained on a base model that is no longer" in err and "Delete" in err
    assert not (out / "base_stage_c").exists()
    shutil.rmtree(out / "ppd")
    assert _demo(out) == 0 and (out / "base_stage_c" / PRETRAIN_FILE).is_file()


@pytest.mark.parametrize("value", ["-1", "100000000"])
def test_pretraining_steps_out_of_range_are_refused_by_name(tmp_path, capsys, value):
    assert _demo(tmp_path / "run", f"world.pretrain_steps={value}") == 2
    assert "world.pretrain_steps" in capsys.readouterr().err
