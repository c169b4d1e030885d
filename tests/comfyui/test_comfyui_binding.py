"""The ComfyUI binding in-process, on ComfyUI's own Stage C classes: same numbers as the diffusers binding, weight 0
and the unconditional pass bit-identical to vanilla, vanilla again after a PPD run, clear refusals."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from comfyui_support import tiny_adapter


@pytest.fixture(scope="module")
def stage_c_file(comfy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cascade")
    comfy["fixtures"].write_tiny_cascade(str(folder), seed=5)
    return folder


def _user(comfy, seed=3, tokens=5, width=24, embedder="test"):
    UserEmbedding = importlib.import_module("ppd_pack.ppd_train.embedding").UserEmbedding
    return UserEmbedding(torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed)), embedder)


def _named(comfy, adapter, name="tiny.safetensors"):
    return importlib.import_module("ppd_pack.nodes.sockets").NamedAdapter(name, adapter)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 6, 6, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 1, 32, generator=g), torch.zeros(batch, 1, 768))


def _forward(patcher, inputs, options):
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(*inputs, transformer_options=options)
    finally:
        patcher.unpatch_model()


def test_comfyui_and_diffusers_bindings_agree(comfy, stage_c_file):
    """Same Stage C weights (Stability's file layout) loaded by ComfyUI and by diffusers, same adapter and user."""
    stage_c = importlib.import_module("ppd_pack.ppd_train.stage_c")
    apply_adapter = importlib.import_module("ppd_pack.nodes.stage_c_patch").apply_adapter
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c")
    config = stage_c_file / "diffusers_config.json"
    config.write_text(json.dumps(stage_c.stage_c_shape(32, 2, (1, 1), 32, 768, 0.0)))
    unet = stage_c.load_stage_c(stage_c_file / "tiny_stage_c.safetensors", config=config)
    adapter = tiny_adapter(comfy, 24, 5, "test")
    user = _user(comfy)
    x, r, text, pooled, image = inputs = _inputs()
    options = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    with torch.no_grad():
        base = _forward(model, inputs, options)
        base_d = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=image).sample
    torch.testing.assert_close(base, base_d, atol=2e-5, rtol=1e-4)
    binding = stage_c.PPDBinding(unet, adapter)
    for weight in (0.5, 1.0, 2.0):
        ppd = _forward(apply_adapter(model, _named(comfy, adapter), user, weight, 0.0, 1.0), inputs, options)
        with torch.no_grad(), binding.user(adapter(user.tokens), weight):
            ppd_d = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=image).sample
        torch.testing.assert_close(ppd, ppd_d, atol=2e-5, rtol=1e-4)
        assert (ppd - base).abs().max() > 1e-2  # the user really changes Stage C


def test_uncond_rows_window_and_weight_zero_are_vanilla(comfy, stage_c_file):
    apply_adapter = importlib.import_module("ppd_pack.nodes.stage_c_patch").apply_adapter
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c")
    adapter, user = _named(comfy, tiny_adapter(comfy, 24, 5, "test")), _user(comfy)
    inputs = _inputs()
    cfg_batch = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0])}
    base = _forward(model, inputs, cfg_batch)
    ppd = _forward(apply_adapter(model, adapter, user, 1.0, 0.0, 1.0), inputs, cfg_batch)
    assert torch.equal(ppd[1], base[1]) and not torch.equal(ppd[0], base[0])  # uncond chunk untouched
    assert torch.equal(_forward(apply_adapter(model, adapter, user, 0.0, 0.0, 1.0), inputs, cfg_batch), base)
    # outside the start/end window (sigma above the start) the user is off
    late = apply_adapter(model, adapter, user, 1.0, 0.5, 1.0)
    big_sigma = {"cond_or_uncond": [0, 0], "sigmas": torch.tensor([500.0])}
    assert torch.equal(_forward(late, inputs, big_sigma), _forward(model, inputs, big_sigma))
    assert not torch.equal(_forward(late, inputs, {"cond_or_uncond": [0, 0], "sigmas": torch.tensor([0.01])}),
                           _forward(model, inputs, {"cond_or_uncond": [0, 0], "sigmas": torch.tensor([0.01])}))
    # two users stack; the input MODEL stays untouched
    two = apply_adapter(apply_adapter(model, adapter, user, 1.0, 0.0, 1.0), adapter, _user(comfy, 9), 1.0, 0.0, 1.0)
    assert not torch.equal(_forward(two, inputs, cfg_batch), ppd)
    assert torch.equal(_forward(model, inputs, cfg_batch), base)


def test_sigma_is_read_once_per_model_call(comfy, stage_c_file):
    """Reading the sigma syncs a GPU: every attention block of one call must share one reading, and the next call
    (a new sigmas tensor) must read again."""
    from torch.overrides import TorchFunctionMode

    apply_adapter = importlib.import_module("ppd_pack.nodes.stage_c_patch").apply_adapter
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c")
    patched = apply_adapter(model, _named(comfy, tiny_adapter(comfy, 24, 5, "test")), _user(comfy), 1.0, 0.5, 1.0)
    reads = []

    class CountSigmaReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.max and args and args[0] is options["sigmas"]:
                reads.append(1)
            return func(*args, **(kwargs or {}))

    inputs = _inputs()
    outputs = []
    for sigma in (500.0, 0.01):  # outside, then inside the window
        options = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([sigma])}
        with CountSigmaReads():
            outputs.append(_forward(patched, inputs, options))
        assert torch.equal(outputs[-1][1], _forward(model, inputs, options)[1])  # uncond chunk vanilla
    assert len(reads) == 2  # one per call, not one per attention block (the tiny Stage C has 4)
    assert torch.equal(outputs[0], _forward(model, inputs, {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([500.0])}))
    assert not torch.equal(outputs[1][0], _forward(model, inputs, options)[0])


def test_sampling_weight_zero_equals_stock_ksampler_and_vanilla_returns(comfy, stage_c_file):
    """Through ComfyUI's real sampling path: PPD Stage C Sampler at weight 0 == stock KSampler, bit for bit, and a
    stock run after a PPD run is vanilla again (object patches are restored)."""
    import nodes as comfy_nodes

    sampler_node = importlib.import_module("ppd_pack.nodes.adapter_nodes").PPDStageCSampler()
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c")
    text = comfy["fixtures"].text_conditioning
    pos, neg = text("a lighthouse"), text("blurry")
    latent = {"samples": torch.zeros(1, 16, 6, 6)}
    adapter, user = _named(comfy, tiny_adapter(comfy, 24, 5, "test")), _user(comfy)
    settings = dict(seed=3, steps=4, cfg=4.0, sampler_name="euler_ancestral", scheduler="simple")

    def stock():
        return comfy_nodes.KSampler().sample(model, positive=pos, negative=neg, latent_image=latent, denoise=1.0,
                                             **settings)[0]["samples"]

    def ppd(weight):
        return sampler_node.sample(model, adapter, user, pos, neg, latent, denoise=1.0, weight=weight,
                                   start_percent=0.0, end_percent=1.0, **settings)[0]["samples"]

    vanilla = stock()
    personal = ppd(1.0)
    assert not torch.equal(personal, vanilla)
    assert torch.equal(stock(), vanilla)
    assert torch.equal(ppd(0.0), vanilla)


def test_bf16_stage_c(comfy, stage_c_file):
    apply_adapter = importlib.import_module("ppd_pack.nodes.stage_c_patch").apply_adapter
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c", torch.bfloat16)
    adapter, user = _named(comfy, tiny_adapter(comfy, 24, 5, "test")), _user(comfy)
    inputs = tuple(t.to(torch.bfloat16) for t in _inputs())
    options = {"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0])}
    base = _forward(model, inputs, options)
    ppd = _forward(apply_adapter(model, adapter, user, 1.0, 0.0, 1.0), inputs, options)
    assert ppd.dtype == torch.bfloat16 and torch.isfinite(ppd.float()).all()
    assert torch.equal(ppd[1], base[1]) and not torch.equal(ppd[0], base[0])
    assert adapter.adapter.user_proj.weight.dtype == torch.float32  # the shared CPU copy is never cast


def test_refusals_say_what_to_do(comfy, stage_c_file):
    patch = importlib.import_module("ppd_pack.nodes.stage_c_patch")
    IncompatibleError = importlib.import_module("ppd_pack.ppd_train.errors").IncompatibleError
    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    model = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_c.safetensors"), "c")
    stage_b = comfy["fixtures"].load_stage(str(stage_c_file / "tiny_stage_b.safetensors"), "b")
    good = _named(comfy, tiny_adapter(comfy, 24, 5, "vlm:llava:direct:all"))
    user = _user(comfy, embedder="vlm:llava:direct:all")
    with pytest.raises(IncompatibleError, match="needs a Stable Cascade Stage C model, got StageB"):
        patch.apply_adapter(stage_b, good, user, 1.0, 0.0, 1.0)
    lite = adapter_mod.PPDAdapter(adapter_mod.AdapterConfig.for_model(
        adapter_mod.ModelInfo((1536,) * 32, (24,) * 32), 24, 5, embedder="vlm:llava:direct:all"))
    with pytest.raises(IncompatibleError, match="made for Stage C lite .* but the connected Stage C is Stage C custom"):
        patch.apply_adapter(model, _named(comfy, lite, "lite.safetensors"), user, 1.0, 0.0, 1.0)
    with pytest.raises(IncompatibleError, match="embedder 'vlm:other:cot:all'.*Re-embed"):
        patch.apply_adapter(model, good, _user(comfy, embedder="vlm:other:cot:all"), 1.0, 0.0, 1.0)
    with pytest.raises(IncompatibleError, match="start_percent"):
        patch.apply_adapter(model, good, user, 1.0, 0.8, 0.2)


@pytest.mark.parametrize("kind", ["lite", "full"])
def test_released_stage_c_sizes_are_recognised(comfy, kind):
    """ComfyUI's own lite/full Stage C configs (built on the meta device, no weights): every attention block is
    found, in forward order, and a matching adapter is accepted while the other size is refused."""
    import comfy.model_patcher
    import comfy.supported_models

    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    patch = importlib.import_module("ppd_pack.nodes.stage_c_patch")
    IncompatibleError = importlib.import_module("ppd_pack.ppd_train.errors").IncompatibleError
    config = {"stable_cascade_stage": "c"}  # ComfyUI's defaults are Stage C full
    if kind == "lite":  # what comfy.model_detection sets for a 1536-wide clip_txt_mapper
        config.update(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]])
    model_config = comfy.supported_models.Stable_Cascade_C(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device="cpu")
    paths, info = patch.stage_c_of(patcher)
    width, heads, count = adapter_mod.KNOWN_STAGE_C[kind]
    assert info.kind == kind and len(paths) == count and paths[0].startswith("diffusion_model.down_blocks.0.")
    user = _user(comfy, embedder="vlm:llava:direct:all")
    for other, (w, h, n) in adapter_mod.KNOWN_STAGE_C.items():
        with torch.device("meta"):
            adapter = adapter_mod.PPDAdapter(adapter_mod.AdapterConfig.for_model(
                adapter_mod.ModelInfo((w,) * n, (h,) * n), 24, 5, embedder="vlm:llava:direct:all"))
        if other == kind:
            patched = patch.apply_adapter(patcher, _named(comfy, adapter), user, 1.0, 0.0, 1.0)
            assert all(isinstance(patched.get_model_object(p), patch.UserAttention) for p in paths)
            assert not isinstance(patcher.get_model_object(paths[0]), patch.UserAttention)
        else:
            with pytest.raises(IncompatibleError, match=f"made for Stage C {other}"):
                patch.apply_adapter(patcher, _named(comfy, adapter), user, 1.0, 0.0, 1.0)
