"""The ComfyUI binding's logic (ppd_train/user_attention.py), without ComfyUI, against independent float64 references:
which rows get which weight (cond/uncond chunks, sigma window, stacked users) and the patched attention's output."""

from __future__ import annotations

import pytest
import torch
from reference import OptimizedAttention, attention64, comfy_attention, linear64, row_weights64, user_kv64

from ppd_train.adapter import AdapterConfig, ModelInfo, PPDAdapter
from ppd_train.embedding import UserEmbedding
from ppd_train.errors import IncompatibleError
from ppd_train.user_attention import (
    SamplingUser,
    UserAttention,
    UserAttn2,
    row_weights,
    sampling_user,
    stacked,
    stacked_attn2,
)

WIDTH, HEADS, TOKENS, EMBED = 8, 2, 3, 6
INFO = ModelInfo((WIDTH,) * 3, (HEADS,) * 3)


def _adapter(seed: int) -> PPDAdapter:
    adapter = PPDAdapter(AdapterConfig.for_model(INFO, embed_dim=EMBED, num_tokens=TOKENS, embedder="test"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():  # all non-zero, as after training (a fresh adapter adds nothing)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(TOKENS, EMBED, generator=torch.Generator().manual_seed(seed))


def _base(seed: int = 0) -> OptimizedAttention:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(WIDTH, WIDTH).double() for _ in range(4)]
    return OptimizedAttention(*layers, heads=HEADS)


@pytest.mark.parametrize("chunks", [[0], [1], [0, 1], [1, 0], [0, 0], [1, 1, 0], [0, 1, 0, 1]])
@pytest.mark.parametrize("sigma", [None, 0.5, 1.0, 3.0, 7.0, 7.5, 20.0])
def test_row_weights_match_the_reference(chunks, sigma):
    for per_chunk in (1, 3):
        batch = per_chunk * len(chunks)
        got = row_weights(0.7, batch, chunks, sigma, 7.0, 1.0)
        assert got == row_weights64(0.7, batch, chunks, sigma, 7.0, 1.0)
    # the window's ends are on (ComfyUI's ControlNet convention), just outside them is off
    assert row_weights(2.0, 2, [0, 0], 7.0, 7.0, 1.0) == row_weights(2.0, 2, [0, 0], 1.0, 7.0, 1.0) == [2.0, 2.0]
    assert row_weights(2.0, 2, [0, 0], 7.01, 7.0, 1.0) == row_weights(2.0, 2, [0, 0], 0.99, 7.0, 1.0) == [0.0, 0.0]


def test_row_weights_refuse_a_batch_that_does_not_split():
    with pytest.raises(IncompatibleError, match="Batch of 3 does not split into 2"):
        row_weights(1.0, 3, [0, 1], None, 1.0, 0.0)
    assert row_weights(1.5, 2, [], None, 1.0, 0.0) == [1.5, 1.5]  # no chunk list: one conditional chunk


def test_sampling_user_reads_the_sigma_once_per_call():
    user = SamplingUser(_adapter(1), _tokens(1), 0.5, sigma_start=10.0, sigma_end=2.0)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0, 5.0])}
    first = user.row_weights(4, options)
    assert first.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert user.row_weights(4, options) is first  # every block of one model call: one reading
    # the next call brings a new sigmas tensor: read again, even with the same batch and chunks
    assert user.row_weights(4, {**options, "sigmas": torch.tensor([20.0, 20.0])}).tolist() == [0.0] * 4
    assert user.row_weights(4, {**options, "sigmas": torch.tensor([1.0, 30.0])}).tolist() == [0.0] * 4  # max sigma
    assert user.row_weights(4, {**options, "cond_or_uncond": [0, 1]}).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert user.row_weights(2, {**options, "cond_or_uncond": [0]}).tolist() == [0.5, 0.5]
    assert user.row_weights(2, {}).tolist() == [0.5, 0.5]  # no sigmas, no chunks: every row, no window
    assert user.row_weights(2, {"sigmas": torch.zeros(0)}).tolist() == [0.5, 0.5]


def test_user_kv_is_computed_once_per_device_and_dtype_from_the_adapter():
    adapter, tokens = _adapter(1), _tokens(1)
    user = SamplingUser(adapter, tokens, 1.0, 1.0, 0.0)
    kv = user.kv(torch.device("cpu"), torch.float64)
    assert user.kv(torch.device("cpu"), torch.float64) is kv
    assert kv.keys[0].dtype == torch.float64 and adapter.user_proj.weight.dtype == torch.float32  # CPU copy untouched
    for i in range(3):
        k64, v64 = user_kv64(adapter, tokens, i)
        torch.testing.assert_close(kv.keys[i], k64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kv.values[i], v64, rtol=1e-5, atol=1e-6)
    assert user.kv(torch.device("cpu"), torch.float32).keys[0].dtype == torch.float32


def _reference_output(base, index, users, q, k, v, options):
    """out_proj( Attn(q, K, V) + sum over users of w_u[row] * Attn(q, K_u, V_u) ), in float64."""
    qp, kp, vp = linear64(base.to_q, q), linear64(base.to_k, k), linear64(base.to_v, v)
    out = attention64(qp, kp, vp, HEADS)
    sigma = float(options["sigmas"].max())
    for user in users:
        w = row_weights64(user.weight, q.shape[0], options["cond_or_uncond"], sigma, user.sigma_start, user.sigma_end)
        k_u, v_u = user_kv64(user.adapter, user.tokens, index)
        extra = attention64(qp, k_u.expand(q.shape[0], -1, -1), v_u.expand(q.shape[0], -1, -1), HEADS)
        out = out + torch.tensor(w, dtype=torch.float64).view(-1, 1, 1) * extra
    return linear64(base.out_proj, out)


@pytest.mark.parametrize("sigma", [20.0, 5.0, 1.0])  # neither user, user A only, both users
def test_patched_attention_matches_the_float64_reference(sigma):
    base = _base()
    a = SamplingUser(_adapter(1), _tokens(1), 0.7, sigma_start=10.0, sigma_end=0.5)
    b = SamplingUser(_adapter(2), _tokens(2), 1.5, sigma_start=2.0, sigma_end=0.0)
    module = stacked(stacked(base, 1, a, comfy_attention), 1, b, comfy_attention)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 5, WIDTH, generator=g, dtype=torch.float64)
    k = v = torch.randn(4, 7, WIDTH, generator=g, dtype=torch.float64)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.full((4,), sigma)}  # uncond chunk first, as ComfyUI does
    with torch.no_grad():
        got = module(q, k, v, transformer_options=options)
        plain = base(q, k, v)
        torch.testing.assert_close(got, _reference_output(base, 1, [a, b], q, k, v, options), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:2], plain[:2])  # the unconditional chunk is the base model, bit for bit
    if sigma > 10.0:
        assert torch.equal(got, plain)  # outside every window: bit-identical
    else:
        assert (got[2:] - plain[2:]).abs().max() > 1e-2


def test_stacking_keeps_the_original_projections_and_every_user():
    base = _base()
    a, b = (SamplingUser(_adapter(s), _tokens(s), 1.0, 1.0, 0.0) for s in (1, 2))
    one = stacked(base, 2, a, comfy_attention)
    two = stacked(one, 2, b, comfy_attention)
    assert isinstance(two, UserAttention) and two.base is base and one.base is base
    assert two.users == [a, b] and one.users == [a] and two.index == 2 and two.heads == HEADS
    assert [two.to_q, two.to_k, two.to_v, two.out_proj] == [base.to_q, base.to_k, base.to_v, base.out_proj]
    # the state dict keeps ComfyUI's names (LoRA patches and weight keys keep working) and holds no copy of the base
    assert sorted(two.state_dict()) == sorted(base.state_dict())


def test_each_block_reads_its_own_keys_and_values():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, WIDTH, generator=g, dtype=torch.float64)
    k = v = torch.randn(2, 6, WIDTH, generator=g, dtype=torch.float64)
    user = SamplingUser(_adapter(1), _tokens(1), 1.0, 1.0, 0.0)
    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([0.5])}
    base = _base()
    outs = []
    for index in range(3):
        with torch.no_grad():
            outs.append(stacked(base, index, user, comfy_attention)(q, k, v, transformer_options=options))
        torch.testing.assert_close(outs[-1], _reference_output(base, index, [user], q, k, v, options), rtol=1e-5,
                                   atol=1e-6)
    assert not torch.allclose(outs[0], outs[1])


def _embedding(embedder="test", shape=(TOKENS, EMBED)):
    return UserEmbedding(torch.randn(*shape, generator=torch.Generator().manual_seed(5)), embedder)


def _percent_to_sigma(percent: float) -> float:
    """Monotone like ComfyUI's model_sampling.percent_to_sigma: 0% -> huge, 100% -> 0."""
    return 999999999.9 if percent <= 0 else 0.0 if percent >= 1 else 10.0 * (1 - percent)


def test_sampling_user_from_node_settings():
    adapter, emb = _adapter(1), _embedding()
    user = sampling_user(adapter, "a.safetensors", INFO, emb, 0.8, 0.2, 0.6, _percent_to_sigma)
    assert user is not None and user.adapter is adapter and torch.equal(user.tokens, emb.tokens)
    assert (user.weight, user.sigma_start, user.sigma_end) == (0.8, 8.0, 4.0)
    whole = sampling_user(adapter, "a", INFO, emb, 1.0, 0.0, 1.0, _percent_to_sigma)
    assert whole is not None and (whole.sigma_start, whole.sigma_end) == (999999999.9, 0.0)
    # weight 0 or an empty window: no user at all, so the node returns a plain clone (the base model, bit for bit)
    assert sampling_user(adapter, "a", INFO, emb, 0.0, 0.0, 1.0, _percent_to_sigma) is None
    assert sampling_user(adapter, "a", INFO, emb, 1.0, 0.5, 0.5, _percent_to_sigma) is None
    assert sampling_user(adapter, "a", INFO, emb, -0.5, 0.0, 1.0, _percent_to_sigma) is not None


def test_sampling_user_refusals_name_the_adapter():
    adapter, emb = _adapter(1), _embedding()
    for start, end in ((0.8, 0.2), (-0.1, 0.5), (0.5, 1.1)):
        with pytest.raises(IncompatibleError, match=rf"start_percent \({start}\) must be <= end_percent"):
            sampling_user(adapter, "a", INFO, emb, 1.0, start, end, _percent_to_sigma)
    with pytest.raises(IncompatibleError, match="PPD adapter 'a.safetensors' was made for .*connected Stage C is"):
        sampling_user(adapter, "a.safetensors", ModelInfo((16,) * 3, (HEADS,) * 3), emb, 1.0, 0.0, 1.0,
                      _percent_to_sigma)
    with pytest.raises(IncompatibleError, match="does not fit PPD adapter 'a.safetensors'"):
        sampling_user(adapter, "a.safetensors", INFO, _embedding("other"), 1.0, 0.0, 1.0, _percent_to_sigma)
    with pytest.raises(IncompatibleError, match="does not fit PPD adapter"):
        sampling_user(adapter, "a", INFO, _embedding(shape=(TOKENS + 1, EMBED)), 1.0, 0.0, 1.0, _percent_to_sigma)


def test_keys_and_values_are_made_in_float32_on_the_sampling_device():
    """A bf16 adapter stays bf16 on the CPU; K_u, V_u are computed from it in float32 on the device asked for ("meta"
    stands in for a GPU: a mixed-device computation fails there)."""
    adapter = _adapter(1).to(torch.bfloat16)
    tokens = _tokens(1)
    user = SamplingUser(adapter, tokens, 1.0, 1.0, 0.0)
    kv = user.kv(torch.device("cpu"), torch.float64)
    assert adapter.user_proj.weight.dtype == torch.bfloat16 and adapter.user_proj.weight.device.type == "cpu"
    k64, v64 = user_kv64(adapter, tokens, 2)  # exact float64 arithmetic on the bf16 weights
    torch.testing.assert_close(kv.keys[2], k64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.values[2], v64, rtol=1e-5, atol=1e-5)
    on_meta = user.kv(torch.device("meta"), torch.float16)
    assert on_meta.keys[0].device.type == "meta" and on_meta.values[1].dtype == torch.float16
    assert adapter.user_proj.weight.device.type == "cpu"


def test_patched_attention_runs_where_the_model_runs_and_passes_options_on():
    """The whole module on the "meta" device (a stand-in for a GPU), and ComfyUI's transformer_options reach every
    native attention call (attention overrides and patches read them)."""
    seen = []

    def native(q, k, v, heads, transformer_options=None):
        seen.append(transformer_options)
        return comfy_attention(q, k, v, heads)

    user = SamplingUser(_adapter(1), _tokens(1), 1.0, 10.0, 0.0)
    module = stacked(_base().to("meta"), 0, user, native)
    q = torch.zeros(2, 5, WIDTH, dtype=torch.float64, device="meta")
    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    out = module(q, q, q, transformer_options=options)
    assert out.device.type == "meta" and out.shape == q.shape
    assert len(seen) == 2 and all(o is options for o in seen)  # the block's attention and the user's


def test_patched_attention_in_bf16_stays_bf16_and_near_the_reference():
    """A bf16 model (as ComfyUI runs Stage C): the user's keys and values come in the query's dtype, so the block's
    output stays bf16 and near the float64 reference of the same weights."""
    base64 = _base()
    user = SamplingUser(_adapter(1), _tokens(1), 1.0, 10.0, 0.0)
    module = stacked(_base().to(torch.bfloat16), 0, user, comfy_attention)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, WIDTH, generator=g, dtype=torch.float64)
    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    with torch.no_grad():
        got = module(q.bfloat16(), q.bfloat16(), q.bfloat16(), transformer_options=options)
        want = _reference_output(base64, 0, [user], q, q, q, options)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------ SDXL: ComfyUI's attn2_replace patch
def _native(q, k, v, heads, attn_precision=None, transformer_options=None):
    """ComfyUI's ``optimized_attention`` as CrossAttention calls it (the precision argument is ignored here)."""
    return comfy_attention(q, k, v, heads)


@pytest.mark.parametrize("sigma", [20.0, 5.0, 1.0])  # neither user, user A only, both users
def test_attn2_patch_matches_the_float64_reference(sigma):
    """ComfyUI hands the patch the cross-attention's projected q, k, v and applies to_out itself: the patch returns
    Attn(q, K, V) plus each user's weighted term, and exactly the native attention on rows without a user."""
    a = SamplingUser(_adapter(1), _tokens(1), 0.7, sigma_start=10.0, sigma_end=0.5)
    b = SamplingUser(_adapter(2), _tokens(2), 1.5, sigma_start=2.0, sigma_end=0.0)
    patch = stacked_attn2(stacked_attn2(None, 1, a, _native), 1, b, _native)
    assert patch.users == (a, b) and patch.previous is None and patch.index == 1
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 5, WIDTH, generator=g, dtype=torch.float64)
    k, v = (torch.randn(4, 7, WIDTH, generator=g, dtype=torch.float64) for _ in range(2))
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.full((4,), sigma), "n_heads": HEADS, "attn_precision": None}
    got = patch(q, k, v, options)
    plain = comfy_attention(q, k, v, HEADS)
    want = attention64(q, k, v, HEADS)
    for user in (a, b):
        w = row_weights64(user.weight, 4, [1, 0], sigma, user.sigma_start, user.sigma_end)
        k_u, v_u = user_kv64(user.adapter, user.tokens, 1)
        want = want + torch.tensor(w, dtype=torch.float64).view(-1, 1, 1) * attention64(
            q, k_u.expand(4, -1, -1), v_u.expand(4, -1, -1), HEADS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:2], plain[:2])  # the unconditional chunk is the native attention, bit for bit
    assert torch.equal(got, plain) if sigma > 10.0 else (got[2:] - plain[2:]).abs().max() > 1e-2


def test_attn2_patch_keeps_the_patch_that_was_there_and_survives_model_option_copies():
    """A patch another pack registered on the layer keeps running, with the users added to its result (stacking
    keeps it too); ComfyUI's clone() deep-copies model_options, which shares the immutable patch."""
    import copy

    seen = []

    def foreign(q, k, v, extra_options):
        seen.append(extra_options)
        return 2 * comfy_attention(q, k, v, extra_options["n_heads"])

    a, b = (SamplingUser(_adapter(s), _tokens(s), 1.0, 10.0, 0.0) for s in (1, 2))
    patch = stacked_attn2(stacked_attn2(foreign, 0, a, _native), 0, b, _native)
    assert isinstance(patch, UserAttn2) and patch.previous is foreign and patch.users == (a, b)
    q = torch.randn(2, 5, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]), "n_heads": HEADS}
    got = patch(q, q, q, options)
    assert len(seen) == 1 and seen[0] is options
    assert torch.equal(got[0], 2 * comfy_attention(q, q, q, HEADS)[0])  # uncond: exactly the foreign patch's result
    assert not torch.equal(got[1], 2 * comfy_attention(q, q, q, HEADS)[1])
    holder = {"patches_replace": {"attn2": {("input", 1, 0): patch}}}
    assert copy.deepcopy(holder)["patches_replace"]["attn2"][("input", 1, 0)] is patch


def test_sampling_user_names_the_connected_base():
    adapter, emb = _adapter(1), _embedding()
    with pytest.raises(IncompatibleError, match=r"'a' was made for Stage C custom .*, but the connected SDXL model is "
                                                r"SDXL custom \(3 attention blocks"):
        sampling_user(adapter, "a", ModelInfo(INFO.block_widths, INFO.block_heads, base="sdxl"), emb, 1.0, 0.0, 1.0,
                      _percent_to_sigma)
