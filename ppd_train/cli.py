"""``ppd-train`` (also ``python -m ppd_train``): the command-line face of the library."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import PPDError


def _cmd_size(args: argparse.Namespace) -> None:
    from .stage_c import adapter_parameter_count

    for kind in ("lite", "full"):
        n = adapter_parameter_count(kind, embed_dim=args.embed_dim, num_tokens=args.tokens)
        print(f"Stage C {kind:4s}: {n['block_count']} blocks, adapter {n['total'] / 1e6:.1f}M parameters "
              f"({n['blocks'] / 1e6:.1f}M in K/V projections, {n['projector'] / 1e6:.1f}M in the user projector)")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .adapter import read_adapter_config

    config, tensors = read_adapter_config(args.file)
    info = json.loads(config.to_json())
    info["parameters"] = sum(t.numel() for t in tensors.values())
    print(json.dumps(info, indent=2, sort_keys=True))


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _cmd_embed(args: argparse.Namespace) -> None:
    import torch

    from .embed_dataset import embed_users
    from .pairs import load_users

    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()
    device = accelerator.device if accelerator else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if bool(args.vlm) == bool(args.clip):
        raise PPDError("Give exactly one embedder: --vlm FOLDER (LLaVA-OneVision) or --clip FOLDER (pair difference).")
    embedder: object
    if args.vlm:
        from .embedders.vlm import VLMEmbedder

        embedder = VLMEmbedder(args.vlm, mode=args.mode, layers=args.layers, device=device, dtype=dtype,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    else:
        from .embedders.pairdiff import PairDifferenceEmbedder

        embedder = PairDifferenceEmbedder.from_clip(args.clip, device=device, dtype=dtype)
    users = load_users(args.pairs)
    table = embed_users(users, embedder, args.out, n_pairs=args.n_pairs, select=args.select, seed=args.seed,
                        batch_users=args.batch_size, accelerator=accelerator, show_progress=not args.quiet)
    print(f"{len(table)} user embeddings -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppd-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("size", help="adapter parameter counts for the released Stage C lite and full")
    p.add_argument("--embed-dim", type=int, default=3584, help="user-embedding width (3584: LLaVA-OV 7B, 896: 0.5B)")
    p.add_argument("--tokens", type=int, default=29, help="user-embedding tokens")
    p.set_defaults(func=_cmd_size)
    p = sub.add_parser("inspect", help="print an adapter file's metadata")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("embed", help="embed every user of a dataset into one table file (resumable)")
    p.add_argument("--pairs", nargs="+", required=True, help="pair folders and/or Pick-a-Pic parquet shards")
    p.add_argument("--out", required=True, help="output table (.safetensors); rerun the same command to resume")
    p.add_argument("--vlm", help="local LLaVA-OneVision folder (transformers format)")
    p.add_argument("--clip", help="local CLIP vision folder: pair-difference embedder")
    p.add_argument("--mode", default="direct", choices=["direct", "cot"], help="VLM mode (default: direct)")
    p.add_argument("--layers", default="all", help="VLM layers: all, last, or e.g. -1,-8 (default: all)")
    p.add_argument("--n-pairs", type=int, default=4, help="pairs per user embedding (default: 4)")
    p.add_argument("--select", default="random", choices=["random", "first"], help="which pairs (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="users per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="chain-of-thought generation length")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if _cuda() else "float32", choices=sorted(_DTYPES))
    p.add_argument("--accelerate", action="store_true", help="split users over the processes of `accelerate launch`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PPDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
