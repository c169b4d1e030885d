"""Small helpers shared by tests (no fixtures here: conftest holds those)."""

from __future__ import annotations

import torch

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.binding import model_info


def trained_looking_adapter(unet, embed_dim: int = 24, num_tokens: int = 5, seed: int = 1,
                            embedder: str = "test") -> PPDAdapter:
    """An adapter whose weights are all non-zero, as after training (a fresh one adds exactly nothing)."""
    config = AdapterConfig.for_model(model_info(unet), embed_dim=embed_dim, num_tokens=num_tokens,
                                       embedder=embedder)
    adapter = PPDAdapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def stage_c_inputs(batch: int = 2, size: int = 6, clip_dim: int = 32, seed: int = 0) -> dict:
    """Stage C conditioning laid out like the real one: 77 text tokens, pooled text, CLIP image (zeros)."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 16, size, size, generator=g), timestep_ratio=torch.rand(batch, generator=g),
                clip_text_pooled=torch.randn(batch, 1, clip_dim, generator=g),
                clip_text=torch.randn(batch, 77, clip_dim, generator=g), clip_img=torch.zeros(batch, 1, clip_dim))


def sdxl_inputs(batch: int = 2, size: int = 8, text_widths: tuple[int, int] = (16, 32), seed: int = 0) -> dict:
    """SDXL conditioning laid out like the real one: 77 tokens of both text encoders' states concatenated, the second
    one's pooled output and the six size/crop numbers (original size, crop top-left, target size)."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_hidden_states=torch.randn(batch, 77, sum(text_widths), generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, text_widths[1], generator=g),
                                       time_ids=torch.tensor([[2.0 * size, 2.0 * size, 0, 0, 2.0 * size, 2.0 * size]]
                                                             * batch)))


def random_image(seed: int, size=(40, 48), mode: str = "RGB"):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


def write_pair_folder(folder, n: int = 5, seed: int = 0, fmt: str = "jsonl", user_id: str | None = None):
    """A real pair folder: PNG/JPEG files and pairs.jsonl or pairs.csv with relative paths."""
    import csv
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        random_image(seed * 100 + 2 * i).save(folder / f"good_{i}.png")
        random_image(seed * 100 + 2 * i + 1).save(folder / f"bad_{i}.jpg", quality=90)
        row = {"prompt": f"a lighthouse at dusk, version {i}", "chosen": f"good_{i}.png", "rejected": f"bad_{i}.jpg"}
        if user_id:
            row["user_id"] = user_id
        rows.append(row)
    if fmt == "jsonl":
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with (folder / "pairs.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return folder


def jpeg_bytes(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    random_image(seed).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_pickapic(path, rows):
    """A parquet shard with Pick-a-Pic v2's real column names and types (JPEG bytes in jpg_0/jpg_1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "are_different": pa.array([r.get("are_different", True) for r in rows], pa.bool_()),
        "best_image_uid": pa.array(["x"] * len(rows), pa.string()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "created_at": pa.array([0] * len(rows), pa.int64()),
        "has_label": pa.array([r.get("has_label", True) for r in rows], pa.bool_()),
        "image_0_uid": pa.array(["a"] * len(rows), pa.string()),
        "image_1_uid": pa.array(["b"] * len(rows), pa.string()),
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
        "label_1": pa.array([r["label_1"] for r in rows], pa.float64()),
        "model_0": pa.array(["sdxl"] * len(rows), pa.string()),
        "model_1": pa.array(["sdxl"] * len(rows), pa.string()),
        "ranking_id": pa.array(list(range(len(rows))), pa.int64()),
        "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
        "num_example_per_prompt": pa.array([1] * len(rows), pa.int64()),
    }
    pq.write_table(pa.table(cols), path)
    return path


# Two small worlds of other shapes than the default (the full sweep is in docs/world-sweep.md). Results are
# deterministic on CPU for a fixed seed.
SMALL = {"seen_users": 24, "unseen_users": 8, "unseen_mixtures": 3, "pairs_per_user": 24, "pretrain_steps": 500,
         "eval_samples": 12, "sample_steps": 12}
# name -> (seed, world); each is its own one-world sweep, so that `make test`'s workers train them side by side.
SMALL_WORLDS = {"small-k4": (1, SMALL), "small-k3-c4": (3, {**SMALL, "k_styles": 3, "n_captions": 4})}
# Seed 2 of the k3 world meets every target but one: its interpolation is not monotone (seen 95%, unseen 100%,
# drift 0.43 sd), a miss of the kind docs/world-sweep.md explains for two of its nine worlds.


def write_tiny_clip_vision(folder, seed: int = 0):
    """A tiny real CLIP vision model with projection and its PIL processor, saved as a local checkpoint folder."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_color_pairs(folder, n: int = 12, size: int = 128):
    """A user who prefers warm, bright images to cold, dark ones: ``n`` pairs of noisy flat colours, ``size`` px, three
    captions (``a lighthouse, view 0..2``), in a pair folder (``pairs.jsonl``)."""
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        for side, colour in (("good", (0.65, 0.45, 0.2)), ("bad", (0.1, 0.2, 0.4))):
            arr = (torch.tensor(colour).view(1, 1, 3) + 0.3 * torch.rand(size, size, 3, generator=g))
            Image.fromarray((arr.clamp(0, 1) * 255).byte().numpy()).save(folder / f"{side}_{i}.png")
        rows.append({"prompt": f"a lighthouse, view {i % 3}", "chosen": f"good_{i}.png", "rejected": f"bad_{i}.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
