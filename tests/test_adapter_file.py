"""The one adapter file format: round trip, metadata checks, and clear errors for bad files."""

from __future__ import annotations

import pytest
import torch
from helpers import stage_c_inputs, trained_looking_adapter
from safetensors.torch import save_file

from ppd_train.adapter import check_embedding, load_adapter, read_adapter_config, save_adapter
from ppd_train.cli import main
from ppd_train.errors import FileFormatError, IncompatibleError
from ppd_train.stage_c import PPDBinding, stage_c_info


def test_round_trip_gives_identical_outputs(tiny_unet, tmp_path):
    adapter = trained_looking_adapter(tiny_unet)
    path = tmp_path / "user.safetensors"
    save_adapter(adapter, path, training={"steps": 3})
    loaded = load_adapter(path)
    assert loaded.config == adapter.config and loaded.config.training == {"steps": 3}
    users = torch.randn(1, 5, 24)
    outs = []
    for a in (adapter, loaded):
        binding = PPDBinding(tiny_unet, a)
        with binding.user(a(users)), torch.no_grad():
            outs.append(tiny_unet(**stage_c_inputs()).sample)
        binding.detach()
    assert torch.equal(outs[0], outs[1])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file behind


def test_keys_are_framework_neutral(tiny_unet, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    _, tensors = read_adapter_config(path)
    assert {"user_norm.weight", "user_proj.weight", "token_pos", "blocks.0.to_k.weight", "blocks.3.to_v.weight"} <= set(
        tensors)
    assert not any("down_blocks" in k or "attention" in k for k in tensors)


def test_truncated_file_is_a_clear_error(tiny_unet, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        load_adapter(path)


def test_pickle_and_other_files_are_refused(tmp_path):
    pt = tmp_path / "adapter.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(FileFormatError, match="safetensors only"):
        load_adapter(pt)
    junk = tmp_path / "adapter.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(FileFormatError, match="not a readable safetensors"):
        load_adapter(junk)
    plain = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(FileFormatError, match="not a PPD adapter"):
        load_adapter(plain)
    with pytest.raises(FileFormatError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")


def test_adapter_for_another_stage_c_names_both_sides(tiny_unet, tmp_path):
    from ppd_train.tiny import build_tiny_stage_c

    wide = build_tiny_stage_c(width=48)
    path = tmp_path / "wide.safetensors"
    save_adapter(trained_looking_adapter(wide), path)
    with pytest.raises(IncompatibleError, match=r"custom \(4 attention blocks, width 48\).*width 32"):
        PPDBinding(tiny_unet, load_adapter(path))
    deeper = build_tiny_stage_c(layers=2)
    path = tmp_path / "deep.safetensors"
    save_adapter(trained_looking_adapter(deeper), path)
    with pytest.raises(IncompatibleError, match="8 attention blocks.*4 attention blocks"):
        PPDBinding(tiny_unet, load_adapter(path))
    assert stage_c_info(tiny_unet).kind == "custom"


def test_embedding_from_another_embedder_is_refused(tiny_unet):
    config = trained_looking_adapter(tiny_unet, embedder="vlm:llava-ov-7b").config
    check_embedding(config, (5, 24), "vlm:llava-ov-7b")
    with pytest.raises(IncompatibleError, match="pairdiff:clip.*vlm:llava-ov-7b"):
        check_embedding(config, (5, 24), "pairdiff:clip")
    with pytest.raises(IncompatibleError, match="4 tokens x 24"):
        check_embedding(config, (4, 24), "vlm:llava-ov-7b")


def test_tampered_tensors_are_refused(tiny_unet, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.to_k.weight"] = torch.zeros(3, 3)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(FileFormatError, match="wrong shape"):
        load_adapter(path)


def test_cli_inspect_and_size(tiny_unet, tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(tiny_unet), path)
    assert main(["inspect", str(path)]) == 0
    assert '"block_count": 4' in capsys.readouterr().out
    assert main(["size"]) == 0
    assert "Stage C lite: 32 blocks" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_an_adapter_holding_nan_is_not_saved(tiny_unet, tmp_path):
    """A diverged adapter never reaches disk, not even over an older good file."""
    adapter = trained_looking_adapter(tiny_unet)
    save_adapter(adapter, tmp_path / "a.safetensors")
    good = (tmp_path / "a.safetensors").read_bytes()
    with torch.no_grad():
        adapter.blocks[0].to_v.weight[0, 0] = float("nan")
    with pytest.raises(FileFormatError, match=r"Not saving .*a\.safetensors: the adapter's weights hold NaN/inf"):
        save_adapter(adapter, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
