"""How training time grows with the number of pairs: one epoch of the real ``Trainer.run`` per dataset size.

Everything a real run does is inside the timing (data hash, validation split and passes, checkpoints, the final
adapter file); only the dataset size changes. Linear growth means the seconds per pair stay flat: the table prints
them and their ratio to the smallest dataset, median over repeats.

    python benchmarks/training_scaling.py [--kind tiny|small|lite|full] [--pairs 256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from measure import timed  # noqa: E402
from sampler_overhead import build  # noqa: E402  (same folder)

from ppd_train.dpo_data import DPOData
from ppd_train.train import TrainConfig, Trainer


def dataset(unet, pairs: int, size: int, users: int = 32, captions: int = 16) -> DPOData:
    c = unet.config
    g = torch.Generator().manual_seed(pairs)
    return DPOData(torch.randn(pairs, 16, size, size, generator=g), torch.randn(pairs, 16, size, size, generator=g),
                   torch.randint(captions, (pairs,), generator=g), torch.randint(users, (pairs,), generator=g),
                   torch.randn(captions, 77, c.clip_text_in_channels, generator=g),
                   torch.randn(captions, 1, c.clip_text_pooled_in_channels, generator=g),
                   [f"u{i}" for i in range(users)])


def one_epoch(kind: str, pairs: int, batch: int, size: int, mixed_precision: str) -> float:
    unet = build(kind, torch.device("cpu"), torch.float32)
    data = dataset(unet, pairs, size)
    tokens = torch.randn(len(data.user_ids), 29, 64, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=pairs // batch, batch_size=batch, tensorboard=False,
                          checkpoint_every=50, val_every=50, log_every=10**9, mixed_precision=mixed_precision)
        trainer = Trainer(cfg, unet, data, tokens, "bench", show_progress=False)
        seconds = timed(trainer.run, trainer.device)
        trainer.detach()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "tiny", choices=["tiny", "small", "lite", "full"])
    ap.add_argument("--pairs", default="256,512,1024,2048")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="training_scaling.json")
    args = ap.parse_args()
    sizes = [int(p) for p in args.pairs.split(",")]
    precision = "bf16" if cuda else "no"
    times: dict[int, list[float]] = {p: [] for p in sizes}
    for _ in range(args.repeats):  # interleaved, so machine drift hits every size alike
        for p in sizes:
            times[p].append(one_epoch(args.kind, p, args.batch, args.size, precision))
    med = {p: statistics.median(t) for p, t in times.items()}
    base = med[sizes[0]] / sizes[0]
    print(f"one epoch of Trainer.run, Stage C '{args.kind}', batch {args.batch}, latent {args.size}x{args.size}, "
          f"{'cuda bf16' if cuda else 'cpu float32'}, median of {args.repeats}")
    print(f"{'pairs':>6s} {'steps':>6s} {'seconds':>8s} {'ms/pair':>8s} {'ratio':>6s}")
    for p in sizes:
        print(f"{p:6d} {p // args.batch:6d} {med[p]:8.2f} {1000 * med[p] / p:8.2f} {med[p] / p / base:6.2f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "training_scaling",
                   "kind": args.kind, "batch": args.batch, "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
