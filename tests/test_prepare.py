"""Real-image data path: EfficientNet encoder (Stability's layout, no torchvision) and CLIP text into DPO data."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import write_pair_folder

from ppd_train.cli import main
from ppd_train.dpo_data import DPOData
from ppd_train.effnet import EfficientNetEncoder, load_effnet, preprocess
from ppd_train.embedding import save_embedding_table
from ppd_train.errors import FileFormatError
from ppd_train.pairs import load_users


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    effnet = EfficientNetEncoder()
    with torch.no_grad():  # non-trivial batch-norm statistics, as in trained weights
        for m in effnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, root / "effnet_encoder.safetensors")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a lighthouse at dusk, version 0 1 2 3 4"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", model_max_length=77)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
                                                      max_position_embeddings=77))
    clip.save_pretrained(root / "clip_g")
    tokenizer.save_pretrained(root / "clip_g")
    return root


def test_effnet_loads_stability_layout_without_torchvision(models, tmp_path):
    effnet = load_effnet(models / "effnet_encoder.safetensors")
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


def test_prepare_leaves_out_embedding_pairs_and_caches(models, tmp_path, tiny_llava_dir, capsys):
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.vlm import VLMEmbedder

    for u in range(2):
        write_pair_folder(tmp_path / "data" / f"user{u}", n=6, seed=u)
    folders = [str(tmp_path / "data" / f"user{u}") for u in range(2)]
    table = embed_users(load_users(folders), VLMEmbedder(tiny_llava_dir), tmp_path / "users.safetensors", n_pairs=4,
                        show_progress=False)
    save_embedding_table(tmp_path / "users.safetensors", table)
    def args(size: int) -> list[str]:
        return ["prepare", "--pairs", *folders, "--effnet", str(models / "effnet_encoder.safetensors"), "--clip-text",
                str(models / "clip_g"), "--embeddings", str(tmp_path / "users.safetensors"), "--out",
                str(tmp_path / "dpo.safetensors"), "--image-size", str(size), "--quiet", "--device", "cpu"]

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
