"""Helpers for the real-ComfyUI tests (tests/comfyui): a headless server and the assets it serves."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI on loopback, and the few HTTP calls the tests need."""

    def __init__(self, base: Path, extra_yaml: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(base), "--extra-model-paths-config", str(extra_yaml),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--preview-method", "none"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within 120 s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt and wait for its history entry (success or error)."""
        status, answer = self.post("/prompt", {"prompt": prompt})
        assert status == 200, f"prompt refused: {json.dumps(answer)[:2000]}"
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, pid: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def execution_error(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return ""


# ---------------------------------------------------------------------------------------------------------- assets
TINY_VLM = "tiny-llava"
ADAPTER = "tiny_ppd.safetensors"  # lives in a folder named only by extra_model_paths.yaml
SDXL_ADAPTER = "tiny_ppd_sdxl.safetensors"  # for the fixture pack's tiny SDXL, in models/ppd_adapters


def tiny_adapter(comfy, embed_dim: int, num_tokens: int, embedder: str, seed: int = 1, info=None):
    """An adapter for the fixture pack's tiny Stage C (or the model ``info`` describes) with every weight non-zero
    (as after training)."""
    import torch

    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    tiny = comfy["fixtures"].TINY_C
    if info is None:
        info = adapter_mod.ModelInfo((tiny["c_hidden"][0],) * 4, (tiny["nhead"][0],) * 4)
    adapter = adapter_mod.PPDAdapter(adapter_mod.AdapterConfig.for_model(info, embed_dim, num_tokens,
                                                                           embedder=embedder))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def write_assets(base: Path, comfy) -> dict:
    import torch
    from helpers import write_pair_folder

    pack = "ppd_pack"
    tiny = importlib.import_module(f"{pack}.ppd_train.tiny")
    adapter_mod = importlib.import_module(f"{pack}.ppd_train.adapter")
    embedding_mod = importlib.import_module(f"{pack}.ppd_train.embedding")
    embedder_nodes = importlib.import_module(f"{pack}.nodes.embedder_nodes")
    pair_nodes = importlib.import_module(f"{pack}.nodes.pair_nodes")

    models = base / "models"
    (models / "diffusion_models").mkdir(parents=True)
    comfy["fixtures"].write_tiny_cascade(str(models / "diffusion_models"))
    vlm_dir = models / "LLM" / TINY_VLM
    tiny.build_tiny_llava(vlm_dir)
    write_pair_folder(base / "input" / "anna", n=5, seed=1)
    write_pair_folder(base / "input" / "ben", n=4, seed=2)
    broken = write_pair_folder(base / "input" / "broken", n=4, seed=3)
    (broken / "good_2.png").unlink()

    # ben's embedding made by the real embedder, saved as an artist would share it
    vlm = embedder_nodes.VLMHandle(vlm_dir, "fp32")
    ben_pairs, _ = pair_nodes.load_pair_source(base / "input" / "ben", "", 4, "first", 0)
    ben = embedder_nodes.embed_pairs(vlm, ben_pairs, "direct", "all", 16, torch.device("cpu"))
    (models / "ppd_embeddings").mkdir(parents=True)
    ben.save(models / "ppd_embeddings" / "ben.safetensors")
    embedding_mod.UserEmbedding(torch.randn(3, 16), "pairdiff:clip-vit").save(
        models / "ppd_embeddings" / "other_embedder.safetensors")

    adapters = base / "extra" / "adapters"
    adapters.mkdir(parents=True)
    t, d = ben.tokens.shape
    adapter_mod.save_adapter(tiny_adapter(comfy, d, t, ben.embedder), adapters / ADAPTER)
    sdxl = comfy["fixtures"].tiny_sdxl()
    comfy["fixtures"].write_tiny_sdxl(str(models / "diffusion_models"))
    sdxl_info = importlib.import_module(f"{pack}.nodes.sdxl_patch").sdxl_of(sdxl)[1]
    (models / "ppd_adapters").mkdir(parents=True)
    adapter_mod.save_adapter(tiny_adapter(comfy, d, t, ben.embedder, info=sdxl_info), models / "ppd_adapters" /
                             SDXL_ADAPTER)
    extra_yaml = base / "extra_model_paths.yaml"
    extra_yaml.write_text(f"ppd_test:\n  base_path: {base / 'extra'}\n  ppd_adapters: adapters\n")
    return {"extra_yaml": extra_yaml, "ben": ben}


def run_tune(world: dict, image_size: int, **over):
    """The Tune User Embedding node on a ``world`` fixture (pairs, model, clip, vae, adapter, start embedding), run as
    ComfyUI runs every node (inside inference mode); ``over`` replaces any of its inputs."""
    import torch

    node = importlib.import_module("ppd_pack.nodes.tune_nodes").PPDTuneUserEmbedding()
    args = dict(pairs=world["pairs"], model=world["model"], clip=world["clip"], vae=world["vae"],
                ppd_adapter=world["adapter"], user_embedding=world["start"], steps=30, seed=0, lr=0.1, batch_size=4,
                image_size=image_size)
    args.update(over)
    with torch.inference_mode():
        return node.tune(**args)


def model_weights(model) -> dict:
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def tune_leaving_inputs_alone(world: dict, image_size: int):
    """Tunes the ``world``'s user (12 pairs: 9 learned from, 3 held out) and checks what either base must give: better
    on the held-out pairs, the report says so, nothing the user connected changed (start embedding, adapter, ComfyUI's
    model weights), and the same inputs and seed give the same result (ComfyUI may rerun a node whose cache was
    dropped). Returns ``(tuned, report)`` for the base's own checks."""
    import torch

    start_tokens = world["start"].tokens.clone()
    adapter_weights = {k: v.clone() for k, v in world["adapter"].adapter.state_dict().items()}
    before = model_weights(world["model"])
    tuned, report = run_tune(world, image_size)

    meta = tuned.meta["tuned"]
    assert meta["val_after"]["loss"] < meta["val_before"]["loss"]
    assert meta["mode"] == "tokens" and meta["val_pairs"] == 3 and meta["train_pairs"] == 9
    assert not torch.allclose(tuned.tokens, start_tokens) and torch.isfinite(tuned.tokens).all()
    assert tuned.embedder == "test" and tuned.meta["user_id"] == "anna"
    b, a = meta["val_before"], meta["val_after"]
    assert f"Held-out DPO loss {b['loss']:.4f} -> {a['loss']:.4f}" in report and "12 pairs" in report
    assert torch.equal(world["start"].tokens, start_tokens)
    assert all(torch.equal(v, adapter_weights[k]) for k, v in world["adapter"].adapter.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in world["model"].model.diffusion_model.state_dict().items())
    again, _ = run_tune(world, image_size)
    assert torch.equal(again.tokens, tuned.tokens)
    return tuned, report
