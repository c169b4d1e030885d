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
