"""SDXL as a second base: tiny real SDXL models on disk, its loaders, and the one binding on its cross-attention."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import sdxl_inputs, stage_c_inputs, trained_looking_adapter

from ppd_train.adapter import KNOWN_SDXL, AdapterConfig, PPDAdapter, load_adapter, save_adapter
from ppd_train.binding import PPDAttnProcessor, PPDBinding, model_info
from ppd_train.errors import FileFormatError, IncompatibleError
from ppd_train.sdxl import load_sdxl, sdxl_attention_layers, sdxl_config, sdxl_info
from ppd_train.tiny import build_tiny_sdxl_unet, sdxl_unet_to_ldm


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def test_real_sdxl_layout_is_known():
    """SDXL 1.0's config gives the 70 attn2 layers of KNOWN_SDXL in forward order (down, mid, up), not diffusers'
    registration order (which puts up_blocks before mid_block)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_config())
    info = sdxl_info(unet)
    assert (info.block_widths, info.block_heads) == KNOWN_SDXL["base"] and info.kind == "base"
    names = [n for n, _ in sdxl_attention_layers(unet)]
    assert names[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert names[24:34] == [f"mid_block.attentions.0.transformer_blocks.{k}.attn2" for k in range(10)]
    assert names[-1] == "up_blocks.1.attentions.2.transformer_blocks.1.attn2"
    assert info.describe() == "SDXL base (70 attention blocks, width 640/1280)"


def test_tiny_sdxl_folder_loads_offline(tiny_sdxl_dir, tiny_sdxl):
    info = model_info(tiny_sdxl)
    assert info.base == "sdxl" and len(info.block_widths) == 11
    assert info.block_widths == (32, 64, 64, 64, 64, 64, 64, 64, 64, 32, 32)  # down 1+2, mid 2, up 4+2
    assert load_sdxl(tiny_sdxl_dir / "unet").config == tiny_sdxl.config  # the unet folder itself works too
    out = _out(tiny_sdxl, sdxl_inputs())
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    names = {p.name for p in tiny_sdxl_dir.iterdir()}
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
            "model_index.json"} <= names


def test_single_file_checkpoint_loads_like_the_folder(tmp_path):
    """A single-file (LDM layout) checkpoint, as artists download them, loads into the same weights."""
    from safetensors.torch import save_file

    unet = build_tiny_sdxl_unet(seed=3)
    ldm = sdxl_unet_to_ldm(unet)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm
    path = tmp_path / "artist_model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    (tmp_path / "config.json").write_text(json.dumps(dict(unet.config)))
    loaded = load_sdxl(path, config=tmp_path / "config.json")
    want, got = unet.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    # without a config, the file must fit SDXL 1.0's: a tiny one does not, and the message says what to pass
    with pytest.raises(IncompatibleError, match="its UNet does not fit SDXL 1.0.s UNet config .*wrong shape.*"
                                                 "Give the checkpoint.s diffusers folder"):
        load_sdxl(path)


def test_sdxl_loader_refuses_pickles_and_other_models(tmp_path, tiny_stage_c_dir):
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(FileFormatError, match="model.ckpt"):
        load_sdxl(ckpt)
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, other)
    with pytest.raises(FileFormatError, match="has no size/pooled-text conditioning .*not SDXL"):
        load_sdxl(other)
    with pytest.raises(FileFormatError, match="no config.json"):
        load_sdxl(tmp_path)
    bin_only = tmp_path / "bin"
    build_tiny_sdxl_unet().save_pretrained(bin_only, safe_serialization=False)
    with pytest.raises(FileFormatError, match="no .safetensors weights"):
        load_sdxl(bin_only)


def test_fresh_adapter_weight_zero_and_no_user_are_bit_identical(tiny_sdxl):
    inputs = sdxl_inputs()
    base = _out(tiny_sdxl, inputs)
    adapter = PPDAdapter(AdapterConfig.for_model(model_info(tiny_sdxl), embed_dim=24, num_tokens=5))
    binding = PPDBinding(tiny_sdxl, adapter)
    with binding.user(adapter(torch.randn(2, 5, 24)), 1.0):  # our processor path equals diffusers' exactly
        assert torch.equal(_out(tiny_sdxl, inputs), base)
    binding.detach()
    trained = trained_looking_adapter(tiny_sdxl)
    binding = PPDBinding(tiny_sdxl, trained)
    kv = trained(torch.randn(2, 5, 24))
    for user, weight in ((kv, 0.0), (None, 1.0), (kv, torch.zeros(2))):
        with binding.user(user, weight):
            assert torch.equal(_out(tiny_sdxl, inputs), base)
    assert torch.equal(_out(tiny_sdxl, inputs), base)
    binding.detach()
    layers = [a for _, a in sdxl_attention_layers(tiny_sdxl)]
    assert not any(isinstance(a.processor, PPDAttnProcessor) for a in layers)


def test_trained_adapter_personalises_sdxl(tiny_sdxl):
    inputs = sdxl_inputs()
    base = _out(tiny_sdxl, inputs)
    adapter = trained_looking_adapter(tiny_sdxl)
    binding = PPDBinding(tiny_sdxl, adapter)
    user_a, user_b = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    with binding.user(adapter(user_a)):
        out_a = _out(tiny_sdxl, inputs)
    with binding.user(adapter(user_b)):
        out_b = _out(tiny_sdxl, inputs)
    assert (out_a - base).abs().max() > 1e-3 and (out_a - out_b).abs().max() > 1e-3
    with binding.user(adapter(user_a), torch.tensor([0.0, 1.0])):  # CFG-style: the uncond row stays the base
        mixed = _out(tiny_sdxl, inputs)
    assert torch.equal(mixed[0], base[0])
    torch.testing.assert_close(mixed[1], out_a[1])
    with binding.user(adapter(user_a), 0.5):
        half = _out(tiny_sdxl, inputs)
    assert 0 < (half - base).abs().max() < (out_a - base).abs().max()
    with pytest.raises(IncompatibleError, match="already has a PPD adapter"):
        PPDBinding(tiny_sdxl, adapter)
    with pytest.raises(IncompatibleError, match="UserKV has 4 blocks, this SDXL has 11"):
        with binding.user(trained_looking_adapter(tiny_sdxl).__class__(
                AdapterConfig((32,) * 4, (2,) * 4, 24, 5, base="sdxl"))(user_a)):
            pass


def test_user_term_is_ip_adapters(tiny_sdxl):
    """The user term is IP-Adapter's: diffusers' own IPAdapterAttnProcessor2_0 with the adapter's K/V projections as
    its to_k_ip/to_v_ip and the projected user tokens as its image tokens gives the same UNet output."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    inputs = sdxl_inputs(batch=1)
    adapter = trained_looking_adapter(tiny_sdxl)
    tokens = torch.randn(1, 5, 24)
    binding = PPDBinding(tiny_sdxl, adapter)
    with binding.user(adapter(tokens), 0.7):
        ours = _out(tiny_sdxl, inputs)
    binding.detach()
    with torch.no_grad():
        u = adapter.user_proj(adapter.user_norm(tokens)) + adapter.token_pos  # the shared projector P(u)
    for (_, attn), block in zip(sdxl_attention_layers(tiny_sdxl), adapter.blocks):
        ip = IPAdapterAttnProcessor2_0(attn.to_q.in_features, u.shape[-1], num_tokens=(5,), scale=0.7)
        ip.to_k_ip[0].weight.data.copy_(block.to_k.weight)
        ip.to_v_ip[0].weight.data.copy_(block.to_v.weight)
        attn.set_processor(ip)
    theirs_inputs = {**inputs, "encoder_hidden_states": (inputs["encoder_hidden_states"], [u.unsqueeze(1)])}
    with torch.no_grad():
        theirs = tiny_sdxl(**theirs_inputs).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_adapter_for_one_base_is_refused_on_the_other(tiny_sdxl, tiny_unet, tmp_path):
    sdxl_adapter, stage_c_adapter = trained_looking_adapter(tiny_sdxl), trained_looking_adapter(tiny_unet)
    with pytest.raises(IncompatibleError, match=r"was made for Stage C custom .* but the SDXL model is SDXL custom"):
        PPDBinding(tiny_sdxl, stage_c_adapter)
    with pytest.raises(IncompatibleError, match=r"was made for SDXL custom .* but the Stage C model is Stage C "):
        PPDBinding(tiny_unet, sdxl_adapter)
    save_adapter(sdxl_adapter, tmp_path / "a.safetensors")  # the base survives the file
    loaded = load_adapter(tmp_path / "a.safetensors")
    assert loaded.config.base == "sdxl" and loaded.config.model == model_info(tiny_sdxl)
    binding = PPDBinding(tiny_sdxl, loaded)
    with binding.user(loaded(torch.randn(1, 5, 24))):
        assert not torch.equal(_out(tiny_sdxl, sdxl_inputs()), _out(tiny_unet, stage_c_inputs())[:, :4, :4, :4])
