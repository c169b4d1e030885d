"""Sampler overhead: one Stage C forward with the PPD adapter vs without, same inputs, over user-token counts.

Baseline and PPD are timed interleaved in the same run (base, PPD, per-step, base, ...); printed: medians over repeats,
the ratio of the medians, and the spread (min-max) of the ratio within each repeat. "cached" = K_u, V_u
computed once per sampling run (what the sampler does); "per step" = recomputed every step, for comparison.
Reduced widths on CPU; real Stage C lite/full widths (random weights, bf16) when CUDA is present.

    python benchmarks/sampler_overhead.py [--kind tiny|small|lite|full] [--tokens 4,16,29,64] [--size 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet
from measure import count_ops, fmt, spread, timed  # noqa: E402  (same folder)

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.binding import model_info
from ppd_train.sdxl import sdxl_config
from ppd_train.stage_c import PPDBinding, stage_c_config
from ppd_train.tiny import tiny_sdxl_config, tiny_stage_c_config

# Stage C: tiny, small (lite's depth at a CPU-friendly width), lite, full; SDXL 1.0 at its released config and tiny
KINDS = ("tiny", "small", "lite", "full", "sdxl", "sdxl-tiny")


def build(kind: str, device: torch.device, dtype: torch.dtype) -> StableCascadeUNet | UNet2DConditionModel:
    torch.manual_seed(0)
    if kind.startswith("sdxl"):
        cfg = sdxl_config() if kind == "sdxl" else tiny_sdxl_config()
        return UNet2DConditionModel(**cfg).to(device, dtype).eval()
    if kind in ("lite", "full"):
        cfg = stage_c_config(kind)
    elif kind == "small":  # lite's depth at a CPU-friendly width
        cfg = {**tiny_stage_c_config(width=256, heads=4, clip_dim=256), "down_num_layers_per_block": (4, 12),
               "up_num_layers_per_block": (12, 4)}
    else:
        cfg = tiny_stage_c_config(width=64, heads=4, clip_dim=64)
    return StableCascadeUNet(**cfg).to(device, dtype).eval()


def stage_c_inputs(unet: StableCascadeUNet, batch: int, size: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random Stage C inputs laid out like real ones (77 text tokens, pooled text, zero CLIP image)."""
    c = unet.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(batch, 16, size, size, generator=g), timestep_ratio=torch.rand(batch, generator=g),
                  clip_text_pooled=torch.randn(batch, 1, c.clip_text_pooled_in_channels, generator=g),
                  clip_text=torch.randn(batch, 77, c.clip_text_in_channels, generator=g),
                  clip_img=torch.zeros(batch, 1, c.clip_image_in_channels))
    return {k: v.to(device, dtype) for k, v in inputs.items()}


def model_inputs(unet: Any, batch: int, size: int, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """Random inputs laid out like real ones for either base (``size``: the latent side)."""
    if model_info(unet).base != "sdxl":
        return stage_c_inputs(unet, batch, size, device, dtype)
    c: Any = unet.config
    g = torch.Generator().manual_seed(0)
    channels, text = int(c["in_channels"]), int(c["cross_attention_dim"])
    pooled = int(c["projection_class_embeddings_input_dim"]) - 6 * int(c["addition_time_embed_dim"])
    sides = float(8 * size)  # SDXL's size/crop numbers: original and target size in pixels, no crop
    return dict(sample=torch.randn(batch, channels, size, size, generator=g).to(device, dtype),
                timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
                encoder_hidden_states=torch.randn(batch, 77, text, generator=g).to(device, dtype),
                added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
                                   "time_ids": torch.tensor([[sides, sides, 0, 0, sides, sides]] * batch,
                                                            device=device, dtype=dtype)})


@torch.no_grad()
def measure(unet, binding: PPDBinding, adapter: PPDAdapter, user: torch.Tensor, inputs: dict, weight,
            repeats: int, device: torch.device) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    kv = adapter(user)

    def base():
        unet(**inputs)

    def ppd():
        with binding.user(kv, weight):
            unet(**inputs)

    def ppd_per_step():
        with binding.user(adapter(user), weight):
            unet(**inputs)

    for f in (base, ppd, ppd_per_step):  # warm-up
        f()
    ops = {"base": count_ops(base), "ppd": count_ops(ppd)}
    times: dict[str, list[float]] = {"base": [], "ppd": [], "per_step": []}
    for _ in range(repeats):  # interleaved, so drift hits all three alike
        times["base"].append(timed(base, device))
        times["ppd"].append(timed(ppd, device))
        times["per_step"].append(timed(ppd_per_step, device))
    return times, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "small", choices=KINDS)
    ap.add_argument("--tokens", default="4,16,29,64")
    ap.add_argument("--size", type=int, default=24 if cuda else 16, help="latent side (24 = 1024x1024 images)")
    ap.add_argument("--batch", type=int, default=2, help="2 = one image with CFG")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--embed-dim", type=int, default=896)
    ap.add_argument("--out", default="sampler_overhead.json")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    unet = build(args.kind, device, dtype)
    info = model_info(unet)
    b, s = args.batch, args.size
    inputs = model_inputs(unet, b, s, device, dtype)
    weight = torch.tensor([1.0, 0.0]) if b == 2 else 1.0  # CFG: the unconditional half gets no user
    rows = []
    print(f"'{args.kind}': {len(info.block_widths)} attention blocks, width {info.block_widths[0]}, "
          f"latent {s}x{s}, batch {b}, {device} {dtype}")
    print(f"{'tokens':>6s} {'base ms':>8s} {'ppd ms':>8s} {'ratio':>6s} {'per-step ms':>11s} {'ratio':>6s} "
          f"{'ops base/ppd':>13s} {'syncs':>6s}")
    for t in map(int, args.tokens.split(",")):
        torch.manual_seed(1)
        adapter = PPDAdapter(AdapterConfig.for_model(info, embed_dim=args.embed_dim, num_tokens=t)).to(device, dtype)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.02)
        binding = PPDBinding(unet, adapter)
        user = torch.randn(1, t, args.embed_dim, device=device, dtype=dtype)
        times, ops = measure(unet, binding, adapter, user, inputs, weight, args.repeats, device)
        binding.detach()
        med = {k: statistics.median(v) for k, v in times.items()}
        per_repeat = {k: spread([x / b for x, b in zip(times[k], times["base"])]) for k in ("ppd", "per_step")}
        row = {"tokens": t, "base_ms": med["base"] * 1e3, "ppd_ms": med["ppd"] * 1e3,
               "per_step_ms": med["per_step"] * 1e3, "ratio": med["ppd"] / med["base"],
               "per_step_ratio": med["per_step"] / med["base"], "ratio_per_repeat": per_repeat["ppd"],
               "per_step_ratio_per_repeat": per_repeat["per_step"], "ops_base": ops["base"][0],
               "ops_ppd": ops["ppd"][0], "syncs_base": ops["base"][1], "syncs_ppd": ops["ppd"][1]}
        rows.append(row)
        print(f"{t:6d} {row['base_ms']:8.2f} {row['ppd_ms']:8.2f} {row['ratio']:6.3f} {row['per_step_ms']:11.2f} "
              f"{row['per_step_ratio']:6.3f} {row['ops_base']:6d}/{row['ops_ppd']:<6d} "
              f"per-repeat ratio {fmt(per_repeat['ppd'], 3)} "
              f"{row['syncs_base']}/{row['syncs_ppd']}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "sampler_overhead",
                   "kind": args.kind, "device": str(device), "dtype": str(dtype), "size": s, "batch": b,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
