"""Binding of the PPD adapter to ComfyUI's own SDXL UNet: the only module that knows ComfyUI's SDXL internals.

SDXL's adapter layers are every cross-attention (``attn2``) of the UNet's transformer blocks in forward order (input
blocks, middle, output blocks; = down, mid, up in diffusers). ComfyUI's own patch mechanism reaches them: a clone of
the MODEL gets one ``attn2_replace`` patch per layer, keyed ``(block name, block index, transformer index)`` as
ComfyUI's ``BasicTransformerBlock`` looks it up (and as IP-Adapter packs register theirs). The patch itself
(:class:`ppd_train.user_attention.UserAttn2`) and everything else that needs no ComfyUI lives in
``ppd_train/user_attention.py``, where ``make test`` checks it.
"""

from __future__ import annotations

import comfy.model_base
import comfy.model_sampling
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..ppd_train.adapter import ModelInfo
from ..ppd_train.embedding import UserEmbedding
from ..ppd_train.errors import IncompatibleError
from ..ppd_train.user_attention import sampling_user, stacked_attn2
from .sockets import NamedAdapter

Key = tuple[str, int, int]  # ComfyUI's attn2_replace key: ("input" | "middle" | "output", block index, transformer)


def is_sdxl(model) -> bool:
    """Whether a ComfyUI MODEL is an SDXL UNet (SDXL 1.0 and its fine-tunes: Pony, Illustrious, ...)."""
    return isinstance(model.model, comfy.model_base.SDXL)


def check_noise_prediction(model) -> None:
    """Training and tuning use SDXL's noise-predicting (eps) objective: refuse a MODEL that predicts v or x0 (some
    fine-tunes do, or a ModelSamplingDiscrete node made it so) rather than tune it on the wrong target."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.EPS) or isinstance(
            sampling, (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.X0)):
        # ComfyUI mixes a prediction class (EPS, V_PREDICTION, CONST, ...) into a torch module: name the former
        mixed = [c for c in type(sampling).__mro__ if c is not object and not issubclass(c, torch.nn.Module)]
        kind = mixed[0].__name__ if mixed else type(sampling).__name__
        raise IncompatibleError(f"Tune User Embedding tunes noise-predicting (eps) SDXL models, but this MODEL "
                                f"samples as {kind}. Connect the SDXL model without the sampling change (or an eps "
                                "checkpoint).")


def attn2_layers(diffusion_model) -> list[tuple[Key, object]]:
    """``(attn2_replace key, attn2 module)`` of every cross-attention in forward order."""
    groups = [("input", list(enumerate(diffusion_model.input_blocks))),
              ("middle", [(0, diffusion_model.middle_block)] if diffusion_model.middle_block is not None else []),
              ("output", list(enumerate(diffusion_model.output_blocks)))]
    layers: list[tuple[Key, object]] = []
    for name, blocks in groups:
        for number, block in blocks:
            transformers = [m for m in block if isinstance(m, SpatialTransformer)]
            if len(transformers) > 1:  # ComfyUI's keys could not tell them apart
                raise IncompatibleError(f"This UNet's {name} block {number} holds {len(transformers)} transformers; "
                                        "PPD supports SDXL's layout (one per block).")
            for transformer in transformers:
                layers += [((name, number, i), t.attn2) for i, t in enumerate(transformer.transformer_blocks)
                           if t.attn2 is not None]
    return layers


def sdxl_of(model) -> tuple[list[Key], ModelInfo]:
    """The ``attn2_replace`` keys and adapter-facing description of a ComfyUI SDXL MODEL, or a clear refusal."""
    if not is_sdxl(model):
        raise IncompatibleError(f"Expected an SDXL model, got {type(model.model).__name__}. Connect the MODEL of an "
                                "SDXL checkpoint (stock Load Checkpoint).")
    layers = attn2_layers(model.get_model_object("diffusion_model"))
    if not layers:
        raise IncompatibleError("This SDXL model has no cross-attention layers for PPD to attach to.")
    return [key for key, _ in layers], ModelInfo(tuple(int(a.to_q.weight.shape[0]) for _, a in layers),
                                                 tuple(int(a.heads) for _, a in layers), base="sdxl")


def apply_adapter(model, adapter: NamedAdapter, embedding: UserEmbedding, weight: float, start_percent: float,
                  end_percent: float):
    """A clone of ``model`` whose SDXL UNet sees ``embedding`` through ``adapter``; ``model`` itself is not changed.

    Weight 0 returns a plain clone (bit-identical to the base model). Applying again adds a second user on top; a patch
    another pack registered on the same layer keeps running, with the users added to its result.
    """
    keys, info = sdxl_of(model)
    sampling = model.get_model_object("model_sampling")
    user = sampling_user(adapter.adapter, adapter.name, info, embedding, weight, start_percent, end_percent,
                         sampling.percent_to_sigma)
    patched = model.clone()
    if user is None:
        return patched
    replace = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for i, key in enumerate(keys):
        # ComfyUI falls back to a (name, index) key when no (name, index, transformer) one exists: keep that patch
        current = replace.get(key, replace.get(key[:2]))
        patched.set_model_attn2_replace(stacked_attn2(current, i, user, optimized_attention), *key)
    return patched
