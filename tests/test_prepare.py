"""Real-image data path: EfficientNet encoder (Stability's layout, no torchvision) and CLIP text into DPO data."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import write_pair_folder

from ppd_train.cli import main
from ppd_train.dpo_data import DPOData
from ppd_train.effnet import load_effnet, preprocess
from ppd_train.embedding import save_embedding_table
from ppd_train.errors import FileFormatError
from ppd_train.pairs import load_users


def test_effnet_loads_stability_layout_without_torchvision(image_encoders, tmp_path):
    effnet = load_effnet(image_encoders / "effnet_encoder.safetensors")
    assert sum(p.numel() for p in effnet.backbone.parameters()) == 21_458_488 - 1_281_000  # torchvision v2_s features
    from PIL import Image

    x = preprocess([Image.new("RGB", (300, 200), "red"), Image.new("RGB", (128, 128), "blue")], image_size=64)
    assert x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert effnet(x).shape == (2, 16, 2, 2)
    assert "torchvision" not in sys.modules
    from safetensors.torch import save_file

    save_file({"backbone.0.0.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(FileFormatError, match="not Stable Cascade's EfficientNet encoder"):
        load_effnet(tmp_path / "vae.safetensors")


def test_prepare_leaves_out_embedding_pairs_and_caches(image_encoders, tmp_path, tiny_llava_dir, capsys):
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.vlm import VLMEmbedder

    for u in range(2):
        write_pair_folder(tmp_path / "data" / f"user{u}", n=6, seed=u)
    folders = [str(tmp_path / "data" / f"user{u}") for u in range(2)]
    table = embed_users(load_users(folders), VLMEmbedder(tiny_llava_dir), tmp_path / "users.safetensors", n_pairs=4,
                        show_progress=False)
    save_embedding_table(tmp_path / "users.safetensors", table)
    def args(size: int) -> list[str]:
        return ["prepare", "--pairs", *folders, "--effnet", str(image_encoders / "effnet_encoder.safetensors"),
                "--clip-text", str(image_encoders / "clip_g"), "--embeddings", str(tmp_path / "users.safetensors"),
                "--out", str(tmp_path / "dpo.safetensors"), "--image-size", str(size), "--quiet", "--device", "cpu"]

    assert main(args(64)) == 0
    data = DPOData.load(tmp_path / "dpo.safetensors")
    assert len(data) == 4 and data.user_ids == ["user0", "user1"]  # 6 pairs each, 4 described the user
    assert data.latents_w.shape == (4, 16, 2, 2)
    assert data.text.shape[1:] == (77, 32) and data.pooled.shape[1:] == (1, 32)
    assert not torch.equal(data.latents_w, data.latents_l)
    capsys.readouterr()
    assert main(args(64)) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(args(96)) == 0  # other preprocessing: encoded again
    assert DPOData.load(tmp_path / "dpo.safetensors").latents_w.shape == (4, 16, 3, 3)
