"""Stage C's noise schedule (cosine, s=0.008, on timestep ratios t in [0, 1]) and a deterministic DDIM sampler.

Deterministic sampling from a fixed starting noise makes base-vs-PPD comparisons paired: the only difference between
the two samples is the user attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

S = 0.008
_NORM = math.cos(S / (1 + S) * math.pi / 2) ** 2


def alpha_bar(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Cumulative signal level at timestep ratio ``t``; ``shift`` > 1 moves it noisier like Stage C's shift (logSNR -
    2 log shift)."""
    ab = (torch.cos((t + S) / (1 + S) * math.pi / 2) ** 2 / _NORM).clamp(1e-4, 0.9999)
    if shift != 1.0:
        logsnr = torch.log(ab / (1 - ab)) - 2 * math.log(shift)
        ab = torch.sigmoid(logsnr)
    return ab


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ab = alpha_bar(t).view(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> predicted noise


@torch.no_grad()
def ddim_sample(denoise: Denoiser, noise: torch.Tensor, steps: int = 20, shift: float = 1.0,
                t_start: float = 1.0) -> torch.Tensor:
    """DDIM (eta = 0) from pure noise at ``t_start`` (1: the top of the schedule) to t=0 in ``steps`` steps."""
    x = noise
    ts = torch.linspace(t_start, 0.0, steps + 1)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        ab, ab_next = alpha_bar(t, shift), alpha_bar(t_next, shift) if t_next > 0 else torch.tensor(1.0)
        eps = denoise(x, t.expand(x.shape[0]).to(x.device))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x
