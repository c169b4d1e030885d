"""Tune User Embedding without ComfyUI: its images and captions become exactly the DPO data ``prepare`` makes, a Stage C
state dict in ComfyUI's layout becomes a working diffusers Stage C (shared, or copied when autograd could not use the
tensors), refusals, the report. tests/comfyui/test_comfyui_tune.py runs the node itself in a real ComfyUI."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import stage_c_inputs, write_pair_folder

from ppd_train.pairs import load_pair_folder
from ppd_train.prepare import ClipTextEncoder, encode_pairs
from ppd_train.safetensors_io import read_safetensors
from ppd_train.stage_c import stage_c_config, stage_c_shape
from ppd_train.tiny import build_tiny_stage_c


@pytest.fixture(scope="module")
def tn(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.tune_nodes")


@pytest.fixture(scope="module")
def IncompatibleError(pack):  # noqa: N802 - the pack's own class (the pack is loaded as a package of its own)
    return importlib.import_module(f"{pack.__name__}.ppd_train.errors").IncompatibleError


# ComfyUI's unet_config of the fixture pack's tiny Stage C, and what comfy.model_detection sets for lite / full
TINY = dict(stable_cascade_stage="c", c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=32, c_hidden=[32, 32],
            nhead=[2, 2], blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
            c_clip_text=32, c_clip_text_pooled=32, c_clip_img=768, c_clip_seq=4, kernel_size=3, dropout=[0.0, 0.0],
            self_attn=True, t_conds=["sca", "crp"], switch_level=[False])
LITE = dict(stable_cascade_stage="c", c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]])


def test_configs_map_and_other_models_are_refused(tn, IncompatibleError):  # noqa: N803
    assert tn.diffusers_config(TINY) == stage_c_shape(32, 2, (1, 1), 32, 768, 0.0)
    assert tn.diffusers_config(LITE) == {**stage_c_config("lite"), "dropout": (0.0, 0.0)}
    assert tn.diffusers_config({"stable_cascade_stage": "c", "c_cond": 2048}) == {**stage_c_config("full"),
                                                                                   "dropout": (0.0, 0.0)}
    stage_b = dict(stable_cascade_stage="b", c_in=4, c_out=4, c_hidden=[320, 640, 1280, 1280], nhead=[-1, -1, 20, 20],
                   blocks=[[2, 6, 28, 6], [6, 28, 6, 2]], level_config=["CT", "CT", "CTA", "CTA"])
    for other in (stage_b, {**TINY, "c_hidden": [32, 64]}, {**TINY, "level_config": ["CT", "CTA"]}):
        with pytest.raises(IncompatibleError, match="supports Stable Cascade Stage C"):
            tn.diffusers_config(other)


def _comfy_layout(unet) -> dict:
    """A diffusers Stage C's weights under ComfyUI's names (``attention.attn.to_q``, ``attention.attn.out_proj``)."""
    def comfy_key(k: str) -> str:
        return k.replace(".attention.to_out.0.", ".attention.attn.out_proj.").replace(".attention.to_",
                                                                                      ".attention.attn.to_")

    return {comfy_key(k): v for k, v in unet.state_dict().items()}


def test_unet_from_comfy_weights_shares_or_copies(tn, IncompatibleError):  # noqa: N803
    ref = build_tiny_stage_c(seed=3)
    sd = _comfy_layout(ref)
    assert any(".attention.attn.out_proj." in k for k in sd) and any(".attention.attn.to_k." in k for k in sd)
    config = tn.diffusers_config(TINY | {"c_clip_img": 32})
    inputs = stage_c_inputs()
    with torch.no_grad():
        expected = ref(**inputs).sample
    shared = tn.unet_from_state_dict(config, sd, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(shared(**inputs).sample, expected, atol=1e-5, rtol=1e-5)
    # usable tensors are shared, not copied: no second Stage C in memory
    assert shared.clip_txt_mapper.weight.data_ptr() == ref.clip_txt_mapper.weight.data_ptr()
    assert not any(p.requires_grad for p in shared.parameters()) and not shared.training

    with torch.inference_mode():  # what ComfyUI's loaders hold: autograd cannot save these for backward
        frozen = {k: v.clone() for k, v in sd.items()}
    copied = tn.unet_from_state_dict(config, frozen, "cpu", torch.float32)
    assert not any(p.is_inference() for p in copied.parameters())
    x = inputs["sample"].clone().requires_grad_(True)
    copied(**{**inputs, "sample": x}).sample.square().sum().backward()  # a gradient flows through the copy
    assert x.grad is not None and x.grad.abs().sum() > 0
    half = tn.unet_from_state_dict(config, sd, "cpu", torch.bfloat16)
    assert half.clip_txt_mapper.weight.dtype == torch.bfloat16 and ref.clip_txt_mapper.weight.dtype == torch.float32

    with pytest.raises(IncompatibleError, match="do not map onto diffusers' Stage C"):
        tn.unet_from_state_dict(config, {k: v for k, v in sd.items() if "clip_txt_mapper" not in k}, "cpu",
                                torch.float32)


def _vae_weights(effnet_file) -> dict:
    """ComfyUI's Stage C VAE state dict (``StageC_coder``) for an effnet file: ``encoder.*``, its normalisation
    constants, and the previewer's keys."""
    tensors, _ = read_safetensors(effnet_file, "effnet")
    return {**{f"encoder.{k}": v for k, v in tensors.items()}, "encoder.mean": torch.tensor([0.485, 0.456, 0.406]),
            "encoder.std": torch.tensor([0.229, 0.224, 0.225]), "previewer.blocks.0.weight": torch.zeros(512, 16, 1, 1)}


def test_node_data_is_prepares(tn, image_encoders, tmp_path):
    """Pairs through the node's path (the VAE's EfficientNet weights, a caption encoder) are the DPO data that
    ``prepare``'s encode_pairs makes from the effnet file and the same text encoder."""
    from dataclasses import replace

    pairs = load_pair_folder(write_pair_folder(tmp_path / "p", n=10, seed=4))
    pairs[3] = replace(pairs[3], prompt=pairs[0].prompt)  # a repeated caption is stored once
    expected = encode_pairs({"anna": pairs}, image_encoders / "effnet_encoder.safetensors", image_encoders / "clip_g",
                            image_size=64, show_progress=False)
    text_encoder = ClipTextEncoder(image_encoders / "clip_g")
    done = []

    def encode_one(caption: str):
        tokens, pooled = text_encoder.encode([caption])
        return tn.text_tokens(tokens, pooled[:, 0])  # ComfyUI's pooled output is [1, c]

    effnet = tn.effnet_from_vae_weights(_vae_weights(image_encoders / "effnet_encoder.safetensors"))
    data = tn.pairs_data(pairs, "anna", effnet, encode_one, 64, on_batch=done.append)
    assert torch.equal(data.latents_w, expected.latents_w) and torch.equal(data.latents_l, expected.latents_l)
    assert torch.equal(data.caption_idx, expected.caption_idx) and len(data.text) == 9
    torch.testing.assert_close(data.text, expected.text, rtol=1e-5, atol=1e-5)  # batch of 1 vs 8 captions
    torch.testing.assert_close(data.pooled, expected.pooled, rtol=1e-5, atol=1e-5)
    assert data.user_ids == ["anna"] and done == [8, 10]
    long = tn.text_tokens(torch.randn(1, 154, 32), torch.randn(1, 32))  # ComfyUI gives 77 per chunk of a long prompt
    assert long[0].shape == (77, 32) and long[1].shape == (1, 32)


def test_vae_refusals(tn, image_encoders, IncompatibleError):  # noqa: N803
    weights = _vae_weights(image_encoders / "effnet_encoder.safetensors")
    previewer_only = {k: (torch.zeros_like(v) if k.endswith("running_mean") else
                          torch.ones_like(v) if k.endswith("running_var") else v) for k, v in weights.items()}
    with pytest.raises(IncompatibleError, match="previewer only"):
        tn.effnet_from_vae_weights(previewer_only)
    stage_a = {"encoder.0.weight": torch.zeros(1), "vquantizer.codebook.weight": torch.zeros(1)}
    for other in (stage_a, {k: v for k, v in weights.items() if "backbone.3." not in k}):
        with pytest.raises(IncompatibleError, match="not the Stable Cascade Stage C VAE.*effnet_encoder"):
            tn.effnet_from_vae_weights(other)
    with pytest.raises(Exception, match="No preference pairs"):
        tn.pairs_data([], "anna", tn.effnet_from_vae_weights(weights), lambda c: (None, None), 64)


def _report(before, after, kept, val_pairs=3):
    return {"mode": "tokens", "steps": 40, "seconds": 12.34, "pairs": 12, "train_pairs": 12 - val_pairs,
            "val_pairs": val_pairs, "val_before": before, "val_after": after,
            "selected": {"delta": {"step": kept}} if before else {"delta": {"step": 40}}}


def test_report_text(tn):
    text = tn.report_text(_report({"loss": 0.6931, "implicit_acc": 0.5}, {"loss": 0.51234, "implicit_acc": 1.0}, 30),
                          "anna")
    assert text.splitlines() == [
        "Tuned anna on 12 pairs (9 to learn from, 3 held out): 40 steps in 12.3 s.",
        "Held-out DPO loss 0.6931 -> 0.5123, implicit accuracy 50% -> 100% (lower loss is better).",
        "Kept the embedding of step 30, the best on the held-out pairs."]
    same = {"loss": 0.6931, "implicit_acc": 0.5}
    assert "unchanged" in tn.report_text(_report(same, same, 0), "")
    assert "No held-out pairs" in tn.report_text(_report({}, {}, 0, val_pairs=0), "anna")


def test_number_inputs_are_checked(tn):
    node = tn.PPDTuneUserEmbedding
    assert node.VALIDATE_INPUTS(steps=200, seed=0, lr=0.05, batch_size=4, image_size=768) is True
    assert node.VALIDATE_INPUTS() is True  # linked values: checked when the node runs
    for bad in (dict(lr=float("nan")), dict(lr=2.0), dict(steps=0), dict(batch_size=0), dict(image_size=10)):
        problem = node.VALIDATE_INPUTS(**bad)
        assert isinstance(problem, str) and f"'{next(iter(bad))}'" in problem


# ------------------------------------------------------------------------------------------------------------- SDXL
# ComfyUI's unet_config of SDXL 1.0 (what comfy.model_detection reads from its checkpoint, with SDXL's extra config),
# and of a tiny SDXL with the same structure (a first level without attention, as SDXL's)
SDXL_1 = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
              num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
              num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
              transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
              num_heads=-1, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
              use_temporal_resblock=False)
TINY_SDXL = dict(SDXL_1, adm_in_channels=16 + 6 * 256, model_channels=32, num_res_blocks=[1, 1, 1],
                 transformer_depth=[0, 1, 2], channel_mult=[1, 1, 2], transformer_depth_middle=2, context_dim=32,
                 num_head_channels=16, transformer_depth_output=[0, 0, 1, 1, 2, 2])


def test_sdxl_configs_map_and_other_layouts_are_refused(tn, IncompatibleError):  # noqa: N803
    from ppd_train.sdxl import sdxl_config, sdxl_shape

    assert tn.sdxl_diffusers_config(SDXL_1) == sdxl_config()
    assert tn.sdxl_diffusers_config(TINY_SDXL) == sdxl_shape((32, 32, 64), (2, 2, 4), (0, 1, 2), 1, (32, 0), 16, 256,
                                                             32, 128)
    sd15 = dict(SDXL_1, num_classes=None, adm_in_channels=None, use_linear_in_transformer=False, context_dim=768)
    for other in (sd15, TINY, {**TINY_SDXL, "transformer_depth_middle": 1},  # diffusers' middle is the last level's
                  {**TINY_SDXL, "transformer_depth": [0, 1, 1]}, {**TINY_SDXL, "in_channels": 9},  # an inpainting UNet
                  {**TINY_SDXL, "num_head_channels": 24}, {**TINY_SDXL, "use_temporal_attention": True}):
        with pytest.raises(IncompatibleError, match="supports SDXL's UNet layout"):
            tn.sdxl_diffusers_config(other)


def test_sdxl_unet_from_comfy_weights_computes_the_same(tn, IncompatibleError):  # noqa: N803
    """A diffusers SDXL's weights in ComfyUI's layout (the single-file layout without its prefix) become a diffusers
    SDXL again that computes the same, shared when usable, copied (and trainable through) when inference tensors."""
    from diffusers import UNet2DConditionModel
    from helpers import sdxl_inputs

    from ppd_train.sdxl import LDM_UNET_PREFIX
    from ppd_train.tiny import sdxl_unet_to_ldm

    config = tn.sdxl_diffusers_config(TINY_SDXL)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape) * 0.02)  # no zero-initialised layer left
    sd = {k.removeprefix(LDM_UNET_PREFIX): v for k, v in sdxl_unet_to_ldm(ref).items()}
    inputs = sdxl_inputs(text_widths=(16, 16))
    with torch.no_grad():
        expected = ref(**inputs).sample
    shared = tn.sdxl_unet_from_state_dict(config, sd, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(shared(**inputs).sample, expected, atol=1e-5, rtol=1e-5)
    assert shared.conv_in.weight.data_ptr() == ref.conv_in.weight.data_ptr()  # no second UNet in memory
    assert not any(p.requires_grad for p in shared.parameters()) and not shared.training
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in sd.items()}
    copied = tn.sdxl_unet_from_state_dict(config, frozen, "cpu", torch.float32)
    assert not any(p.is_inference() for p in copied.parameters())
    x = inputs["sample"].clone().requires_grad_(True)
    copied(**{**inputs, "sample": x}).sample.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(IncompatibleError, match="SDXL weights do not map onto diffusers' SDXL UNet.*missing"):
        tn.sdxl_unet_from_state_dict(config, {k: v for k, v in sd.items() if not k.startswith("label_emb")}, "cpu",
                                     torch.float32)


def test_sdxl_node_data_is_prepares(tn, tiny_sdxl_dir, tmp_path):
    """Pairs through the node's SDXL path (a VAE's latents, one caption at a time) are the DPO data that
    ``prepare``'s encode_sdxl_pairs makes from the same SDXL folder."""
    from dataclasses import replace

    from ppd_train.prepare import SDXLEncoders, encode_sdxl_pairs

    pairs = load_pair_folder(write_pair_folder(tmp_path / "p", n=10, seed=4))
    pairs[3] = replace(pairs[3], prompt=pairs[0].prompt)
    expected = encode_sdxl_pairs({"anna": pairs}, tiny_sdxl_dir, image_size=16, show_progress=False)
    enc = SDXLEncoders(tiny_sdxl_dir)
    done = []

    def encode_one(caption: str):
        tokens, pooled = enc.encode_text([caption])
        return tn.text_tokens(tokens, pooled[:, 0])

    data = tn.sdxl_pairs_data(pairs, "anna", enc.latents, encode_one, 16, on_batch=done.append)
    assert data.base == expected.base == "sdxl" and torch.equal(data.time_ids, expected.time_ids)
    assert torch.equal(data.latents_w, expected.latents_w) and torch.equal(data.latents_l, expected.latents_l)
    assert torch.equal(data.caption_idx, expected.caption_idx) and len(data.text) == 9
    torch.testing.assert_close(data.text, expected.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.pooled, expected.pooled, rtol=1e-5, atol=1e-5)
    assert done == [8, 10]


def test_sdxl_vae_and_clip_refusals(tn, IncompatibleError):  # noqa: N803
    tn.check_sdxl_vae(4, 8)
    for channels, ratio in ((16, 32), (4, 4)):  # Stage C's VAE, Stage A
        with pytest.raises(IncompatibleError, match=f"not an SDXL VAE \\(it makes {channels}-channel"):
            tn.check_sdxl_vae(channels, ratio)
    config = tn.sdxl_diffusers_config(SDXL_1)
    tn.check_clip(torch.zeros(77, 2048), torch.zeros(1, 1280), config, "the SDXL")
    with pytest.raises(IncompatibleError, match=r"width 1280 \(pooled 1280\), but the SDXL reads 2048 \(pooled "
                                                r"1280\)\. Connect the CLIP of the same checkpoint"):
        tn.check_clip(torch.zeros(77, 1280), torch.zeros(1, 1280), config, "the SDXL")  # Stage C's CLIP-G
