"""Independent float64 references for the user attention, and ComfyUI's Stage C attention call shape, rebuilt here
from ComfyUI's source (comfy/ldm/cascade/common.py, comfy/ldm/modules/attention.py) so CI checks it without ComfyUI."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def comfy_attention(q, k, v, heads, transformer_options=None):
    """ComfyUI's ``optimized_attention`` (attention_pytorch): merged heads ``[B, N, C]`` in and out."""
    b, _, c = q.shape

    def split(t):
        return t.view(b, -1, heads, c // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, -1, c)


class OptimizedAttention(torch.nn.Module):
    """ComfyUI's Stage C ``OptimizedAttention``: ``out_proj(attention(to_q(q), to_k(k), to_v(v)))``."""

    def __init__(self, to_q, to_k, to_v, out_proj, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.out_proj = to_q, to_k, to_v, out_proj

    def forward(self, q, k, v, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        return self.out_proj(comfy_attention(self.to_q(q), self.to_k(k), self.to_v(v), self.heads))


def comfy_attn_block(x, clip, kv_mapper, attn, self_attn=True, transformer_options=None):
    """ComfyUI's ``AttnBlock.forward`` with ``Attention2D`` inlined; ``attn`` is what sits at ``attention.attn``."""
    kv = kv_mapper(clip)
    norm_x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
    tokens = norm_x.view(norm_x.size(0), norm_x.size(1), -1).permute(0, 2, 1)
    if self_attn:
        kv = torch.cat([tokens, kv], dim=1)
    out = attn(tokens, kv, kv, transformer_options=transformer_options or {})
    return x + out.permute(0, 2, 1).view(*x.shape)


def comfy_attn2_replaced(x, context, attn, patch, extra_options):
    """ComfyUI's ``BasicTransformerBlock`` cross-attention with an ``attn2_replace`` patch (attention.py): the layer's
    own ``to_q/to_k/to_v``, then the patch, then its ``to_out``; ``attn`` holds the weights (diffusers' names)."""
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    return attn.to_out[0](patch(q, k, v, extra_options))


# ------------------------------------------------------------------------------------------------- float64 references
def attention64(q, k, v, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out, in float64; merged heads in and out."""
    q, k, v = q.double(), k.double(), v.double()
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).permute(0, 2, 1, 3).reshape(b, n, c)


def user_kv64(adapter, tokens: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``index``'s ``K_u, V_u`` from the adapter's weights, in float64: LayerNorm, projector, positions, K/V."""
    p = {k: v.double() for k, v in adapter.state_dict().items()}
    u = tokens.double()
    if u.dim() == 2:
        u = u[None]
    mean, var = u.mean(-1, keepdim=True), u.var(-1, unbiased=False, keepdim=True)
    normed = (u - mean) / torch.sqrt(var + 1e-5) * p["user_norm.weight"] + p["user_norm.bias"]
    h = normed @ p["user_proj.weight"].T + p["user_proj.bias"] + p["token_pos"]
    return h @ p[f"blocks.{index}.to_k.weight"].T, h @ p[f"blocks.{index}.to_v.weight"].T


def linear64(layer, x):
    return x.double() @ layer.weight.double().T + layer.bias.double()


def row_weights64(weight, batch, cond_or_uncond, sigma, sigma_start, sigma_end) -> list[float]:
    """Row by row: the row's chunk must be a conditional one and the sigma inside the window (ends included)."""
    chunks = list(cond_or_uncond) or [0]
    size = batch // len(chunks)
    inside = sigma is None or sigma_end <= sigma <= sigma_start
    return [float(weight) if inside and chunks[row // size] == 0 else 0.0 for row in range(batch)]
