"""Tests against a real ComfyUI: a checkout named by ``COMFYUI_DIR``, run with the Python that runs it
(docs/testing-comfyui.md). Skipped, with a message naming ``COMFYUI_DIR``, when it is not set.

In-process tests import ComfyUI's modules directly (CPU); server tests start ComfyUI headless on loopback with this
pack and the test-only fixture pack (tiny Stage C / B / A built with ComfyUI's own classes) and talk to its HTTP API.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
REPO = Path(__file__).resolve().parents[2]
FIXTURE_PACK = Path(__file__).resolve().parent / "fixture_pack"
SKIP = ("real-ComfyUI tests: set COMFYUI_DIR to a ComfyUI checkout (>= 0.3.60) and run pytest with the Python that "
        "runs it; see docs/testing-comfyui.md")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR:
        return
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.skip(reason=SKIP))


def _load_package(name: str, folder: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's modules in this process, on the CPU, plus this pack and the fixture pack loaded as ComfyUI would."""
    assert COMFYUI_DIR
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    try:
        import comfy.cli_args
    except ImportError as e:
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} is set but ComfyUI does not import with {sys.executable} ({e}). Run "
                    "pytest with the Python of ComfyUI's environment.")
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (device set-up reads the args above)

    return {"pack": _load_package("ppd_pack", REPO), "fixtures": _load_package("ppd_comfy_fixtures", FIXTURE_PACK)}


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfy):
    """ComfyUI with both packs, tiny models in its folders, two users' pair folders and saved embeddings."""
    from comfyui_support import ComfyServer, write_assets

    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ppd").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "ppd_test_fixtures").symlink_to(FIXTURE_PACK, target_is_directory=True)
    assets = write_assets(base, comfy)
    server = ComfyServer(base, assets["extra_yaml"])
    server.assets = assets  # type: ignore[attr-defined]
    yield server
    server.stop()
