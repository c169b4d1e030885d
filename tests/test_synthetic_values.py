"""The synthetic world's own numbers, hand-computed: the latents it draws, the style and fidelity it reads back from
them, the pairs a user labels, and the targets a demo run is checked against (the proof's ruler, issue 28)."""

from __future__ import annotations

import math

import pytest
import torch

from ppd_train.embedding import UserEmbedding
from ppd_train.synthetic import (
    Targets,
    World,
    WorldConfig,
    check_targets,
    diagnose_users,
    failure_counts,
    interpolation_pair,
)

STYLE, NOISE = 2.0, 0.5  # not 1: a world where dividing and multiplying by them differ


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(k_styles=2, n_captions=3, latent_size=4, style_scale=STYLE, noise_scale=NOISE,
                             seen_users=3, unseen_users=3, unseen_mixtures=2), seed=0)


def _checker(c: float, size: int = 4) -> torch.Tensor:
    """+c/-c in a checkerboard, the same in every channel: RMS c, every channel's spatial mean 0 (no style)."""
    i = torch.arange(size)
    return c * (1.0 - 2.0 * ((i[:, None] + i[None, :]) % 2)).float().expand(16, size, size)


def _latents(world: World, z: torch.Tensor, caps: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    return world.caption_means[caps] + (z @ world.directions)[:, :, None, None] + rest


def test_the_world_is_built_as_configured(world):
    d = world.directions
    assert d.shape == (2, 16) and torch.allclose(d @ d.T, torch.eye(2), atol=1e-6)  # orthonormal over channels
    assert world.caption_means.shape == (3, 16, 4, 4)
    assert world.seen == ["seen00", "seen01", "seen02"] and world.unseen == ["mix00", "mix01", "new02"]
    assert set(world.prefs) == set(world.seen + world.unseen)
    for p in world.prefs.values():
        assert p.shape == (2,) and float(p.norm()) == pytest.approx(1.0, abs=1e-6)
    # a mixture is the unit sum of two different seen users' preferences
    seen = [world.prefs[u] for u in world.seen]
    for uid in ("mix00", "mix01"):
        sums = [World._unit(seen[a] + seen[b]) for a in range(3) for b in range(3) if a != b]
        assert any(torch.allclose(world.prefs[uid], s, atol=1e-6) for s in sums)
    with pytest.raises(ValueError, match="world.k_styles = 17: k_styles must be <= 16"):
        World(WorldConfig(k_styles=17), seed=0)
    assert World._unit(torch.zeros(3)).abs().max() == 0  # no NaN from a zero vector
    again = World(WorldConfig(k_styles=2, n_captions=3, latent_size=4, style_scale=STYLE, noise_scale=NOISE,
                              seen_users=3, unseen_users=3, unseen_mixtures=2), seed=0)
    assert torch.equal(again.directions, d) and torch.equal(again.prefs["new02"], world.prefs["new02"])


def test_style_reward_and_fidelity_of_hand_built_latents(world):
    z = torch.tensor([[1.0, -2.0], [0.0, 0.0], [0.5, 0.25]])
    caps = torch.tensor([2, 0, 1])
    rest = torch.stack([_checker(0.3), _checker(0.0), _checker(1.0)])
    x = _latents(world, z, caps, rest)
    assert torch.allclose(world.style_of(x, caps), z, atol=1e-5)
    uid = world.seen[1]
    assert torch.allclose(world.reward(uid, x, caps), z @ world.prefs[uid], atol=1e-5)
    f = world.fidelity(x.double(), caps)  # any dtype in, float32 out
    assert f["style_energy"].dtype == torch.float32
    # |z|^2 / (2 style^2) nats; the residual's RMS in units of the noise
    assert torch.allclose(f["style_energy"], z.pow(2).sum(1) / (2 * STYLE**2), atol=1e-5)
    assert torch.allclose(f["residual"], torch.tensor([0.3, 0.0, 1.0]) / NOISE, atol=1e-5)


def test_data_samples_have_the_configured_style_and_noise(world):
    g = torch.Generator().manual_seed(1)
    caps = torch.randint(3, (20000,), generator=g)
    x = world.sample_data(caps, g)
    assert x.shape == (20000, 16, 4, 4)
    z = world.style_of(x, caps)
    # the style read back is the drawn one plus the noise's channel means (sd NOISE/4 per channel, 16 positions)
    assert z.std(0) == pytest.approx([math.sqrt(STYLE**2 + NOISE**2 / 16)] * 2, rel=0.03)
    assert z.mean(0).abs().max() < 0.05
    f = world.fidelity(x, caps)
    # on data: the style energy's mean is K/2 (plus the noise's share), the residual about 1 noise unit
    assert f["style_energy"].mean() == pytest.approx(2 / 2 * (1 + NOISE**2 / 16 / STYLE**2), rel=0.03)
    assert f["residual"].mean() == pytest.approx(1.0, abs=0.03)
    # each caption's latents sit around its own mean
    for c in range(3):
        assert (x[caps == c].mean(0) - world.caption_means[c]).abs().mean() < 0.05


def test_a_users_pairs_put_the_higher_reward_first(world):
    uid = world.unseen[2]
    chosen, rejected, caps = world.pairs(uid, 64, torch.Generator().manual_seed(5))
    assert chosen.shape == rejected.shape == (64, 16, 4, 4) and caps.shape == (64,)
    assert (world.reward(uid, chosen, caps) >= world.reward(uid, rejected, caps)).all()
    # the same two draws as sample_data gives, each pair's images kept together with its caption
    g = torch.Generator().manual_seed(5)
    caps2 = torch.randint(3, (64,), generator=g)
    a, b = world.sample_data(caps2, g), world.sample_data(caps2, g)
    assert torch.equal(caps, caps2)
    a_first = world.reward(uid, a, caps) >= world.reward(uid, b, caps)
    assert 0 < int(a_first.sum()) < 64  # both orders occur
    assert torch.equal(chosen[a_first], a[a_first]) and torch.equal(chosen[~a_first], b[~a_first])
    assert torch.equal(rejected[a_first], b[a_first]) and torch.equal(rejected[~a_first], a[~a_first])


def test_the_worlds_embedder_is_phi_of_the_pooled_difference(world):
    g = torch.Generator().manual_seed(2)
    chosen, rejected = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    tokens = world.embedder().embed_tokens(list(chosen), list(rejected))
    expected = (chosen.mean(dim=(2, 3)) - rejected.mean(dim=(2, 3))) @ world.phi.T
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert world.embedder().id == "pairdiff:synthetic-phi"


def test_diagnosis_reads_the_confidence_and_keeps_the_boundaries(world):
    uid = world.seen[0]
    conf = {"confidence": 0.25, "low_confidence": True}
    emb = UserEmbedding(torch.ones(4, 32), "synthetic-phi", {"confidence": conf})
    world.embed_evidence[uid] = world.prefs[uid][None].repeat(2, 1)
    m = {"win_rate": 0.49}
    diagnose_users(world, {uid: emb}, {uid: m})
    assert m["confidence"] == 0.25 and m["low_confidence"] is True and m["failure"] == "adapter is wrong"
    # an embedding from before the confidence: no number, not flagged
    old = UserEmbedding(torch.ones(4, 32), "synthetic-phi", {})
    m = {"win_rate": 0.5}
    diagnose_users(world, {uid: old}, {uid: m})
    assert math.isnan(m["confidence"]) and m["low_confidence"] is False and m["failure"] is None
    # a cosine of exactly AGREE_COS (0.5) agrees: 60 degrees off the preference
    p = world.prefs[uid]
    rot = torch.tensor([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]], dtype=p.dtype)
    world.embed_evidence[uid] = (rot @ p)[None]
    m = {"win_rate": 0.0}
    diagnose_users(world, {uid: emb}, {uid: m})
    assert m["evidence_cos"] == pytest.approx(0.5, abs=1e-6)
    world.embed_evidence[uid] = (rot @ p)[None] * 3  # the length of the evidence does not matter
    diagnose_users(world, {uid: emb}, {uid: m})
    assert m["evidence_cos"] == pytest.approx(0.5, abs=1e-6)


def test_failure_counts_count_each_cause_and_the_flags():
    per_user = {"a": {"failure": "adapter is wrong", "low_confidence": True, "other_draws_win": True},
                "b": {"failure": "pairs say too little", "low_confidence": False, "other_draws_win": True},
                "c": {"failure": "pairs say too little", "low_confidence": True, "other_draws_win": False},
                "g": {"failure": "adapter is wrong", "low_confidence": True, "other_draws_win": False},
                "d": {"failure": None, "low_confidence": True},
                "e": {"failure": None, "low_confidence": False},
                "f": {"failure": None, "low_confidence": True}}
    assert failure_counts(per_user) == {"below_half": 4, "pairs_say_too_little": 2, "adapter_wrong": 2,
                                        "failing_flagged": 3, "other_draws_win": 2, "adapter_wrong_other_draws_win": 1,
                                        "flagged": 5, "flagged_failing": 3}


def test_demo_table_shows_each_failing_users_redraws_and_the_count():
    from ppd_train.synthetic import _table

    row = {"group": "seen", "win_rate": 0.0, "reward_gain": -0.01, "drift_sd": 0.3, "noise_ratio": 1.0}
    per_user = {"a": {**row, "failure": "adapter is wrong", "low_confidence": True, "other_draws_win": True,
                      "redraw_win_rates": [1.0, 0.5, 0.25, 1.0, 1.0, 0.0, 1.0, 1.0]},
                "b": {**row, "failure": "pairs say too little", "low_confidence": True, "other_draws_win": False,
                      "redraw_win_rates": [0.0, 0.0, 1.0]},
                "c": {**row, "win_rate": 1.0, "failure": None, "low_confidence": False}}
    lines = _table({"users": per_user, "failures": failure_counts(per_user)}).splitlines()
    assert lines[1].endswith("adapter is wrong (other draws: 6 of 8 reach 50%)")  # 0.5 counts as reaching
    assert lines[2].endswith("pairs say too little (other draws: 1 of 3 reach 50%)")
    assert lines[3].endswith("  ")  # a user PPD serves has no cause and no redraws
    assert lines[-1].startswith("given other draws of their pairs, 1 of these 2 users reach 50% with most draws "
                                "(1 of the 1 adapter-wrong)")
    for m in per_user.values():  # redraws = 0: nothing about them, and no count
        m.pop("redraw_win_rates", None), m.pop("other_draws_win", None)
    counts = failure_counts(per_user)
    assert "other_draws_win" not in counts and "other draws" not in _table({"users": per_user, "failures": counts})


BASE = {"seen": {"win_rate": 0.9}, "unseen": {"win_rate": 0.8}, "all": {"drift_sd": 2.0, "noise_ratio": 1.1},
        "interpolation": {"monotone": True}}


def _with(**changes) -> dict:
    m = {k: dict(v) for k, v in BASE.items()}
    for key, value in changes.items():
        group, field = key.split("__")
        m[group][field] = value
    return m


def test_each_target_is_met_at_its_bound_and_missed_past_it():
    assert check_targets(BASE, Targets()) == []  # every value exactly at its bound: met
    assert check_targets(_with(seen__win_rate=0.89), Targets()) == ["seen win rate 89% < 90%"]
    assert check_targets(_with(unseen__win_rate=0.79), Targets()) == ["unseen win rate 79% < 80%"]
    assert check_targets(_with(all__drift_sd=2.01), Targets()) == [
        "fidelity: PPD samples drift 2.0 sd off the data's styles > 2"]
    assert check_targets(_with(all__noise_ratio=1.11), Targets()) == [
        "fidelity: residual off the data 1.11x the base model's > 1.1"]
    assert check_targets(_with(interpolation__monotone=False), Targets()) == ["interpolation is not monotone"]
    assert check_targets(_with(interpolation__monotone=False), Targets(monotone=False)) == []
    # NaN fidelity is a miss, not a pass
    assert len(check_targets(_with(all__drift_sd=float("nan"), all__noise_ratio=float("nan")), Targets())) == 2
    # the bounds come from the targets given
    assert check_targets(_with(seen__win_rate=0.5, unseen__win_rate=0.5, all__drift_sd=3.0, all__noise_ratio=1.5),
                         Targets(seen_win_rate=0.5, unseen_win_rate=0.5, max_drift_sd=3.0,
                                 max_noise_ratio=1.5)) == []
    # a world without unseen users is checked on the rest
    no_unseen = {k: v for k, v in _with(seen__win_rate=0.0).items() if k != "unseen"}
    assert check_targets(no_unseen, Targets()) == ["seen win rate 0% < 90%"]
    # all misses at once, in order
    assert len(check_targets(_with(seen__win_rate=0.0, unseen__win_rate=0.0, all__drift_sd=9.0,
                                   all__noise_ratio=9.0, interpolation__monotone=False), Targets())) == 5


def test_interpolation_pair_is_the_most_opposed_of_the_users_the_embedder_reads(world):
    # hand-set tastes: a and b are the most opposed pair overall, but b's pairs do not agree with its taste
    w = World(WorldConfig(k_styles=2, n_captions=1, latent_size=4, seen_users=4, unseen_users=1, unseen_mixtures=0),
              seed=0)
    w.prefs.update({"seen00": torch.tensor([1.0, 0.0]), "seen01": torch.tensor([-1.0, 0.0]),
                    "seen02": torch.tensor([0.0, 1.0]), "seen03": torch.tensor([-0.6, -0.8])})
    users = {u: {"embedding_agrees": u != "seen01"} for u in w.seen}
    assert interpolation_pair(w, w.seen, users) == ("seen02", "seen03")  # cos -0.8: the most opposed that agree
    users["seen01"]["embedding_agrees"] = True
    assert interpolation_pair(w, w.seen, users) == ("seen00", "seen01")  # cos -1 once seen01 agrees
    # fewer than two agree: the most opposed of all trained users (held-out users are not passed in)
    assert interpolation_pair(w, w.seen, {u: {"embedding_agrees": u == "seen02"} for u in w.seen}) == \
        ("seen00", "seen01")
    users["seen01"]["embedding_agrees"] = False
    assert interpolation_pair(w, ["seen00", "seen01", "seen02"], users) == ("seen00", "seen02")  # seen03 not trained
