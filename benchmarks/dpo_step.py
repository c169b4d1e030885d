"""One Diffusion-DPO training step: our adapter-off reference vs the usual frozen second copy of Stage C.

Both recipes run the same policy pass (adapter on, with gradients) on the same inputs; they differ only in the
reference: ours switches the adapter off on the same network, the usual recipe keeps a frozen copy of Stage C. Peak
memory (CUDA allocator; on CPU, the weights held, which is where the recipes differ) and median step time are
printed with ratios, with and without gradient checkpointing.

    python benchmarks/dpo_step.py [--kind tiny|small|lite|full] [--batch 4] [--size 24]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics

import torch
from sampler_overhead import build, stage_c_inputs  # noqa: E402  (same folder)
from timing import timed  # noqa: E402

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.loss import dpo_loss
from ppd_train.stage_c import PPDBinding, stage_c_info


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


def weights_mb(*modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers())) / 2**20


def run(recipe: str, kind: str, checkpointing: bool, batch: int, size: int, steps: int, device, dtype) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = peak_mb(device) if device.type == "cuda" else 0.0
    unet = build(kind, device, dtype).requires_grad_(False)
    reference = copy.deepcopy(unet) if recipe == "second copy" else None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    info = stage_c_info(unet)
    torch.manual_seed(0)
    adapter = PPDAdapter(AdapterConfig.for_stage_c(info, embed_dim=896, num_tokens=29)).to(device, dtype)
    binding = PPDBinding(unet, adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    b2 = 2 * batch
    inputs = stage_c_inputs(unet, b2, size, device, dtype)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(batch, 16, size, size, generator=g).to(device, dtype)
    users = torch.randn(b2, 29, 896, generator=g).to(device, dtype)
    def one_step() -> None:
        with torch.no_grad():
            if reference is None:
                with binding.adapter_off():
                    ref = unet(**inputs).sample
            else:
                ref = reference(**inputs).sample
        with binding.user(adapter(users)):
            pred = unet(**inputs).sample
            loss = dpo_loss(pred[:batch], pred[batch:], ref[:batch], ref[batch:], eps, 2500.0).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # the first step includes allocation and optimizer-state creation
    times = [timed(one_step, device) for _ in range(steps)]
    binding.detach()
    return {"recipe": recipe, "checkpointing": checkpointing, "step_s": statistics.median(times),
            "peak_mb": peak_mb(device) - before, "weights_mb": weights_mb(unet, reference, adapter)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "small", choices=["tiny", "small", "lite", "full"])
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="dpo_step.json")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for checkpointing in (True, False):
        for recipe in ("adapter off", "second copy"):
            rows.append(run(recipe, args.kind, checkpointing, args.batch, args.size, args.steps, device, dtype))
    print(f"DPO step, Stage C '{args.kind}', {args.batch} pairs, latent {args.size}x{args.size}, {device} {dtype}")
    print(f"{'reference':12s} {'ckpt':>5s} {'step s':>8s} {'peak MiB':>9s} {'weights MiB':>11s}")
    for r in rows:
        print(f"{r['recipe']:12s} {str(r['checkpointing']):>5s} {r['step_s']:8.3f} {r['peak_mb']:9.0f} "
              f"{r['weights_mb']:11.0f}")
    for ck in (True, False):
        ours = next(r for r in rows if r["recipe"] == "adapter off" and r["checkpointing"] == ck)
        usual = next(r for r in rows if r["recipe"] == "second copy" and r["checkpointing"] == ck)
        memory = (f"peak memory ratio {ours['peak_mb'] / usual['peak_mb']:.3f}" if cuda else
                  f"weights ratio {ours['weights_mb'] / usual['weights_mb']:.3f}")
        print(f"checkpointing={ck}: step time ratio {ours['step_s'] / usual['step_s']:.3f}, {memory}")
    with open(args.out, "w") as f:
        json.dump({"kind": args.kind, "device": str(device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
