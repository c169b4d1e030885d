"""Tune User Embedding in-process on ComfyUI's own classes: the fixture pack's tiny Stage C, ComfyUI's Stage C VAE
(``StageC_coder``) and a tiny CLIP with CLIP-G's settings, all made under ``torch.inference_mode()`` as ComfyUI's
loaders make them. The node tunes, the user's inputs stay untouched, an interrupt ends it cleanly, bad inputs are
refused with the sampler's messages."""

from __future__ import annotations

import importlib

import pytest
import torch
from comfyui_support import model_weights, run_tune, tiny_adapter, tune_leaving_inputs_alone

IMAGE_SIZE = 128  # 4x4 Stage C latents: seconds on a CPU


def _mod(name):
    return importlib.import_module(f"ppd_pack.{name}")


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    """A user who prefers warm, bright images to cold, dark ones (12 pairs), and ComfyUI models made the way its
    loaders make them (inside inference mode, so their weights are inference tensors)."""
    from helpers import write_color_pairs

    folder = tmp_path_factory.mktemp("tune")
    pairs_dir = write_color_pairs(folder / "anna", 12, IMAGE_SIZE)
    pairs, _ = _mod("nodes.pair_nodes").load_pair_source(pairs_dir, "", 12, "first", 0)
    fixtures = comfy["fixtures"]
    with torch.inference_mode():
        fixtures.write_tiny_cascade(str(folder), seed=5)
        model = fixtures.load_stage(str(folder / "tiny_stage_c.safetensors"), "c")
        stage_b = fixtures.load_stage(str(folder / "tiny_stage_b.safetensors"), "b")
        import comfy.sd as comfy_sd
        import comfy.utils as comfy_utils

        stage_a = comfy_sd.VAE(sd=comfy_utils.load_torch_file(str(folder / "tiny_stage_a.safetensors")))
        vae, clip = fixtures.stage_c_vae(seed=2), fixtures.tiny_clip(seed=3)
        start = _mod("ppd_train.embedding").UserEmbedding(
            torch.randn(5, 24, generator=torch.Generator().manual_seed(4)), "test", {"user_id": "anna"})
    adapter = _mod("nodes.sockets").NamedAdapter("tiny.safetensors", tiny_adapter(comfy, 24, 5, "test"))
    return dict(stage_c_file=str(folder / "tiny_stage_c.safetensors"), pairs=pairs, model=model, stage_b=stage_b,
                stage_a=stage_a, vae=vae, clip=clip, start=start, adapter=adapter)


def _tune(world, **over):
    return run_tune(world, IMAGE_SIZE, **over)


def test_tunes_the_user_and_leaves_the_inputs_alone(comfy, world):
    tuned, report = tune_leaving_inputs_alone(world, IMAGE_SIZE)
    meta = tuned.meta["tuned"]
    assert meta["pairs_hash"] == _mod("ppd_train.pairs").content_hash(world["pairs"])
    assert f"{meta['steps']} steps in" in report


def test_the_tuned_user_samples_and_weight_zero_is_vanilla(comfy, world):
    """The tuned embedding goes straight into the PPD Stage C Sampler: at weight 0 it is the stock KSampler bit for bit,
    at weight 1 it samples differently from the start (the tuning reached the sampler)."""
    import nodes as comfy_nodes

    tuned, _ = _tune(world)
    sampler = _mod("nodes.adapter_nodes").PPDStageCSampler()
    text = comfy["fixtures"].text_conditioning
    pos, neg = text("a lighthouse, view 0"), text("blurry")
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    settings = dict(seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)

    def ppd(user, weight):
        return sampler.sample(world["model"], world["adapter"], user, pos, neg, latent, weight=weight,
                              start_percent=0.0, end_percent=1.0, **settings)[0]["samples"]

    def stock():
        return comfy_nodes.KSampler().sample(world["model"], positive=pos, negative=neg, latent_image=latent,
                                             **settings)[0]["samples"]

    vanilla = stock()
    assert torch.equal(ppd(tuned, 0.0), vanilla)
    _tune(world, steps=2)
    assert torch.equal(stock(), vanilla)  # tuning leaves ComfyUI's Stage C as it was
    assert not torch.equal(ppd(tuned, 1.0), ppd(world["start"], 1.0))


def test_latents_are_prepares_and_the_unet_is_comfyuis(comfy, world, tmp_path):
    """Images: the VAE's EfficientNet weights saved as an effnet file and read by ppd_train's loader give the node's
    latents exactly (prepare's path). Stage C: the diffusers model built from ComfyUI's weights computes what
    ComfyUI's own Stage C computes."""
    tn = _mod("nodes.tune_nodes")
    effnet_mod = _mod("ppd_train.effnet")
    io = _mod("ppd_train.safetensors_io")
    with torch.inference_mode():
        sd = world["vae"].first_stage_model.state_dict()
    with torch.inference_mode(False):
        eff = tn.effnet_from_vae_weights(sd)
        io.atomic_save_safetensors({k: v.clone() for k, v in eff.state_dict().items()}, tmp_path / "effnet.safetensors",
                                   {})
        data = tn.pairs_data(world["pairs"], "anna", eff, lambda c: (torch.zeros(77, 32), torch.zeros(1, 32)),
                             IMAGE_SIZE)
        loaded = effnet_mod.load_effnet(tmp_path / "effnet.safetensors")
        with torch.no_grad():  # prepare's batches: 8 pairs, preferred and dispreferred interleaved
            images = [im for p in world["pairs"] for im in (p.chosen.load(), p.rejected.load())]
            expected = torch.cat([loaded(effnet_mod.preprocess(images[s:s + 16], IMAGE_SIZE))
                                  for s in range(0, len(images), 16)])
        assert torch.equal(data.latents_w, expected[0::2]) and torch.equal(data.latents_l, expected[1::2])
        assert torch.isfinite(expected).all() and expected.std() > 0
        assert data.latents_w.shape == (12, 16, 4, 4) and data.text.shape == (3, 77, 32)

    with torch.inference_mode():  # a fresh MODEL: calling diffusion_model directly bypasses ComfyUI's patch state
        model = comfy["fixtures"].load_stage(world["stage_c_file"], "c")
        sd = model.model.diffusion_model.state_dict()
    with torch.inference_mode(False):
        unet = tn.unet_from_state_dict(tn.diffusers_config(model.model.model_config.unet_config), sd, "cpu",
                                       torch.float32)
        assert all(not p.is_inference() for p in unet.parameters())  # autograd can save them
        g = torch.Generator().manual_seed(0)
        x, r = torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g)
        text, pooled = torch.randn(2, 77, 32, generator=g), torch.randn(2, 1, 32, generator=g)
        img = torch.zeros(2, 1, 768)
        with torch.no_grad():
            ours = unet(sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=img).sample
            theirs = model.model.diffusion_model(x, r, text, pooled, img)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_interrupt_ends_the_prompt_cleanly(comfy, world):
    """ComfyUI's Cancel during tuning: the node raises ComfyUI's InterruptProcessingException (so the prompt ends as
    interrupted), the flag is consumed, the inputs are untouched, and the next run works."""
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    start_tokens = world["start"].tokens.clone()
    before = model_weights(world["model"])
    seen = []

    def hook(value, total, preview, node_id=None):  # what the server's progress hook sees
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _tune(world, steps=50)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert max(seen) == 3 and not mm.processing_interrupted()
    assert torch.equal(world["start"].tokens, start_tokens)
    assert all(torch.equal(v, before[k]) for k, v in world["model"].model.diffusion_model.state_dict().items())
    tuned, report = _tune(world, steps=2)
    assert "2 steps in" in report and torch.isfinite(tuned.tokens).all()


def test_refusals_say_what_to_do(comfy, world):
    IncompatibleError = _mod("ppd_train.errors").IncompatibleError
    PPDError = _mod("ppd_train.errors").PPDError
    adapter_mod = _mod("ppd_train.adapter")
    UserEmbedding = _mod("ppd_train.embedding").UserEmbedding
    with pytest.raises(IncompatibleError, match="not the Stable Cascade Stage C VAE.*effnet_encoder"):
        _tune(world, vae=world["stage_a"])
    with torch.inference_mode():
        previewer_only = comfy["fixtures"].stage_c_vae(seed=2, calibrate=False)
    with pytest.raises(IncompatibleError, match="previewer only"):
        _tune(world, vae=previewer_only)
    with pytest.raises(IncompatibleError, match="needs a Stable Cascade Stage C model, got StageB"):
        _tune(world, model=world["stage_b"])
    lite = adapter_mod.PPDAdapter(adapter_mod.AdapterConfig.for_model(
        adapter_mod.ModelInfo((1536,) * 32, (24,) * 32), 24, 5, embedder="test"))
    named = _mod("nodes.sockets").NamedAdapter("lite.safetensors", lite)
    with pytest.raises(IncompatibleError, match="'lite.safetensors' was made for Stage C lite .* but the connected"):
        _tune(world, ppd_adapter=named)
    with pytest.raises(IncompatibleError, match="embedder 'other'.*Re-embed"):
        _tune(world, user_embedding=UserEmbedding(torch.randn(5, 24), "other"))
    with pytest.raises(PPDError, match="No preference pairs"):
        _tune(world, pairs=[])
    with pytest.raises(PPDError, match="'lr'"):
        _tune(world, lr=float("nan"))
