"""Evaluation: PPD against the base model for each user, with fixed seeds and pluggable rewards.

For every user and every evaluation seed, the base model (Stage C or SDXL) samples twice from the same starting
noise and caption: once with the adapter off (the base model) and once with the user's embedding. A *win* is a higher
user reward for the PPD sample; a *tie* (exactly equal rewards) counts as half a win, because it states no preference:
an adapter that changes nothing scores exactly 50%, not 0% (see :func:`win_rate`). Rewards are callables
``reward(user_id, latents, caption_idx) -> [B]`` — the synthetic world's, or one named in a config as
``"package.module:function"``.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from .binding import PPDBinding, half_autocast
from .embedding import UserEmbedding, interpolate
from .errors import PPDError
from .schedule import ddim_sample, sdxl_ddim_sample

Reward = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
# Fidelity, where the data distribution is known (the synthetic world): ``fidelity(latents, caption_idx)`` ->
# {"style_energy": [B], "residual": [B]}: the negative log-likelihood of the sample's style coordinates (nats) and the
# RMS of what is left after the caption mean and the styles, in units of the data's own noise.
Fidelity = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def load_reward(spec: str) -> Reward:
    """``"package.module:function"`` -> the callable (imported like any installed module; never eval'd)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PPDError(f"Reward {spec!r}: write it as 'package.module:function'.")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PPDError(f"Reward {spec!r} cannot be imported ({e}). Is the module installed / on PYTHONPATH?") from None
    if not callable(fn):
        raise PPDError(f"Reward {spec!r} is not callable.")
    return fn


@dataclass
class EvalConfig:
    config_version: int = 1
    stage_c: str = ""
    sdxl: str = ""  # or an SDXL (diffusers folder or single file): one of the two
    sdxl_config: str = ""  # single files not shaped like SDXL 1.0: their diffusers folder or UNet config.json
    adapter: str = ""
    embeddings: str = ""  # embedding table (ppd-train embed)
    data: str = ""  # DPO data file: captions to sample with, latent size, and which users were seen in training
    reward: str = ""  # "package.module:function", called as reward(user_id, latents, caption_idx) -> [B]
    users: list[str] = field(default_factory=list)  # default: every user in the table
    samples: int = 16
    steps: int = 20
    seed: int = 1234
    out: str = ""  # metrics JSON


@dataclass
class Conditions:
    """What the base model is sampled with: captions (text tokens + pooled) and the latent shape."""

    text: torch.Tensor  # [C, L, c]
    pooled: torch.Tensor  # [C, 1, c]
    clip_img_dim: int  # Stage C's image-prompt width (fed zeros); SDXL: unused
    latent_shape: tuple[int, int, int]  # (16, h, w); SDXL (4, h, w)
    t_start: float = 1.0  # where sampling starts (1: the top of the noise schedule)
    time_ids: torch.Tensor | None = None  # SDXL: the 6 size/crop numbers to sample with (original, crop, target)


def sample(binding: PPDBinding, cond: Conditions, caption_idx: torch.Tensor, noise: torch.Tensor,
           user_tokens: torch.Tensor | None = None, weight: float = 1.0, steps: int = 20) -> torch.Tensor:
    """Deterministic samples of the base model (Stage C or SDXL); ``user_tokens`` ``[B or 1, T, D]`` or None for the
    base model."""
    unet = binding.unet
    b = noise.shape[0]
    dev = next(unet.parameters()).device
    if binding.base == "sdxl":
        if cond.time_ids is None:
            raise PPDError("Sampling SDXL needs its size/crop numbers (Conditions.time_ids).")
        kw: dict = dict(encoder_hidden_states=cond.text[caption_idx].to(dev),
                        added_cond_kwargs=dict(text_embeds=cond.pooled[caption_idx, 0].to(dev),
                                               time_ids=cond.time_ids.reshape(1, 6).expand(b, 6).to(dev)))
        sampler: Callable[..., torch.Tensor] = sdxl_ddim_sample
    else:
        kw = dict(clip_text_pooled=cond.pooled[caption_idx].to(dev), clip_text=cond.text[caption_idx].to(dev),
                  clip_img=torch.zeros(b, 1, cond.clip_img_dim, device=dev))
        sampler = ddim_sample
    with torch.no_grad(), half_autocast(unet):  # a bf16/fp16 base takes the float32 inputs
        kv = binding.adapter(user_tokens.to(dev)) if user_tokens is not None else None  # once per run, not per step
        with binding.user(kv, weight):
            return sampler(lambda x, t: unet(x, t, **kw).sample, noise.to(dev), steps, t_start=cond.t_start).cpu()


def _seeds(cond: Conditions, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *cond.latent_shape), generator=g)
    caps = torch.arange(n) % cond.text.shape[0]
    return noise, caps


def win_rate(r_ppd: torch.Tensor, r_base: torch.Tensor) -> float:
    """Share of samples where PPD's reward beats the base model's from the same noise; an exact tie counts 1/2."""
    return ((r_ppd > r_base).float() + 0.5 * (r_ppd == r_base).float()).mean().item()


def fidelity_means(fidelity: Fidelity, x: torch.Tensor, caps: torch.Tensor) -> dict[str, float]:
    """The batch means of ``fidelity(x, caps)``."""
    return {k: v.float().mean().item() for k, v in fidelity(x, caps).items()}


def fidelity_change(ppd: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """How far PPD's samples sit off the data compared with the base model's (both from :func:`fidelity_means`):
    ``drift_sd`` (> 0: further off the data's styles, in data standard deviations, see :func:`drift_sd`) and
    ``noise_ratio`` (PPD's residual over the base model's: > 1 = noisier, 1 = unchanged)."""
    return {"drift_sd": drift_sd(ppd["style_energy"] - base["style_energy"]),
            "noise_ratio": ppd["residual"] / base["residual"]}


def is_monotone(ra: Sequence[float], rb: Sequence[float]) -> bool:
    """Along an interpolation from user a (first point) to user b (last point): a's reward never rises and b's never
    falls (equal neighbours allowed). Both must hold."""
    return all(x >= y for x, y in zip(ra, ra[1:])) and all(x <= y for x, y in zip(rb, rb[1:]))


def drift_sd(energy_gap: float) -> float:
    """A gap in mean negative log-likelihood (nats per sample) as a distance in the data's standard deviations: moving
    a Gaussian's samples ``m`` standard deviations along one direction costs ``m**2 / 2`` nats, so ``sqrt(2 * gap)``
    (signed: negative when the samples got closer to the data's centre than the base model's)."""
    return math.copysign(math.sqrt(2 * abs(energy_gap)), energy_gap)


def group_summary(rows: list[dict]) -> dict:
    """Means over a group's users, its lowest user's win rate and the share of users below 50% (exactly 50%, e.g. an
    adapter that changes nothing, is not below); with fidelity, the mean and the worst of drift and noise ratio."""
    out = {"users": len(rows), "win_rate": statistics.fmean(m["win_rate"] for m in rows),
           "reward_gain": statistics.fmean(m["reward_gain"] for m in rows),
           "min_win_rate": min(m["win_rate"] for m in rows),
           "below_half": statistics.fmean(float(m["win_rate"] < 0.5) for m in rows)}
    if "drift_sd" in rows[0]:
        out["drift_sd"] = statistics.fmean(m["drift_sd"] for m in rows)
        out["max_drift_sd"] = max(m["drift_sd"] for m in rows)
        out["noise_ratio"] = statistics.fmean(m["noise_ratio"] for m in rows)
        out["max_noise_ratio"] = max(m["noise_ratio"] for m in rows)
    return out


def evaluate_users(binding: PPDBinding, cond: Conditions, users: dict[str, UserEmbedding], reward: Reward,
                   seen: set[str], samples: int = 16, seed: int = 1234, steps: int = 20,
                   fidelity: Fidelity | None = None, heldout: Collection[str] = ()) -> dict:
    """Per-user win rate (ties count 1/2, see :func:`win_rate`) and mean reward gain of PPD over the base model, plus
    group aggregates (:func:`group_summary`: mean, lowest user, share of users below 50%). Groups: ``seen`` (trained
    on), ``heldout`` (held out of training for model selection) and ``unseen`` (never used). With ``fidelity``, also
    how far the PPD samples move off the data compared with the base model's samples from the same noise
    (:func:`fidelity_change`: ``drift_sd`` and ``noise_ratio``)."""
    noise, caps = _seeds(cond, samples, seed)
    base = sample(binding, cond, caps, noise, None, steps=steps)
    fid_base = fidelity_means(fidelity, base, caps) if fidelity else {}
    per_user = {}
    for uid, emb in users.items():
        ppd = sample(binding, cond, caps, noise, emb.tokens[None], steps=steps)
        r_base, r_ppd = reward(uid, base, caps).float(), reward(uid, ppd, caps).float()
        group = "heldout" if uid in heldout else "seen" if uid in seen else "unseen"
        m = {"seen": group == "seen", "group": group, **_score(r_ppd, r_base), "reward_base": r_base.mean().item(),
             "reward_ppd": r_ppd.mean().item()}
        if fidelity is not None:
            m.update(fidelity_change(fidelity_means(fidelity, ppd, caps), fid_base))
        per_user[uid] = m
    out: dict = {"users": per_user}
    for group in ("seen", "heldout", "unseen"):
        rows = [m for m in per_user.values() if m["group"] == group]
        if rows:
            out[group] = group_summary(rows)
    return out


def user_scores(binding: PPDBinding, cond: Conditions, uid: str, embeddings: Sequence[UserEmbedding], reward: Reward,
                samples: int = 16, seed: int = 1234, steps: int = 20) -> list[dict]:
    """One user's ``win_rate`` and ``reward_gain`` with each of several embeddings (say, each made from another draw
    of its pairs), on the noise and captions :func:`evaluate_users` uses with the same ``samples`` and ``seed``."""
    noise, caps = _seeds(cond, samples, seed)
    r_base = reward(uid, sample(binding, cond, caps, noise, None, steps=steps), caps).float()
    return [_score(reward(uid, sample(binding, cond, caps, noise, e.tokens[None], steps=steps), caps).float(), r_base)
            for e in embeddings]


def _score(r_ppd: torch.Tensor, r_base: torch.Tensor) -> dict:
    """A user's win rate and mean reward gain of PPD's samples over the base model's from the same noise."""
    return {"win_rate": win_rate(r_ppd, r_base), "reward_gain": (r_ppd - r_base).mean().item()}


def interpolation_curve(binding: PPDBinding, cond: Conditions, a: UserEmbedding, b: UserEmbedding, reward: Reward,
                        ids: tuple[str, str], weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                        samples: int = 16, seed: int = 4321, steps: int = 20, method: str = "lerp") -> dict:
    """Mean reward of both users for samples made with ``interpolate(a, b, w)``; should move monotonically."""
    noise, caps = _seeds(cond, samples, seed)
    curve = []
    for w in weights:
        x = sample(binding, cond, caps, noise, interpolate(a, b, w, method).tokens[None], steps=steps)
        curve.append({"weight": w, ids[0]: reward(ids[0], x, caps).mean().item(),
                      ids[1]: reward(ids[1], x, caps).mean().item()})
    ra, rb = [c[ids[0]] for c in curve], [c[ids[1]] for c in curve]
    return {"users": list(ids), "method": method, "curve": curve, "monotone": is_monotone(ra, rb)}
