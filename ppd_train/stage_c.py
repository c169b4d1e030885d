"""Binding of the PPD adapter to diffusers' ``StableCascadeUNet`` (training, evaluation, the synthetic world).

No diffusers model code is forked: each ``SDCascadeAttnBlock.attention`` gets a :class:`PPDAttnProcessor` that hands the
call to the block's original processor whenever no user is active (so "adapter off" *is* the base model, bit for bit)
and otherwise adds the user attention before ``to_out``. ``StableCascadeUNet`` has no ``set_attn_processor`` and its
blocks pass no extra arguments, so the user's keys/values reach the processors through state the binding holds for
the duration of a ``with binding.user(kv, weight):`` block.

With gradient checkpointing, blocks are recomputed during backward: call ``backward()`` inside the same ``with`` block
and run the adapter-off reference pass before the policy pass.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock, StableCascadeUNet

from .adapter import KNOWN_STAGE_C, PPDAdapter, StageCInfo, UserKV, apply_user_attention, check_stage_c
from .errors import FileFormatError, IncompatibleError
from .safetensors_io import read_safetensors, require_safetensors


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns on every ``.to(dtype)`` of any model that "modules should be kept in float32: []" (it
    tests ``self._keep_in_fp32_modules or []`` against None, always true); for an empty list the cast is exactly
    right, so only that message is dropped. A model that really keeps modules in float32 still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "that should be kept in float32: []." not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())


def stage_c_shape(width: int, heads: int, layers: tuple[int, int], clip_text: int, clip_image: int,
                  dropout: float) -> dict:
    """diffusers config with Stage C's structure: two levels without spatial down-sampling, each layer
    (ResBlock, TimestepBlock, AttnBlock); ``layers`` = (level 0, level 1) going down, mirrored going up."""
    blocks = (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2
    return dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
                conditioning_dim=width, block_out_channels=(width, width), num_attention_heads=(heads, heads),
                down_num_layers_per_block=layers, up_num_layers_per_block=layers[::-1],
                down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1), block_types_per_layer=blocks,
                clip_text_in_channels=clip_text, clip_text_pooled_in_channels=clip_text,
                clip_image_in_channels=clip_image, clip_seq=4, kernel_size=3, dropout=(dropout, dropout),
                self_attn=True, timestep_conditioning_type=("sca", "crp"), switch_level=(False,))


def stage_c_config(kind: str) -> dict:
    """diffusers config of the released Stage C checkpoints ("lite" 1.0B, "full" 3.6B)."""
    if kind not in KNOWN_STAGE_C:
        raise IncompatibleError(f"Unknown Stage C kind {kind!r}; expected one of {sorted(KNOWN_STAGE_C)}.")
    width, heads, _ = KNOWN_STAGE_C[kind]
    return stage_c_shape(width, heads, (4, 12) if kind == "lite" else (8, 24), 1280, 768, 0.1)


def clip_image_dim(unet: StableCascadeUNet) -> int:
    """Width of the CLIP image input (fed zeros when no image prompt is used)."""
    return int(unet.config["clip_image_in_channels"] or unet.config["clip_text_in_channels"])


def attention_blocks(unet: StableCascadeUNet) -> list[tuple[str, SDCascadeAttnBlock]]:
    """Attention blocks in forward order (down 0, down 1, up 0, up 1): the block index is the adapter's key."""
    found = []
    for group_name in ("down_blocks", "up_blocks"):
        for i, group in enumerate(getattr(unet, group_name)):
            for j, block in enumerate(group):
                if isinstance(block, SDCascadeAttnBlock):
                    found.append((f"{group_name}.{i}.{j}", block))
    return found


def stage_c_info(unet: StableCascadeUNet) -> StageCInfo:
    blocks = [b.attention for _, b in attention_blocks(unet)]
    if not blocks:
        raise IncompatibleError("This StableCascadeUNet has no attention blocks: it is not a Stage C model.")
    return StageCInfo(tuple(a.to_q.in_features for a in blocks), tuple(a.heads for a in blocks))


@dataclass
class _UserState:
    kv: UserKV | None = None
    weight: float | torch.Tensor = 1.0


class PPDAttnProcessor:
    """Processor for one Stage C attention block; not an ``nn.Module``, so it never ends up in the UNet's weights."""

    def __init__(self, original, state: _UserState, index: int) -> None:
        self.original = original
        self.state = state
        self.index = index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        kv = self.state.kv
        if kv is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if (attention_mask is not None or encoder_hidden_states is None or hidden_states.dim() != 4
                or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross
                or attn.norm_q is not None or attn.norm_k is not None):
            raise IncompatibleError("PPD user attention supports Stable Cascade Stage C attention blocks only.")
        # Same operations, in the same order, as diffusers' AttnProcessor2_0 for this block type; the user term is
        # added to the attention output before to_out.
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        query, key, value = attn.to_q(x), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
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
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class PPDBinding:
    """An adapter attached to one diffusers Stage C. Without an active user the UNet is exactly the base model."""

    def __init__(self, unet: StableCascadeUNet, adapter: PPDAdapter) -> None:
        check_stage_c(adapter.config, stage_c_info(unet))
        self.unet = unet
        self.adapter = adapter
        self._state = _UserState()
        self._originals: list[tuple[Attention, Any]] = []
        for i, (_, block) in enumerate(attention_blocks(unet)):
            attn = block.attention
            if isinstance(attn.processor, PPDAttnProcessor):
                raise IncompatibleError("This Stage C already has a PPD adapter attached; detach it first.")
            self._originals.append((attn, attn.processor))
            attn.set_processor(PPDAttnProcessor(attn.processor, self._state, i))

    def detach(self) -> None:
        for attn, original in self._originals:
            attn.set_processor(original)
        self._originals.clear()

    @contextmanager
    def user(self, kv: UserKV | None, weight: float | torch.Tensor = 1.0) -> Iterator[None]:
        """Within the block, Stage C forwards see this user (``kv`` from ``adapter(tokens)``) at ``weight``.

        ``weight`` may be a ``[B]`` tensor (per-sample weights; 0 = that sample gets no user). ``kv=None`` or weight 0
        leaves the base model untouched.
        """
        if kv is not None and len(kv) != len(self._originals):
            raise IncompatibleError(f"UserKV has {len(kv)} blocks, this Stage C has {len(self._originals)}.")
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


def load_stage_c(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 config: str | os.PathLike | None = None) -> StableCascadeUNet:
    """Load Stage C from local files only: a diffusers folder (or a pipeline folder with ``prior/``), or a single
    ``.safetensors`` file as Stability ships it (lite/full detected from the weights, not the file name; other sizes
    need ``config``, a diffusers ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "prior" if (path / "prior" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileFormatError(f"{path} has no config.json (nor prior/config.json): not a diffusers Stage C folder.")
        require_safetensors(folder, "Stage C")
        unet = StableCascadeUNet.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                 torch_dtype=dtype)
    else:
        from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

        weights, _ = read_safetensors(path, "Stage C")
        mapper = weights.get("clip_txt_mapper.weight")
        if mapper is None:
            raise FileFormatError(f"{path} has no 'clip_txt_mapper.weight': it is not a Stable Cascade Stage C file.")
        if config is not None:
            cfg = json.loads(Path(config).read_text())
        else:
            kind = {KNOWN_STAGE_C[k][0]: k for k in KNOWN_STAGE_C}.get(int(mapper.shape[0]))
            if kind is None:
                raise IncompatibleError(f"{path}: Stage C of width {mapper.shape[0]} is neither lite (1536) nor full "
                                        "(2048); pass the matching diffusers config.json as `config`.")
            cfg = stage_c_config(kind)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        unet = StableCascadeUNet(**cfg)
        missing, unexpected = unet.load_state_dict(convert_stable_cascade_unet_single_file_to_diffusers(weights),
                                                   strict=False)
        if missing or unexpected:
            raise IncompatibleError(f"{path} does not match the Stage C config (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}).")
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def adapter_parameter_count(kind: str, embed_dim: int = 3584, num_tokens: int = 29) -> dict[str, int]:
    """Trainable parameters of the default adapter for a released Stage C, counted on the meta device."""
    from .adapter import AdapterConfig

    with torch.device("meta"):
        info = stage_c_info(StableCascadeUNet(**stage_c_config(kind)))
        adapter = PPDAdapter(AdapterConfig.for_stage_c(info, embed_dim=embed_dim, num_tokens=num_tokens))
    blocks = sum(p.numel() for p in adapter.blocks.parameters())
    total = sum(p.numel() for p in adapter.parameters())
    return {"blocks": blocks, "projector": total - blocks, "total": total, "block_count": len(info.block_widths)}
