"""SDXL from one ``.safetensors`` checkpoint, as artists download it and ComfyUI's *Load Checkpoint* reads it.

The original (SD/SDXL "LDM") layout holds four models under four prefixes (:data:`PARTS`): the UNet, the VAE, CLIP-L
and OpenCLIP bigG. Only the parts a command needs are read. diffusers' own conversion functions turn each part into
diffusers' layout; the models are built from configs with no download: SDXL 1.0's (in code below, equal to
``stabilityai/stable-diffusion-xl-base-1.0``'s ``*/config.json``; the fine-tunes artists use share them) unless
``config`` names a diffusers SDXL folder (its ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``
``config.json`` are read, never its weights) or the UNet's own ``config.json``. Every part must fit its config exactly
(no missing, extra or reshaped weight), or the file is refused.

The file holds no tokenizer. Text encoding takes SDXL's two CLIP tokenizers (the same vocabulary; the first pads with
``<|endoftext|>``, the second with ``!``) from :func:`sdxl_tokenizers`: a folder given, a diffusers folder's
``tokenizer/`` and ``tokenizer_2/``, or ComfyUI's own ``comfy/sd1_tokenizer`` when the pack sits in ComfyUI.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import FileFormatError, IncompatibleError, PPDError
from .safetensors_io import read_safetensors, shape_mismatch

PARTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
         "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
         "text_encoder_2": "OpenCLIP bigG text encoder"}
ENCODERS = ("vae", "text_encoder", "text_encoder_2")
# Weights other checkpoints have and SDXL's never has, to say what a refused file looks like.
LOOKALIKES = (
    ("clip_txt_mapper.weight", "a Stable Cascade Stage C checkpoint (give it as stage_c / --stage-c)"),
    ("down_blocks.1.0.channelwise.0.weight", "a Stable Cascade Stage B checkpoint"),
    ("cond_stage_model.transformer.", "an SD 1.x checkpoint (Stable Diffusion 1.4/1.5 or a fine-tune of it)"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint"),
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint (PPD trains on the SDXL base and its fine-tunes)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("add_embedding.linear_1.weight", "a diffusers UNet weight file (diffusion_pytorch_model.safetensors): give its "
                                      "diffusers folder instead"),
)
TOKENIZER_PADS = ("<|endoftext|>", "!")  # SDXL's tokenizer/ and tokenizer_2/ differ only in this


def sdxl_vae_config() -> dict:
    """diffusers config of SDXL 1.0's VAE (``vae/config.json``)."""
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)


def sdxl_text_encoder_config(part: str) -> dict:
    """transformers config of SDXL 1.0's ``text_encoder`` (CLIP-L) or ``text_encoder_2`` (OpenCLIP bigG)."""
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1, attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
    if part == "text_encoder":
        return dict(common, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu")
    return dict(common, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                projection_dim=1280, hidden_act="gelu")


def part_config(part: str, config: str | os.PathLike | None) -> tuple[dict, str]:
    """The config of one part, and where it came from (for messages)."""
    from .sdxl import sdxl_config

    if config is not None and Path(config).is_dir():
        path = Path(config) / part / "config.json"
        if not path.is_file():
            raise FileFormatError(f"{config} has no {part}/config.json: give a diffusers SDXL folder as the SDXL "
                                  "config (its configs are read, not its weights), or leave it out for SDXL 1.0's.")
        return _read_json(path), f"the config {path}"
    if config is not None and part == "unet":
        return _read_json(Path(config)), f"the config {config}"
    defaults = {"unet": sdxl_config, "vae": sdxl_vae_config}
    cfg = defaults[part]() if part in defaults else sdxl_text_encoder_config(part)
    return cfg, f"SDXL 1.0's {NAMES[part]} config"


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileFormatError(f"Cannot read the config {path} ({e}); give a diffusers config.json.") from None
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{path} is not a config (a JSON object); give a diffusers config.json.")
    return cfg


def check_sdxl_names(path: str | os.PathLike, names: list[str], parts: Iterable[str]) -> None:
    """Refuse a file that is not a single-file SDXL checkpoint holding ``parts``, saying what it looks like."""
    for key, looks_like in LOOKALIKES:
        if any(n.startswith(key) for n in names):
            raise FileFormatError(f"{path} looks like {looks_like}, not an SDXL checkpoint.")
    unet = PARTS["unet"]
    if any(n.startswith(unet) for n in names) and not any(n.startswith(unet + "label_emb.") for n in names):
        raise FileFormatError(f"{path}: its UNet ({unet}*) has no size/pooled-text conditioning ({unet}label_emb.*), "
                              "which every SDXL has: it is another model (an SD 1.x/2.x UNet?), not SDXL.")
    missing = [p for p in parts if not any(n.startswith(PARTS[p]) for n in names)]
    if not missing:
        return
    if not any(n.startswith(tuple(PARTS.values())) for n in names):
        layout = ", ".join(p + "*" for p in PARTS.values())
        raise FileFormatError(f"{path} holds none of a single-file SDXL checkpoint's weights ({layout}; it has "
                              f"{', '.join(names[:3]) or 'no tensors'}...): it is not an SDXL checkpoint. For a "
                              "diffusers folder, give the folder.")
    absent = " and no ".join(f"{NAMES[p]} ({PARTS[p]}*)" for p in missing)
    raise FileFormatError(f"{path} has no {absent} weights. Give the full SDXL checkpoint (as ComfyUI's Load "
                          "Checkpoint reads it: UNet, VAE and both text encoders), or a diffusers SDXL folder.")


def read_sdxl_file(path: str | os.PathLike, parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weights of ``parts`` from a single-file SDXL checkpoint; nothing else is read from disk."""
    parts = tuple(parts)
    prefixes = tuple(PARTS[p] for p in parts)

    def select(names: list[str]) -> list[str]:
        check_sdxl_names(path, names, parts)
        return [n for n in names if n.startswith(prefixes)]

    weights, _ = read_safetensors(path, "Stable Diffusion XL checkpoint", advice="download it again",
                                  select=select)
    return weights


def load_part(path: str | os.PathLike, weights: dict[str, torch.Tensor], part: str,
              config: str | os.PathLike | None, dtype: torch.dtype) -> Any:
    """One part of a single-file checkpoint, converted by diffusers' own code into the model built from its config."""
    from accelerate import init_empty_weights

    cfg, where = part_config(part, config)
    own = {k: v for k, v in weights.items() if k.startswith(PARTS[part])}
    with init_empty_weights():  # parameters on the meta device, buffers real: nothing allocated before the check
        model = _build(part, cfg)
    try:
        state = _convert(part, own, cfg, model)
    except Exception as e:  # diffusers' converters index the weights they expect: a missing one is a KeyError
        raise IncompatibleError(f"{path}: its {NAMES[part]} weights do not convert for {where} ({type(e).__name__}: "
                                f"{e}). The file is incomplete or not an SDXL checkpoint: download it again, or give "
                                "the checkpoint's diffusers folder as the SDXL config (--sdxl-config, sdxl_config)."
                                ) from None
    problems = shape_mismatch(model.state_dict(), state)
    if problems:
        raise IncompatibleError(f"{path}: its {NAMES[part]} does not fit {where} ({problems}). Give the "
                                "checkpoint's diffusers folder (or, for the UNet, its config.json) as the SDXL config "
                                "(--sdxl-config, sdxl_config); a file missing weights is incomplete: download it "
                                "again.")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def _build(part: str, cfg: dict) -> Any:  # a diffusers or transformers model
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if part == "unet":
        return UNet2DConditionModel(**cfg)
    if part == "vae":
        return AutoencoderKL(**cfg)
    cls = CLIPTextModel if part == "text_encoder" else CLIPTextModelWithProjection
    return cls(CLIPTextConfig.from_dict(cfg))


def _convert(part: str, weights: dict[str, torch.Tensor], config: dict, model: Any) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    if part == "unet":
        return convert_ldm_unet_checkpoint(weights, config)
    if part == "vae":
        return convert_ldm_vae_checkpoint(weights, config)
    if part == "text_encoder":
        state = convert_ldm_clip_checkpoint(weights)
    else:
        state = convert_open_clip_checkpoint(model, weights, prefix=PARTS[part])
    # position_ids is a computed buffer, not a weight (some files carry it); transformers >= 5.6 dropped CLIPTextModel's
    # ``text_model.`` level, as diffusers' own loader does
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not hasattr(model, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def load_sdxl_unet_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        config: str | os.PathLike | None = None) -> Any:
    """SDXL's UNet from a single-file checkpoint (a UNet-only file in the same layout works too)."""
    return load_part(path, read_sdxl_file(path, ["unet"]), "unet", config, dtype)


def comfyui_tokenizer(here: str | os.PathLike = __file__) -> Path | None:
    """ComfyUI's own CLIP tokenizer folder (``comfy/sd1_tokenizer``, the one its SDXL text encoders use) when this
    pack is installed in ComfyUI (``ComfyUI/custom_nodes/<pack>/ppd_train``), else None."""
    for path in (Path(here).absolute(), Path(here).resolve()):  # custom_nodes/<pack> may be a link to the pack
        parents = path.parents
        if len(parents) > 3 and parents[2].name == "custom_nodes" and (parents[3] / "comfy" / "sd1_tokenizer").is_dir():
            return parents[3] / "comfy" / "sd1_tokenizer"
    return None


def sdxl_tokenizers(tokenizer: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                    here: str | os.PathLike = __file__) -> list:
    """SDXL's two tokenizers, from local files only: ``tokenizer`` (a diffusers SDXL folder, or one CLIP tokenizer
    folder: ComfyUI's ``comfy/sd1_tokenizer``, SDXL's ``tokenizer/``), else the ``config`` folder's, else ComfyUI's
    (when the pack sits in ComfyUI; said on stderr)."""
    from transformers import AutoTokenizer

    source = Path(tokenizer) if tokenizer else None
    if source is None and config is not None and _has_both(Path(config)):
        source = Path(config)
    if source is None:
        source = comfyui_tokenizer(here)
        if source is not None:
            print(f"SDXL tokenizers: ComfyUI's {source}", file=sys.stderr)
    if source is None:
        raise PPDError("A single-file SDXL checkpoint holds no tokenizer: give one with --sdxl-tokenizer: ComfyUI's "
                       "comfy/sd1_tokenizer folder, the tokenizer folder of stabilityai/stable-diffusion-xl-base-1.0, "
                       "or a diffusers SDXL folder (found by itself when this pack is installed in ComfyUI).")
    if not source.is_dir():
        raise FileFormatError(f"SDXL tokenizer folder not found: {source}. Give ComfyUI's comfy/sd1_tokenizer folder "
                              "or a diffusers SDXL folder.")

    def load(folder: Path, **kw):
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise FileFormatError(f"{folder} holds no tokenizer (no vocab.json or tokenizer.json): give ComfyUI's "
                                  "comfy/sd1_tokenizer folder or a diffusers SDXL folder.")
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)

    if _has_both(source):
        return [load(source / "tokenizer"), load(source / "tokenizer_2")]
    return [load(source, pad_token=pad) for pad in TOKENIZER_PADS]


def _has_both(folder: Path) -> bool:
    return (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir()
