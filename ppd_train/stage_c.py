"""Stable Cascade Stage C as a PPD base: where the adapter attaches (every ``SDCascadeAttnBlock.attention``, in
forward order), its configs and its loader. The binding itself (:class:`PPDBinding`, the same for every base) lives in
``binding.py``; it is re-exported here, where the trainer has always imported it from.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock, StableCascadeUNet

from .adapter import KNOWN_STAGE_C, ModelInfo, count_adapter_parameters
from .binding import PPDAttnProcessor as PPDAttnProcessor  # re-exported: one binding for every base
from .binding import PPDBinding as PPDBinding
from .errors import FileFormatError, IncompatibleError
from .safetensors_io import diffusers_folder, read_safetensors


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


def stage_c_info(unet: StableCascadeUNet) -> ModelInfo:
    blocks = [b.attention for _, b in attention_blocks(unet)]
    if not blocks:
        raise IncompatibleError("This StableCascadeUNet has no attention blocks: it is not a Stage C model.")
    return ModelInfo(tuple(a.to_q.in_features for a in blocks), tuple(a.heads for a in blocks))


def load_stage_c(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 config: str | os.PathLike | None = None) -> StableCascadeUNet:
    """Load Stage C from local files only: a diffusers folder (or a pipeline folder with ``prior/``), or a single
    ``.safetensors`` file as Stability ships it (lite/full detected from the weights, not the file name; other sizes
    need ``config``, a diffusers ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        folder = diffusers_folder(path, "prior", "Stage C")
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
    with torch.device("meta"):
        info = stage_c_info(StableCascadeUNet(**stage_c_config(kind)))
    return count_adapter_parameters(info, embed_dim, num_tokens)
