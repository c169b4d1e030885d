"""Noise schedules: Stage C's (cosine, s=0.008, on timestep ratios t in [0, 1]) with a deterministic DDIM sampler, and
SDXL's (discrete DDPM, 1000 steps, scaled-linear betas 0.00085..0.012), on the same ratios t in [0, 1].

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
    return _ddim(denoise, noise, steps, t_start, lambda t: alpha_bar(t, shift), lambda t: t)


def _ddim(denoise: Denoiser, noise: torch.Tensor, steps: int, t_start: float,
          signal: Callable[[torch.Tensor], torch.Tensor], model_time: Callable[[torch.Tensor], torch.Tensor]):
    """DDIM (eta = 0) on timestep ratios from ``t_start`` to 0; ``signal(t)`` is the schedule's alpha_bar and
    ``model_time(t)`` what the model takes as its timestep."""
    x = noise
    ts = torch.linspace(t_start, 0.0, steps + 1)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        ab, ab_next = signal(t), signal(t_next) if t_next > 0 else torch.tensor(1.0)
        eps = denoise(x, model_time(t).expand(x.shape[0]).to(x.device))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x


# SDXL (and every SD 1.x/2.x/XL UNet): diffusers' DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
# beta_end=0.012, num_train_timesteps=1000), as SDXL's scheduler config and the Diffusion-DPO SDXL recipe use it.
SDXL_STEPS = 1000
_SDXL_ALPHAS_CUMPROD = torch.cumprod(
    1.0 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, SDXL_STEPS, dtype=torch.float32) ** 2, dim=0)


def sdxl_timesteps(t: torch.Tensor) -> torch.Tensor:
    """Timestep ratios ``t`` in [0, 1] -> SDXL's discrete timesteps 0..999 (uniform t gives uniform timesteps, as the
    recipe's ``randint(0, 1000)``; ``t_min``/``t_max`` keep their meaning as shares of the schedule)."""
    return (t * SDXL_STEPS).long().clamp(0, SDXL_STEPS - 1)


def sdxl_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    return _SDXL_ALPHAS_CUMPROD[sdxl_timesteps(t)]


@torch.no_grad()
def sdxl_ddim_sample(denoise: Denoiser, noise: torch.Tensor, steps: int = 20, t_start: float = 1.0) -> torch.Tensor:
    """:func:`ddim_sample` on SDXL's discrete schedule: the model sees timesteps 0..999, ``t_start`` is a ratio."""
    return _ddim(denoise, noise, steps, t_start, sdxl_alpha_bar, sdxl_timesteps)


def sdxl_add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DDPM forward process at the timesteps of ``t`` (epsilon prediction: the target is ``noise``)."""
    ab = sdxl_alpha_bar(t).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
