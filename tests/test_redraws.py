"""Users below 50% are evaluated again with embeddings from other draws of their pairs (``redraw_failing``): does the
adapter fail the user, or only the one draw of 4 pairs its embedding came from?"""

from __future__ import annotations

import dataclasses

import pytest

from ppd_train.adapter import load_adapter
from ppd_train.evaluate import evaluate_users, user_scores
from ppd_train.stage_c import PPDBinding, load_stage_c
from ppd_train.sweep import load_sweep, world_config
from ppd_train.synthetic import (
    EVAL_SEED,
    DemoConfig,
    World,
    failure_counts,
    redraw_failing,
    served_by_most,
    train_world,
)


@pytest.mark.xdist_group("small-k4")  # the worker that trains this world for test_demo.py
def test_redraws_score_a_failing_user_with_fresh_draws_of_its_own_pairs(small_world):
    folder, sweep_file, _ = small_world("small-k4")
    name, change = load_sweep(sweep_file)[0]
    cfg = world_config(DemoConfig(), change, folder / "sweep" / name)
    tw = train_world(cfg, log=lambda *a: None, show_progress=False)  # reuses the finished run
    world, c = tw.world, cfg.world
    binding = PPDBinding(load_stage_c(folder / "sweep" / name / "base_stage_c"), load_adapter(tw.adapter_path))
    cond = world.conditions()
    a, b = world.seen[1], world.unseen[-1]
    users = {u: tw.embeddings[u] for u in (a, b)}
    per_user = evaluate_users(binding, cond, users, world.reward, set(world.seen), c.eval_samples, EVAL_SEED,
                              steps=c.sample_steps)["users"]
    assert per_user[a]["win_rate"] >= 0.75 and per_user[b]["win_rate"] >= 0.75  # this world serves both

    # the same noise as the evaluation: the evaluation embedding scores exactly its evaluated win rate
    assert user_scores(binding, cond, a, [users[a]], world.reward, c.eval_samples, EVAL_SEED, c.sample_steps) == [
        {k: per_user[a][k] for k in ("win_rate", "reward_gain")}]

    # marked failing, `a` gets its redraws, each of N pairs of its own; `b` is not failing and gets none
    per_user[a]["failure"], per_user[b]["failure"] = "adapter is wrong", None
    drawn = []
    pairs = world.pairs
    world.pairs = lambda uid, n, g: (drawn.append((uid, n)), pairs(uid, n, g))[1]  # type: ignore[method-assign]
    redraw_failing(world, binding, cond, per_user, cfg.seed)
    world.pairs = pairs  # type: ignore[method-assign]
    assert drawn == [(a, c.n_embed_pairs)] * 8
    rates, gains = per_user[a]["redraw_win_rates"], per_user[a]["redraw_reward_gains"]
    assert len(rates) == len(gains) == c.redraws == 8 and all(0.0 <= r <= 1.0 for r in rates)
    assert "redraw_win_rates" not in per_user[b]
    # the draws are other pairs than the evaluation's and than each other: their embeddings move the reward by other
    # amounts; a user the adapter serves wins with most of them
    assert len(set(gains)) == len(gains) and per_user[a]["reward_gain"] not in gains
    assert per_user[a]["other_draws_win"] is True
    # they depend on the seed and the user only: again the same, and the same when another user fails beside it,
    # which gets draws of its own pairs (and is served by them too)
    again = {a: {"failure": "pairs say too little"}, b: {"failure": "adapter is wrong"}}
    redraw_failing(world, binding, cond, again, cfg.seed)
    assert again[a]["redraw_reward_gains"] == gains and again[b]["redraw_reward_gains"] != gains
    assert again[b]["other_draws_win"] is True

    # redraws = 0 measures nothing
    off = World(dataclasses.replace(world.cfg, redraws=0), cfg.seed)
    none = {a: {"failure": "adapter is wrong"}}
    redraw_failing(off, binding, cond, none, cfg.seed)
    assert none[a] == {"failure": "adapter is wrong"}
    binding.detach()


def test_served_by_most_needs_more_than_half_of_the_draws():
    assert served_by_most([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.49]) is False  # 4 of 8 is not most
    assert served_by_most([1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0]) is True  # 0.5 reaches 50%
    assert served_by_most([0.0]) is False and served_by_most([0.5]) is True


def test_redraw_counts_are_there_when_redraws_ran_and_no_user_failed():
    per_user = {"a": {"failure": None, "low_confidence": False}}
    assert failure_counts(per_user, redrawn=True)["other_draws_win"] == 0  # "0 of 0", not "- of 0"
    assert "other_draws_win" not in failure_counts(per_user)  # redraws off (or an older run)
