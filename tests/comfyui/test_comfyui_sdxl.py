"""Apply PPD Adapter on ComfyUI's own SDXL (a tiny ``comfy.supported_models.SDXL`` UNet, and the real SDXL layout on
the meta device) through ComfyUI's ``attn2_replace`` patches, sampled by the stock KSampler: weight 0 and the
unconditional pass bit-identical, a user changes the result, two users stack, the window works, vanilla again after a
PPD run, adapters for the other base refused naming both."""

from __future__ import annotations

import importlib

import pytest
import torch


def _mod(name):
    return importlib.import_module(f"ppd_pack.{name}")


def _user(seed=3, tokens=5, width=24, embedder="test"):
    return _mod("ppd_train.embedding").UserEmbedding(
        torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed)), embedder)


def _adapter(info, seed=1, embedder="test", name="tiny_sdxl.safetensors"):
    """A named adapter for ``info`` with every weight non-zero, as after training."""
    adapter_mod = _mod("ppd_train.adapter")
    adapter = adapter_mod.PPDAdapter(adapter_mod.AdapterConfig.for_model(info, 24, 5, embedder=embedder))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if not p.is_meta:  # shapes only (the real SDXL layout)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return _mod("nodes.sockets").NamedAdapter(name, adapter)


@pytest.fixture(scope="module")
def sdxl(comfy):
    return comfy["fixtures"].tiny_sdxl(seed=4)


def _apply(model, adapter, user, weight=1.0, start=0.0, end=1.0):
    return _mod("nodes.adapter_nodes").PPDApplyAdapter().apply(model, adapter, user, weight, start, end)[0]


def _forward(patcher, options, batch=2, seed=0):
    """One UNet call as ComfyUI's sampler makes it: the MODEL's transformer_options (its attn2 patches) plus the
    call's own (cond_or_uncond, sigmas)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, 32, generator=g)
    y = torch.randn(batch, patcher.model.adm_channels, generator=g)  # pooled text + SDXL's 6 size embeddings
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context, y, transformer_options={
                **patcher.model_options["transformer_options"], **options})
    finally:
        patcher.unpatch_model()


def _ksampler(comfy, model, seed=3):
    import nodes as comfy_nodes

    text = comfy["fixtures"].sdxl_conditioning
    return comfy_nodes.KSampler().sample(model, seed=seed, steps=4, cfg=5.0, sampler_name="euler",
                                         scheduler="normal", positive=text("a lighthouse"), negative=text("blurry"),
                                         latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)[0]["samples"]


def test_stock_ksampler_weight_zero_is_vanilla_a_user_changes_it_and_vanilla_returns(comfy, sdxl):
    info = _mod("nodes.sdxl_patch").sdxl_of(sdxl)[1]
    adapter, user = _adapter(info), _user()
    vanilla = _ksampler(comfy, sdxl)
    assert torch.equal(_ksampler(comfy, _apply(sdxl, adapter, user, weight=0.0)), vanilla)
    personal = _ksampler(comfy, _apply(sdxl, adapter, user))
    assert (personal - vanilla).abs().max() > 1e-3
    assert torch.equal(_ksampler(comfy, sdxl), vanilla)  # the input MODEL is untouched, a stock run is vanilla
    # a user that is on only late in sampling changes less than one on all the way
    late = _ksampler(comfy, _apply(sdxl, adapter, user, start=0.5))
    assert not torch.equal(late, vanilla) and not torch.equal(late, personal)


def test_uncond_rows_window_and_stacked_users(comfy, sdxl):
    patch = _mod("nodes.sdxl_patch")
    keys, info = patch.sdxl_of(sdxl)
    adapter, anna, ben = _adapter(info), _user(3), _user(9)
    cfg_batch = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0])}
    base = _forward(sdxl, cfg_batch)
    one = _apply(sdxl, adapter, anna)
    ppd = _forward(one, cfg_batch)
    assert torch.equal(ppd[1], base[1]) and (ppd[0] - base[0]).abs().max() > 1e-3  # uncond chunk untouched
    # the window: start_percent 0.5 is off at a large sigma (early), on at a small one (late)
    late = _apply(sdxl, adapter, anna, start=0.5)
    early, end = ({"cond_or_uncond": [0, 0], "sigmas": torch.tensor([s, s])} for s in (14.0, 0.05))
    assert torch.equal(_forward(late, early), _forward(sdxl, early))
    assert not torch.equal(_forward(late, end), _forward(sdxl, end))
    # applying twice stacks two users on every layer, and the result is the two users' terms added
    two = _apply(one, adapter, ben)
    patches = two.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert sorted(patches) == sorted(keys) and all(len(patches[k].users) == 2 for k in keys)
    assert not torch.equal(_forward(two, cfg_batch), ppd)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 16, 64, generator=g), torch.randn(2, 77, 64, generator=g)
    options = {**cfg_batch, "n_heads": 4, "attn_precision": None}
    only_ben = _apply(sdxl, adapter, ben).model_options["transformer_options"]["patches_replace"]["attn2"][keys[1]]
    vanilla_attn = patch.optimized_attention(q, k, k, 4)
    torch.testing.assert_close(patches[keys[1]](q, k, k, options),
                               one.model_options["transformer_options"]["patches_replace"]["attn2"][keys[1]](
                                   q, k, k, options) + only_ben(q, k, k, options) - vanilla_attn)
    assert torch.equal(_forward(sdxl, cfg_batch), base)  # the input MODEL stays untouched


def test_a_patch_another_pack_registered_keeps_running(comfy, sdxl):
    """An attn2_replace patch already on the MODEL (as IP-Adapter packs register theirs) is kept: the users are added
    to its result, and the uncond rows are exactly what it returns."""
    keys, info = _mod("nodes.sdxl_patch").sdxl_of(sdxl)
    optimized_attention = _mod("nodes.sdxl_patch").optimized_attention
    calls = []

    def doubled(q, k, v, extra_options):  # a stand-in for another pack's patch
        calls.append(1)
        return 2 * optimized_attention(q, k, v, extra_options["n_heads"])

    other = sdxl.clone()
    for key in keys:
        other.set_model_attn2_replace(doubled, *key)
    options = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0])}
    theirs = _forward(other, options)
    calls.clear()
    both = _forward(_apply(other, _adapter(info), _user()), options)
    assert len(calls) == len(keys)
    assert torch.equal(both[1], theirs[1]) and not torch.equal(both[0], theirs[0])


def _patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device="cpu")


def test_the_real_sdxl_layout_and_refusals(comfy, sdxl):
    """ComfyUI's own SDXL config (as comfy.model_detection gives it for SDXL 1.0; built on the meta device): 70
    cross-attention layers in forward order, recognised as SDXL base; an adapter for the other base is refused naming
    both, for SDXL and for Stage C."""
    import comfy.supported_models as supported_models

    adapter_mod = _mod("ppd_train.adapter")
    patch = _mod("nodes.sdxl_patch")
    IncompatibleError = _mod("ppd_train.errors").IncompatibleError
    config = supported_models.SDXL({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False})
    config.set_inference_dtype(torch.float16, None)
    real = _patcher(config.get_model({}, device=torch.device("meta")))
    keys, info = patch.sdxl_of(real)
    assert info == adapter_mod.ModelInfo(*adapter_mod.KNOWN_SDXL["base"], base="sdxl") and info.kind == "base"
    assert keys[:3] == [("input", 4, 0), ("input", 4, 1), ("input", 5, 0)] and keys[24] == ("middle", 0, 0)
    assert keys[-1] == ("output", 5, 1) and len(set(keys)) == 70
    with torch.device("meta"):
        sdxl_adapter = _adapter(info)
        lite = _adapter(adapter_mod.ModelInfo((1536,) * 32, (24,) * 32), name="lite.safetensors")
    patched = _apply(real, sdxl_adapter, _user())
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == 70
    with pytest.raises(IncompatibleError, match=r"'lite.safetensors' was made for Stage C lite .*, but the connected "
                                                r"SDXL model is SDXL base \(70 attention blocks"):
        _apply(real, lite, _user())
    with pytest.raises(IncompatibleError, match=r"was made for SDXL custom .*but the connected SDXL model is SDXL "
                                                r"base"):
        _apply(real, _adapter(patch.sdxl_of(sdxl)[1]), _user())
    stage_c = _patcher(comfy["fixtures"]._model_config("c").get_model({}))
    with pytest.raises(IncompatibleError,
                       match=r"'tiny_sdxl.safetensors' was made for SDXL base .*, but the connected Stage C is Stage"):
        _apply(stage_c, sdxl_adapter, _user())
    sd15 = supported_models.SD15({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False})
    with pytest.raises(IncompatibleError, match="needs a Stable Cascade Stage C or an SDXL model, got BaseModel"):
        _apply(_patcher(sd15.get_model({}, device=torch.device("meta"))), sdxl_adapter, _user())
    with pytest.raises(IncompatibleError, match="PPD Stage C Sampler samples Stable Cascade Stage C.*Apply PPD"):
        _mod("nodes.adapter_nodes").PPDStageCSampler().sample(sdxl, sdxl_adapter, _user(), None, None, None, 0, 1,
                                                              1.0, "euler", "normal", 1.0, 1.0, 0.0, 1.0)


def test_diffusers_and_comfyui_bindings_agree(comfy):
    """The same tiny SDXL weights in diffusers (ppd_train's binding, as training and ppd-train sample) and in
    ComfyUI's own UNet (converted through the single-file layout, config detected by ComfyUI's model_detection), the
    same adapter and user: the same noise prediction, layer for layer the same ModelInfo."""
    import comfy.model_detection as model_detection
    from diffusers import UNet2DConditionModel

    sdxl_mod, tiny, binding_mod = _mod("ppd_train.sdxl"), _mod("ppd_train.tiny"), _mod("ppd_train.binding")
    # ComfyUI's UNet normalises with 32 groups: widths 32/64, both levels with attention, 2 + 4 heads of 16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_mod.sdxl_shape((32, 64), (2, 4), (1, 2), 1, (16, 16), 32, 256, 32, 8)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)  # no zero-initialised layer left
    ldm = tiny.sdxl_unet_to_ldm(unet)
    prefix = sdxl_mod.LDM_UNET_PREFIX
    config = model_detection.detect_unet_config(ldm, prefix)
    model = comfy["fixtures"].tiny_sdxl(state_dict={k.removeprefix(prefix): v for k, v in ldm.items()},
                                        unet_config=config)
    keys, info = _mod("nodes.sdxl_patch").sdxl_of(model)
    assert info == binding_mod.model_info(unet) and len(keys) == 11
    named = _adapter(info)
    user = _user()

    batch = 2
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 120.0])
    context = torch.randn(batch, 77, 32, generator=g)
    pooled = torch.randn(batch, 32, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)
    with torch.no_grad():  # SDXL's ADM vector as diffusers builds it: pooled text + the six size numbers embedded
        y = torch.cat([pooled, unet.add_time_proj(time_ids.flatten()).reshape(batch, -1)], dim=1)

        def diffusers():
            return unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0, 1.0])}

    def comfyui(patcher):
        patcher.patch_model()
        try:
            with torch.no_grad():
                return patcher.model.diffusion_model(x, t, context, y, transformer_options={
                    **patcher.model_options["transformer_options"], **options})
        finally:
            patcher.unpatch_model()

    base = comfyui(model)
    torch.testing.assert_close(base, diffusers(), atol=2e-5, rtol=1e-4)
    binding = binding_mod.PPDBinding(unet, named.adapter)
    for weight in (0.5, 1.0, 2.0):
        ppd = comfyui(_apply(model, named, user, weight))
        with torch.no_grad(), binding.user(named.adapter(user.tokens), weight):
            want = diffusers()
        torch.testing.assert_close(ppd, want, atol=2e-5, rtol=1e-4)
        assert (ppd - base).abs().max() > 1e-2  # the user really changes SDXL

