"""One Diffusion-DPO training step: our adapter-off reference vs the usual frozen second copy of Stage C.

Both recipes run the same policy pass (adapter on, with gradients) on the same inputs; they differ only in the
reference: ours switches the adapter off on the same network, the usual recipe keeps a frozen copy of Stage C. Each
variant runs in a fresh process; its peak memory (CUDA allocator, or peak resident set size on a CPU, above what the
process held before building the model) and median step time are printed with ratios, with and without gradient
checkpointing.

    python benchmarks/dpo_step.py [--kind tiny|small|lite|full] [--batch 4] [--size 24]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from measure import in_fresh_process, peak_memory_mib, timed  # noqa: E402
from sampler_overhead import build, stage_c_inputs  # noqa: E402  (same folder)

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.loss import dpo_loss
from ppd_train.stage_c import PPDBinding, stage_c_info
from ppd_train.train import adamw

RECIPES = {"adapter-off": "adapter off", "second-copy": "second copy"}


def weights_mb(*modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers())) / 2**20


def run(recipe: str, kind: str, checkpointing: bool, batch: int, size: int, steps: int, device, dtype) -> dict:
    before = peak_memory_mib(device)
    unet = build(kind, device, dtype).requires_grad_(False)
    reference = copy.deepcopy(unet) if recipe == "second copy" else None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    info = stage_c_info(unet)
    torch.manual_seed(0)
    adapter = PPDAdapter(AdapterConfig.for_stage_c(info, embed_dim=896, num_tokens=29)).to(device, dtype)
    binding = PPDBinding(unet, adapter)
    opt = adamw(adapter.parameters(), 1e-5, 0.0)  # the trainer's optimizer
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
            "peak_mb": peak_memory_mib(device) - before, "weights_mb": weights_mb(unet, reference, adapter)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "small", choices=["tiny", "small", "lite", "full"])
    ap.add_argument("--batch", type=int, default=4 if cuda else 2, help="pairs per step")
    ap.add_argument("--size", type=int, default=24 if cuda else 16, help="latent side (24 = 1024x1024 images)")
    ap.add_argument("--steps", type=int, default=5 if cuda else 3)
    ap.add_argument("--out", default="dpo_step.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # RECIPE:0|1, run by the parent in a fresh process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.variant:
        recipe, ckpt = args.variant.split(":")
        row = run(RECIPES[recipe], args.kind, ckpt == "1", args.batch, args.size, args.steps, device, dtype)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return
    common = ["--kind", args.kind, "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
    rows = [in_fresh_process(__file__, [*common, "--variant", f"{recipe}:{int(ckpt)}"])
            for ckpt in (True, False) for recipe in RECIPES]
    what = "CUDA allocator peak" if cuda else "peak resident set"
    print(f"DPO step, Stage C '{args.kind}', {args.batch} pairs, latent {args.size}x{args.size}, {device} {dtype}; "
          f"peak = {what} above the process before building")
    print(f"{'reference':12s} {'ckpt':>5s} {'step s':>8s} {'peak MiB':>9s} {'weights MiB':>11s}")
    for r in rows:
        print(f"{r['recipe']:12s} {str(r['checkpointing']):>5s} {r['step_s']:8.3f} {r['peak_mb']:9.0f} "
              f"{r['weights_mb']:11.0f}")
    ratios = []
    for ck in (True, False):
        ours = next(r for r in rows if r["recipe"] == "adapter off" and r["checkpointing"] == ck)
        usual = next(r for r in rows if r["recipe"] == "second copy" and r["checkpointing"] == ck)
        ratio = {"checkpointing": ck, "step_time": ours["step_s"] / usual["step_s"],
                 "peak_memory": ours["peak_mb"] / usual["peak_mb"], "weights": ours["weights_mb"] / usual["weights_mb"]}
        ratios.append(ratio)
        print(f"checkpointing={ck}: step time ratio {ratio['step_time']:.3f}, peak memory ratio "
              f"{ratio['peak_memory']:.3f}, weights ratio {ratio['weights']:.3f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "dpo_step",
                   "kind": args.kind, "device": str(device), "dtype": str(dtype), "batch": args.batch,
                   "size": args.size, "memory": what, "rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
