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
  attention blocks (2048 x 64 vs 1536 x 32 = 2.67x), since every block's saved tensors grow with both.
- a fixed **1.0 GiB** for the CUDA context, cuBLAS workspaces and allocator slack; a total within the last 10% of a
  card is "tight" (the desktop and other programs hold some of it).

Sampling: the nodes keep the adapter on the CPU and move only K_u, V_u (a few MiB) to the GPU, so sampling needs
what ComfyUI's Stage C needs (weights in bf16) plus those.

    python benchmarks/gpu_budget.py --dpo docs/results/dpo_step-lite-cpu.json [--forward]
"""

from __future__ import annotations

import argparse
import json

import torch
from measure import in_fresh_process, peak_memory_mib  # noqa: E402  (same folder)
from sampler_overhead import build, stage_c_inputs  # noqa: E402

from ppd_train import optim
from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.stage_c import stage_c_info

GIB, MIB = 2**30, 2**20
OVERHEAD_GIB = 1.0
CARDS = (8, 12, 16, 24)
SCALE = {"lite": 1.0, "full": (2048 * 64) / (1536 * 32)}
STATE_BYTES = {"adamw": 8.0, "adamw8bit": optim.STATE_BYTES}


def fit(gib: float, card: int) -> str:
    """yes, tight (within the last 10% of the card: other programs, fragmentation) or no."""
    return "yes" if gib <= 0.9 * card else "tight" if gib <= card else "no"


def counts(kind: str) -> tuple[int, int]:
    """(Stage C parameters, adapter parameters), counted without allocating."""
    with torch.device("meta"):
        unet = build(kind, torch.device("meta"), torch.float32)
        adapter = PPDAdapter(AdapterConfig.for_model(stage_c_info(unet), embed_dim=896, num_tokens=29))
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in adapter.parameters())


def forward_activations() -> dict:
    """Peak above the weights of one no-grad lite forward, batch 2 at 24x24, float32 (run in a fresh process)."""
    device = torch.device("cpu")
    before = peak_memory_mib(device)
    unet = build("lite", device, torch.float32)
    inputs = stage_c_inputs(unet, 2, 24, device, torch.float32)
    held = peak_memory_mib(device)
    with torch.no_grad():
        unet(**inputs)
    return {"forward_mb": peak_memory_mib(device) - held, "weights_mb": held - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpo", help="dpo_step.py JSON at lite width (CPU, float32); required")
    ap.add_argument("--forward", action="store_true", help="measure the sampling forward's activations (minutes)")
    ap.add_argument("--forward-mb", type=float, help="or give that measurement (MiB, float32, lite)")
    ap.add_argument("--no-ckpt-peak-mb", type=float,
                    help="the baseline's peak without checkpointing, when --dpo has no such row (MiB, lite, float32)")
    ap.add_argument("--out", default="gpu_budget.json")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.result:  # the fresh process of --forward
        with open(args.result, "w") as f:
            json.dump(forward_activations(), f)
        return
    if not args.dpo:
        ap.error("--dpo is required")
    dpo = json.load(open(args.dpo))
    if dpo["kind"] != "lite" or dpo["dtype"] != "torch.float32":
        raise SystemExit("--dpo must be a lite-width float32 run of dpo_step.py")
    sizes = {kind: counts(kind) for kind in ("lite", "full")}
    adapter_lite = sizes["lite"][1]
    act: dict[bool, float] = {}  # float32 training activations at lite width, MiB, by gradient checkpointing
    for row in dpo["rows"]:
        if row["variant"] == "adapters-disabled":
            state_mb = adapter_lite * (4 + STATE_BYTES["adamw"]) / MIB  # gradients + moments
            act[row["checkpointing"]] = row["peak_mb"]["median"] - row["weights_mb"] - state_mb
    if args.no_ckpt_peak_mb and False not in act:
        weights = next(r["weights_mb"] for r in dpo["rows"] if r["variant"] == "adapters-disabled")
        act[False] = args.no_ckpt_peak_mb - weights - adapter_lite * (4 + STATE_BYTES["adamw"]) / MIB
    forward_mb = args.forward_mb
    if args.forward:
        forward_mb = in_fresh_process(__file__, [])["forward_mb"]
    rows = []
    for kind, (n_unet, n_adapter) in sizes.items():
        for ck, act_mb in sorted(act.items(), reverse=True):
            for opt, state in STATE_BYTES.items():
                parts = {"stage_c": n_unet * 2 / GIB, "adapter": n_adapter * 4 / GIB,
                         "gradients": n_adapter * 4 / GIB, "optimizer": n_adapter * state / GIB,
                         "activations": act_mb * SCALE[kind] / 2 * MIB / GIB, "overhead": OVERHEAD_GIB}
                rows.append({"task": "train", "kind": kind, "checkpointing": ck, "optimizer": opt, "parts": parts,
                             "total_gib": sum(parts.values()),
                             "total_gib_fp32_stage_c": sum(parts.values()) + parts["stage_c"]})
                if opt != "adamw":  # against the same recipe with AdamW: what the option saves
                    base = rows[-len(STATE_BYTES)]
                    rows[-1]["vs_adamw"] = rows[-1]["total_gib"] / base["total_gib"]
                    rows[-1]["vs_adamw_without_overhead"] = ((rows[-1]["total_gib"] - OVERHEAD_GIB)
                                                             / (base["total_gib"] - OVERHEAD_GIB))
        if forward_mb is not None:
            parts = {"stage_c": n_unet * 2 / GIB, "activations": forward_mb * SCALE[kind] / 2 * MIB / GIB,
                     "overhead": OVERHEAD_GIB}
            rows.append({"task": "sample", "kind": kind, "parts": parts, "total_gib": sum(parts.values())})
    head = " ".join(f"{c:>5d}G" for c in CARDS)
    print(f"{'task':6s} {'Stage C':7s} {'ckpt':>5s} {'optimizer':9s} {'GiB':>6s}  {head}")
    for r in rows:
        fits = " ".join(f"{fit(r['total_gib'], c):>6s}" for c in CARDS)
        bf16 = f" (float32 Stage C: {r['total_gib_fp32_stage_c']:.1f})" if "total_gib_fp32_stage_c" in r else ""
        if "vs_adamw" in r:
            bf16 += f" {r['vs_adamw']:.3f}x AdamW ({r['vs_adamw_without_overhead']:.3f}x without the overhead)"
        print(f"{r['task']:6s} {r['kind']:7s} {str(r.get('checkpointing', '')):>5s} {r.get('optimizer', ''):9s} "
              f"{r['total_gib']:6.1f}  {fits}   " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()) + bf16)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "gpu_budget", "params": sizes, "activations_fp32_lite_mb": act,
                   "forward_fp32_lite_mb": forward_mb, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
