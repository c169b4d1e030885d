"""The user attention on a real (tiny) diffusers Stage C: identity when off, personalisation when on."""

from __future__ import annotations

import pytest
import torch
from helpers import stage_c_inputs, trained_looking_adapter

from ppd_train.adapter import AdapterConfig, PPDAdapter, apply_user_attention
from ppd_train.errors import IncompatibleError
from ppd_train.stage_c import PPDBinding, adapter_parameter_count, attention_blocks, stage_c_info


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def test_attention_blocks_in_forward_order(tiny_unet):
    names = [n for n, _ in attention_blocks(tiny_unet)]
    assert names == ["down_blocks.0.2", "down_blocks.1.2", "up_blocks.0.2", "up_blocks.1.2"]


def test_fresh_adapter_weight_zero_and_no_user_are_bit_identical(tiny_unet):
    inputs = stage_c_inputs()
    base = _out(tiny_unet, inputs)
    adapter = PPDAdapter(AdapterConfig.for_model(stage_c_info(tiny_unet), embed_dim=24, num_tokens=5))
    binding = PPDBinding(tiny_unet, adapter)
    kv = adapter(torch.randn(2, 5, 24))
    with binding.user(kv, 1.0):  # fresh adapter: zero V_u, our processor path must equal diffusers' exactly
        assert torch.equal(_out(tiny_unet, inputs), base)
    trained = trained_looking_adapter(tiny_unet)
    binding.detach()
    binding = PPDBinding(tiny_unet, trained)
    kv = trained(torch.randn(2, 5, 24))
    with binding.user(kv, 0.0):
        assert torch.equal(_out(tiny_unet, inputs), base)
    with binding.user(None):
        assert torch.equal(_out(tiny_unet, inputs), base)
    with binding.user(kv, torch.zeros(2)):
        assert torch.equal(_out(tiny_unet, inputs), base)
    assert torch.equal(_out(tiny_unet, inputs), base)  # outside any user block


def test_trained_adapter_personalises_per_user(tiny_unet):
    inputs = stage_c_inputs()
    base = _out(tiny_unet, inputs)
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    user_a, user_b = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    with binding.user(adapter(user_a)):
        out_a = _out(tiny_unet, inputs)
    with binding.user(adapter(user_b)):
        out_b = _out(tiny_unet, inputs)
    assert (out_a - base).abs().max() > 1e-3
    assert (out_a - out_b).abs().max() > 1e-3
    # per-sample weights: row 0 without user stays the base model exactly, row 1 equals the all-user run
    with binding.user(adapter(user_a), torch.tensor([0.0, 1.0])):
        mixed = _out(tiny_unet, inputs)
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], out_a[1])
    # the weight scales the effect continuously
    with binding.user(adapter(user_a), 0.5):
        half = _out(tiny_unet, inputs)
    assert 0 < (half - base).abs().max() < (out_a - base).abs().max()


@pytest.mark.parametrize("weight", [1.0, 0.5, [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.7, 0.7], [1.0, 0.0, 1.0, 0.0],
                                    [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
@pytest.mark.parametrize("grad", [False, True])
def test_user_attention_rows_and_weights(weight, grad):
    """Every row pattern (one span with one weight: views and an in-place add; others: gathers) gives
    ``out + w * attend`` on the rows with a weight and leaves the others bit-identical; under autograd ``out`` is
    never changed in place and gradients reach K_u, V_u."""
    g = torch.Generator().manual_seed(0)
    out, q = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    k_u = torch.randn(1, 3, 8, generator=g).requires_grad_(grad)
    v_u = torch.randn(1, 3, 8, generator=g).requires_grad_(grad)
    attend = torch.nn.functional.scaled_dot_product_attention
    w = torch.as_tensor(weight).expand(4)
    expected = out + w.view(-1, 1, 1) * attend(q, k_u.expand(4, -1, -1), v_u.expand(4, -1, -1)).detach()
    base = out.clone()
    if grad:
        out.requires_grad_(True)
    with torch.set_grad_enabled(grad):
        got = apply_user_attention(out, q, k_u, v_u, torch.as_tensor(weight) if isinstance(weight, list) else weight,
                                   attend)
    for i in range(4):
        if w[i] == 0:
            assert torch.equal(got[i], base[i])
        else:
            torch.testing.assert_close(got[i], expected[i])
    if grad:
        assert torch.equal(out.detach(), base)
        if bool(w.any()):
            got.sum().backward()
            assert k_u.grad is not None and v_u.grad.abs().sum() > 0


def test_per_user_batch_equals_one_by_one(tiny_unet):
    inputs = stage_c_inputs()
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    users = torch.randn(2, 5, 24)
    with binding.user(adapter(users)):
        both = _out(tiny_unet, inputs)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        with binding.user(adapter(users[i:i + 1])):
            torch.testing.assert_close(_out(tiny_unet, one)[0], both[i], rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_adapter_and_reference_is_base(tiny_unet):
    inputs = stage_c_inputs()
    base = _out(tiny_unet, inputs)
    adapter = trained_looking_adapter(tiny_unet).train().requires_grad_(True)
    binding = PPDBinding(tiny_unet, adapter)
    tiny_unet.requires_grad_(False)
    with binding.adapter_off(), torch.no_grad():
        assert torch.equal(tiny_unet(**inputs).sample, base)
    with binding.user(adapter(torch.randn(2, 5, 24))):
        tiny_unet(**inputs).sample.square().mean().backward()
    assert all(p.grad is None for p in tiny_unet.parameters())
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_matches_plain_backward(tiny_unet):
    inputs = stage_c_inputs()
    adapter = trained_looking_adapter(tiny_unet).requires_grad_(True)
    binding = PPDBinding(tiny_unet, adapter)
    users = torch.randn(2, 5, 24)

    def grads():
        adapter.zero_grad()
        with binding.user(adapter(users)):
            tiny_unet(**{k: v.clone() for k, v in inputs.items()}).sample.square().mean().backward()
        return [p.grad.clone() for p in adapter.parameters()]

    plain = grads()
    tiny_unet.enable_gradient_checkpointing()
    tiny_unet.train()  # checkpointing is active only with grad enabled
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kv_is_computed_once_per_user(tiny_unet):
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    calls = []
    adapter.user_proj.register_forward_hook(lambda *a: calls.append(1))
    kv = adapter(torch.randn(1, 5, 24))
    with binding.user(kv), torch.no_grad():
        for step in range(3):  # a sampling loop reuses the same K_u, V_u
            tiny_unet(**stage_c_inputs(seed=step))
    assert len(calls) == 1


def test_wrong_shapes_and_double_attach_are_refused(tiny_unet):
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    with pytest.raises(IncompatibleError, match="5 tokens, width 24"):
        adapter(torch.randn(1, 4, 24))
    with pytest.raises(IncompatibleError, match="already has a PPD adapter"):
        PPDBinding(tiny_unet, adapter)
    binding.detach()
    other = AdapterConfig(block_widths=(64,) * 4, block_heads=(2,) * 4, embed_dim=24, num_tokens=5)
    with pytest.raises(IncompatibleError, match="width 64.*width 32"):
        PPDBinding(tiny_unet, PPDAdapter(other))


def test_parameter_count_for_real_stage_c():
    lite = adapter_parameter_count("lite")
    assert lite["block_count"] == 32
    assert lite["blocks"] == 32 * 2 * 1536 * 1536  # ~151M: the paper's "~150M"
    assert 150e6 < lite["total"] < 158e6
    # projector for LLaVA-OneVision 7B (D = 3584, 29 tokens): LayerNorm, Linear D -> 1536 with bias, token positions
    assert lite["projector"] == lite["total"] - lite["blocks"] == 2 * 3584 + 3584 * 1536 + 1536 + 29 * 1536
    full = adapter_parameter_count("full")
    assert full["block_count"] == 64 and 530e6 < full["total"] < 550e6


def test_one_span_of_rows_is_added_in_place_and_others_gather_in_the_models_dtype():
    """The hot path: one run of rows with one weight (all rows, or CFG's conditional chunk) adds into ``out`` in place,
    with no gather; other patterns build a new tensor, in ``out``'s dtype (bf16 here)."""
    g = torch.Generator().manual_seed(0)
    attend = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(4, 6, 8, generator=g)
    k_u, v_u = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    for weight in (1.0, torch.tensor([0.0, 0.0, 0.7, 0.7]), torch.tensor([0.5, 0.5, 0.0, 0.0])):
        out = torch.randn(4, 6, 8, generator=g)
        assert apply_user_attention(out, q, k_u, v_u, weight, attend) is out
    for weight in (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.5, 0.0, 0.0])):
        out = torch.randn(4, 6, 8, generator=g).bfloat16()
        got = apply_user_attention(out, q.bfloat16(), k_u.bfloat16(), v_u.bfloat16(), weight, attend)
        assert got is not out and got.dtype == torch.bfloat16
        want = out.double() + weight.double().view(-1, 1, 1) * attend(q, k_u.expand(4, -1, -1),
                                                                       v_u.expand(4, -1, -1)).double()
        torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02)


def test_a_bf16_stage_c_samples_on_float32_inputs(tiny_unet):
    """The sampler feeds float32 timesteps, text and zero image prompts; a bf16 Stage C (realsize's default on CUDA)
    takes them under autocast, with or without a user, near the float32 samples."""
    from ppd_train.evaluate import Conditions, sample

    adapter = trained_looking_adapter(tiny_unet)
    g = torch.Generator().manual_seed(0)
    cond = Conditions(torch.randn(1, 77, 32, generator=g), torch.randn(1, 1, 32, generator=g), 32, (16, 4, 4))
    noise, users = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 5, 24, generator=g)
    binding = PPDBinding(tiny_unet, adapter)
    ref = {u is None: sample(binding, cond, torch.tensor([0]), noise, u, steps=2) for u in (None, users)}
    tiny_unet.to(torch.bfloat16)
    for u in (None, users):
        x = sample(binding, cond, torch.tensor([0]), noise, u, steps=2)
        assert torch.isfinite(x).all()
        err = float((x.float() - ref[u is None]).norm() / ref[u is None].norm())
        assert err < 0.05, err  # bf16 rounding, not another sample
