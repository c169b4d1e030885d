"""Embedding throughput: users/second and peak memory, direct vs chain-of-thought, over batch sizes.

Prints a table with medians and their spread and the cost ratio cot/direct measured in the same run; writes JSON.
Each row runs in a fresh process, so its peak memory (CUDA allocator, or peak resident set size on a CPU, above what
the process held before loading the VLM) is its own; the rows are interleaved (direct, cot, direct, cot ...)
``--rounds`` times, so drift hits both modes alike.
Without --vlm it builds a tiny LLaVA-OneVision (CPU-sized); on a GPU pass a real folder, e.g. llava-onevision 0.5B.

    python benchmarks/embedding_throughput.py [--vlm FOLDER] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from measure import fmt, in_fresh_process, interleaved, peak_memory_mib, spread, timed  # noqa: E402  (same folder)

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


def one_row(folder: str, mode: str, batch: int, n_users: int, image_size: int, cot_tokens: int, repeats: int,
            device: torch.device, dtype: torch.dtype) -> dict:
    users = make_users(n_users, size=image_size)
    before = peak_memory_mib(device)
    emb = VLMEmbedder(folder, mode=mode, device=device, dtype=dtype, max_new_tokens=cot_tokens, batch_size=batch)
    emb.embed(users[:batch])  # warm-up
    med = statistics.median(timed(lambda: emb.embed(users), device) for _ in range(repeats))
    return {"mode": mode, "batch": batch, "users_per_s": n_users / med, "s_per_user": med / n_users,
            "peak_mib": peak_memory_mib(device) - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", help="LLaVA-OneVision folder (default: a tiny one built here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--cot-tokens", type=int, default=1024 if torch.cuda.is_available() else 128,
                    help="tokens generated in chain-of-thought mode (the embedder's default is 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs in each process (their median)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh-process runs of each row, interleaved (direct, cot, direct, cot, ...)")
    ap.add_argument("--out", default="embedding_throughput.json")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # MODE:BATCH, run by the parent in a fresh process
    ap.add_argument("--image-size", type=int, default=384, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.row:
        if device.type == "cpu":
            torch.set_num_threads(1)
        mode, batch = args.row.split(":")
        row = one_row(args.vlm, mode, int(batch), args.users, args.image_size, args.cot_tokens, args.repeats, device,
                      dtype)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return
    folder = args.vlm
    if folder is None:
        from ppd_train.tiny import build_tiny_llava

        folder = tempfile.mkdtemp()
        build_tiny_llava(folder)
    common = ["--vlm", folder, "--device", args.device, "--dtype", args.dtype, "--users", str(args.users),
              "--cot-tokens", str(args.cot_tokens), "--repeats", str(args.repeats),
              "--image-size", "64" if args.vlm is None else "384"]
    keys = [(mode, bs) for bs in map(int, args.batch_sizes.split(",")) for mode in ("direct", "cot")]
    runs = interleaved(keys, args.rounds, lambda k: in_fresh_process(__file__, [*common, "--row", f"{k[0]}:{k[1]}"]))
    rows = []
    for (mode, bs), got in runs.items():  # median over the rounds, with their spread
        per_s = spread([r["users_per_s"] for r in got])
        rows.append({"mode": mode, "batch": bs, "users_per_s": per_s["median"], "users_per_s_spread": per_s,
                     "s_per_user": 1 / per_s["median"], "peak_mib": statistics.median(r["peak_mib"] for r in got)})
    direct = {r["batch"]: r["users_per_s"] for r in rows if r["mode"] == "direct"}
    print(f"{'mode':7s} {'batch':>5s} {'users/s':>9s} {'s/user':>8s} {'peak MiB':>8s} {'direct/this':>11s}")
    for r in rows:
        r["direct_speedup"] = direct[r["batch"]] / r["users_per_s"]
        print(f"{r['mode']:7s} {r['batch']:5d} {r['users_per_s']:9.2f} {r['s_per_user']:8.4f} {r['peak_mib']:8.0f} "
              f"{r['direct_speedup']:10.1f}x  users/s {fmt(r['users_per_s_spread'], 2)}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "embedding_throughput",
                   "device": str(device), "dtype": args.dtype, "vlm": args.vlm or "tiny", "cot_tokens": args.cot_tokens,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
