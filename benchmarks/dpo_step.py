"""One Diffusion-DPO training step of the adapter: the recipe a user would otherwise run, ours, and a full fine-tune's.

Every variant runs the same policy pass (adapter on, with gradients) on the same inputs; they differ in the reference
and the optimizer:

- **adapters disabled, AdamW** (the baseline): the same network with the adapter switched off as the reference, as
  diffusers' Diffusion-DPO script does for adapter training with ``disable_adapters()``; float32 AdamW state. This is
  also the trainer's default (``optimizer = "adamw"``), so our default is this recipe, ratio 1.0 by construction.
- **adapters disabled, AdamW 8-bit**: the trainer with ``optimizer = "adamw8bit"`` (ppd_train/optim.py).
- **second copy, AdamW**: a frozen duplicate of Stage C as the reference, which full fine-tuning needs (there the
  policy's own weights move); for adapter-only training it computes exactly what the adapter-off pass computes.

Each run of a variant is a fresh process (a CPU's peak resident set cannot be reset), and the variants are run
interleaved (A B C A B C ...), ``--repeats`` times, so this machine's drift hits each alike. Reported: the median with
min-max of the per-run step times, of the optimizer step alone, and of the peak memory above what the process held
before building the model, with ratios to the baseline's medians, with and without gradient checkpointing.

    python benchmarks/dpo_step.py [--kind tiny|small|lite|full|sdxl|sdxl-tiny] [--batch 4] [--size 24] [--repeats 3]
        [--ckpt yes]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from measure import fmt, in_fresh_process, interleaved, peak_memory_mib, spread, timed  # noqa: E402
from sampler_overhead import KINDS, build, model_inputs  # noqa: E402  (same folder)

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.binding import model_info
from ppd_train.loss import dpo_loss
from ppd_train.optim import make_optimizer
from ppd_train.stage_c import PPDBinding

# name: (reference, optimizer); the first is the baseline the others are divided by
VARIANTS = {"adapters-disabled": ("adapters disabled", "adamw"),
            "adapters-disabled-8bit": ("adapters disabled", "adamw8bit"),
            "second-copy": ("second copy", "adamw")}


def weights_mb(*modules) -> float:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers())) / 2**20


def run(recipe: str, optimizer: str, kind: str, checkpointing: bool, batch: int, size: int, steps: int, device,
        dtype) -> dict:
    before = peak_memory_mib(device)
    unet = build(kind, device, dtype).requires_grad_(False)
    reference = copy.deepcopy(unet) if recipe == "second copy" else None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    info = model_info(unet)
    torch.manual_seed(0)
    adapter = PPDAdapter(AdapterConfig.for_model(info, embed_dim=896, num_tokens=29)).to(device, dtype)
    binding = PPDBinding(unet, adapter)
    opt = make_optimizer(optimizer, adapter.parameters(), 1e-5, 0.0)  # the trainer's optimizers
    b2 = 2 * batch
    inputs = model_inputs(unet, b2, size, device, dtype)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    users = torch.randn(b2, 29, 896, generator=g).to(device, dtype)
    opt_times: list[float] = []

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
        opt_times.append(timed(opt.step, device))
        opt.zero_grad(set_to_none=True)

    one_step()  # the first step includes allocation and optimizer-state creation
    times = [timed(one_step, device) for _ in range(steps)]
    binding.detach()
    return {"step_s": statistics.median(times), "optimizer_s": statistics.median(opt_times[1:]),
            "peak_mb": peak_memory_mib(device) - before, "weights_mb": weights_mb(unet, reference, adapter)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "small", choices=KINDS)
    ap.add_argument("--batch", type=int, default=4 if cuda else 2, help="pairs per step")
    ap.add_argument("--size", type=int, default=24 if cuda else 16,
                    help="latent side (Stage C 24, SDXL 128 = 1024x1024 images)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one untimed)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs of each variant, interleaved")
    ap.add_argument("--ckpt", default="both", choices=["both", "yes", "no"], help="gradient checkpointing")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which variants (the first is the baseline)")
    ap.add_argument("--out", default="dpo_step.json")
    ap.add_argument("--gather", action="store_true", help="report the runs logged beside --out, run nothing")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # NAME:0|1, run by the parent in a fresh process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.variant:
        name, ckpt = args.variant.split(":")
        row = run(*VARIANTS[name], args.kind, ckpt == "1", args.batch, args.size, args.steps, device, dtype)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return
    common = ["--kind", args.kind, "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
    ckpts = {"both": (True, False), "yes": (True,), "no": (False,)}[args.ckpt]
    keys = [(name, ck) for ck in ckpts for name in args.variants.split(",")]
    log = f"{args.out}.runs.jsonl"  # each run appended as it ends: runs cut short or made apart are read by --gather

    def one(key: tuple[str, bool]) -> dict:
        got = in_fresh_process(__file__, [*common, "--variant", f"{key[0]}:{int(key[1])}"])
        with open(log, "a") as f:
            f.write(json.dumps({"variant": key[0], "checkpointing": key[1], **got}) + "\n")
        return got

    if args.gather:
        with open(log) as f:
            done = [json.loads(line) for line in f]
        keys = [k for k in keys if any((d["variant"], d["checkpointing"]) == k for d in done)]
        runs = {k: [d for d in done if (d["variant"], d["checkpointing"]) == k] for k in keys}
    else:
        runs = interleaved(keys, args.repeats, one)
    args.repeats = min(len(v) for v in runs.values())
    what = "CUDA allocator peak" if cuda else "peak resident set"
    print(f"DPO step, '{args.kind}', {args.batch} pairs, latent {args.size}x{args.size}, {device} {dtype}; "
          f"peak = {what} above the process before building; median (min-max) of {args.repeats}+ interleaved runs")
    print(f"{'reference':18s} {'optimizer':9s} {'ckpt':>5s} {'step s':>22s} {'optimizer step s':>22s} "
          f"{'peak MiB':>20s} {'weights':>7s} {'time/base':>9s} {'peak/base':>9s}")
    rows = []
    for name, ck in keys:
        recipe, optimizer = VARIANTS[name]
        got = runs[(name, ck)]
        row = {"variant": name, "reference": recipe, "optimizer": optimizer, "checkpointing": ck,
               **{k: spread([r[k] for r in got]) for k in ("step_s", "optimizer_s", "peak_mb")},
               "weights_mb": got[0]["weights_mb"]}
        base = next((r for r in rows if r["checkpointing"] == ck), row)  # the baseline comes first
        row["time_ratio"] = row["step_s"]["median"] / base["step_s"]["median"]
        row["peak_ratio"] = row["peak_mb"]["median"] / base["peak_mb"]["median"]
        row["optimizer_share"] = row["optimizer_s"]["median"] / row["step_s"]["median"]
        rows.append(row)
        print(f"{recipe:18s} {optimizer:9s} {str(ck):>5s} {fmt(row['step_s'], 3):>22s} "
              f"{fmt(row['optimizer_s'], 3):>22s} {fmt(row['peak_mb'], 0):>20s} {row['weights_mb']:7.0f} "
              f"{row['time_ratio']:9.3f} {row['peak_ratio']:9.3f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "dpo_step", "baseline": "adapters disabled, AdamW",
                   "kind": args.kind, "device": str(device), "dtype": str(dtype), "batch": args.batch,
                   "size": args.size, "repeats": args.repeats, "memory": what, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
