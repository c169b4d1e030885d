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
    return parser


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
