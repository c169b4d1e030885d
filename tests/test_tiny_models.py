"""Tiny real models load from disk through the same code paths real checkpoints use."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import stage_c_inputs

from ppd_train.errors import FileFormatError
from ppd_train.stage_c import load_stage_c, stage_c_info
from ppd_train.tiny import tiny_stage_c_config

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_stage_c_mirrors_stage_c(tiny_unet):
    info = stage_c_info(tiny_unet)
    assert len(info.block_widths) == 4 and set(info.block_heads) == {2}
    assert sum(p.numel() for p in tiny_unet.parameters()) < 200_000
    out = tiny_unet(**stage_c_inputs()).sample
    assert out.shape == (2, 16, 6, 6) and torch.isfinite(out).all()


def test_single_file_stage_c_round_trip(tiny_unet, tmp_path):
    """Stability's single-file layout (fused in_proj of nn.MultiheadAttention) loads through our loader."""
    import json

    from safetensors.torch import save_file

    sd = tiny_unet.state_dict()
    single = {}
    for k, v in sd.items():
        if ".attention.to_q." in k:
            kind = k.rsplit(".", 1)[1]
            stem = k.split(".attention.to_q.")[0]
            parts = [sd[f"{stem}.attention.to_{x}.{kind}"] for x in "qkv"]
            single[f"{stem}.attention.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        elif ".attention.to_out.0." in k:
            single[k.replace("attention.to_out.0", "attention.attn.out_proj")] = v
        else:
            single[k] = v
    path = tmp_path / "stage_c_tiny.safetensors"
    save_file(single, path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_stage_c_config()))
    loaded = load_stage_c(path, config=config)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(p.dtype == torch.float64 for p in load_stage_c(path, dtype=torch.float64, config=config).parameters())
    inputs = stage_c_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, tiny_unet(**inputs).sample)
    with pytest.raises(Exception, match="neither lite"):
        load_stage_c(path)


def test_stage_c_loader_errors(tmp_path):
    with pytest.raises(FileFormatError, match="not a diffusers Stage C folder"):
        load_stage_c(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(FileFormatError, match="not a Stable Cascade Stage C"):
        load_stage_c(tmp_path / "vae.safetensors")


def test_tiny_llava_loads_like_a_real_checkpoint(tiny_llava_dir):
    from PIL import Image
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from ppd_train.embedders.llava_processor import ImageOnlyLlavaOnevisionProcessor

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_dir, use_safetensors=True,
                                                                    local_files_only=True)
    processor = ImageOnlyLlavaOnevisionProcessor.from_pretrained(tiny_llava_dir, local_files_only=True)
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert AutoTokenizer.from_pretrained(tiny_llava_dir).convert_tokens_to_ids("<image>") == model.config.image_token_id
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    text = "<|im_start|>user\nPair 1: <image> preferred over <image><|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[images], text=[text], return_tensors="pt")
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert "torchvision" not in sys.modules


def test_pack_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location("ppd_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.NODE_CLASS_MAPPINGS == {}
    finally:
        del sys.modules[spec.name]


def test_stage_c_folders_load_frozen_in_the_asked_dtype(tiny_unet, tmp_path):
    tiny_unet.save_pretrained(tmp_path / "pipeline" / "prior")  # a pipeline folder: Stage C sits in prior/
    loaded = load_stage_c(tmp_path / "pipeline", dtype=torch.float64)
    assert not loaded.training and all(p.dtype == torch.float64 and not p.requires_grad for p in loaded.parameters())
    inputs = {k: v.double() for k, v in stage_c_inputs().items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample.float(), tiny_unet(**stage_c_inputs()).sample, rtol=1e-3,
                                   atol=1e-4)


def test_single_file_that_does_not_match_its_config(tiny_unet, tmp_path):
    import json

    from safetensors.torch import save_file

    from ppd_train.errors import IncompatibleError

    save_file({"clip_txt_mapper.weight": torch.zeros(32, 32), "extra.weight": torch.zeros(1)},
              tmp_path / "c.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**tiny_stage_c_config(), "_class_name": "StableCascadeUNet"}))
    with pytest.raises(IncompatibleError, match="does not match the Stage C config"):
        load_stage_c(tmp_path / "c.safetensors", config=tmp_path / "config.json")
    save_file({"clip_txt_mapper.weight": torch.zeros(32, 32)}, tmp_path / "c.safetensors")  # only missing weights
    with pytest.raises(IncompatibleError, match=r"does not match the Stage C config \(missing \['"):
        load_stage_c(tmp_path / "c.safetensors", config=tmp_path / "config.json")


def test_missing_stage_c_file_is_named(tmp_path):
    with pytest.raises(FileFormatError, match="Stage C file not found: .*nope.safetensors"):
        load_stage_c(tmp_path / "nope.safetensors")



@pytest.mark.parametrize("width, refused", [(1536, False), (2048, False), (1280, True)])
def test_a_single_files_size_is_read_from_its_text_mapper(tmp_path, width, refused):
    """Lite (1536) and full (2048) are told apart by the rows of ``clip_txt_mapper.weight``, never its 1280 columns
    (CLIP's width). Built on the meta device: the released sizes without their gigabytes; the file holds only the
    mapper, so a recognised size goes on to the weights' own mismatch."""
    import re
    import warnings

    from safetensors.torch import save_file

    from ppd_train.errors import IncompatibleError

    path = tmp_path / "stage_c.safetensors"
    save_file({"clip_txt_mapper.weight": torch.zeros(width, 1280)}, path)
    message = "neither lite (1536) nor full (2048)" if refused else "does not match the Stage C config (missing"
    with torch.device("meta"), warnings.catch_warnings(), pytest.raises(IncompatibleError, match=re.escape(message)):
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and torch says so
        load_stage_c(path)


def test_stage_c_dtype_cast_is_quiet():
    """diffusers' "modules that should be kept in float32: []" warning on every .to(dtype) is silenced (its list is
    empty, so there is nothing to warn about); the cast still happens, and other warnings still get through."""
    import logging

    from ppd_train.stage_c import load_stage_c  # noqa: F401  (importing the binding installs the filter)
    from ppd_train.tiny import build_tiny_stage_c

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger, keep = logging.getLogger("diffusers.models.modeling_utils"), Keep()
    logger.addHandler(keep)
    try:
        unet = build_tiny_stage_c()
        unet.to(torch.bfloat16)
        logger.warning("another warning")
    finally:
        logger.removeHandler(keep)
    assert keep.messages == ["another warning"]
    assert next(unet.parameters()).dtype == torch.bfloat16
