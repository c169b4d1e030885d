"""Binding of the PPD adapter to ComfyUI's own Stage C: the only module that knows ComfyUI's Stage C internals.

ComfyUI's attention patches (``attn2_replace`` and friends) never reach Stage C, so every attention block's
``attention.attn`` (an ``OptimizedAttention``) is swapped, on a *clone* of the model, through ``add_object_patch``
for a module that reuses the block's own ``to_q/to_k/to_v/out_proj`` (same names, so LoRA patches and state-dict keys
keep working) and adds the user term with :func:`ppd_train.adapter.apply_user_attention` before ``out_proj``.

Per sampling call ComfyUI says which batch chunks are the unconditional pass (``cond_or_uncond``) and the current
sigma (``sigmas``): those rows, and steps outside the start/end window, get weight 0 and are left bit-identical to the
base model. ``K_u, V_u`` are computed once per device and dtype and reused for every step. The adapter's weights stay
on the CPU: only the small per-user keys/values go to the GPU.
"""

from __future__ import annotations

import copy

import torch
from comfy.ldm.cascade.common import AttnBlock
from comfy.ldm.cascade.stage_c import StageC
from comfy.ldm.modules.attention import optimized_attention

from ..ppd_train.adapter import StageCInfo, UserKV, apply_user_attention, check_embedding, check_stage_c
from ..ppd_train.embedding import UserEmbedding
from ..ppd_train.errors import IncompatibleError
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


def stage_c_of(model) -> tuple[list[str], StageCInfo]:
    """Attention paths and adapter-facing description of a ComfyUI Stage C MODEL, or a clear refusal."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, StageC):
        raise IncompatibleError(
            f"PPD needs a Stable Cascade Stage C model, got {type(diffusion_model).__name__}. Connect the MODEL of "
            "the Stage C checkpoint (stable_cascade_stage_c / lite), not Stage B or another model.")
    paths = attention_paths(diffusion_model)
    attns = [model.get_model_object(p) for p in paths]
    base = [a.base if isinstance(a, PPDStageCAttention) else a for a in attns]
    return paths, StageCInfo(tuple(int(a.to_q.weight.shape[1]) for a in base), tuple(int(a.heads) for a in base))


class PPDUser:
    """One adapter, one user, one weight and sigma window; caches ``K_u, V_u`` per device and dtype."""

    def __init__(self, adapter: NamedAdapter, embedding: UserEmbedding, weight: float, sigma_start: float,
                 sigma_end: float) -> None:
        self.adapter = adapter.adapter
        self.tokens = embedding.tokens
        self.weight = float(weight)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self._kv: dict[tuple[torch.device, torch.dtype], UserKV] = {}
        self._rows: tuple[object, tuple, torch.Tensor] | None = None  # last call: (sigmas, (batch, chunks), weights)

    def kv(self, device: torch.device, dtype: torch.dtype) -> UserKV:
        key = (device, dtype)
        if key not in self._kv:
            with torch.no_grad():  # fp32 on the sampling device, once; the CPU copy of the adapter stays untouched
                on_device = copy.deepcopy(self.adapter).to(device=device, dtype=torch.float32)
                self._kv[key] = on_device(self.tokens.to(device)).to(dtype=dtype)
                del on_device
        return self._kv[key]

    def row_weights(self, batch: int, transformer_options: dict) -> torch.Tensor:
        """The weight of each batch row: 0 for the unconditional chunks and outside the start/end window.

        Every attention block of one model call asks with the same ``sigmas`` tensor; the answer is kept for that
        tensor, so reading the sigma (a device sync on a GPU) happens once per call rather than once per block.
        """
        sigmas = transformer_options.get("sigmas")
        chunks = tuple(transformer_options.get("cond_or_uncond") or [0])
        last = self._rows
        if last is not None and last[0] is sigmas and last[1] == (batch, chunks):
            return last[2]
        if batch % len(chunks):
            raise IncompatibleError(f"Batch of {batch} does not split into {len(chunks)} cond/uncond chunks.")
        weights = torch.tensor([self.weight if c == 0 else 0.0 for c in chunks for _ in range(batch // len(chunks))])
        if sigmas is not None and torch.is_tensor(sigmas) and sigmas.numel():
            s = float(sigmas.max())
            if s > self.sigma_start or s < self.sigma_end:
                weights = torch.zeros(batch)
        self._rows = (sigmas, (batch, chunks), weights)
        return weights


class PPDStageCAttention(torch.nn.Module):
    """Drop-in for Stage C's ``OptimizedAttention``: identical when no user is active, plus the users' terms."""

    def __init__(self, base: torch.nn.Module, index: int, users: list[PPDUser]) -> None:
        super().__init__()
        self.heads = base.heads
        self.to_q, self.to_k, self.to_v, self.out_proj = base.to_q, base.to_k, base.to_v, base.out_proj
        self._base = (base,)  # a tuple, so the original is not registered twice as a child
        self.index = index
        self.users = users

    @property
    def base(self) -> torch.nn.Module:
        return self._base[0]

    def forward(self, q, k, v, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        q = self.to_q(q)
        k = self.to_k(k)
        v = self.to_v(v)
        out = optimized_attention(q, k, v, self.heads, transformer_options=transformer_options)

        def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return optimized_attention(q_, k_, v_, self.heads, transformer_options=transformer_options)

        for user in self.users:
            weights = user.row_weights(out.shape[0], transformer_options)
            kv = user.kv(q.device, q.dtype)
            out = apply_user_attention(out, q, kv.keys[self.index], kv.values[self.index], weights, attend)
        return self.out_proj(out)


def apply_adapter(model, adapter: NamedAdapter, embedding: UserEmbedding, weight: float, start_percent: float,
                  end_percent: float):
    """A clone of ``model`` whose Stage C sees ``embedding`` through ``adapter``; ``model`` itself is not changed.

    Weight 0 returns a plain clone (bit-identical to the base model). Applying again adds a second user on top.
    """
    paths, info = stage_c_of(model)
    check_stage_c(adapter.adapter.config, info, f"PPD adapter '{adapter.name}'", "the connected Stage C")
    check_embedding(adapter.adapter.config, tuple(embedding.tokens.shape), embedding.embedder,
                    f"PPD adapter '{adapter.name}'")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise IncompatibleError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in "
                                "0..1.")
    patched = model.clone()
    if float(weight) == 0.0 or start_percent == end_percent:
        return patched
    sampling = model.get_model_object("model_sampling")
    user = PPDUser(adapter, embedding, weight, sampling.percent_to_sigma(start_percent),
                   sampling.percent_to_sigma(end_percent))
    for i, path in enumerate(paths):
        current = patched.get_model_object(path)
        if isinstance(current, PPDStageCAttention):
            patched.add_object_patch(path, PPDStageCAttention(current.base, i, [*current.users, user]))
        else:
            patched.add_object_patch(path, PPDStageCAttention(current, i, [user]))
    return patched
