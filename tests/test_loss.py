"""The Diffusion-DPO loss against a value computed by hand."""

from __future__ import annotations

import math

import torch

from ppd_train.loss import dpo_loss


def test_loss_matches_hand_computation():
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    model_w = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # mse: 1, 0
    ref_w = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # mse: 2, 1
    model_l = torch.tensor([[0.0, 2.0], [1.0, 3.0]])  # mse: 2, 2
    ref_l = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # mse: 1, 1
    beta = 0.5
    # diff = (mw - rw) - (ml - rl): sample 0: (1-2)-(2-1) = -2; sample 1: (0-1)-(2-1) = -2
    expected = -math.log(1 / (1 + math.exp(-(-beta * -2.0))))
    stats = dpo_loss(model_w, model_l, ref_w, ref_l, noise, beta)
    assert math.isclose(stats.loss.item(), expected, rel_tol=1e-6)
    assert stats.implicit_acc == 1.0 and math.isclose(stats.reward_margin, 2.0)
    assert math.isclose(stats.model_mse, (1 + 0 + 2 + 2) / 4) and math.isclose(stats.ref_mse, (2 + 1 + 1 + 1) / 4)


def test_policy_equal_to_reference_gives_log2():
    x = torch.randn(3, 4)
    stats = dpo_loss(x, x, x, x, torch.randn(3, 4), beta=2500.0)
    assert math.isclose(stats.loss.item(), math.log(2), rel_tol=1e-6) and stats.implicit_acc == 0.0


def test_per_sample_errors_against_a_float64_reference():
    """Each pair has its own d = (mse_w - ref_w) - (mse_l - ref_l); the loss averages -log sigmoid(-beta d) over pairs
    (not the sigmoid of an averaged d); implicit accuracy is the share of pairs with d < 0."""
    g = torch.Generator().manual_seed(0)
    model_w, model_l, ref_w, ref_l, noise = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(5))
    model_l[:2] = noise[:2]  # pairs 0, 1: the dispreferred image is predicted perfectly
    model_w[2:] = noise[2:]  # pairs 2, 3: the preferred one is
    beta = 0.7
    d = []
    for i in range(4):
        mse = [float(((x[i].double() - noise[i].double()) ** 2).mean()) for x in (model_w, ref_w, model_l, ref_l)]
        d.append((mse[0] - mse[1]) - (mse[2] - mse[3]))
    expected = sum(math.log1p(math.exp(beta * x)) for x in d) / 4  # -log sigmoid(-beta d)
    stats = dpo_loss(model_w, model_l, ref_w, ref_l, noise, beta)
    assert math.isclose(stats.loss.item(), expected, rel_tol=1e-5)
    share = sum(x < 0 for x in d) / 4
    assert 0 < share < 1 and stats.implicit_acc == share
    assert math.isclose(stats.reward_margin, -sum(d) / 4, rel_tol=1e-5)
    # per-pair margins (validation's implicit accuracy is their sign): -d, positive where the preferred image gained
    torch.testing.assert_close(stats.margins.double(), -torch.tensor(d, dtype=torch.float64), rtol=1e-5, atol=1e-7)
