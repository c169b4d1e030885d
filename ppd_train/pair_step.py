"""One Diffusion-DPO forward on a batch of preference pairs, shared by ``fit`` (the adapter learns) and ``tune-user``
(one user's tokens learn, the adapter is frozen): the noised pair latents, the reference pass (the same model with
the adapter off), the user-conditioned pass and the loss of ``loss.py``.

What differs between base models is only how a batch of pairs becomes the model's inputs (its noise schedule and its
conditioning): :func:`pair_inputs` picks that once per model. Both predict the noise, so the loss is the same."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from .adapter import UserKV
from .binding import PPDBinding, model_info
from .dpo_data import DPOData
from .errors import PPDError
from .loss import DPOStats, dpo_loss
from .schedule import add_noise, sdxl_add_noise, sdxl_timesteps


def noised_pairs(data: DPOData, idx: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip_img: torch.Tensor,
                 device: torch.device | str) -> dict:
    """Stage C inputs for pairs ``idx`` of ``data``: preferred rows first, then dispreferred, both noised with the same
    ``eps`` at the same ``t``, each with its own caption."""
    xw, xl = data.latents_w[idx], data.latents_l[idx]
    cap = data.caption_idx[idx]
    return dict(sample=torch.cat([add_noise(xw, eps, t), add_noise(xl, eps, t)]).to(device),
                timestep_ratio=torch.cat([t, t]).to(device),
                clip_text_pooled=data.pooled[cap].repeat(2, 1, 1).to(device),
                clip_text=data.text[cap].repeat(2, 1, 1).to(device),
                clip_img=clip_img.expand(2 * len(idx), -1, -1).to(device))


def sdxl_noised_pairs(data: DPOData, idx: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                      device: torch.device | str) -> dict:
    """SDXL inputs for pairs ``idx``, as :func:`noised_pairs` (and the Diffusion-DPO SDXL recipe): both images of a
    pair at the same discrete timestep with the same noise, its caption's text and pooled text, and its size/crop
    numbers."""
    if data.time_ids is None:
        raise PPDError("This DPO data has no SDXL size/crop numbers (time_ids): it was not prepared for SDXL.")
    xw, xl = data.latents_w[idx], data.latents_l[idx]
    cap = data.caption_idx[idx]
    return dict(sample=torch.cat([sdxl_add_noise(xw, eps, t), sdxl_add_noise(xl, eps, t)]).to(device),
                timestep=sdxl_timesteps(torch.cat([t, t])).to(device),
                encoder_hidden_states=data.text[cap].repeat(2, 1, 1).to(device),
                added_cond_kwargs=dict(text_embeds=data.pooled[cap, 0].repeat(2, 1).to(device),
                                       time_ids=data.time_ids[idx].repeat(2, 1).to(device)))


PairInputs = Callable[[DPOData, torch.Tensor, torch.Tensor, torch.Tensor, "torch.device | str"], dict]


def pair_inputs(unet: torch.nn.Module) -> PairInputs:
    """``(data, idx, t, eps, device) -> the model's inputs`` for this model's base: the one per-base choice of
    training."""
    if model_info(unet).base == "sdxl":
        return sdxl_noised_pairs
    from .stage_c import clip_image_dim

    clip_img = torch.zeros(1, 1, clip_image_dim(unet))  # type: ignore[arg-type]  # no image prompt: zeros

    def stage_c(data: DPOData, idx: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, device) -> dict:
        return noised_pairs(data, idx, t, eps, clip_img, device)

    return stage_c


def pair_loss(binding: PPDBinding, inputs: dict, eps: torch.Tensor, kv: Callable[[], UserKV], beta: float,
              weights: float | torch.Tensor,
              autocast: Callable[[], AbstractContextManager] = nullcontext,
              backward: Callable[[torch.Tensor], None] | None = None) -> DPOStats:
    """The DPO loss of one batch from :func:`noised_pairs`. ``kv()`` makes the user keys/values (inside autocast, after
    the reference pass); ``weights`` is the adapter weight, a number or one per row (0 = that pair runs with the
    adapter off). ``backward`` (when given) runs inside the user block, where checkpointed Stage C blocks recompute
    with the user still attached; on a non-finite loss it gets a zero-gradient loss instead."""
    unet, b = binding.unet, eps.shape[0]
    with autocast():
        with torch.no_grad(), binding.adapter_off():  # the reference: same network, adapter off
            ref = unet(**inputs).sample
        user_kv = kv()
        with binding.user(user_kv, weights):
            pred = unet(**inputs).sample
            stats = dpo_loss(pred[:b], pred[b:], ref[:b], ref[b:], eps.to(pred.device), beta)
            if backward is not None:
                loss = stats.loss
                if not (torch.isfinite(loss) and loss.requires_grad):
                    # a non-finite loss (the step will be skipped) or every pair dropped (the constant ln 2: the
                    # adapter is not in its graph): this batch's gradient is 0, and backward still runs, as every
                    # process must under DDP (gradients are all-reduced in backward; a process that skips hangs all)
                    loss = 0.0 * torch.stack([t.sum() for t in (*user_kv.keys, *user_kv.values)]).sum()
                backward(loss)
    return stats
