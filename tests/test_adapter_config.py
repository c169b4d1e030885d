"""What an adapter knows about Stage C, its config and metadata, the binding's bookkeeping, and the user-attention
edge cases: every check refuses what it should and accepts what it should."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
from helpers import stage_c_inputs, trained_looking_adapter

from ppd_train.adapter import (
    AdapterConfig,
    ModelInfo,
    UserKV,
    apply_user_attention,
    check_base,
    check_embedding,
    load_adapter,
    save_adapter,
)
from ppd_train.errors import FileFormatError, IncompatibleError
from ppd_train.stage_c import PPDAttnProcessor, PPDBinding, clip_image_dim, stage_c_config, stage_c_info
from ppd_train.tiny import tiny_stage_c_config


def test_stage_c_kinds_and_descriptions():
    assert ModelInfo((1536,) * 32, (24,) * 32).kind == "lite"
    assert ModelInfo((2048,) * 64, (32,) * 64).describe() == "Stage C full (64 attention blocks, width 2048)"
    assert ModelInfo((1536,) * 32, (32,) * 32).kind == "custom"  # lite widths, other heads
    assert ModelInfo((2048,) * 32, (32,) * 32).kind == "custom"  # full width, lite depth
    assert ModelInfo((64, 32, 64), (2, 2, 2)).describe() == "Stage C custom (3 attention blocks, width 32/64)"


def test_released_stage_c_configs_have_the_published_sizes():
    """Stability's model card: Stage C lite 1.03B parameters, full 3.59B (counted on the meta device)."""
    counts = {}
    for kind in ("lite", "full"):
        with torch.device("meta"):
            unet = StableCascadeUNet(**stage_c_config(kind))
        counts[kind] = sum(p.numel() for p in unet.parameters())
        assert stage_c_info(unet).kind == kind
        assert clip_image_dim(unet) == 768
    assert counts == {"lite": 1_030_785_040, "full": 3_589_103_632}
    with pytest.raises(IncompatibleError, match="Unknown Stage C kind 'huge'"):
        stage_c_config("huge")


def test_clip_image_width_falls_back_to_the_text_width():
    with torch.device("meta"):
        unet = StableCascadeUNet(**{**tiny_stage_c_config(clip_dim=24), "clip_image_in_channels": None})
    assert clip_image_dim(unet) == 24


def test_a_unet_without_attention_is_not_stage_c():
    blocks = (("SDCascadeResBlock", "SDCascadeTimestepBlock"),) * 2
    with torch.device("meta"):
        unet = StableCascadeUNet(**{**tiny_stage_c_config(), "block_types_per_layer": blocks})
    with pytest.raises(IncompatibleError, match="no attention blocks"):
        stage_c_info(unet)


def test_config_checks_and_defaults():
    info = ModelInfo((32, 64), (2, 4))
    config = AdapterConfig.for_model(info, embed_dim=24, num_tokens=5, embedder="e")
    assert config.proj_dim == 64 and config.model == info  # projector width: the widest block
    assert AdapterConfig((32, 64), (2, 4), 24, 5, proj_dim=16).proj_dim == 16
    bad = [dict(block_widths=(32,), block_heads=(2, 2)), dict(block_widths=(), block_heads=()),
           dict(block_widths=(30,), block_heads=(4,)), dict(embed_dim=0), dict(num_tokens=0), dict(num_tokens=-1)]
    for change in bad:
        with pytest.raises(IncompatibleError, match="Adapter config"):
            AdapterConfig(**{**dict(block_widths=(32,), block_heads=(2,), embed_dim=4, num_tokens=2), **change})


def test_metadata_round_trip_and_damage():
    config = AdapterConfig((1536,) * 32, (24,) * 32, 3584, 29, embedder="vlm:x", training={"steps": 3})
    d = json.loads(config.to_json())
    assert (d["format"], d["format_version"], d["stage_c_kind"], d["block_count"]) == ("ppd-adapter", 1, "lite", 32)
    back = AdapterConfig.from_dict(d)
    assert back == config and back.training == {"steps": 3} and back.proj_dim == 1536
    narrow = AdapterConfig((64, 64), (2, 2), 24, 5, proj_dim=16)
    assert AdapterConfig.from_dict(json.loads(narrow.to_json())).proj_dim == 16
    with pytest.raises(FileFormatError, match=r"^<adapter> is not a PPD adapter"):
        AdapterConfig.from_dict({})
    assert AdapterConfig.from_dict({k: v for k, v in d.items() if k != "training"}).training == {}
    with pytest.raises(FileFormatError, match=r"x.safetensors: the PPD adapter does not say which embedder made its "
                                              r"tokens \(metadata 'embedder' is None\): the file is damaged"):
        AdapterConfig.from_dict({k: v for k, v in d.items() if k != "embedder"}, "x.safetensors")
    with pytest.raises(FileFormatError, match=r"x.safetensors is not a PPD adapter "
                                              r"\(format='lora', expected 'ppd-adapter'\)"):
        AdapterConfig.from_dict({**d, "format": "lora"}, "x.safetensors")
    for key in ("block_widths", "embed_dim", "proj_dim"):
        with pytest.raises(FileFormatError, match="x.safetensors: adapter metadata is incomplete or damaged"):
            AdapterConfig.from_dict({k: v for k, v in d.items() if k != key}, "x.safetensors")
    with pytest.raises(FileFormatError, match="incomplete or damaged"):
        AdapterConfig.from_dict({**d, "embed_dim": "wide"}, "x.safetensors")
    for key, value in (("embed_dim", "wide"), ("num_tokens", -1), ("proj_dim", 10**9)):  # the message names the key
        with pytest.raises(FileFormatError, match=rf"\({key} = {value!r} is not a whole number between [01] and \d+\)"):
            AdapterConfig.from_dict({**d, key: value}, "x.safetensors")


def test_metadata_limits_are_inclusive_and_damage_names_its_kind():
    """0 and the documented maximum are valid sizes (proj_dim 0 = the widest block), so is the largest block count; a
    field of the wrong type is reported with its exception's type."""
    from ppd_train.adapter import MAX_BLOCKS, MAX_WIDTH

    d = json.loads(AdapterConfig((64, 64), (2, 2), 24, 5, proj_dim=16).to_json())
    assert AdapterConfig.from_dict({**d, "proj_dim": 0}).proj_dim == 64
    assert AdapterConfig.from_dict({**d, "embed_dim": MAX_WIDTH}).embed_dim == MAX_WIDTH
    many = {**d, "block_widths": [64] * MAX_BLOCKS, "block_heads": [2] * MAX_BLOCKS}
    assert len(AdapterConfig.from_dict(many).block_widths) == MAX_BLOCKS
    with pytest.raises(FileFormatError, match=f"{MAX_BLOCKS + 1} blocks"):
        AdapterConfig.from_dict({**many, "block_widths": [64] * (MAX_BLOCKS + 1),
                                 "block_heads": [2] * (MAX_BLOCKS + 1)})
    with pytest.raises(FileFormatError, match=r"incomplete or damaged \(TypeError\("):
        AdapterConfig.from_dict({**d, "block_widths": 64}, "x.safetensors")


def test_user_kv_and_token_layouts(tiny_unet):
    adapter = trained_looking_adapter(tiny_unet)
    tokens = torch.randn(5, 24)
    one, batched = adapter(tokens), adapter(tokens[None])
    assert len(one) == 4 and one.keys[0].shape == (1, 5, 32)
    assert all(torch.equal(a, b) for a, b in zip(one.keys + one.values, batched.keys + batched.values))
    half = one.to(dtype=torch.float16)
    assert half.keys[3].dtype == half.values[3].dtype == torch.float16 and len(half) == 4
    with pytest.raises(IncompatibleError, match=r"shape \(5,\) does not fit"):
        adapter(torch.randn(5))


def test_loaded_adapters_are_frozen_in_the_asked_dtype(tiny_unet, tmp_path):
    save_adapter(trained_looking_adapter(tiny_unet), tmp_path / "a.safetensors")
    loaded = load_adapter(tmp_path / "a.safetensors", dtype=torch.float64)
    assert not loaded.training and all(p.dtype == torch.float64 and not p.requires_grad for p in loaded.parameters())
    assert loaded.config.training == {}


def test_an_adapter_of_unknown_origin_takes_any_embedder_of_its_shape(tiny_unet):
    config = trained_looking_adapter(tiny_unet, embedder="unknown").config
    check_embedding(config, (5, 24), "whatever")
    check_embedding(config, (2, 5, 24), "whatever")  # batched tokens: the last two dimensions count
    with pytest.raises(IncompatibleError, match="5 tokens x 23"):
        check_embedding(config, (5, 23), "whatever")


def test_weights_that_do_not_fit_the_batch():
    g = torch.Generator().manual_seed(0)
    out, q = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    k_u = v_u = torch.randn(1, 2, 8, generator=g)
    attend = torch.nn.functional.scaled_dot_product_attention
    one = apply_user_attention(out.clone(), q, k_u, v_u, torch.tensor([0.5]), attend)  # one entry: every row
    torch.testing.assert_close(one, apply_user_attention(out.clone(), q, k_u, v_u, 0.5, attend))
    with pytest.raises(IncompatibleError, match="Adapter weight has 2 entries for a batch of 3"):
        apply_user_attention(out, q, k_u, v_u, torch.tensor([1.0, 1.0]), attend)
    per_row = torch.randn(3, 2, 8, generator=g)  # one user per row
    got = apply_user_attention(out.clone(), q, per_row, per_row, 1.0, attend)
    torch.testing.assert_close(got[2], out[2] + attend(q[2:], per_row[2:], per_row[2:])[0])


def test_binding_contexts_nest_and_detach_restores(tiny_unet):
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    inputs = stage_c_inputs()
    a, b = adapter(torch.randn(1, 5, 24)), adapter(torch.randn(1, 5, 24))
    with torch.no_grad():
        base = tiny_unet(**inputs).sample
        with binding.user(a):
            only_a = tiny_unet(**inputs).sample
        with binding.user(b):
            with binding.user(a):
                assert torch.equal(tiny_unet(**inputs).sample, only_a)
            assert not torch.equal(tiny_unet(**inputs).sample, only_a)  # b again after the inner block
            with binding.adapter_off():
                assert torch.equal(tiny_unet(**inputs).sample, base)
    with pytest.raises(IncompatibleError, match="UserKV has 2 blocks, this Stage C has 4"):
        with binding.user(UserKV(a.keys[:2], a.values[:2])):
            pass
    binding.detach()
    processors = [blk.attention.processor for name, blk in tiny_unet.named_modules() if hasattr(blk, "kv_mapper")]
    assert len(processors) == 4 and not any(isinstance(p, PPDAttnProcessor) for p in processors)
    PPDBinding(tiny_unet, adapter).detach()  # attaching again after a detach works


def test_processor_refuses_other_attention_layouts(tiny_unet):
    adapter = trained_looking_adapter(tiny_unet)
    binding = PPDBinding(tiny_unet, adapter)
    attn = tiny_unet.down_blocks[0][2].attention
    x, kv = torch.randn(1, 32, 2, 2), torch.randn(1, 3, 32)
    with binding.user(adapter(torch.randn(1, 5, 24))), torch.no_grad():
        assert attn(x, encoder_hidden_states=kv).shape == x.shape
        for call in (lambda: attn(x, encoder_hidden_states=kv, attention_mask=torch.ones(1, 4, 3)),
                     lambda: attn(x), lambda: attn(x.unsqueeze(0), encoder_hidden_states=kv)):
            with pytest.raises(IncompatibleError, match="SDXL cross-attention layers only"):
                call()
        # Each normalisation the processor does not reproduce is refused on its own, not only in company.
        for name in ("norm_q", "norm_k", "group_norm", "spatial_norm", "norm_cross"):
            assert getattr(attn, name) in (None, False)
            setattr(attn, name, torch.nn.Identity())
            try:
                with pytest.raises(IncompatibleError, match="SDXL cross-attention layers only"):
                    attn(x, encoder_hidden_states=kv)
            finally:
                setattr(attn, name, None)
        assert attn(x, encoder_hidden_states=kv).shape == x.shape


def test_refusals_name_both_sides_by_default(tiny_unet):
    from ppd_train.adapter import check_base

    config = trained_looking_adapter(tiny_unet, embedder="e").config
    with pytest.raises(IncompatibleError, match=r"^the user embedding \(5 tokens x 24 from embedder 'f'\) does not fit "
                                                r"the adapter, which reads 5 tokens x 24 from embedder 'e'"):
        check_embedding(config, (5, 24), "f")
    with pytest.raises(IncompatibleError, match=r"^the adapter was made for Stage C custom \(4 attention blocks, width "
                                                r"32\), but the Stage C model is Stage C lite"):
        check_base(config, ModelInfo((1536,) * 32, (24,) * 32))


def test_adapters_and_user_kv_move_to_the_asked_device(tiny_unet, tmp_path):
    save_adapter(trained_looking_adapter(tiny_unet), tmp_path / "a.safetensors")
    on_meta = load_adapter(tmp_path / "a.safetensors", device="meta")  # "meta" stands in for a GPU
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    kv = trained_looking_adapter(tiny_unet)(torch.randn(5, 24)).to(device="meta")
    assert {t.device.type for t in kv.keys + kv.values} == {"meta"} and kv.keys[0].dtype == torch.float32


def test_a_damaged_adapter_file_names_what_does_not_match(tiny_unet, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key in ("blocks.0.to_k.weight", "blocks.1.to_k.weight", "blocks.2.to_k.weight", "blocks.3.to_k.weight"):
        del tensors[key]  # four missing: the message lists the first three
    tensors["token_pos"] = torch.zeros(2, 2)
    save_file(tensors, path, metadata=meta)
    missing = "['blocks.0.to_k.weight', 'blocks.1.to_k.weight', 'blocks.2.to_k.weight']"
    with pytest.raises(FileFormatError) as err:
        load_adapter(path)
    assert f"(missing {missing}; wrong shape ['token_pos'])" in str(err.value)


def test_adapter_files_say_what_they_are(tiny_unet, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["format"] == "ppd-adapter"  # for any safetensors reader
    meta = json.loads(metadata["ppd_adapter"])
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ppd_adapter": json.dumps({**meta, "format": "lora"})})
    with pytest.raises(FileFormatError, match=r"b.safetensors is not a PPD adapter "
                                              r"\(format='lora', expected 'ppd-adapter'\)"):
        load_adapter(tmp_path / "b.safetensors")
    with pytest.raises(FileFormatError, match="PPD adapter file not found"):
        load_adapter(tmp_path / "missing.safetensors")


def test_the_base_is_recorded_checked_and_stage_c_files_are_unchanged(tmp_path):
    """An adapter says which base it attaches to; Stage C files read and write exactly as before SDXL existed."""
    sdxl = ModelInfo((640,) * 4 + (1280,) * 60 + (640,) * 6, (10,) * 4 + (20,) * 60 + (10,) * 6, base="sdxl")
    assert sdxl.describe() == "SDXL base (70 attention blocks, width 640/1280)"
    assert ModelInfo((64, 32), (2, 2), base="sdxl").kind == "custom"
    stage_c = ModelInfo((32, 32), (2, 2))
    for info in (stage_c, ModelInfo((32, 32), (2, 2), base="sdxl")):
        config = AdapterConfig.for_model(info, embed_dim=6, num_tokens=3)
        assert config.model == info
        saved = json.loads(config.to_json())
        assert ("base" in saved) == (info.base != "stage_c")  # a Stage C file holds no new key
        assert AdapterConfig.from_dict(saved) == config
    old = json.loads(AdapterConfig.for_model(stage_c, embed_dim=6, num_tokens=3).to_json())
    assert AdapterConfig.from_dict(old).base == "stage_c"
    with pytest.raises(FileFormatError, match="base = 'flux'"):
        AdapterConfig.from_dict({**old, "base": "flux"})
    with pytest.raises(IncompatibleError, match="base 'flux'"):
        AdapterConfig.for_model(ModelInfo((32,), (2,), base="flux"), embed_dim=6, num_tokens=3)
    on_sdxl = AdapterConfig.for_model(ModelInfo((32, 32), (2, 2), base="sdxl"), embed_dim=6, num_tokens=3)
    with pytest.raises(IncompatibleError, match=r"made for SDXL custom .* but the Stage C model is Stage C custom"):
        check_base(on_sdxl, stage_c)
