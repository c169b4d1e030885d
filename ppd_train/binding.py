"""Binding of the PPD adapter to a diffusers model, the same for every base (Stage C, SDXL).

A base only says where the adapter attaches (:func:`attention_layers`: its attention modules in forward order and the
:class:`ModelInfo` they make); the rest is here. No diffusers model code is forked: each of those ``Attention`` modules
gets a :class:`PPDAttnProcessor` that hands the call to the module's original processor whenever no user is active (so
"adapter off" *is* the base model, bit for bit) and otherwise adds the user attention before ``to_out``, where
IP-Adapter adds its image term. The user's keys/values reach the processors through state the binding holds for the
duration of a ``with binding.user(kv, weight):`` block (Stage C's blocks pass no extra arguments to processors).

With gradient checkpointing, blocks are recomputed during backward: call ``backward()`` inside the same ``with`` block
and run the adapter-off reference pass before the policy pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .adapter import BASES, ModelInfo, PPDAdapter, UserKV, apply_user_attention, check_base
from .errors import IncompatibleError


def attention_layers(unet: torch.nn.Module) -> tuple[list[Attention], ModelInfo]:
    """The attention modules the adapter attaches to, in forward order, and the model they make, by base."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    if isinstance(unet, StableCascadeUNet):
        from .stage_c import attention_blocks, stage_c_info

        return [b.attention for _, b in attention_blocks(unet)], stage_c_info(unet)
    if isinstance(unet, UNet2DConditionModel):
        from .sdxl import sdxl_attention_layers, sdxl_info

        return [a for _, a in sdxl_attention_layers(unet)], sdxl_info(unet)
    raise IncompatibleError(f"PPD adapters attach to Stable Cascade Stage C or SDXL, not to a {type(unet).__name__}.")


def model_info(unet: torch.nn.Module) -> ModelInfo:
    return attention_layers(unet)[1]


def half_autocast(unet: torch.nn.Module) -> AbstractContextManager:
    """Autocast to the model's dtype when its weights are bf16/fp16 (a no-op in float32): the project's inputs
    (timesteps, cached text latents, the zero image prompt, the adapter's K_u/V_u) stay float32 and meet the half
    weights under it, as in `fit`'s mixed precision."""
    p = next(unet.parameters())
    return torch.autocast(p.device.type, dtype=p.dtype) if p.dtype in (torch.bfloat16, torch.float16) else nullcontext()


def set_gradient_checkpointing(unet: Any, on: bool) -> bool:
    """diffusers' gradient checkpointing of the base's blocks on or off (-> the previous setting): the blocks keep no
    activations for backward and recompute them there, trading ~30% more compute for activation memory of about one
    block. Active only where grad is enabled; needs ``backward()`` inside the user block (see the module docstring)."""
    previous = bool(unet.is_gradient_checkpointing)
    if on:
        unet.enable_gradient_checkpointing()
    elif previous:
        unet.disable_gradient_checkpointing()
    return previous


@dataclass
class _UserState:
    kv: UserKV | None = None
    weight: float | torch.Tensor = 1.0


class PPDAttnProcessor:
    """Processor for one attention layer; not an ``nn.Module``, so it never ends up in the UNet's weights."""

    def __init__(self, original, state: _UserState, index: int) -> None:
        self.original = original
        self.state = state
        self.index = index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        kv = self.state.kv
        if kv is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if (attention_mask is not None or encoder_hidden_states is None or hidden_states.dim() not in (3, 4)
                or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross
                or attn.norm_q is not None or attn.norm_k is not None):
            raise IncompatibleError("PPD user attention supports Stable Cascade Stage C attention blocks and SDXL "
                                    "cross-attention layers only (no attention masks or extra norms).")
        # Same operations, in the same order, as diffusers' AttnProcessor2_0 for these layers (Stage C: image-shaped
        # [B, C, H, W]; SDXL attn2: tokens [B, N, C]); the user term is added to the attention output before to_out.
        residual = hidden_states
        image_shaped = hidden_states.dim() == 4
        if image_shaped:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, split(k), split(v), dropout_p=0.0, is_causal=False)

        q = split(query)
        out = F.scaled_dot_product_attention(q, split(key), split(value), attn_mask=None, dropout_p=0.0,
                                             is_causal=False)
        out = apply_user_attention(out, q, kv.keys[self.index], kv.values[self.index], self.state.weight, attend)
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shaped:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PPDBinding:
    """An adapter attached to one diffusers UNet (Stage C or SDXL). Without an active user it is exactly the base."""

    def __init__(self, unet: torch.nn.Module, adapter: PPDAdapter) -> None:
        layers, info = attention_layers(unet)
        self.base, self.base_name = info.base, BASES[info.base]
        check_base(adapter.config, info, model_name=f"the {self.base_name} model")
        self.unet = unet
        self.adapter = adapter
        self._state = _UserState()
        self._originals: list[tuple[Attention, Any]] = []
        if any(isinstance(attn.processor, PPDAttnProcessor) for attn in layers):
            raise IncompatibleError(f"This {self.base_name} already has a PPD adapter attached; detach it first.")
        for i, attn in enumerate(layers):
            self._originals.append((attn, attn.processor))
            attn.set_processor(cast(Any, PPDAttnProcessor(attn.processor, self._state, i)))

    def detach(self) -> None:
        for attn, original in self._originals:
            attn.set_processor(original)
        self._originals.clear()

    @contextmanager
    def user(self, kv: UserKV | None, weight: float | torch.Tensor = 1.0) -> Iterator[None]:
        """Within the block, forwards of the UNet see this user (``kv`` from ``adapter(tokens)``) at ``weight``.

        ``weight`` may be a ``[B]`` tensor (per-sample weights; 0 = that sample gets no user). ``kv=None`` or weight 0
        leaves the base model untouched.
        """
        if kv is not None and len(kv) != len(self._originals):
            raise IncompatibleError(f"UserKV has {len(kv)} blocks, this {self.base_name} has {len(self._originals)}.")
        previous = (self._state.kv, self._state.weight)
        off = kv is None or (not torch.is_tensor(weight) and float(weight) == 0.0)
        self._state.kv, self._state.weight = (None, 1.0) if off else (kv, weight)
        try:
            yield
        finally:
            self._state.kv, self._state.weight = previous

    @contextmanager
    def adapter_off(self) -> Iterator[None]:
        """The reference model of Diffusion-DPO: the same network with the user attention switched off."""
        with self.user(None):
            yield
