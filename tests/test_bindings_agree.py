"""Both bindings give the same attention-block output for the same weights, without ComfyUI: diffusers' Stage C block
with the training binding (PPDBinding) against ComfyUI's AttnBlock call shape (tests/reference.py) with the module the
nodes patch in (ppd_train.user_attention); and every SDXL cross-attention against ComfyUI's attn2_replace call shape
with the patch the nodes register. The full check on ComfyUI's own classes is in tests/comfyui."""

from __future__ import annotations

import pytest
import torch
from helpers import trained_looking_adapter
from reference import OptimizedAttention, comfy_attention, comfy_attn2_replaced, comfy_attn_block

from ppd_train.binding import model_info
from ppd_train.sdxl import sdxl_attention_layers
from ppd_train.stage_c import PPDBinding, attention_blocks
from ppd_train.user_attention import SamplingUser, stacked, stacked_attn2


def _comfy_twin(block, index, users):
    """The block's weights under ComfyUI's layout (to_out.0 -> out_proj), patched as the nodes patch it."""
    a = block.attention
    base = OptimizedAttention(a.to_q, a.to_k, a.to_v, a.to_out[0], heads=a.heads)
    module = base
    for user in users:
        module = stacked(module, index, user, comfy_attention)
    return base, module


def _inputs(block, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = block.attention.to_q.in_features
    return (torch.randn(2, width, 3, 4, generator=g),
            torch.randn(2, 6, block.kv_mapper[1].in_features, generator=g))


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
def test_every_block_gives_the_same_output_in_both_bindings(tiny_unet, weight):
    adapter = trained_looking_adapter(tiny_unet)
    tokens = torch.randn(5, 24, generator=torch.Generator().manual_seed(7))
    user = SamplingUser(adapter, tokens, weight, sigma_start=1e9, sigma_end=0.0)
    binding = PPDBinding(tiny_unet, adapter)
    kv = adapter(tokens)
    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0, 1.0])}
    for index, (_, block) in enumerate(attention_blocks(tiny_unet)):
        x, clip = _inputs(block, seed=index)
        base, patched = _comfy_twin(block, index, [user])
        with torch.no_grad():
            vanilla = block(x, clip)
            torch.testing.assert_close(comfy_attn_block(x, clip, block.kv_mapper, base), vanilla, rtol=1e-5,
                                       atol=1e-6)  # the two call shapes agree on the base model
            with binding.user(kv, weight):
                diffusers = block(x, clip)
            comfy = comfy_attn_block(x, clip, block.kv_mapper, patched, transformer_options=options)
        torch.testing.assert_close(comfy, diffusers, rtol=1e-5, atol=1e-6)
        assert (diffusers - vanilla).abs().max() > 1e-2, index  # the user really changes the block


def test_cfg_batches_and_stacked_users_agree(tiny_unet):
    """ComfyUI's [uncond, cond] chunks against per-sample weights [0, w]; two stacked users against two
    ``binding.user`` passes summed."""
    adapter = trained_looking_adapter(tiny_unet)
    a_tokens, b_tokens = (torch.randn(5, 24, generator=torch.Generator().manual_seed(s)) for s in (8, 9))
    a = SamplingUser(adapter, a_tokens, 0.7, 1e9, 0.0)
    b = SamplingUser(adapter, b_tokens, 1.3, 1e9, 0.0)
    binding = PPDBinding(tiny_unet, adapter)
    index, (_, block) = 1, attention_blocks(tiny_unet)[1]
    x, clip = _inputs(block, seed=3)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0, 1.0])}
    with torch.no_grad():
        vanilla = block(x, clip)
        with binding.user(adapter(a_tokens), torch.tensor([0.0, 0.7])):
            only_a = block(x, clip)
        with binding.user(adapter(b_tokens), torch.tensor([0.0, 1.3])):
            only_b = block(x, clip)
        comfy_a = comfy_attn_block(x, clip, block.kv_mapper, _comfy_twin(block, index, [a])[1],
                                   transformer_options=options)
        comfy_ab = comfy_attn_block(x, clip, block.kv_mapper, _comfy_twin(block, index, [a, b])[1],
                                    transformer_options=options)
        # out_proj is linear, so two users before it add up: only_a + only_b - vanilla
    torch.testing.assert_close(comfy_a, only_a, rtol=1e-5, atol=1e-6)
    assert torch.equal(comfy_a[0], comfy_attn_block(x, clip, block.kv_mapper, _comfy_twin(block, index, [])[0])[0])
    torch.testing.assert_close(comfy_ab, only_a + only_b - vanilla, rtol=1e-5, atol=1e-5)


def _native(q, k, v, heads, attn_precision=None, transformer_options=None):
    return comfy_attention(q, k, v, heads)


def test_every_sdxl_cross_attention_gives_the_same_output_in_both_bindings(tiny_sdxl):
    """diffusers' attn2 with the training binding against ComfyUI's attn2_replace path with the nodes' patch: the same
    output for one and for two stacked users, on the conditional rows of a [cond, uncond] batch; the uncond rows are
    the base model's."""
    adapter = trained_looking_adapter(tiny_sdxl)
    a_tokens, b_tokens = (torch.randn(5, 24, generator=torch.Generator().manual_seed(s)) for s in (8, 9))
    a, b = SamplingUser(adapter, a_tokens, 0.7, 1e9, 0.0), SamplingUser(adapter, b_tokens, 1.3, 1e9, 0.0)
    binding = PPDBinding(tiny_sdxl, adapter)
    layers = sdxl_attention_layers(tiny_sdxl)
    assert len(layers) == len(model_info(tiny_sdxl).block_widths) == 11
    g = torch.Generator().manual_seed(2)
    for index, (_, attn) in enumerate(layers):
        x = torch.randn(2, 6, attn.to_q.in_features, generator=g)
        context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
        options = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0]), "n_heads": attn.heads,
                   "attn_precision": None}
        one = stacked_attn2(None, index, a, _native)
        two = stacked_attn2(one, index, b, _native)
        with torch.no_grad():
            vanilla = attn(x, encoder_hidden_states=context)
            with binding.user(adapter(a_tokens), torch.tensor([0.7, 0.0])):
                only_a = attn(x, encoder_hidden_states=context)
            with binding.user(adapter(b_tokens), torch.tensor([1.3, 0.0])):
                only_b = attn(x, encoder_hidden_states=context)
            comfy_a = comfy_attn2_replaced(x, context, attn, one, options)
            comfy_ab = comfy_attn2_replaced(x, context, attn, two, options)
        torch.testing.assert_close(comfy_a, only_a, rtol=1e-5, atol=1e-6)
        # to_out is linear, so two users before it add up: only_a + only_b - vanilla
        torch.testing.assert_close(comfy_ab, only_a + only_b - vanilla, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comfy_ab[1], vanilla[1], rtol=1e-5, atol=1e-6)
        assert (only_a[0] - vanilla[0]).abs().max() > 1e-3, index  # the user really changes the layer
