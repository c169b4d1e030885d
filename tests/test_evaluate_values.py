"""The evaluation's numbers, hand-computed: win rate with ties, group summaries, the monotone check, and fidelity
(drift and noise ratio) on sample sets with a known answer and on real PPD samples of a tiny Stage C."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import trained_looking_adapter

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.embedding import UserEmbedding, interpolate
from ppd_train.errors import PPDError
from ppd_train.evaluate import (
    evaluate_users,
    fidelity_change,
    fidelity_means,
    group_summary,
    interpolation_curve,
    is_monotone,
    load_reward,
    sample,
    win_rate,
)
from ppd_train.schedule import ddim_sample
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
        adapter = PPDAdapter(AdapterConfig.for_model(stage_c_info(unet), embed_dim=24, num_tokens=5,
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
        assert m["reward_base"] == pytest.approx(r_base.mean().item(), abs=1e-6)
        assert m["reward_ppd"] == pytest.approx(r_ppd.mean().item(), abs=1e-6)
        assert m["win_rate"] == pytest.approx((r_ppd > r_base).float().mean().item())
        assert m["reward_gain"] == pytest.approx((r_ppd - r_base).mean().item(), abs=1e-6)
        assert m["drift_sd"] == pytest.approx(math.copysign(math.sqrt(2 * abs(gap)), gap), rel=1e-4)
        assert m["drift_sd"] > 0.2  # these users push samples off the data's styles
        assert m["noise_ratio"] == pytest.approx((f_ppd["residual"].mean() / f_base["residual"].mean()).item(),
                                                 rel=1e-4)
        assert abs(m["noise_ratio"] - 1.0) > 1e-5  # measured on the base samples it would be exactly 1
    assert [m["seen"] for m in out["users"].values()] == [True, True, False]
    seen = [out["users"][u] for u in world.seen[:2]]
    assert out["seen"]["win_rate"] == pytest.approx(sum(m["win_rate"] for m in seen) / 2)
    assert out["seen"]["max_drift_sd"] == max(m["drift_sd"] for m in seen)
    assert out["unseen"]["users"] == 1 and "heldout" not in out


def test_sampling_is_stage_c_with_the_captions_conditioning_and_the_user_at_its_weight(world):
    binding, cond = _binding(world, moving=True), world.conditions()
    noise, caps = _noise(world)
    tokens = _users(world)[world.seen[0]].tokens[None]
    kw = dict(clip_text_pooled=world.pooled[caps], clip_text=world.text[caps],
              clip_img=torch.zeros(SAMPLES, 1, world.cfg.width))

    def by_hand(steps: int, weight: float | None) -> torch.Tensor:
        with torch.no_grad(), binding.user(binding.adapter(tokens) if weight else None, weight or 0.0):
            return ddim_sample(lambda x, t: binding.unet(x, t, **kw).sample, noise, steps, t_start=cond.t_start)

    assert torch.equal(sample(binding, cond, caps, noise, None, steps=3), by_hand(3, None))
    assert torch.equal(sample(binding, cond, caps, noise, tokens, steps=3), by_hand(3, 1.0))
    assert torch.equal(sample(binding, cond, caps, noise, tokens, 0.5, steps=3), by_hand(3, 0.5))
    assert torch.equal(sample(binding, cond, caps, noise, tokens, 0.0, steps=3), by_hand(3, None))
    assert torch.equal(sample(binding, cond, caps, noise, tokens), by_hand(20, 1.0))  # defaults: weight 1, 20 steps


def test_evaluation_defaults(world):
    binding, cond, users = _binding(world, moving=True), world.conditions(), _users(world)
    assert evaluate_users(binding, cond, users, world.reward, set()) == evaluate_users(
        binding, cond, users, world.reward, set(), samples=16, seed=1234, steps=20)


def test_the_interpolation_curve_is_each_users_reward_along_the_mix(world):
    binding, cond, users = _binding(world, moving=True), world.conditions(), _users(world)
    a, b = world.seen[0], world.unseen[0]
    out = interpolation_curve(binding, cond, users[a], users[b], world.reward, (a, b), weights=(0.0, 0.5, 1.0),
                              samples=SAMPLES, seed=SEED, steps=STEPS, method="slerp")
    noise, caps = _noise(world)
    for point, w in zip(out["curve"], (0.0, 0.5, 1.0), strict=True):
        x = sample(binding, cond, caps, noise, interpolate(users[a], users[b], w, "slerp").tokens[None], steps=STEPS)
        assert point == pytest.approx({"weight": w, a: world.reward(a, x, caps).mean().item(),
                                       b: world.reward(b, x, caps).mean().item()}, abs=1e-6)
    assert out["users"] == [a, b] and out["method"] == "slerp"
    assert out["monotone"] == is_monotone([p[a] for p in out["curve"]], [p[b] for p in out["curve"]])
    # a reward that is highest at each user's own end: the two-point curve is monotone, and only in this order
    ends = {u: sample(binding, cond, caps, noise, users[u].tokens[None], steps=STEPS) for u in (a, b)}

    def closeness(uid, x, _caps):
        return -(x - ends[uid]).flatten(1).norm(dim=1)

    two = interpolation_curve(binding, cond, users[a], users[b], closeness, (a, b), weights=(0.0, 1.0),
                              samples=SAMPLES, seed=SEED, steps=STEPS)
    assert two["monotone"] and not interpolation_curve(binding, cond, users[a], users[b], closeness, (b, a),
                                                       weights=(0.0, 1.0), samples=SAMPLES, seed=SEED,
                                                       steps=STEPS)["monotone"]
    default = interpolation_curve(binding, cond, users[a], users[b], world.reward, (a, b))
    assert [p["weight"] for p in default["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0] and default["method"] == "lerp"
    noise16 = torch.randn((16, *cond.latent_shape), generator=torch.Generator().manual_seed(4321))
    x = sample(binding, cond, torch.arange(16) % world.cfg.n_captions, noise16, users[a].tokens[None], steps=20)
    assert default["curve"][0][a] == pytest.approx(
        world.reward(a, x, torch.arange(16) % world.cfg.n_captions).mean().item(), abs=1e-6)


def test_a_reward_is_named_as_module_colon_function():
    assert load_reward("ppd_train.evaluate:win_rate") is win_rate
    for bad in ("ppd_train.evaluate", "ppd_train.evaluate:", ":win_rate", "ppd_train.nowhere:f",
                "ppd_train.evaluate:nothing", "ppd_train.evaluate:math"):
        with pytest.raises(PPDError, match="Reward"):
            load_reward(bad)
