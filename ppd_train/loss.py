"""The user-conditioned Diffusion-DPO loss (one place only).

For a pair (x+ preferred, x- dispreferred) of one user u, with the same noise eps and timestep t for both images::

    d+ = ||eps - eps_theta(x+_t, c, u, t)||^2 - ||eps - eps_ref(x+_t, c, t)||^2      (per-sample mean squared error)
    d- = ||eps - eps_theta(x-_t, c, u, t)||^2 - ||eps - eps_ref(x-_t, c, t)||^2
    L  = -log sigmoid( -beta * (d+ - d-) )

Convention: ``beta`` multiplies the difference directly, as in the diffusers Diffusion-DPO example (beta 2500 there).
Salesforce's original code writes ``-0.5 * beta`` with beta 5000: the same objective. The reference is the same network
with the adapter switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOStats:
    loss: torch.Tensor  # scalar, differentiable
    implicit_acc: float  # share of pairs where the model prefers x+ more than the reference does
    model_mse: float  # mean model MSE over both images
    ref_mse: float  # mean reference MSE over both images
    reward_margin: float  # mean of -(d+ - d-)
    margins: torch.Tensor  # per pair -(d+ - d-), detached: > 0 where the model prefers x+ more than the reference


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             noise: torch.Tensor, beta: float) -> DPOStats:
    """Predictions for the preferred (w) and dispreferred (l) images; ``noise`` is shared by both."""
    mw, ml = _mse(model_w, noise), _mse(model_l, noise)
    rw, rl = _mse(ref_w, noise), _mse(ref_l, noise)
    diff = (mw - rw) - (ml - rl)
    loss = -F.logsigmoid(-beta * diff).mean()
    return DPOStats(loss=loss, implicit_acc=(diff < 0).float().mean().item(),
                    model_mse=((mw + ml) / 2).mean().item(), ref_mse=((rw + rl) / 2).mean().item(),
                    reward_margin=(-diff).mean().item(), margins=-diff.detach())
