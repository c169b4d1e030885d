"""The evaluation's numbers, hand-computed: win rate with ties, group summaries, the monotone check, and fidelity
(drift and noise ratio) on sample sets with a known answer and on real PPD samples of a tiny Stage C."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import trained_looking_adapter

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.embedding import UserEmbedding
from ppd_train.evaluate import (
    evaluate_users,
    fidelity_change,
    fidelity_means,
    group_summary,
    is_monotone,
    sample,
    win_rate,
)
from ppd_train.stage_c import PPDBinding, stage_c_info
from ppd_train.synthetic import World, WorldConfig
from ppd_train.tiny import build_tiny_stage_c


def test_a_tie_is_half_a_win():
    # win, tie, loss, tie
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 4.0])) == 0.5
    assert win_rate(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.0])) == pytest.approx(2 / 3)
    assert win_rate(torch.zeros(5), torch.zeros(5)) == 0.5  # no change: no preference either way
    assert win_rate(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0])) == 0.5
    assert win_rate(torch.tensor([0.1]), torch.tensor([0.0])) == 1.0
    assert win_rate(torch.tensor([-0.1]), torch.tensor([0.0])) == 0.0


def test_group_summary_lowest_user_and_share_below_half():
    rows = [{"win_rate": 1.0, "reward_gain": 0.4, "drift_sd": 0.1, "noise_ratio": 1.0},
            {"win_rate": 0.5, "reward_gain": 0.0, "drift_sd": -0.5, "noise_ratio": 0.9},  # exactly 50%: not below
            {"win_rate": 0.25, "reward_gain": -0.2, "drift_sd": 2.0, "noise_ratio": 1.3},
            {"win_rate": 0.75, "reward_gain": 0.2, "drift_sd": 0.3, "noise_ratio": 1.2}]
    s = group_summary(rows)
    assert s == pytest.approx({"users": 4, "win_rate": 0.625, "reward_gain": 0.1, "min_win_rate": 0.25,
                               "below_half": 0.25, "drift_sd": 0.475, "max_drift_sd": 2.0, "noise_ratio": 1.1,
                               "max_noise_ratio": 1.3})
    # without fidelity, no fidelity keys
    assert set(group_summary([{"win_rate": 0.4, "reward_gain": -0.1}])) == {
        "users", "win_rate", "reward_gain", "min_win_rate", "below_half"}
    assert group_summary([{"win_rate": 0.4, "reward_gain": -0.1}])["below_half"] == 1.0


@pytest.mark.parametrize("ra, rb, expected", [
    ([3.0, 2.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0], True),  # a falls, b rises (flat steps allowed)
    ([1.0, 1.0], [1.0, 1.0], True),
    ([3.0, 2.0, 2.5, 1.0], [0.0, 1.0, 2.0, 3.0], False),  # a rises once
    ([3.0, 2.0, 1.0, 0.0], [0.0, 2.0, 1.0, 3.0], False),  # b falls once
    ([3.0, 2.0, 1.0], [3.0, 2.0, 1.0], False),  # only a is right: both must hold
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], False),  # only b is right
    ([0.0, 1.0, 2.0], [2.0, 1.0, 0.0], False),  # the wrong way round
])
def test_monotone_needs_both_users_to_move_the_right_way(ra, rb, expected):
    assert is_monotone(ra, rb) is expected


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(k_styles=3, n_captions=4), seed=0)


def _data(world: World, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(world.cfg.n_captions, (n,), generator=g)
    return world.sample_data(caps, g), caps


def test_fidelity_of_data_samples_is_unchanged(world):
    base, base_caps = _data(world, 20000, 1)
    other, other_caps = _data(world, 20000, 2)  # other draws of the same distribution
    change = fidelity_change(fidelity_means(world.fidelity, other, other_caps),
                             fidelity_means(world.fidelity, base, base_caps))
    # the style energies' means differ only by sampling error (sd ~0.012 nats here, so |drift| ~ sqrt(2 * 0.012))
    assert abs(change["drift_sd"]) < 0.3
    assert change["noise_ratio"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_samples_shifted_k_sd_along_a_style_drift_k_sd(world, k):
    base, caps = _data(world, 20000, 1)
    shifted = base + k * world.directions[2][None, :, None, None]
    change = fidelity_change(fidelity_means(world.fidelity, shifted, caps),
                             fidelity_means(world.fidelity, base, caps))
    assert change["drift_sd"] == pytest.approx(k, abs=0.1)
    assert change["noise_ratio"] == pytest.approx(1.0, abs=1e-4)  # a style move adds no noise
    back = fidelity_change(fidelity_means(world.fidelity, base, caps), fidelity_means(world.fidelity, shifted, caps))
    assert back["drift_sd"] == pytest.approx(-k, abs=0.1)  # closer to the data's centre: negative


def test_noisier_samples_have_a_noise_ratio_above_one(world):
    base, caps = _data(world, 20000, 1)
    g = torch.Generator().manual_seed(3)
    noisier = base + world.cfg.noise_scale * torch.randn(base.shape, generator=g)  # as much noise again
    change = fidelity_change(fidelity_means(world.fidelity, noisier, caps),
                             fidelity_means(world.fidelity, base, caps))
    assert change["noise_ratio"] == pytest.approx(math.sqrt(2), abs=0.03)
    assert abs(change["drift_sd"]) < 0.3


# --------------------------------------------------------------------------------- evaluate_users on a real Stage C
SAMPLES, STEPS, SEED = 8, 4, 1234


def _binding(world: World, moving: bool) -> PPDBinding:
    unet = build_tiny_stage_c(seed=0, width=world.cfg.width, clip_dim=world.cfg.width)
    if moving:  # trained-looking weights, the user values scaled up so that the samples move well off the base's
        adapter = trained_looking_adapter(unet, embed_dim=24, num_tokens=5, seed=2)
        with torch.no_grad():
            for block in adapter.blocks:
                block.to_v.weight.mul_(10.0)
    else:  # a fresh adapter: its user values are 0, PPD samples are the base model's, bit for bit
        adapter = PPDAdapter(AdapterConfig.for_stage_c(stage_c_info(unet), embed_dim=24, num_tokens=5,
                                                       embedder="test"))
    return PPDBinding(unet, adapter)


def _users(world: World) -> dict[str, UserEmbedding]:
    g = torch.Generator().manual_seed(7)
    return {uid: UserEmbedding(torch.randn(5, 24, generator=g), "test") for uid in
            (world.seen[0], world.seen[1], world.unseen[0])}


def _noise(world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation's fixed draws: noise from ``seed``, captions in turn."""
    noise = torch.randn((SAMPLES, *world.conditions().latent_shape), generator=torch.Generator().manual_seed(SEED))
    return noise, torch.arange(SAMPLES) % world.cfg.n_captions


def test_an_adapter_that_changes_nothing_scores_exactly_half(world):
    users = _users(world)
    out = evaluate_users(_binding(world, moving=False), world.conditions(), users, world.reward, {world.seen[0]},
                         SAMPLES, SEED, STEPS, fidelity=world.fidelity, heldout={world.seen[1]})
    for m in out["users"].values():
        assert (m["win_rate"], m["reward_gain"], m["drift_sd"], m["noise_ratio"]) == (0.5, 0.0, 0.0, 1.0)
    assert {uid: m["group"] for uid, m in out["users"].items()} == {
        world.seen[0]: "seen", world.seen[1]: "heldout", world.unseen[0]: "unseen"}
    assert out["seen"]["below_half"] == 0.0 and out["unseen"]["min_win_rate"] == 0.5


def test_fidelity_and_rewards_are_measured_on_the_ppd_samples(world):
    binding, users, cond = _binding(world, moving=True), _users(world), world.conditions()
    out = evaluate_users(binding, cond, users, world.reward, {world.seen[0], world.seen[1]}, SAMPLES, SEED, STEPS,
                         fidelity=world.fidelity)
    noise, caps = _noise(world)
    base = sample(binding, cond, caps, noise, None, steps=STEPS)
    f_base = world.fidelity(base, caps)
    for uid, emb in users.items():
        ppd = sample(binding, cond, caps, noise, emb.tokens[None], steps=STEPS)
        assert (ppd - base).abs().max() > 0.1  # the adapter does move the samples
        r_ppd, r_base = world.reward(uid, ppd, caps), world.reward(uid, base, caps)
        f_ppd = world.fidelity(ppd, caps)
        gap = (f_ppd["style_energy"].mean() - f_base["style_energy"].mean()).item()
        m = out["users"][uid]
        assert m["win_rate"] == pytest.approx((r_ppd > r_base).float().mean().item())
        assert m["reward_gain"] == pytest.approx((r_ppd - r_base).mean().item(), abs=1e-6)
        assert m["drift_sd"] == pytest.approx(math.copysign(math.sqrt(2 * abs(gap)), gap), rel=1e-4)
        assert m["drift_sd"] > 0.2  # these users push samples off the data's styles
        assert m["noise_ratio"] == pytest.approx((f_ppd["residual"].mean() / f_base["residual"].mean()).item(),
                                                 rel=1e-4)
        assert abs(m["noise_ratio"] - 1.0) > 1e-5  # measured on the base samples it would be exactly 1
    seen = [out["users"][u] for u in world.seen[:2]]
    assert out["seen"]["win_rate"] == pytest.approx(sum(m["win_rate"] for m in seen) / 2)
    assert out["seen"]["max_drift_sd"] == max(m["drift_sd"] for m in seen)
    assert out["unseen"]["users"] == 1 and "heldout" not in out
