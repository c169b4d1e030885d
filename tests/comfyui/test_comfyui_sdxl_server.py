"""An SDXL graph on a real ComfyUI server: the fixture pack's tiny SDXL (what Load Checkpoint gives) -> Apply PPD
Adapter (a saved user, an SDXL adapter from models/ppd_adapters) -> stock KSampler -> VAE Decode -> the Preference
Picker answered over its route; weight 0 equals the stock KSampler; a Stage C adapter on SDXL is an execution error
naming both bases and the next prompt runs."""

from __future__ import annotations

import importlib
import json
import time

import torch
from comfyui_support import ADAPTER, SDXL_ADAPTER, execution_error


def _graph(adapter=SDXL_ADAPTER, weight=1.0, pair_set="sdxl_picks"):
    def ksampler(model, seed):
        return {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}

    return {
        "sdxl": {"class_type": "PPDTestTinySDXL", "inputs": {"unet": "tiny_sdxl_unet.safetensors"}},
        "pos": {"class_type": "PPDTestSDXLConditioning", "inputs": {"text": "a lighthouse at dusk"}},
        "neg": {"class_type": "PPDTestSDXLConditioning", "inputs": {"text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "adapter": {"class_type": "PPDAdapterLoader", "inputs": {"adapter_name": adapter}},
        "user": {"class_type": "PPDLoadUserEmbedding", "inputs": {"embedding": "ben.safetensors"}},
        "ppd": {"class_type": "PPDApplyAdapter", "inputs": {
            "model": ["sdxl", 0], "ppd_adapter": ["adapter", 0], "user_embedding": ["user", 0], "weight": weight,
            "start_percent": 0.0, "end_percent": 1.0}},
        "a": ksampler(["ppd", 0], 1), "b": ksampler(["ppd", 0], 2), "stock": ksampler(["sdxl", 0], 1),
        "decode_a": {"class_type": "VAEDecode", "inputs": {"samples": ["a", 0], "vae": ["sdxl", 1]}},
        "decode_b": {"class_type": "VAEDecode", "inputs": {"samples": ["b", 0], "vae": ["sdxl", 1]}},
        "pick": {"class_type": "PPDPreferencePicker", "inputs": {
            "images_a": ["decode_a", 0], "images_b": ["decode_b", 0], "prompt": "a lighthouse at dusk",
            "pair_set": pair_set, "timeout_s": 60}},
        "save_a": {"class_type": "SaveLatent", "inputs": {"samples": ["a", 0], "filename_prefix": "sdxl/a"}},
        "save_stock": {"class_type": "SaveLatent", "inputs": {"samples": ["stock", 0],
                                                              "filename_prefix": "sdxl/stock"}},
    }


def _latent(server, entry, node):
    from safetensors.torch import load_file

    (item,) = entry["outputs"][node]["latents"]
    return load_file(server.base / "output" / item["subfolder"] / item["filename"])["latent_tensor"]


def _answer(server, prompt_id, choice, timeout: float = 300):
    deadline = time.time() + timeout  # generous: on a loaded 2-core machine a tiny SDXL graph can take minutes
    while not (pending := server.get("/ppd/picker/pending")) and time.time() < deadline:
        assert server.get(f"/history/{prompt_id}").get(prompt_id) is None, execution_error(
            server.get(f"/history/{prompt_id}")[prompt_id])
        time.sleep(0.3)
    (question,) = pending
    assert server.post("/ppd/picker/choose", {"request_id": question["request_id"], "choice": choice})[0] == 200
    return server.wait(prompt_id, timeout)


def test_sdxl_graph_with_the_stock_ksampler_and_the_picker(comfy_server):
    status, answer = comfy_server.post("/prompt", {"prompt": _graph()})
    assert status == 200, answer
    entry = _answer(comfy_server, answer["prompt_id"], "B")
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    personal, stock = _latent(comfy_server, entry, "save_a"), _latent(comfy_server, entry, "save_stock")
    assert (personal - stock).abs().max() > 1e-3  # the user changes SDXL's sample
    folder = comfy_server.base / "input" / "sdxl_picks"
    (row,) = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert row["prompt"] == "a lighthouse at dusk" and (folder / row["chosen"]).is_file()

    status, answer = comfy_server.post("/prompt", {"prompt": _graph(weight=0.0, pair_set="sdxl_picks_w0")})
    entry = _answer(comfy_server, answer["prompt_id"], "A")
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert torch.equal(_latent(comfy_server, entry, "save_a"), _latent(comfy_server, entry, "save_stock"))


def test_a_stage_c_adapter_on_sdxl_is_a_clear_error_and_the_queue_goes_on(comfy_server):
    graph = _graph(adapter=ADAPTER)
    for name in ("b", "decode_a", "decode_b", "pick"):
        graph.pop(name)
    entry = comfy_server.run(graph)
    message = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and message.startswith("PPDApplyAdapter"), message
    assert f"'{ADAPTER}' was made for Stage C custom" in message and "the connected SDXL model is SDXL" in message
    graph["adapter"]["inputs"]["adapter_name"] = SDXL_ADAPTER
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def _loop_graph(pair_set: str, num_pairs: int) -> dict:
    """The SDXL loop in one graph: the user's pairs (earlier picks) -> Tune User Embedding on the tiny SDXL's MODEL,
    CLIP and VAE -> Save User Embedding, and -> Apply PPD Adapter -> two stock KSamplers on the tiny SDXL CLIP's stock
    CLIPTextEncode -> the Preference Picker, which adds the next pick to the same pair set."""
    graph = _graph(pair_set=pair_set)
    text = {name: {"class_type": "CLIPTextEncode", "inputs": {"text": t, "clip": ["sdxl", 2]}}
            for name, t in (("pos", "a lighthouse at dusk"), ("neg", "blurry"))}
    graph.update(text, **{
        "pairs": {"class_type": "PPDPreferencePairLoader", "inputs": {
            "source": pair_set, "user_id": "", "num_pairs": num_pairs, "selection": "first", "seed": 0}},
        "tune": {"class_type": "PPDTuneUserEmbedding", "inputs": {
            "pairs": ["pairs", 0], "model": ["sdxl", 0], "clip": ["sdxl", 2], "vae": ["sdxl", 1],
            "ppd_adapter": ["adapter", 0], "user_embedding": ["user", 0], "steps": 6, "seed": 0, "lr": 0.1,
            "batch_size": 4, "image_size": 64}},
        "save_user": {"class_type": "PPDSaveUserEmbedding", "inputs": {
            "user_embedding": ["tune", 0], "filename_prefix": "ppd/sdxl_loop", "note": ""}},
        "report": {"class_type": "PreviewAny", "inputs": {"source": ["tune", 1]}}})
    graph["ppd"]["inputs"]["user_embedding"] = ["tune", 0]
    return graph


def test_sdxl_loop_picks_tune_sample_pick(comfy_server):
    """Earlier picks tune the user on SDXL, the tuned user samples through Apply PPD Adapter and the stock KSampler,
    the picker saves the next pick into the same set; queued again, the tuning reads that pick too."""
    from helpers import write_color_pairs

    UserEmbedding = importlib.import_module("ppd_pack.ppd_train.embedding").UserEmbedding
    folder = write_color_pairs(comfy_server.base / "input" / "sdxl_loop", 6, 64)
    for run, choice in ((1, "B"), (2, "A")):
        status, answer = comfy_server.post("/prompt", {"prompt": _loop_graph("sdxl_loop", 5 + run)})  # all pairs
        assert status == 200, answer
        entry = _answer(comfy_server, answer["prompt_id"], choice, timeout=600)  # tunes first
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        (report,) = entry["outputs"]["report"]["text"]
        assert report.startswith(f"Tuned ben on {5 + run} pairs") and "Held-out DPO loss" in report, report
        assert len((folder / "pairs.jsonl").read_text().splitlines()) == 6 + run  # the pick joined the set
        personal, stock = _latent(comfy_server, entry, "save_a"), _latent(comfy_server, entry, "save_stock")
        assert (personal - stock).abs().max() > 1e-3
    saved = sorted((comfy_server.base / "models" / "ppd_embeddings" / "ppd").glob("sdxl_loop_*.safetensors"))
    assert len(saved) == 2
    tuned = UserEmbedding.load(saved[-1])
    assert tuned.meta["tuned"]["pairs"] == 7 and tuned.embedder == comfy_server.assets["ben"].embedder
    assert not torch.equal(tuned.tokens, comfy_server.assets["ben"].tokens)
