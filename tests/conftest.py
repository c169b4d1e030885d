"""Shared fixtures: tiny *real* models written to disk and loaded back through the same code real weights use."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SMALL_WORLDS  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast and much steadier


@pytest.fixture(autouse=True)
def _library_logs_to_this_stderr():
    """diffusers and transformers bind their log handler to the sys.stderr of their first import. A process that
    imported them before this session (mutmut's fork server) leaves it on a stream that may be closed by now, and a
    warning then prints "--- Logging error ---" with a traceback into a test's output. Point it at today's stderr."""
    import logging
    import sys

    for name in ("diffusers", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream, handler.flush = sys.stderr, sys.stderr.flush
    yield


def pytest_collection_modifyitems(config, items):
    """Under ``make mutate``: a mutant's run stops at its first failing test, but mutmut hands its tests over in set
    order; run the cheapest first (modules by their recorded time, then tests by theirs), so a killed mutant costs the
    fastest test that catches it."""
    import json
    from pathlib import Path

    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    def cost(item) -> float:
        return seconds.get(item.nodeid, 60.0)  # not in the stats: assume slow

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    per_module: dict[str, float] = {}
    for item in items:
        per_module[module(item)] = per_module.get(module(item), 0.0) + cost(item)
    items.sort(key=lambda i: (per_module[module(i)], module(i), cost(i)))


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
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny real SDXL pipeline folder (diffusers layout: unet, vae, two text encoders and tokenizers, scheduler)."""
    from ppd_train.tiny import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl(folder)
    return folder


@pytest.fixture()
def tiny_sdxl(tiny_sdxl_dir):
    from ppd_train.sdxl import load_sdxl

    return load_sdxl(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from ppd_train.tiny import build_tiny_llava

    folder = tmp_path_factory.mktemp("llava")
    build_tiny_llava(folder)
    return folder


@pytest.fixture(scope="session")
def image_encoders(tmp_path_factory):
    """Tiny Stable Cascade image encoders on disk: effnet_encoder.safetensors (EfficientNet, Stability's layout) and
    clip_g/ (CLIP text with projection, 32 wide, with a locally trained tokenizer)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from ppd_train.effnet import EfficientNetEncoder

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


def _sweep_file(folder, name: str):
    seed, world = SMALL_WORLDS[name]
    path = folder / "sweep.toml"
    path.write_text(f'[[worlds]]\nname = "{name}"\nseed = {seed}\n'
                    "world = { " + ", ".join(f"{k} = {v}" for k, v in world.items()) + " }\n")
    return path


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """``small_world(name)``: one of ``SMALL_WORLDS`` trained with the demo's recipe (``ppd-train demo --sweep`` with
    a one-world sweep file), once per test process: (folder, sweep file, its sweep row). The world's base Stage C,
    adapter and metrics are under ``folder / "sweep" / name``. Tests that use a world carry
    ``pytest.mark.xdist_group(name)``, so one worker trains it."""
    from ppd_train.sweep import load_sweep, run_sweep
    from ppd_train.synthetic import DemoConfig

    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(name)
            sweep_file = _sweep_file(folder, name)
            threads = torch.get_num_threads()
            rows = run_sweep(DemoConfig(), load_sweep(sweep_file), folder / "sweep", log=lambda *a: None)
            torch.set_num_threads(threads)
            done[name] = (folder, sweep_file, rows[0])
        return done[name]

    return get
