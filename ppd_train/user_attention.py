"""The ComfyUI binding's logic without ComfyUI: which batch rows get which weight, and the patched attention.

ComfyUI tells each attention layer which batch chunks are the unconditional pass (``cond_or_uncond``: 0 = cond,
1 = uncond) and the current ``sigmas``. Every stacked user adds ``w * Attn(q, K_u, V_u)`` before the layer's output
projection through :func:`ppd_train.adapter.apply_user_attention`, the function the diffusers binding uses. Two ways
in, one per base:

- Stage C: ComfyUI's attention patches never reach it, so :class:`UserAttention` is a drop-in for each attention
  block's ``attn`` (an ``OptimizedAttention``: ``to_q/to_k/to_v/out_proj`` around a native attention on merged heads)
  that ``nodes/stage_c_patch.py`` swaps in.
- SDXL: :class:`UserAttn2` is an ``attn2_replace`` patch (ComfyUI's own mechanism, what IP-Adapter packs use), called
  with the cross-attention's projected ``q, k, v`` and ``extra_options``; ComfyUI applies ``to_out`` to what it
  returns. ``nodes/sdxl_patch.py`` registers one per ``attn2``.

The native attention is passed in, so nothing here imports ComfyUI and ``make test`` checks all of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from .adapter import BASES, ModelInfo, PPDAdapter, UserKV, apply_user_attention, check_base, check_embedding
from .embedding import UserEmbedding
from .errors import IncompatibleError

# ComfyUI's ``optimized_attention(q, k, v, heads, transformer_options=...)`` on ``[B, N, C]`` (merged heads).
NativeAttention = Callable[..., torch.Tensor]


def row_weights(weight: float, batch: int, cond_or_uncond: Sequence[int], sigma: float | None, sigma_start: float,
                sigma_end: float) -> list[float]:
    """Weight of each batch row: ``weight`` on the conditional chunks, 0 on the unconditional ones, and 0 on every row
    when ``sigma`` is outside ``[sigma_end, sigma_start]`` (both ends on, like ComfyUI's ControlNet windows).

    ComfyUI stacks the chunks of one model call in the batch, equally sized, in ``cond_or_uncond`` order; ``sigma``
    None means the caller gave no sigma, so no window applies.
    """
    chunks = list(cond_or_uncond) or [0]
    if batch % len(chunks):
        raise IncompatibleError(f"Batch of {batch} does not split into {len(chunks)} cond/uncond chunks.")
    if sigma is not None and not sigma_end <= sigma <= sigma_start:
        return [0.0] * batch
    return [float(weight) if c == 0 else 0.0 for c in chunks for _ in range(batch // len(chunks))]


class SamplingUser:
    """One adapter, one user, one weight and sigma window; caches ``K_u, V_u`` per device and dtype."""

    def __init__(self, adapter: PPDAdapter, tokens: torch.Tensor, weight: float, sigma_start: float,
                 sigma_end: float) -> None:
        self.adapter = adapter
        self.tokens = tokens
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
        """:func:`row_weights` for one model call, as a ``[batch]`` CPU tensor.

        Every attention block of one model call asks with the same ``sigmas`` tensor; the answer is kept for that
        tensor, so reading the sigma (a device sync on a GPU) happens once per call rather than once per block.
        """
        sigmas = transformer_options.get("sigmas")
        chunks = tuple(transformer_options.get("cond_or_uncond") or [0])
        last = self._rows
        if last is not None and last[0] is sigmas and last[1] == (batch, chunks):
            return last[2]
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) and sigmas.numel() else None
        weights = torch.tensor(row_weights(self.weight, batch, chunks, sigma, self.sigma_start, self.sigma_end))
        self._rows = (sigmas, (batch, chunks), weights)
        return weights


def add_users(out: torch.Tensor, q: torch.Tensor, index: int, users: Sequence[SamplingUser],
              attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              transformer_options: dict) -> torch.Tensor:
    """``out`` (layer ``index``'s attention, before its output projection) plus every user's weighted term."""
    for user in users:
        weights = user.row_weights(out.shape[0], transformer_options)
        kv = user.kv(q.device, q.dtype)
        out = apply_user_attention(out, q, kv.keys[index], kv.values[index], weights, attend)
    return out


class UserAttention(torch.nn.Module):
    """Drop-in for Stage C's ``OptimizedAttention``: identical when no user is active, plus the users' terms."""

    def __init__(self, base: torch.nn.Module, index: int, users: list[SamplingUser],
                 attention: NativeAttention) -> None:
        super().__init__()
        self.heads = base.heads
        # the block's own projections under the same names, so LoRA patches and state-dict keys keep working
        self.to_q, self.to_k, self.to_v, self.out_proj = base.to_q, base.to_k, base.to_v, base.out_proj
        self._base = (base,)  # a tuple, so the original is not registered twice as a child
        self.index = index
        self.users = users
        self.attention = attention

    @property
    def base(self) -> torch.nn.Module:
        return self._base[0]

    def forward(self, q, k, v, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        q = self.to_q(q)
        k = self.to_k(k)
        v = self.to_v(v)
        out = self.attention(q, k, v, self.heads, transformer_options=transformer_options)

        def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return self.attention(q_, k_, v_, self.heads, transformer_options=transformer_options)

        return self.out_proj(add_users(out, q, self.index, self.users, attend, transformer_options))


def stacked(current: torch.nn.Module, index: int, user: SamplingUser, attention: NativeAttention) -> UserAttention:
    """The module for block ``index`` with ``user`` added on top of the users ``current`` already has (if any)."""
    if isinstance(current, UserAttention):
        return UserAttention(current.base, index, [*current.users, user], attention)
    return UserAttention(current, index, [user], attention)


# ComfyUI's ``attn2_replace`` patch: ``(q, k, v, extra_options) -> attention output before to_out``.
Attn2Patch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


class UserAttn2:
    """``attn2_replace`` patch for cross-attention layer ``index``: the layer's own attention (or the patch that was
    registered there before, e.g. another pack's, whose result is kept) plus every stacked user's term.

    ComfyUI has already projected ``q, k, v`` with the layer's ``to_q/to_k/to_v`` and applies its ``to_out`` to the
    result, so rows without a user are exactly what ComfyUI's own ``CrossAttention`` computes. Immutable: stacking
    makes a new patch, and ``ModelPatcher.clone()`` (which deep-copies ``model_options``) shares this one.
    """

    def __init__(self, index: int, users: Sequence[SamplingUser], attention: NativeAttention,
                 previous: Attn2Patch | None = None) -> None:
        self.index = index
        self.users = tuple(users)
        self.attention = attention
        self.previous = previous

    def __deepcopy__(self, memo: dict) -> UserAttn2:
        return self  # no state changes after construction; a copy would duplicate the users' cached K_u, V_u

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        if self.previous is None:  # what CrossAttention.forward does between its projections
            out = self.attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        else:
            out = self.previous(q, k, v, extra_options)

        def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return self.attention(q_, k_, v_, heads, attn_precision=precision, transformer_options=extra_options)

        return add_users(out, q, self.index, self.users, attend, extra_options)


def stacked_attn2(current: Attn2Patch | None, index: int, user: SamplingUser,
                  attention: NativeAttention) -> UserAttn2:
    """The patch for layer ``index`` with ``user`` added on top of ``current`` (our users, or a foreign patch)."""
    if isinstance(current, UserAttn2):
        return UserAttn2(index, [*current.users, user], attention, current.previous)
    return UserAttn2(index, [user], attention, current)


def sampling_user(adapter: PPDAdapter, adapter_name: str, model: ModelInfo, embedding: UserEmbedding, weight: float,
                  start_percent: float, end_percent: float,
                  percent_to_sigma: Callable[[float], float]) -> SamplingUser | None:
    """Check that adapter, model and embedding fit and the window is sane; None when the user changes nothing
    (weight 0 or an empty window), so the caller can return a plain clone, bit-identical to the base model."""
    connected = "the connected Stage C" if model.base == "stage_c" else f"the connected {BASES[model.base]} model"
    check_base(adapter.config, model, f"PPD adapter '{adapter_name}'", connected)
    check_embedding(adapter.config, tuple(embedding.tokens.shape), embedding.embedder, f"PPD adapter '{adapter_name}'")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise IncompatibleError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in "
                                "0..1.")
    if float(weight) == 0.0 or start_percent == end_percent:
        return None
    return SamplingUser(adapter, embedding.tokens, weight, percent_to_sigma(start_percent),
                        percent_to_sigma(end_percent))
