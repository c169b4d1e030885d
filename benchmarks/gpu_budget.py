"""What an artist's GPU needs: peak memory to train a lite or full adapter and to sample with one, from measured parts.

Nothing here needs a GPU. The table is the sum of per-component sizes:

- **weights**: parameter counts of Stage C and of the PPD adapter, counted exactly on the meta device (no memory);
  under ``mixed_precision = "bf16"`` ``ppd-train fit`` holds the frozen Stage C in bf16 (``stage_c_dtype = "auto"``,
  as diffusers' training scripts hold a frozen network; ``total_gib_fp32_stage_c`` is the same row with
  ``stage_c_dtype = "float32"``) and the adapter's parameters and gradients in float32; the optimizer state is
  8 bytes per adapter parameter for AdamW and 2 + 12/256 for ``adamw8bit`` (ppd_train/optim.py).
- **activations**: measured on the CPU at lite width in float32 by ``dpo_step.py`` (peak minus weights, gradients and
  optimizer state, 1 pair = 2 images at 24x24 latents = 1024 px) and by ``--forward`` here (one no-grad Stage C
  forward, batch 2 = one image with CFG). bf16 stores them in half the bytes; full Stage C is scaled by its width x
  attention blocks (2048 x 64 vs 1536 x 32 = 2.67x), since every block's saved tensors grow with both. SDXL's are
  measured at its own released config (``--sdxl-dpo``: ``dpo_step.py --kind sdxl --batch 1``); a 1024 px training
  step (128x128 latents) in float32 does not fit this CPU's 24 GB, so it is measured at a smaller latent and scaled
  by the number of latent positions (every saved tensor, attention included, grows linearly with them: PyTorch's
  attention kernels do not store the attention matrix; checked by measuring at two sizes). ``--forward`` measures
  SDXL's sampling forward at 1024 px itself.
- a fixed **1.0 GiB** for the CUDA context, cuBLAS workspaces and allocator slack; a total within the last 10% of a
  card is "tight" (the desktop and other programs hold some of it).

Sampling: the nodes keep the adapter on the CPU and move only K_u, V_u (a few MiB) to the GPU, so sampling needs
what ComfyUI's Stage C needs (weights in bf16) plus those.

    python benchmarks/gpu_budget.py --dpo docs/results/dpo_step-lite-cpu.json [--forward]
        [--sdxl-dpo docs/results/dpo_step-sdxl-cpu.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from measure import in_fresh_process, peak_memory_mib  # noqa: E402  (same folder)
from sampler_overhead import build, model_inputs  # noqa: E402

from ppd_train import optim
from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.binding import model_info

GIB, MIB = 2**30, 2**20
OVERHEAD_GIB = 1.0
CARDS = (8, 12, 16, 24)
SCALE = {"lite": 1.0, "full": (2048 * 64) / (1536 * 32), "sdxl": 1.0}  # activations against the measured ones
SIDE = {"lite": 24, "sdxl": 128}  # latent side of a 1024 px image
STATE_BYTES = {"adamw": 8.0, "adamw8bit": optim.STATE_BYTES}


def fit(gib: float, card: int) -> str:
    """yes, tight (within the last 10% of the card: other programs, fragmentation) or no."""
    return "yes" if gib <= 0.9 * card else "tight" if gib <= card else "no"


def counts(kind: str) -> tuple[int, int]:
    """(base model parameters, adapter parameters), counted without allocating."""
    with torch.device("meta"):
        unet = build(kind, torch.device("meta"), torch.float32)
        adapter = PPDAdapter(AdapterConfig.for_model(model_info(unet), embed_dim=896, num_tokens=29))
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in adapter.parameters())


def forward_activations(kind: str) -> dict:
    """Peak above the weights of one no-grad forward (``lite`` or ``sdxl``), batch 2 at 1024 px, float32 (run in a
    fresh process)."""
    device = torch.device("cpu")
    before = peak_memory_mib(device)
    unet = build(kind, device, torch.float32)
    inputs = model_inputs(unet, 2, SIDE[kind], device, torch.float32)
    held = peak_memory_mib(device)
    with torch.no_grad():
        unet(**inputs)
    return {"forward_mb": peak_memory_mib(device) - held, "weights_mb": held - before}


def training_activations(dpo: dict, n_adapter: int) -> dict[bool, float]:
    """float32 training activations (MiB) of a dpo_step.py run, by gradient checkpointing: the baseline's peak
    minus its weights and the adapter's gradients and AdamW moments."""
    state_mb = n_adapter * (4 + STATE_BYTES["adamw"]) / MIB
    return {row["checkpointing"]: row["peak_mb"]["median"] - row["weights_mb"] - state_mb
            for row in dpo["rows"] if row["variant"] == "adapters-disabled"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpo", help="dpo_step.py JSON at lite width (CPU, float32); required")
    ap.add_argument("--sdxl-dpo", help="dpo_step.py JSON at SDXL's config (CPU, float32, --size 128): SDXL rows")
    ap.add_argument("--forward", action="store_true", help="measure the sampling forward's activations (minutes)")
    ap.add_argument("--forward-mb", type=float, help="or give that measurement (MiB, float32, lite)")
    ap.add_argument("--sdxl-forward-mb", type=float, help="and SDXL's (MiB, float32, 1024 px)")
    ap.add_argument("--no-ckpt-peak-mb", type=float,
                    help="the baseline's peak without checkpointing, when --dpo has no such row (MiB, lite, float32)")
    ap.add_argument("--out", default="gpu_budget.json")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="lite", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.result:  # the fresh process of --forward
        with open(args.result, "w") as f:
            json.dump(forward_activations(args.kind), f)
        return
    if not args.dpo:
        ap.error("--dpo is required")
    runs = {"lite": json.load(open(args.dpo))}
    if args.sdxl_dpo:
        runs["sdxl"] = json.load(open(args.sdxl_dpo))
    for kind, run in runs.items():
        want = {"kind": kind, "dtype": "torch.float32"} | ({"batch": 1} if kind == "sdxl" else {})
        if any(run.get(k) != v for k, v in want.items()):
            raise SystemExit(f"--{'sdxl-' if kind == 'sdxl' else ''}dpo must be a float32 dpo_step.py run with {want}")
    # training activations against the measured run: full by width x blocks, SDXL by latent positions up to 1024 px
    train_scale = dict(SCALE, sdxl=(SIDE["sdxl"] / runs["sdxl"]["size"]) ** 2 if "sdxl" in runs else 1.0)
    kinds = ("lite", "full", "sdxl") if "sdxl" in runs else ("lite", "full")
    sizes = {kind: counts(kind) for kind in kinds}
    act = {kind: training_activations(run, sizes[kind][1]) for kind, run in runs.items()}  # MiB by checkpointing
    if args.no_ckpt_peak_mb and False not in act["lite"]:
        weights = next(r["weights_mb"] for r in runs["lite"]["rows"] if r["variant"] == "adapters-disabled")
        act["lite"][False] = args.no_ckpt_peak_mb - weights - sizes["lite"][1] * (4 + STATE_BYTES["adamw"]) / MIB
    forward = {"lite": args.forward_mb, "sdxl": args.sdxl_forward_mb}
    if args.forward:
        forward = {kind: in_fresh_process(__file__, ["--kind", kind])["forward_mb"] for kind in runs}
    measured = {"lite": "lite", "full": "lite", "sdxl": "sdxl"}  # whose measurement each row scales
    rows = []
    for kind, (n_unet, n_adapter) in sizes.items():
        for ck, act_mb in sorted(act[measured[kind]].items(), reverse=True):
            for opt, state in STATE_BYTES.items():
                parts = {"base_model": n_unet * 2 / GIB, "adapter": n_adapter * 4 / GIB,
                         "gradients": n_adapter * 4 / GIB, "optimizer": n_adapter * state / GIB,
                         "activations": act_mb * train_scale[kind] / 2 * MIB / GIB, "overhead": OVERHEAD_GIB}
                rows.append({"task": "train", "kind": kind, "checkpointing": ck, "optimizer": opt, "parts": parts,
                             "total_gib": sum(parts.values()),
                             "total_gib_fp32_stage_c": sum(parts.values()) + parts["base_model"]})
                if opt != "adamw":  # against the same recipe with AdamW: what the option saves
                    base = rows[-len(STATE_BYTES)]
                    rows[-1]["vs_adamw"] = rows[-1]["total_gib"] / base["total_gib"]
                    rows[-1]["vs_adamw_without_overhead"] = ((rows[-1]["total_gib"] - OVERHEAD_GIB)
                                                             / (base["total_gib"] - OVERHEAD_GIB))
        forward_mb = forward.get(measured[kind])
        if forward_mb is not None:
            parts = {"base_model": n_unet * 2 / GIB, "activations": forward_mb * SCALE[kind] / 2 * MIB / GIB,
                     "overhead": OVERHEAD_GIB}
            rows.append({"task": "sample", "kind": kind, "parts": parts, "total_gib": sum(parts.values())})
    head = " ".join(f"{c:>5d}G" for c in CARDS)
    print(f"{'task':6s} {'model':7s} {'ckpt':>5s} {'optimizer':9s} {'GiB':>6s}  {head}")
    for r in rows:
        fits = " ".join(f"{fit(r['total_gib'], c):>6s}" for c in CARDS)
        bf16 = f" (float32 base model: {r['total_gib_fp32_stage_c']:.1f})" if "total_gib_fp32_stage_c" in r else ""
        if "vs_adamw" in r:
            bf16 += f" {r['vs_adamw']:.3f}x AdamW ({r['vs_adamw_without_overhead']:.3f}x without the overhead)"
        print(f"{r['task']:6s} {r['kind']:7s} {str(r.get('checkpointing', '')):>5s} {r.get('optimizer', ''):9s} "
              f"{r['total_gib']:6.1f}  {fits}   " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()) + bf16)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "gpu_budget", "params": sizes, "activations_fp32_lite_mb": act["lite"],
                   "activations_fp32_sdxl_mb": act.get("sdxl"), "forward_fp32_lite_mb": forward["lite"],
                   "forward_fp32_sdxl_mb": forward.get("sdxl"), "sdxl_train_scale": train_scale["sdxl"],
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
