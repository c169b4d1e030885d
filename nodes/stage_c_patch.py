"""Binding of the PPD adapter to ComfyUI's own Stage C: the only module that knows ComfyUI's Stage C internals.

ComfyUI's attention patches (``attn2_replace`` and friends) never reach Stage C, so every attention block's
``attention.attn`` (an ``OptimizedAttention``) is swapped, on a *clone* of the model, through ``add_object_patch``
for a :class:`ppd_train.user_attention.UserAttention` running ComfyUI's ``optimized_attention``. Everything that does
not need ComfyUI (which rows get which weight, the window, stacking users, the module's math) lives in
``ppd_train/user_attention.py``, where ``make test`` checks it; this file keeps only what must import ``comfy``.
"""

from __future__ import annotations

import torch
from comfy.ldm.cascade.common import AttnBlock
from comfy.ldm.cascade.stage_c import StageC
from comfy.ldm.modules.attention import optimized_attention

from ..ppd_train.adapter import ModelInfo
from ..ppd_train.embedding import UserEmbedding
from ..ppd_train.errors import IncompatibleError
from ..ppd_train.user_attention import UserAttention, sampling_user, stacked
from .sockets import NamedAdapter


def attention_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """Module paths of the attention blocks' ``attn`` in forward order (down 0, down 1, up 0, up 1)."""
    paths = []
    for group in ("down_blocks", "up_blocks"):
        for i, level in enumerate(getattr(diffusion_model, group)):
            for j, block in enumerate(level):
                if isinstance(block, AttnBlock):
                    paths.append(f"diffusion_model.{group}.{i}.{j}.attention.attn")
    return paths


def stage_c_of(model) -> tuple[list[str], ModelInfo]:
    """Attention paths and adapter-facing description of a ComfyUI Stage C MODEL, or a clear refusal."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, StageC):
        raise IncompatibleError(
            f"PPD needs a Stable Cascade Stage C model, got {type(diffusion_model).__name__}. Connect the MODEL of "
            "the Stage C checkpoint (stable_cascade_stage_c / lite), not Stage B or another model.")
    paths = attention_paths(diffusion_model)
    attns = [model.get_model_object(p) for p in paths]
    base = [a.base if isinstance(a, UserAttention) else a for a in attns]
    return paths, ModelInfo(tuple(int(a.to_q.weight.shape[1]) for a in base), tuple(int(a.heads) for a in base))


def apply_adapter(model, adapter: NamedAdapter, embedding: UserEmbedding, weight: float, start_percent: float,
                  end_percent: float):
    """A clone of ``model`` whose Stage C sees ``embedding`` through ``adapter``; ``model`` itself is not changed.

    Weight 0 returns a plain clone (bit-identical to the base model). Applying again adds a second user on top.
    """
    paths, info = stage_c_of(model)
    sampling = model.get_model_object("model_sampling")
    user = sampling_user(adapter.adapter, adapter.name, info, embedding, weight, start_percent, end_percent,
                         sampling.percent_to_sigma)
    patched = model.clone()
    if user is None:
        return patched
    for i, path in enumerate(paths):
        patched.add_object_patch(path, stacked(patched.get_model_object(path), i, user, optimized_attention))
    return patched
