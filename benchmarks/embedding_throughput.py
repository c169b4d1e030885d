"""Embedding throughput: users/second and peak memory, direct vs chain-of-thought, over batch sizes.

Prints a table with medians over repeats and the cost ratio cot/direct measured in the same run; writes JSON.
Without --vlm it builds a tiny LLaVA-OneVision (CPU-sized); on a GPU pass a real folder, e.g. llava-onevision 0.5B.

    python benchmarks/embedding_throughput.py [--vlm FOLDER] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from ppd_train.embedders.vlm import VLMEmbedder
from ppd_train.pairs import pairs_from_images


def make_users(n: int, size: int = 384):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    users = []
    for u in range(n):
        imgs = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(8)]
        users.append(pairs_from_images([f"a photo of subject {u}"], imgs[:4], imgs[4:], user_id=f"u{u}"))
    return users


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", help="LLaVA-OneVision folder (default: a tiny one built here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--cot-tokens", type=int, default=64, help="generated tokens in chain-of-thought mode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="embedding_throughput.json")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    folder = args.vlm
    if folder is None:
        from ppd_train.tiny import build_tiny_llava

        folder = tempfile.mkdtemp()
        build_tiny_llava(folder)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    users = make_users(args.users, size=64 if args.vlm is None else 384)
    rows = []
    for mode in ("direct", "cot"):
        for bs in map(int, args.batch_sizes.split(",")):
            emb = VLMEmbedder(folder, mode=mode, device=device, dtype=dtype, max_new_tokens=args.cot_tokens,
                              batch_size=bs)
            emb.embed(users[:bs])  # warm-up
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.repeats):
                _sync(device)
                t = time.perf_counter()
                emb.embed(users)
                _sync(device)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append({"mode": mode, "batch": bs, "users_per_s": len(users) / med, "s_per_user": med / len(users),
                         "peak_gib": peak})
            emb.unload()
    direct = {r["batch"]: r["users_per_s"] for r in rows if r["mode"] == "direct"}
    print(f"{'mode':7s} {'batch':>5s} {'users/s':>9s} {'s/user':>8s} {'peak GiB':>8s} {'direct/this':>11s}")
    for r in rows:
        r["direct_speedup"] = direct[r["batch"]] / r["users_per_s"]
        print(f"{r['mode']:7s} {r['batch']:5d} {r['users_per_s']:9.2f} {r['s_per_user']:8.4f} {r['peak_gib']:8.2f} "
              f"{r['direct_speedup']:10.1f}x")
    with open(args.out, "w") as f:
        json.dump({"device": str(device), "dtype": args.dtype, "vlm": args.vlm or "tiny", "cot_tokens": args.cot_tokens,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
