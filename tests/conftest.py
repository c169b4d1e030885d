"""Shared fixtures: tiny *real* models written to disk and loaded back through the same code real weights use."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast and much steadier


@pytest.fixture(scope="session")
def tiny_stage_c_dir(tmp_path_factory):
    from ppd_train.tiny import build_tiny_stage_c

    folder = tmp_path_factory.mktemp("stage_c")
    build_tiny_stage_c(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_unet(tiny_stage_c_dir):
    from ppd_train.stage_c import load_stage_c

    return load_stage_c(tiny_stage_c_dir)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from ppd_train.tiny import build_tiny_llava

    folder = tmp_path_factory.mktemp("llava")
    build_tiny_llava(folder)
    return folder


@pytest.fixture(scope="session")
def pack():
    """The repository loaded as a ComfyUI custom-node package, the way ComfyUI loads it (by path, relative imports)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "ppd_pack" not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location("ppd_pack", root / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ppd_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["ppd_pack"]
