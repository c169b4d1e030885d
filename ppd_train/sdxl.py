"""SDXL as a PPD base: where the adapter attaches, its config and its loader.

The adapter attaches to every cross-attention (``attn2``) of the UNet's transformer blocks, in forward order (down
blocks, mid block, up blocks; within a block, attention by attention and transformer block by transformer block), the
same layers IP-Adapter attaches to. SDXL 1.0 has 70 of them (:data:`~ppd_train.adapter.KNOWN_SDXL`). The binding is
the one of ``binding.py``; the user term goes where IP-Adapter's image term goes (before ``to_out``).

Only local files are read: a diffusers folder (a pipeline folder with ``unet/``, or the ``unet`` folder itself), or a
single-file ``.safetensors`` checkpoint as artists download them (:mod:`ppd_train.sdxl_file`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from .adapter import ModelInfo, count_adapter_parameters
from .errors import FileFormatError, IncompatibleError
from .safetensors_io import diffusers_folder, shape_mismatch

LDM_UNET_PREFIX = "model.diffusion_model."


def sdxl_shape(widths: tuple[int, ...], heads: tuple[int, ...], transformer_layers: tuple[int, ...],
               layers_per_block: int, text_widths: tuple[int, int], pooled_dim: int, time_dim: int,
               groups: int, sample_size: int) -> dict:
    """diffusers config with SDXL's structure: levels of ``widths``; a level with 0 transformer layers has no
    attention (SDXL's first), the others cross-attend to both text encoders' states concatenated (``text_widths``);
    the pooled text (width ``pooled_dim``) and the six size/crop numbers (``time_dim`` each) enter through
    ``addition_embed_type = "text_time"``. diffusers reads ``attention_head_dim`` as the head count (SDXL's own
    config does the same)."""
    down = tuple("CrossAttnDownBlock2D" if n else "DownBlock2D" for n in transformer_layers)
    up = tuple("CrossAttnUpBlock2D" if n else "UpBlock2D" for n in transformer_layers[::-1])
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=widths, layers_per_block=layers_per_block,
                attention_head_dim=heads, transformer_layers_per_block=tuple(max(n, 1) for n in transformer_layers),
                cross_attention_dim=sum(text_widths), norm_num_groups=groups, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim, flip_sin_to_cos=True, freq_shift=0)


def sdxl_config() -> dict:
    """diffusers config of SDXL 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, ``unet/config.json``); the
    SDXL fine-tunes artists use share it."""
    return sdxl_shape((320, 640, 1280), (5, 10, 20), (0, 2, 10), 2, (768, 1280), 1280, 256, 32, 128)


def sdxl_attention_layers(unet: UNet2DConditionModel) -> list[tuple[str, Attention]]:
    """Every transformer block's cross-attention ``attn2`` in forward order (down, mid, up), with its module name.

    Not ``named_modules()`` order: diffusers registers ``up_blocks`` before ``mid_block``."""
    mid = [unet.mid_block] if unet.mid_block is not None else []
    groups: list[tuple[str, Iterable[torch.nn.Module]]] = [("down_blocks", unet.down_blocks), ("mid_block", mid),
                                                           ("up_blocks", unet.up_blocks)]
    found = []
    for group_name, group in groups:
        for i, block in enumerate(group):
            prefix = group_name if group_name == "mid_block" else f"{group_name}.{i}"
            for j, transformer in enumerate(getattr(block, "attentions", [])):
                for k, tb in enumerate(getattr(transformer, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        found.append((f"{prefix}.attentions.{j}.transformer_blocks.{k}.attn2", tb.attn2))
    return found


def sdxl_info(unet: UNet2DConditionModel) -> ModelInfo:
    layers = [a for _, a in sdxl_attention_layers(unet)]
    if not layers or unet.config.get("addition_embed_type") != "text_time":
        raise IncompatibleError("This UNet2DConditionModel has no cross-attention layers or no SDXL size/pooled-text "
                                "conditioning (addition_embed_type 'text_time'): it is not an SDXL model.")
    return ModelInfo(tuple(a.to_q.in_features for a in layers), tuple(a.heads for a in layers), base="sdxl")


def unet_from_ldm(weights: dict[str, torch.Tensor], config: dict, problem: str, fix: str,
                  convert: Callable[[torch.Tensor], torch.Tensor]) -> UNet2DConditionModel:
    """A diffusers SDXL UNet of ``config`` holding ``weights`` in the single-file (LDM) layout, keys prefixed
    ``model.diffusion_model.`` (as ComfyUI's own UNet names them, prefix aside), each weight passed through
    ``convert`` (a dtype, a device, a copy) and assigned as is. Shapes are checked before anything is allocated; a
    mismatch raises ``IncompatibleError("<problem> (<what differs>). <fix>")``."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes only: nothing is allocated before the weights are known to fit
        unet = UNet2DConditionModel(**config)
    try:
        converted = convert_ldm_unet_checkpoint(weights, config)
    except KeyError as e:  # diffusers' conversion looks weights up by name
        raise IncompatibleError(f"{problem} (missing {e.args[0]!r}). {fix}") from None
    problems = shape_mismatch(unet.state_dict(), converted)
    if problems:
        raise IncompatibleError(f"{problem} ({problems}). {fix}")
    unet.load_state_dict({k: convert(v) for k, v in converted.items()}, assign=True)
    return unet


def load_sdxl(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              config: str | os.PathLike | None = None) -> UNet2DConditionModel:
    """Load SDXL's UNet from local files only: a diffusers folder (pipeline folder with ``unet/``, or the ``unet``
    folder), or a single-file ``.safetensors`` checkpoint (SDXL 1.0's config unless ``config``, a diffusers SDXL
    folder or the UNet's ``config.json``, says otherwise; see :mod:`ppd_train.sdxl_file`)."""
    path = Path(path)
    if path.is_dir():
        folder = diffusers_folder(path, "unet", "SDXL")
        unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                    torch_dtype=dtype)
    else:
        from .sdxl_file import load_sdxl_unet_file

        unet = load_sdxl_unet_file(path, dtype, config)
    if not isinstance(unet, UNet2DConditionModel):
        raise FileFormatError(f"{path} is not an SDXL UNet.")
    sdxl_info(unet)  # refuse an SD 1.x/2.x UNet now, with a clear message
    return unet.eval().requires_grad_(False)


def sdxl_adapter_parameter_count(embed_dim: int = 3584, num_tokens: int = 29) -> dict[str, int]:
    """Trainable parameters of the default adapter for SDXL 1.0, counted on the meta device."""
    with torch.device("meta"):
        info = sdxl_info(UNet2DConditionModel(**sdxl_config()))
    return count_adapter_parameters(info, embed_dim, num_tokens)
