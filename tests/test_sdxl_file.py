"""Single-file SDXL checkpoints, as artists download them: the original layout (UNet, VAE, CLIP-L, bigG in one
``.safetensors``) loads through diffusers' own converters into the same models as the diffusers folder, bit for bit,
and ``prepare`` makes the same data from either."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import random_image, sdxl_inputs, write_pair_folder

from ppd_train.cli import main
from ppd_train.dpo_data import DPOData
from ppd_train.errors import PPDError
from ppd_train.prepare import SDXLEncoders, sdxl_preprocess
from ppd_train.sdxl import load_sdxl
from ppd_train.sdxl_file import ENCODERS, PARTS, load_part, read_sdxl_file, sdxl_tokenizers
from ppd_train.tiny import write_tiny_sdxl_single_file

CAPTIONS = ["a lighthouse at dusk", "soft bright colour 1 2 3 !"]


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_sdxl_dir):
    """The tiny SDXL pipeline folder written as one checkpoint in the original layout."""
    path = tmp_path_factory.mktemp("sdxl_file") / "artist_model.safetensors"
    write_tiny_sdxl_single_file(tiny_sdxl_dir, path)
    return path


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sb), "weights differ"


def test_single_file_loads_bit_for_bit_like_the_folder(single_file, tiny_sdxl_dir, tiny_sdxl):
    # the UNet (fit, eval, tune-user)
    unet = load_sdxl(single_file, config=tiny_sdxl_dir)
    _equal_state(unet, tiny_sdxl)
    inputs = sdxl_inputs()
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, tiny_sdxl(**inputs).sample)
    # the VAE and both text encoders with their tokenizers (prepare, tune-user --pairs)
    from_file = SDXLEncoders(single_file, config=tiny_sdxl_dir)
    from_folder = SDXLEncoders(tiny_sdxl_dir)
    for a, b in zip([from_file.vae, *from_file.text_encoders], [from_folder.vae, *from_folder.text_encoders]):
        assert type(a) is type(b)
        _equal_state(a, b)
    text_a, pooled_a = from_file.encode_text(CAPTIONS)
    text_b, pooled_b = from_folder.encode_text(CAPTIONS)
    assert torch.equal(text_a, text_b) and torch.equal(pooled_a, pooled_b)
    x = sdxl_preprocess(random_image(1), 16)[0][None]
    with torch.no_grad():
        assert torch.equal(from_file.vae.encode(x).latent_dist.mean, from_folder.vae.encode(x).latent_dist.mean)
    # only the parts a command needs are read from the file
    assert not any(k.startswith(PARTS["unet"]) for k in read_sdxl_file(single_file, ENCODERS))


def test_prepare_from_single_file_gives_the_folders_data(single_file, tiny_sdxl_dir, tmp_path, capsys):
    """`ppd-train prepare --sdxl <file>`: the same data as from the diffusers folder, with the tokenizers from the
    config folder or from one CLIP tokenizer folder (SDXL's two tokenizers differ only in their padding)."""
    folders = [str(write_pair_folder(tmp_path / "pairs" / f"user{u}", n=3, seed=u)) for u in range(2)]
    common = ["prepare", "--pairs", *folders, "--image-size", "16", "--quiet", "--device", "cpu"]
    runs = {"folder": ["--sdxl", str(tiny_sdxl_dir)],
            "file": ["--sdxl", str(single_file), "--sdxl-config", str(tiny_sdxl_dir)],
            "file+tokenizer": ["--sdxl", str(single_file), "--sdxl-config", str(tiny_sdxl_dir), "--sdxl-tokenizer",
                               str(tiny_sdxl_dir / "tokenizer")]}
    data = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.safetensors"
        assert main([*common, *args, "--out", str(out)]) == 0, capsys.readouterr().err
        data[name] = DPOData.load(out)
    want = data["folder"]
    for name in ("file", "file+tokenizer"):
        got = data[name]
        for field in ("latents_w", "latents_l", "caption_idx", "user_idx", "text", "pooled", "time_ids"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
        assert got.user_ids == want.user_ids and got.base == "sdxl"
    capsys.readouterr()
    assert main([*common, *runs["file"], "--out", str(tmp_path / "file.safetensors")]) == 0
    assert "up to date" in capsys.readouterr().out


def test_tokenizers_come_from_comfyui_next_to_the_pack(tiny_sdxl_dir, tmp_path, capsys):
    """An artist with ComfyUI and one .safetensors needs nothing else: installed in ComfyUI/custom_nodes, the pack
    takes ComfyUI's own CLIP tokenizer (comfy/sd1_tokenizer; here the tiny one in its place) and says so; elsewhere
    it asks for one. tests/comfyui checks ComfyUI's real folder against ComfyUI's own SDXL tokenizer."""
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(tiny_sdxl_dir / "tokenizer", comfy / "comfy" / "sd1_tokenizer")
    found = sdxl_tokenizers(here=comfy / "custom_nodes" / "ppd" / "ppd_train" / "sdxl_file.py")
    assert f"SDXL tokenizers: ComfyUI's {comfy / 'comfy' / 'sd1_tokenizer'}" in capsys.readouterr().err
    want = SDXLEncoders(tiny_sdxl_dir).tokenizers
    for a, b in zip(found, want):
        ids = [t(CAPTIONS, padding="max_length", max_length=77).input_ids for t in (a, b)]
        assert ids[0] == ids[1]
    assert found[0].pad_token == "<|endoftext|>" and found[1].pad_token == "!"
    pack = tmp_path / "elsewhere" / "ppd"  # a pack linked into custom_nodes from where it was cloned
    (pack / "ppd_train").mkdir(parents=True)
    (comfy / "custom_nodes").mkdir()
    (comfy / "custom_nodes" / "ppd").symlink_to(pack)
    assert sdxl_tokenizers(here=comfy / "custom_nodes" / "ppd" / "ppd_train" / "sdxl_file.py")[1].pad_token == "!"
    with pytest.raises(PPDError, match="holds no tokenizer: give one with --sdxl-tokenizer: .*comfy/sd1_tokenizer"):
        sdxl_tokenizers(here=tmp_path / "elsewhere" / "ppd" / "ppd_train" / "sdxl_file.py")


def test_sdxl_1_0_configs_take_the_released_checkpoints_layout():
    """The configs in code are SDXL 1.0's: its models' parameter counts, and a checkpoint in the original layout at
    full size (meta tensors: nothing allocated) loads through the real converters with no config given."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ppd_train.sdxl import sdxl_config
    from ppd_train.sdxl_file import sdxl_text_encoder_config, sdxl_vae_config
    from ppd_train.tiny import sdxl_single_file_tensors

    with torch.device("meta"):
        models = [UNet2DConditionModel(**sdxl_config()), AutoencoderKL(**sdxl_vae_config()),
                  CLIPTextModel(CLIPTextConfig(**sdxl_text_encoder_config("text_encoder"))),
                  CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_text_encoder_config("text_encoder_2")))]
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]  # SDXL 1.0's UNet, VAE, CLIP-L, bigG
    tensors = sdxl_single_file_tensors(*models)
    shapes = {"conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
              "conditioner.embedders.1.model.text_projection": (1280, 1280),
              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
              "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
              "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
              "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048)}
    assert {k: tuple(tensors[k].shape) for k in shapes} == shapes  # names and shapes of the released file
    for part, model in zip(PARTS, models):
        loaded = load_part("sd_xl_base_1.0.safetensors", tensors, part, None, torch.float16)
        assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in
                                                                        model.state_dict().items()}


def test_fit_eval_and_tune_user_on_the_single_file_match_the_folder(single_file, tiny_sdxl_dir, tiny_sdxl, tmp_path,
                                                                     monkeypatch):
    """`fit` and `eval` with `sdxl = <file>`, and `tune-user --sdxl <file> --pairs`, give exactly what they give on
    the folder."""
    import json
    import sys

    from helpers import trained_looking_adapter

    from ppd_train.adapter import read_adapter_config, save_adapter
    from ppd_train.embedding import UserEmbedding, save_embedding_table
    from ppd_train.pairs import load_users
    from ppd_train.prepare import prepare_dpo_data

    folders = [str(write_pair_folder(tmp_path / "pairs" / f"user{u}", n=3, seed=u)) for u in range(3)]
    data = prepare_dpo_data(load_users(folders), None, None, tmp_path / "data.safetensors", image_size=16,
                            show_progress=False, sdxl=tiny_sdxl_dir)
    g = torch.Generator().manual_seed(0)
    save_embedding_table(tmp_path / "users.safetensors", {u: UserEmbedding(torch.randn(3, 8, generator=g), "test")
                                                         for u in data.user_ids})
    base = {"folder": [f"sdxl={tiny_sdxl_dir}"], "file": [f"sdxl={single_file}", f"sdxl_config={tiny_sdxl_dir}"]}
    for name, sets in base.items():
        sets = [*sets, f"data={tmp_path / 'data.safetensors'}", f"embeddings={tmp_path / 'users.safetensors'}",
                f"out_dir={tmp_path / name}", "max_steps=2", "batch_size=4", "lr=1e-2", "beta=100",
                "tensorboard=false"]
        assert main(["fit", "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    want, got = (read_adapter_config(tmp_path / n / "adapter_last.safetensors")[1] for n in base)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

    (tmp_path / "file_rewards.py").write_text("def brightness(user_id, latents, caption_idx):\n"
                                              "    return latents.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, sets in base.items():
        sets = [*sets, f"adapter={tmp_path / 'folder' / 'adapter.safetensors'}",
                f"data={tmp_path / 'data.safetensors'}", f"embeddings={tmp_path / 'users.safetensors'}",
                "reward=file_rewards:brightness", "samples=2", "steps=2", f"out={tmp_path / name}.json"]
        assert main(["eval", *[a for s in sets for a in ("--set", s)]]) == 0
    sys.modules.pop("file_rewards", None)
    want_m, got_m = (json.loads((tmp_path / f"{n}.json").read_text()) for n in base)
    assert got_m["users"] == want_m["users"] and len(want_m["users"]) == 3

    save_adapter(trained_looking_adapter(tiny_sdxl, embed_dim=8, num_tokens=3), tmp_path / "adapter.safetensors")
    UserEmbedding(torch.randn(3, 8, generator=g), "test").save(tmp_path / "start.safetensors")
    common = ["tune-user", "--pairs", folders[0], "--image-size", "16", "--adapter",
              str(tmp_path / "adapter.safetensors"), "--embedding", str(tmp_path / "start.safetensors"),
              "--steps", "2", "--seed", "3", "--quiet", "--device", "cpu", "--dtype", "float32"]
    assert main([*common, "--sdxl", str(tiny_sdxl_dir), "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main([*common, "--sdxl", str(single_file), "--sdxl-config", str(tiny_sdxl_dir),
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = (UserEmbedding.load(tmp_path / f"{n}.safetensors") for n in "ab")
    assert torch.equal(a.tokens, b.tokens)
    for key in ("val_before", "val_after"):  # held-out scores: the pairs encoded and scored by each model
        assert a.meta["tuned"][key] == b.meta["tuned"][key] and a.meta["tuned"][key]["loss"] > 0
