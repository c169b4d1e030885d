"""tune-user's selection and early-stopping rules, as values: patience 0, 1 and n, the best kept, and never an
embedding worse on its held-out pairs than the one it started from; the anchor pulls toward the start."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import trained_looking_adapter

from ppd_train.dpo_data import DPOData
from ppd_train.embedding import UserEmbedding
from ppd_train.stage_c import PPDBinding
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.tune import Selection, TuneConfig, UserTuner, _Tokens, one_user, split_pairs


def _run_rule(patience: int, start: float, losses: list[float]) -> tuple[int, int]:
    """The rule over a phase: validations 1..n after the start (0) -> (index of the kept one, validations run)."""
    rule, best, ran = Selection(patience, start), 0, 0
    for i, loss in enumerate(losses, 1):
        ran = i
        if rule.offer(loss):
            best = i
        if rule.stop:
            break
    return best, ran


LOSSES = [0.9, 0.95, 0.96, 0.97, 0.8, 0.85, 0.86]  # start 1.0: a gain, three without, a gain, two without


@pytest.mark.parametrize("patience, kept, ran", [
    (1, 1, 2),  # stops at the first validation without a gain
    (2, 1, 3),
    (3, 1, 4),
    (4, 5, 7),  # three in a row without a gain are not four: it reaches the second gain, then runs out
    (0, 5, 7),  # never stops early
])
def test_patience_counts_validations_in_a_row_without_a_gain(patience, kept, ran):
    assert _run_rule(patience, 1.0, LOSSES) == (kept, ran)


def test_the_start_is_kept_unless_something_is_strictly_better():
    assert _run_rule(0, 0.5, [0.6, 0.7, 0.55]) == (0, 3)  # all worse: the start
    assert _run_rule(0, 0.5, [0.5, 0.5]) == (0, 2)  # a tie is not a gain: the earlier one (the start) stays
    assert _run_rule(0, 0.5, [0.4, 0.4, 0.3]) == (3, 3)
    assert _run_rule(2, 0.5, [math.nan, 0.4]) == (2, 2)  # NaN is never better, and counts as no gain
    assert _run_rule(1, 0.5, [math.nan, 0.4]) == (0, 1)


# ------------------------------------------------------------------------------------------- the real tuner
N_PAIRS = 8


def _binding(v_scale: float) -> PPDBinding:
    """A tiny Stage C with a trained-looking adapter, its user values scaled by ``v_scale``."""
    unet = build_tiny_stage_c(seed=0)
    adapter = trained_looking_adapter(unet, embed_dim=24, num_tokens=5)
    adapter.config.training.update({"beta": 500.0, "t_min": 0.1, "t_max": 0.9})
    with torch.no_grad():
        for block in adapter.blocks:
            block.to_v.weight.mul_(v_scale)
    return PPDBinding(unet, adapter)


@pytest.fixture(scope="module")
def binding():
    return _binding(1.0)


def _start() -> UserEmbedding:
    return UserEmbedding(torch.randn(5, 24, generator=torch.Generator().manual_seed(3)), "test", {"user_id": "ann"})


def _data(held_out: str, cfg: TuneConfig) -> DPOData:
    """Pairs whose held-out share (tune-user's own split) are copies of training pairs: ``same`` (what is learnt
    holds on them), ``swapped`` (preferred and dispreferred exchanged: what is learnt is wrong on them) or ``tied``
    (the preferred image is the dispreferred one: every embedding scores exactly ln 2 on them)."""
    g = torch.Generator().manual_seed(5)
    w, lat = torch.randn(N_PAIRS, 16, 4, 4, generator=g), torch.randn(N_PAIRS, 16, 4, 4, generator=g)
    val, train = split_pairs(N_PAIRS, cfg.val_fraction, cfg.seed)
    src = train[:len(val)]
    if held_out == "same":
        w[val], lat[val] = w[src], lat[src]
    elif held_out == "swapped":
        w[val], lat[val] = lat[src], w[src]
    else:
        w[val], lat[val] = w[src], w[src]
    return DPOData(w, lat, torch.zeros(N_PAIRS, dtype=torch.long), torch.zeros(N_PAIRS, dtype=torch.long),
                   torch.randn(1, 77, 32, generator=g), torch.randn(1, 1, 32, generator=g), ["ann"])


def _tune(binding, held_out: str = "same", **kw) -> tuple[torch.Tensor, dict, UserTuner]:
    cfg = TuneConfig(**{"mode": "tokens", "val_fraction": 0.5, "val_every": 2, "val_draws": 2, "max_steps": 30,
                        "batch_size": 4, **kw})
    tuner = UserTuner(binding, _data(held_out, cfg), cfg, _start())
    tokens, report = tuner.run(show_progress=False)
    return tokens, report, tuner


def _expected(losses: list[float], patience: int) -> tuple[int, int]:
    """Written out: (index of the lowest loss, first one wins; index of the last validation run)."""
    best, bad = 0, 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best]:
            best, bad = i, 0
        else:
            bad += 1
        if patience and bad >= patience:
            return best, i
    return best, len(losses) - 1


def test_the_tuner_stops_and_selects_by_the_rule(binding):
    runs = {p: _tune(binding, patience=p, lr=0.3) for p in (0, 1, 2, 3)}
    full = [loss for _, loss in runs[0][1]["selected"]["delta"]["history"]]
    assert len(full) == 30 // 2 + 1  # the start and every 2nd step
    for patience, (_, report, _) in runs.items():
        history = report["selected"]["delta"]["history"]
        losses = [loss for _, loss in history]
        assert losses == full[:len(losses)]  # the same run, stopped earlier or later
        best, last = _expected(full, patience)
        assert len(history) == last + 1, (patience, full)
        assert report["steps"] == history[-1][0] == 2 * last
        assert report["selected"]["delta"]["step"] == history[best][0]
        assert report["val_after"]["loss"] == pytest.approx(full[best], abs=1e-6)  # the best is what is returned
    # the runs differ where they should: patience 1 stops at the first validation without a gain, later ones go on
    assert len(runs[1][1]["selected"]["delta"]["history"]) < len(runs[2][1]["selected"]["delta"]["history"])
    assert len(runs[2][1]["selected"]["delta"]["history"]) < len(full)


def test_tuning_that_only_hurts_on_held_out_pairs_keeps_the_start():
    # user values small: the start's margins are near 0, and what is learnt on the training pairs is exactly wrong on
    # the held-out ones
    tokens, report, _ = _tune(_binding(0.1), "swapped", lr=0.3, patience=0)
    losses = [loss for _, loss in report["selected"]["delta"]["history"]]
    assert min(losses[1:]) > losses[0]  # every tuned candidate was worse on the held-out pairs
    assert report["start_kept"] and torch.equal(tokens, _start().tokens)
    assert report["val_after"] == report["val_before"] and report["selected"]["delta"]["step"] == 0


def test_a_tie_on_held_out_pairs_keeps_the_start(binding):
    tokens, report, _ = _tune(binding, "tied", lr=0.3, patience=0)
    losses = [loss for _, loss in report["selected"]["delta"]["history"]]
    assert len(losses) == 16 and losses == [pytest.approx(math.log(2), rel=1e-6)] * 16
    assert report["start_kept"] and torch.equal(tokens, _start().tokens)


def test_tuning_that_helps_is_kept(binding):
    tokens, report, _ = _tune(binding, "same", lr=0.3, patience=0)
    assert not report["start_kept"] and not torch.equal(tokens, _start().tokens)
    assert report["val_after"]["loss"] < report["val_before"]["loss"]


def test_the_anchor_pulls_the_tokens_toward_the_start(binding):
    def distance(anchor: float) -> float:
        _, _, tuner = _tune(binding, lr=0.3, anchor=anchor, val_fraction=0.0, max_steps=20)  # the last step is kept
        with torch.no_grad():
            return float(tuner.tokens.penalty())  # mean(((tokens - start) / rms(start))^2)

    free, pulled = distance(0.0), distance(1.0)
    assert free > 0 and pulled < 0.5 * free, (free, pulled)


def test_the_tuned_embeddings_metadata(binding):
    """What the tuned file says about itself: the start's own facts kept, those of its making dropped (they describe
    the start, not the tuned tokens), the tuning report without its config, and every default of ``embedding()``."""
    cfg = TuneConfig(mode="tokens", max_steps=0, val_fraction=0.5, val_draws=1)
    data = _data("same", cfg)
    start = UserEmbedding(_start().tokens, "test", {"user_id": "ann", "style": "ink", "pair_sources": ["a"],
                                                    "content_hash": "c", "mix": {"a": 1.0}, "mix_method": "slerp",
                                                    "tuned": {"old": 1}})
    tuner = UserTuner(binding, data, cfg, start)
    tokens, report = tuner.run(show_progress=False)
    meta = tuner.embedding(tokens, report).meta
    assert set(meta) == {"user_id", "style", "n_pairs", "tuned"}
    assert meta["user_id"] == "ann" and meta["style"] == "ink" and meta["n_pairs"] == N_PAIRS
    tuned = meta["tuned"]
    assert tuned["start"] == {"embedding": start.describe(), "library_users": 0}
    assert "config" not in tuned and "old" not in tuned and tuned["steps"] == 0
    assert tuned["pairs_hash"] == data.digest() and (tuned["lr"], tuned["anchor"], tuned["seed"]) == (0.05, 0.3, 0)
    named = tuner.embedding(tokens, report, user_id="bo", start_name="ann.safetensors", library_size=3,
                            pairs_hash="h").meta
    assert named["user_id"] == "bo" and named["tuned"]["pairs_hash"] == "h"
    assert named["tuned"]["start"] == {"embedding": "ann.safetensors", "library_users": 3}
    # a cold start from a library: no start to name, no user id to keep
    library = [UserEmbedding(torch.randn(5, 24, generator=torch.Generator().manual_seed(s)), "test", {})
               for s in (7, 8)]
    cold = UserTuner(binding, data, TuneConfig(mode="mix", max_steps=0, val_fraction=0.5, val_draws=1),
                     library=library)
    meta = cold.embedding(*cold.run(show_progress=False)).meta
    assert meta["user_id"] == "" and meta["tuned"]["start"] == {"embedding": "", "library_users": 0}


def test_the_tokens_and_the_anchor_penalty_by_hand():
    """tokens = center + sum_i c_i (e_i - center) + rms(center) * delta, penalty = mean(((tokens - center) / rms)^2),
    with a center of RMS 2 and two library users one offset each from it."""
    center = torch.tensor([[2.0, -2.0], [2.0, 2.0]])
    library = torch.stack([center + torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                           center + torch.tensor([[0.0, 0.0], [0.0, 2.0]])])
    tokens = _Tokens(center, library)
    assert tokens.scale == 2.0 and torch.equal(tokens(), center)  # c and delta start at 0: the start
    with torch.no_grad():
        tokens.c.copy_(torch.tensor([0.5, -1.0]))
        tokens.delta.copy_(torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    assert torch.equal(tokens(), torch.tensor([[2.5, -1.0], [2.0, 0.0]]))
    assert float(tokens.penalty().detach()) == (0.25**2 + 0.5**2 + 0.0 + 1.0**2) / 4


def test_timesteps_are_drawn_in_the_configured_range(binding):
    """t_min/t_max set for tune-user replace the adapter's training range (0.1-0.9 here): every timestep a score
    draws lies in [0.3, 0.6] and they spread over it."""
    cfg = TuneConfig(mode="tokens", max_steps=0, val_fraction=0.5, val_draws=16, t_min=0.3, t_max=0.6)
    tuner = UserTuner(binding, _data("same", cfg), cfg, _start())
    drawn = []
    inputs = tuner.pair_inputs

    def recording(data, idx, t, eps, device):  # the tuner's own pair_inputs, its timesteps noted
        drawn.append(t)
        return inputs(data, idx, t, eps, device)

    tuner.pair_inputs = recording
    tuner.score(tuner.val_idx)
    t = torch.cat(drawn)
    assert (tuner.t_min, tuner.t_max) == (0.3, 0.6) and len(t) == 16 * len(tuner.val_idx)
    assert t.min() >= 0.3 and t.max() <= 0.6 and t.max() - t.min() > 0.2


def test_one_user_keeps_that_users_pairs_and_the_sdxl_fields():
    """One user's pairs, in order, as a one-user data set: its SDXL size/crop ids and base go with them."""
    g = torch.Generator().manual_seed(0)
    w, lat = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    time_ids = torch.arange(30.0).view(5, 6)
    data = DPOData(w, lat, torch.tensor([0, 1, 0, 1, 1]), torch.tensor([0, 1, 1, 0, 1]), torch.randn(2, 77, 8),
                   torch.randn(2, 1, 8), ["ann", "bo"], {"k": 1}, time_ids, "sdxl")
    sub, user = one_user(data, "bo")
    assert user == "bo" and sub.user_ids == ["bo"] and sub.user_idx.tolist() == [0, 0, 0]
    assert torch.equal(sub.latents_w, w[[1, 2, 4]]) and torch.equal(sub.latents_l, lat[[1, 2, 4]])
    assert sub.caption_idx.tolist() == [1, 0, 1] and torch.equal(sub.text, data.text)
    assert sub.time_ids is not None and torch.equal(sub.time_ids, time_ids[[1, 2, 4]])
    assert sub.base == "sdxl" and sub.info == {"k": 1}
    alone, user = one_user(sub, None)  # a single user needs no name
    assert user == "bo" and torch.equal(alone.latents_w, sub.latents_w)
