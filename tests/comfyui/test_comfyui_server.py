"""A real ComfyUI, headless on loopback, with this pack: node listing, whole graphs through POST /prompt, the shipped
workflows, and bad input that must end as a clear error while the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_support import ADAPTER, TINY_VLM, execution_error
from PIL import Image

API = json.loads((Path(__file__).resolve().parents[1] / "node_api.json").read_text())
WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
STAGE_C = "tiny_stage_c.safetensors"


def _graph(user_a="anna", user_b_file="ben.safetensors", weight=1.0, blend=0.5, adapter=ADAPTER, prefix="ppd_e2e",
           width=256):
    """pairs -> VLM embedder -> interpolate with a saved user -> PPD Stage C -> Stage B -> Stage A -> SaveImage."""
    return {
        "models": {"class_type": "PPDTestTinyCascade", "inputs": {"stage_c": STAGE_C}},
        "pos": {"class_type": "PPDTestTextConditioning", "inputs": {"text": "a lighthouse at dusk"}},
        "neg": {"class_type": "PPDTestTextConditioning", "inputs": {"text": "blurry"}},
        "latent": {"class_type": "StableCascade_EmptyLatentImage",
                   "inputs": {"width": width, "height": width, "compression": 42, "batch_size": 1}},
        "pairs": {"class_type": "PPDPreferencePairLoader",
                  "inputs": {"source": user_a, "user_id": "", "num_pairs": 4, "selection": "first", "seed": 0}},
        "vlm": {"class_type": "PPDVLMLoader", "inputs": {"model": TINY_VLM, "dtype": "fp32"}},
        "embed": {"class_type": "PPDVLMUserEmbedder", "inputs": {"vlm": ["vlm", 0], "pairs": ["pairs", 0],
                                                                 "mode": "direct", "layers": "all",
                                                                 "max_new_tokens": 16}},
        "user_b": {"class_type": "PPDLoadUserEmbedding", "inputs": {"embedding": user_b_file}},
        "blend": {"class_type": "PPDEmbeddingInterpolate", "inputs": {"embedding_a": ["embed", 0],
                                                                      "embedding_b": ["user_b", 0],
                                                                      "weight": blend, "method": "slerp"}},
        "adapter": {"class_type": "PPDAdapterLoader", "inputs": {"adapter_name": adapter}},
        "stage_c": {"class_type": "PPDStageCSampler", "inputs": {
            "model": ["models", 0], "ppd_adapter": ["adapter", 0], "user_embedding": ["blend", 0],
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "seed": 7, "steps": 3,
            "cfg": 4.0, "sampler_name": "euler_ancestral", "scheduler": "simple", "denoise": 1.0, "weight": weight,
            "start_percent": 0.0, "end_percent": 1.0}},
        "cond_b": {"class_type": "StableCascade_StageB_Conditioning",
                   "inputs": {"conditioning": ["pos", 0], "stage_c": ["stage_c", 0]}},
        "stage_b": {"class_type": "KSampler", "inputs": {
            "model": ["models", 1], "positive": ["cond_b", 0], "negative": ["neg", 0], "latent_image": ["latent", 1],
            "seed": 7, "steps": 2, "cfg": 1.1, "sampler_name": "euler_ancestral", "scheduler": "simple",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["stage_b", 0], "vae": ["models", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def test_object_info_lists_every_node_with_tooltips_and_pinned_inputs(comfy_server):
    info = comfy_server.get("/object_info")
    log = comfy_server.log()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "custom_nodes/ppd" in line)
    for node_id, pinned in API.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        spec = info[node_id]
        sections = [spec["input"].get("required", {}), spec["input"].get("optional", {})]
        names = [name for section in sections for name in section]
        assert names == pinned["inputs"], f"{node_id}: inputs renamed or reordered (only appending is allowed)"
        assert spec["output"] == pinned["outputs"] and spec["category"].startswith("PPD") and spec["description"]
        for section in sections:
            for name, entry in section.items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert ADAPTER in info["PPDAdapterLoader"]["input"]["required"]["adapter_name"][0]  # via extra_model_paths
    assert TINY_VLM in info["PPDVLMLoader"]["input"]["required"]["model"][0]
    assert {"anna", "ben", "broken"} <= set(info["PPDPreferencePairLoader"]["input"]["required"]["source"][0])


def test_pairs_to_png_through_the_whole_cascade(comfy_server):
    entry = comfy_server.run(_graph())
    assert entry["status"]["status_str"] == "success", execution_error(entry) or comfy_server.log()[-3000:]
    (image,) = entry["outputs"]["save"]["images"]
    png = comfy_server.base / "output" / image["subfolder"] / image["filename"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (256, 256) and im.mode == "RGB"
        assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 100  # a real decoded image, not a flat fill
    # re-queued with unchanged pair files: pairs are not reloaded and the VLM does not run again
    again = comfy_server.run(_graph(prefix="ppd_e2e_again"))
    cached = next(data["nodes"] for kind, data in again["status"]["messages"] if kind == "execution_cached")
    assert {"pairs", "vlm", "embed", "stage_c"} <= set(cached) and "save" not in cached


def _latent(comfy_server, entry, node):
    from safetensors.torch import load_file

    (item,) = entry["outputs"][node]["latents"]
    return load_file(comfy_server.base / "output" / item["subfolder"] / item["filename"])["latent_tensor"]


def test_weight_zero_equals_stock_ksampler_over_http(comfy_server):
    graph = _graph()
    for name in ("cond_b", "stage_b", "decode", "save"):
        graph.pop(name)
    stock = dict(graph["stage_c"], class_type="KSampler")
    stock["inputs"] = {k: v for k, v in graph["stage_c"]["inputs"].items()
                       if k not in ("ppd_adapter", "user_embedding", "weight", "start_percent", "end_percent")}
    zero = {"class_type": "PPDStageCSampler", "inputs": dict(graph["stage_c"]["inputs"], weight=0.0)}
    graph.update(stock=stock, zero=zero)
    for node, prefix in (("stage_c", "w1"), ("stock", "stock"), ("zero", "w0")):
        graph[f"save_{prefix}"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0],
                                                                          "filename_prefix": f"latents/{prefix}"}}
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    w1, stock_latent, w0 = (_latent(comfy_server, entry, f"save_{p}") for p in ("w1", "stock", "w0"))
    assert torch.equal(w0, stock_latent)
    assert (w1 - stock_latent).abs().max() > 1e-3


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflows_convert_and_validate(comfy_server, workflow):
    """UI format -> API format against this server's /object_info (comfy-cli's converter), then POST /prompt
    validation. The model files the workflows name are empty placeholders: only validation is checked."""
    from comfy_cli.workflow_to_api import convert_ui_to_api

    models = comfy_server.base / "models"
    for rel in ("checkpoints/stable_cascade_stage_c.safetensors", "checkpoints/stable_cascade_stage_b.safetensors",
                "checkpoints/sd_xl_base_1.0.safetensors", "ppd_adapters/ppd_adapter_sdxl.safetensors",
                "vae/effnet_encoder.safetensors", "ppd_adapters/ppd_adapter.safetensors",
                "ppd_embeddings/ppd/user_00001.safetensors",
                "ppd_embeddings/ppd/anna_00001.safetensors", "ppd_embeddings/ppd/ben_00001.safetensors",
                "LLM/llava-onevision-qwen2-7b-ov-chat-hf/config.json"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).touch()
    pairs = comfy_server.base / "input" / "my_pairs"
    pairs.mkdir(parents=True, exist_ok=True)
    (pairs / "pairs.jsonl").touch()
    api = convert_ui_to_api(json.loads(workflow.read_text()), comfy_server.get("/object_info"))
    assert any(node["class_type"].startswith("PPD") for node in api.values())
    status, answer = comfy_server.post("/prompt", {"prompt": api})
    assert status == 200, json.dumps(answer)[:2000]
    entry = comfy_server.wait(answer["prompt_id"])  # placeholders cannot run: the error must be a clean one
    assert entry["status"]["status_str"] == "error" and execution_error(entry)


def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(comfy_server):
    status, answer = comfy_server.post("/prompt", {"prompt": _graph(adapter="missing.safetensors")})
    assert status == 400 and "adapter" in json.dumps(answer["node_errors"])

    entry = comfy_server.run(_graph(user_b_file="other_embedder.safetensors"))
    assert entry["status"]["status_str"] == "error"
    assert "Cannot mix" in execution_error(entry) and "same embedder settings" in execution_error(entry)

    graph = _graph()
    graph["blend"]["inputs"]["weight"] = 0.0
    graph["user_b"]["inputs"]["embedding"] = "other_embedder.safetensors"
    graph["stage_c"]["inputs"]["user_embedding"] = ["user_b", 0]
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "error" and "Re-embed the user" in execution_error(entry)

    entry = comfy_server.run(_graph(user_a="broken"))
    message = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and "good_2.png" in message and "not found" in message

    entry = comfy_server.run(_graph(prefix="after_errors", blend=0.25))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
