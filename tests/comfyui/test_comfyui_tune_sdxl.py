"""Tune User Embedding on an SDXL MODEL, in process on ComfyUI's own classes: the fixture pack's tiny SDXL
(``comfy.model_base.SDXL``), ComfyUI's SD/SDXL VAE class holding a tiny diffusers ``AutoencoderKL``'s weights (as Load
Checkpoint / Load VAE convert a diffusers VAE) and a CLIP with SDXL's two text encoders' settings, all made under
``torch.inference_mode()`` as ComfyUI's loaders make them. The node tunes through ppd_train's one tune loop; the user's
inputs stay untouched; the tuned user samples through Apply PPD Adapter and the stock KSampler; the node's latents are
``prepare``'s; bad inputs are refused before any heavy work."""

from __future__ import annotations

import importlib

import pytest
import torch
from comfyui_support import model_weights, run_tune, tiny_adapter, tune_leaving_inputs_alone

IMAGE_SIZE = 64  # 8x8 SDXL latents: seconds on a CPU


def _mod(name):
    return importlib.import_module(f"ppd_pack.{name}")


def _diffusers_vae(seed: int = 6):
    """A tiny SDXL-shaped diffusers VAE (4 latent channels, 1/8 size, SDXL's scaling factor) that ComfyUI's own VAE
    class can hold (32 normalisation groups, as ComfyUI's encoder has)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=IMAGE_SIZE, scaling_factor=0.13025).eval()


def _comfy_vae(diffusers_vae):
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    return comfy.sd.VAE(sd={k: v.clone() for k, v in diffusers_vae.state_dict().items()},
                        config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    """A user who prefers warm, bright images to cold, dark ones (12 pairs of 64 px), and ComfyUI SDXL objects made
    the way its loaders make them (inside inference mode, so their weights are inference tensors)."""
    from helpers import write_color_pairs

    folder = tmp_path_factory.mktemp("tune_sdxl") / "anna"
    write_color_pairs(folder, 12, IMAGE_SIZE)
    pairs, _ = _mod("nodes.pair_nodes").load_pair_source(folder, "", 12, "first", 0)
    fixtures = comfy["fixtures"]
    diffusers_vae = _diffusers_vae()
    with torch.inference_mode():
        model = fixtures.tiny_sdxl(seed=4)
        vae, clip = _comfy_vae(diffusers_vae), fixtures.tiny_sdxl_clip(seed=3)
        stage_c_vae = fixtures.stage_c_vae(seed=2)
    start = _mod("ppd_train.embedding").UserEmbedding(
        torch.randn(5, 24, generator=torch.Generator().manual_seed(4)), "test", {"user_id": "anna"})
    info = _mod("nodes.sdxl_patch").sdxl_of(model)[1]
    adapter = _mod("nodes.sockets").NamedAdapter("tiny_sdxl.safetensors", tiny_adapter(comfy, 24, 5, "test",
                                                                                        info=info))
    return dict(pairs=pairs, model=model, clip=clip, vae=vae, start=start, adapter=adapter,
                diffusers_vae=diffusers_vae, stage_c_vae=stage_c_vae)


def _tune(world, **over):
    return run_tune(world, IMAGE_SIZE, **over)


def test_tunes_an_sdxl_user_and_leaves_the_inputs_alone(comfy, world):
    tune_leaving_inputs_alone(world, IMAGE_SIZE)


def test_the_tuned_user_samples_with_apply_ppd_adapter_and_the_stock_ksampler(comfy, world):
    """The tuned embedding goes straight into Apply PPD Adapter before the stock KSampler: at weight 0 that is the
    stock KSampler bit for bit, at weight 1 it samples differently from the start; tuning leaves the MODEL as it was."""
    import nodes as comfy_nodes

    tuned, _ = _tune(world)
    clip = world["clip"]
    with torch.inference_mode():
        pos, neg = (comfy_nodes.CLIPTextEncode().encode(clip, t)[0] for t in ("a lighthouse, view 0", "blurry"))

    def sample(model):
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return comfy_nodes.KSampler().sample(model, seed=3, steps=3, cfg=5.0, sampler_name="euler",
                                             scheduler="normal", positive=pos, negative=neg, latent_image=latent,
                                             denoise=1.0)[0]["samples"]

    def ppd(user, weight):
        return sample(_mod("nodes.adapter_nodes").PPDApplyAdapter().apply(world["model"], world["adapter"], user,
                                                                          weight, 0.0, 1.0)[0])

    vanilla = sample(world["model"])
    assert torch.equal(ppd(tuned, 0.0), vanilla)
    _tune(world, steps=2)
    assert torch.equal(sample(world["model"]), vanilla)  # tuning leaves ComfyUI's SDXL as it was
    assert not torch.equal(ppd(tuned, 1.0), ppd(world["start"], 1.0))


def test_node_data_is_prepares_and_the_unet_is_comfyuis(comfy, world):
    """Images: ComfyUI's VAE through the node gives the latents (and size/crop numbers) that prepare's SDXL path gives
    with the diffusers VAE of the same weights. Text: what ComfyUI's CLIP gives KSampler, cut to 77 tokens. The
    diffusers SDXL built from ComfyUI's weights computes what ComfyUI's own UNet computes."""
    tn = _mod("nodes.tune_nodes")
    prepare = _mod("ppd_train.prepare")
    model, clip, pairs = world["model"], world["clip"], world["pairs"]
    latent_format = model.get_model_object("latent_format")
    captions = []

    def encode_one(caption):
        captions.append(caption)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        return tn.text_tokens(cond, pooled)

    with torch.inference_mode():
        data = tn.sdxl_pairs_data(pairs, "anna", tn.vae_latents(world["vae"], latent_format), encode_one, IMAGE_SIZE)
    vae = world["diffusers_vae"]
    with torch.no_grad():
        want_w, want_l, want_ids = prepare.sdxl_pair_images(
            pairs, IMAGE_SIZE, lambda x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    assert data.base == "sdxl" and data.latents_w.shape == (12, 4, 8, 8) and want_w.abs().max() > 0.01
    torch.testing.assert_close(data.latents_w, want_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(data.latents_l, want_l, atol=1e-6, rtol=1e-5)
    assert torch.equal(data.time_ids, want_ids) and data.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    assert captions == sorted(set(captions), key=captions.index) and len(captions) == 3 == len(data.text)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(captions[1]), return_pooled=True)
    assert torch.equal(data.text[1], cond[0]) and torch.equal(data.pooled[1], pooled)
    assert data.text.shape == (3, 77, 32) and data.pooled.shape == (3, 1, comfy["fixtures"].SDXL_POOLED_WIDTH)

    config = tn.sdxl_diffusers_config(model.model.model_config.unet_config)
    data.check_fits(config, "the pairs", "the MODEL")
    with torch.inference_mode():
        fresh = comfy["fixtures"].tiny_sdxl(seed=4)  # calling the UNet directly bypasses ComfyUI's patch state
        sd = fresh.model.diffusion_model.state_dict()
    with torch.inference_mode(False):
        unet = tn.sdxl_unet_from_state_dict(config, sd, "cpu", torch.float32)
        assert all(not p.is_inference() for p in unet.parameters())  # autograd can save them
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 120.0])
        text, pooled = torch.randn(2, 77, 32, generator=g), torch.randn(2, 16, generator=g)
        time_ids = torch.tensor([[64.0, 48.0, 8.0, 0.0, 64.0, 64.0]] * 2)
        with torch.no_grad():
            ours = unet(x, t, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            y = fresh.model.encode_adm(pooled_output=pooled, height=64, width=48, crop_h=8, crop_w=0,
                                       target_height=64, target_width=64)  # ComfyUI's own size/crop embedding
            theirs = fresh.model.diffusion_model(x, t, text, y)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_interrupt_ends_the_prompt_cleanly(comfy, world):
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    before = model_weights(world["model"])

    def hook(value, total, preview, node_id=None):
        if value == 3:
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _tune(world, steps=50)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
    assert not mm.processing_interrupted()
    assert all(torch.equal(v, before[k]) for k, v in world["model"].model.diffusion_model.state_dict().items())
    tuned, report = _tune(world, steps=2)
    assert "2 steps in" in report and torch.isfinite(tuned.tokens).all()


def test_sdxl_refusals_say_what_to_do(comfy, world):
    """Each refusal comes before any image is encoded: a Stage C VAE or CLIP on SDXL, a v-prediction SDXL, an
    adapter made for Stage C, another embedder, no pairs."""
    from comfy.model_sampling import V_PREDICTION
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    IncompatibleError = _mod("ppd_train.errors").IncompatibleError
    PPDError = _mod("ppd_train.errors").PPDError
    UserEmbedding = _mod("ppd_train.embedding").UserEmbedding
    with pytest.raises(IncompatibleError, match="not an SDXL VAE .*16-channel.*Load Checkpoint"):
        _tune(world, vae=world["stage_c_vae"])
    with torch.inference_mode():
        wide_clip = comfy["fixtures"].tiny_clip(seed=3)  # Stage C's CLIP-G settings: pooled as wide as the text
    with pytest.raises(IncompatibleError, match=r"CLIP gives text of width 32 \(pooled 32\), but the connected SDXL "
                                                r"model reads 32 \(pooled 16\).*same checkpoint"):
        _tune(world, clip=wide_clip)
    v_pred = ModelSamplingDiscrete().patch(world["model"], "v_prediction", False)[0]  # ComfyUI's own node
    assert isinstance(v_pred.get_model_object("model_sampling"), V_PREDICTION)
    with pytest.raises(IncompatibleError, match="noise-predicting \\(eps\\) SDXL models, but this MODEL samples as "
                                                "V_PREDICTION"):
        _tune(world, model=v_pred)
    stage_c_adapter = _mod("nodes.sockets").NamedAdapter("stage_c.safetensors", tiny_adapter(comfy, 24, 5, "test"))
    with pytest.raises(IncompatibleError, match="'stage_c.safetensors' was made for Stage C .*but the connected SDXL "
                                                "model is SDXL"):
        _tune(world, ppd_adapter=stage_c_adapter)
    with pytest.raises(IncompatibleError, match="embedder 'other'.*Re-embed"):
        _tune(world, user_embedding=UserEmbedding(torch.randn(5, 24), "other"))
    with pytest.raises(PPDError, match="No preference pairs"):
        _tune(world, pairs=[])
