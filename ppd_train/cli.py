"""``ppd-train`` (also ``python -m ppd_train``): the command-line face of the library."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from .errors import PPDError


def _cmd_size(args: argparse.Namespace) -> None:
    from .sdxl import sdxl_adapter_parameter_count
    from .stage_c import adapter_parameter_count

    rows = [(f"Stage C {kind:4s}", adapter_parameter_count(kind, embed_dim=args.embed_dim, num_tokens=args.tokens))
            for kind in ("lite", "full")]
    rows.append(("SDXL 1.0    ", sdxl_adapter_parameter_count(embed_dim=args.embed_dim, num_tokens=args.tokens)))
    for name, n in rows:
        print(f"{name}: {n['block_count']} blocks, adapter {n['total'] / 1e6:.1f}M parameters "
              f"({n['blocks'] / 1e6:.1f}M in K/V projections, {n['projector'] / 1e6:.1f}M in the user projector)")


def load_base(stage_c: str | None, stage_c_config: str | None, sdxl: str | None, sdxl_config: str | None,
              dtype=None, keys: tuple[str, str] = ("stage_c", "sdxl")):
    """The frozen base model a command runs on: Stage C or SDXL, whichever of the two is given (exactly one)."""
    import torch

    if bool(stage_c) == bool(sdxl):
        raise PPDError(f"Give one base model: {keys[0]} (a Stable Cascade Stage C) or {keys[1]} (an SDXL checkpoint), "
                       "not both and not neither.")
    if sdxl:
        from .sdxl import load_sdxl

        return load_sdxl(sdxl, dtype=dtype or torch.float32, config=sdxl_config or None)
    from .stage_c import load_stage_c

    return load_stage_c(stage_c, dtype=dtype or torch.float32, config=stage_c_config or None)  # type: ignore[arg-type]


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
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               quantize=args.quantize, offload=args.offload, max_gpu_gib=args.max_gpu_memory)
    else:
        if args.quantize != "none" or args.offload:
            raise PPDError("--quantize and --offload are VLM load options; the pair-difference embedder (--clip) "
                           "takes neither.")
        from .embedders.pairdiff import PairDifferenceEmbedder

        embedder = PairDifferenceEmbedder.from_clip(args.clip, device=device, dtype=dtype)
    problems: list[str] = []
    users = load_users(args.pairs, problems, args.merge_users)  # unreadable sources are listed, the rest embed
    for problem in problems:
        print(f"note: skipped: {problem}", file=sys.stderr)
    table = embed_users(users, embedder, args.out, n_pairs=args.n_pairs, select=args.select, seed=args.seed,
                        batch_users=args.batch_size, accelerator=accelerator, show_progress=not args.quiet)
    print(f"{len(table)} user embeddings -> {args.out}")
    low = sorted(u for u, e in table.items() if (e.meta.get("confidence") or {}).get("low_confidence"))
    if low:  # README "Do the pairs say enough?": the pairs of these users say too little about their taste
        needed = [e.meta["confidence"]["pairs_needed"] for u, e in table.items() if u in low]
        typical = sorted(n for n in needed if n is not None)
        hint = f"; typically about {typical[len(typical) // 2]} pairs would do" if typical else ""
        print(f"note: {len(low)} of {len(table)} users have low pair confidence ({', '.join(low[:5])}"
              f"{', ...' if len(low) > 5 else ''}): their {args.n_pairs} pairs say too little about their taste"
              f"{hint} (each user's confidence is in the table's metadata)", file=sys.stderr)


def _sdxl_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sdxl-config", help="single-file SDXL not shaped like SDXL 1.0: its diffusers folder (configs "
                   "read, not weights) or its UNet's config.json")
    p.add_argument("--sdxl-tokenizer", help="single-file SDXL: the CLIP tokenizer folder (ComfyUI's "
                   "comfy/sd1_tokenizer, found by itself when the pack is in ComfyUI) or a diffusers SDXL folder")


def _cmd_prepare(args: argparse.Namespace) -> None:
    import torch

    from .embedding import load_embedding_table
    from .pairs import load_users
    from .prepare import prepare_dpo_data

    if args.sdxl and (args.effnet or args.clip_text):
        raise PPDError("prepare: give Stage C's encoders (--effnet and --clip-text) or an SDXL model (--sdxl), not "
                       "both.")
    if not args.sdxl and not (args.effnet and args.clip_text):
        raise PPDError("prepare needs the base model's encoders: --effnet and --clip-text (Stage C), or --sdxl "
                       "(an SDXL diffusers folder or single-file checkpoint, for its VAE and text encoders).")
    dtype = getattr(torch, args.dtype)
    table = load_embedding_table(args.embeddings)[0] if args.embeddings else None
    users = load_users(args.pairs, merge_users=args.merge_users)
    image_size = args.image_size or (1024 if args.sdxl else 768)
    data = prepare_dpo_data(users, args.effnet, args.clip_text, args.out, embeddings=table,
                            image_size=image_size, batch_size=args.batch_size, device=args.device, dtype=dtype,
                            show_progress=not args.quiet, sdxl=args.sdxl, sdxl_config=args.sdxl_config,
                            sdxl_tokenizer=args.sdxl_tokenizer)
    print(f"{len(data)} pairs of {len(data.user_ids)} users, latents {tuple(data.latents_w.shape[1:])} -> {args.out}")


def _load(cls, args: argparse.Namespace):
    from .config import load_config, to_toml

    cfg = load_config(cls, args.config, args.set)
    if args.print_config:
        print(to_toml(cfg), end="")
        return None
    return cfg


def _cmd_fit(args: argparse.Namespace) -> None:
    import os
    from contextlib import nullcontext

    from .train import TrainConfig

    cfg = _load(TrainConfig, args)
    if cfg is None:
        return
    for key in ("stage_c" if not cfg.sdxl else "sdxl", "data", "embeddings"):
        if not getattr(cfg, key):
            raise PPDError(f"Config key '{key}' is required for fit (set it in the config or with --set {key}=...; "
                           "for SDXL, set sdxl instead of stage_c).")
    cfg.validate()
    from .run_lock import out_dir_lock

    # under torchrun / accelerate launch only the main process writes (and locks) the out_dir
    main_process = int(os.environ.get("RANK", "0")) == 0
    with out_dir_lock(cfg.out_dir) if main_process else nullcontext():
        _fit(cfg, args)


def _fit(cfg, args: argparse.Namespace) -> None:
    import errno

    from .checkpoint import find_latest
    from .dpo_data import DPOData
    from .embedding import load_embedding_table
    from .train import Trainer

    data = DPOData.load(cfg.data)
    table, _ = load_embedding_table(cfg.embeddings)
    tokens, embedder_id = data.user_tokens(table)
    unet = load_base(cfg.stage_c, cfg.stage_c_config, cfg.sdxl, cfg.sdxl_config, cfg.frozen_dtype())
    data.check_fits(unet.config, cfg.data, cfg.stage_c or cfg.sdxl)
    trainer = Trainer(cfg, unet, data, tokens, embedder_id, show_progress=not args.quiet)

    def resume_hint() -> str:
        latest = find_latest(trainer.out_dir / "checkpoints")
        saved = f"the last checkpoint is {latest.name}" if latest else "no checkpoint was written yet"
        return f"stopped at step {trainer.step} ({saved}). Rerun the same command to resume."

    try:
        out = trainer.run(resume=not args.no_resume, force=args.force)
    except KeyboardInterrupt:
        raise Stopped(f"Interrupted: {resume_hint()}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PPDError(f"The disk holding {cfg.out_dir} is full: {resume_hint()} Free some space first "
                           "(or lower keep_checkpoints).") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PPDError(f"Cannot write in {cfg.out_dir} ({e.strerror}: {e.filename}): {resume_hint()} "
                           "Fix the folder's permissions or set another out_dir.") from None
        raise
    if trainer.acc.is_main_process:  # under accelerate launch / torchrun, say it once
        best = trainer.best
        if best is not None:
            print(f"selected step {best['step']} of {trainer.step} by {trainer.select_metric} = {best['value']:.4f} "
                  f"(held-out users: {len(trainer.heldout_ids)}); the last step is in adapter_last.safetensors")
        print(f"adapter -> {out}")
    # under torchrun / accelerate launch: leave the process group before the interpreter exits, or gloo's threads can
    # abort the process at exit after a successful run (pytorch/pytorch#190489); nothing to do in a single process
    trainer.acc.end_training()


class Stopped(PPDError):
    """The user stopped the command (Ctrl+C); the exit status is the shell's usual 130."""

    exit_code = 130


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from .adapter import load_adapter
    from .binding import PPDBinding
    from .dpo_data import DPOData
    from .embedding import load_embedding_table
    from .evaluate import Conditions, EvalConfig, evaluate_users, load_reward

    cfg = _load(EvalConfig, args)
    if cfg is None:
        return
    data = DPOData.load(cfg.data)
    table, _ = load_embedding_table(cfg.embeddings)
    unet = load_base(cfg.stage_c, None, cfg.sdxl, cfg.sdxl_config)
    data.check_fits(unet.config, cfg.data, cfg.stage_c or cfg.sdxl)
    adapter = load_adapter(cfg.adapter)
    binding = PPDBinding(unet, adapter)
    heldout = set(adapter.config.training.get("heldout_users", []))  # held out of training by fit
    users = {u: table[u] for u in (cfg.users or sorted(table))}
    if data.base == "sdxl":  # sampled at the data's target size, uncropped, as SDXL's pipeline does
        assert data.time_ids is not None
        h, w = data.time_ids[0, 4:].tolist()
        cond = Conditions(data.text, data.pooled, 0, tuple(data.latents_w.shape[1:]),  # type: ignore[arg-type]
                          time_ids=torch.tensor([h, w, 0.0, 0.0, h, w]))
    else:
        from .stage_c import clip_image_dim

        cond = Conditions(data.text, data.pooled, clip_image_dim(unet),
                          tuple(data.latents_w.shape[1:]))  # type: ignore[arg-type]
    metrics = evaluate_users(binding, cond, users, load_reward(cfg.reward), set(data.user_ids) - heldout, cfg.samples,
                             cfg.seed, cfg.steps, heldout=heldout)
    from .safetensors_io import dumps_json

    text = dumps_json(metrics, sort_keys=False, indent=2)
    if cfg.out:
        from pathlib import Path

        Path(cfg.out).write_text(text)
    for group in ("seen", "heldout", "unseen"):
        if group in metrics:
            m = metrics[group]
            print(f"{group:7s}: win rate {m['win_rate']:.0%}, reward gain {m['reward_gain']:+.3f} ({m['users']} users)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .synthetic import DemoConfig, run_demo

    cfg = _load(DemoConfig, args)
    if cfg is None:
        return 0
    if args.out:
        cfg.out_dir = args.out
    if args.sweep:
        from .sweep import load_sweep, run_sweep

        rows = run_sweep(cfg, load_sweep(args.sweep), cfg.out_dir, show_progress=not args.quiet)
        missed = [r["world"] for r in rows if r["targets"] != "met"]
    else:
        missed = run_demo(cfg, show_progress=not args.quiet)["missed"]
    return 1 if args.check and missed else 0


def _cmd_tune_user(args: argparse.Namespace) -> int:
    import torch

    from .adapter import load_adapter
    from .binding import PPDBinding
    from .embedding import UserEmbedding, load_embeddings
    from .tune import TuneConfig, UserTuner, one_user

    cfg = _load(TuneConfig, args)
    if cfg is None:
        return 0
    for key in ("mode", "steps", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, "max_steps" if key == "steps" else key, getattr(args, key))
    cfg.validate()
    if bool(args.pairs) == bool(args.data):
        raise PPDError("Give the user's pairs either as --pairs (pair folders / Pick-a-Pic shards) or as --data (a "
                       "file from `ppd-train prepare`).")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PPDError(f"{out} exists; choose another --out, or pass --force to replace it.")
    start = UserEmbedding.load(args.embedding) if args.embedding else None
    library = [e for path in args.library for e in load_embeddings(path).values()]
    adapter = load_adapter(args.adapter)
    pairs_hash = None
    if bool(args.stage_c) == bool(args.sdxl):
        raise PPDError("Give the base model the adapter was trained on: --stage-c (Stable Cascade Stage C) or --sdxl "
                       "(SDXL), one of the two.")
    if args.pairs:
        from .pairs import content_hash, load_users
        from .prepare import encode_pairs, encode_sdxl_pairs

        if not args.sdxl and not (args.effnet and args.clip_text):
            raise PPDError("--pairs are images: give --effnet and --clip-text too, the encoders `ppd-train prepare` "
                           "uses (or pass a prepared --data file).")
        users = load_users(args.pairs, merge_users=args.merge_users)
        user = args.user or (next(iter(users)) if len(users) == 1 else None)
        if user is None or user not in users:
            raise PPDError(f"The pairs hold the users {', '.join(sorted(users)[:8])}; say which one with --user."
                           if user is None else f"No pairs of user {user!r} (users: {', '.join(sorted(users)[:8])}).")
        pairs_hash = content_hash(users[user])
        if args.sdxl:  # SDXL's own VAE and text encoders, from its diffusers folder or single file
            data = encode_sdxl_pairs({user: users[user]}, args.sdxl, args.image_size or 1024, device=args.device,
                                     show_progress=not args.quiet, config=args.sdxl_config,
                                     tokenizer=args.sdxl_tokenizer)
        else:
            data = encode_pairs({user: users[user]}, args.effnet, args.clip_text, args.image_size or 768,
                                device=args.device, show_progress=not args.quiet)
    else:
        from .dpo_data import DPOData

        data = DPOData.load(args.data)
    data, user = one_user(data, args.user)
    unet = load_base(args.stage_c, args.stage_c_config, args.sdxl, args.sdxl_config, getattr(torch, args.dtype),
                     keys=("--stage-c", "--sdxl")).to(args.device)
    data.check_fits(unet.config, args.data or "the pairs", args.stage_c or args.sdxl)
    binding = PPDBinding(unet, adapter.to(args.device))
    tuner = UserTuner(binding, data, cfg, start, library)
    tokens, report = tuner.run(show_progress=not args.quiet)
    emb = tuner.embedding(tokens, report, user, start_name=Path(args.embedding).name if args.embedding else "",
                          library_size=len(library), pairs_hash=pairs_hash)
    emb.save(out)
    before, after = report["val_before"], report["val_after"]
    if before:
        print(f"held-out pairs ({report['val_pairs']}): DPO loss {before['loss']:.5g} -> {after['loss']:.5g}, "
              f"implicit accuracy {before['implicit_acc']:.0%} -> {after['implicit_acc']:.0%}")
        if report["start_kept"]:
            print("the start scored best on the held-out pairs: it is kept unchanged")
    else:
        print("note: no held-out pairs (val_fraction 0, or a single pair): the last step is kept, unchecked")
    print(f"tuned {user} ({report['mode']}, {report['steps']} steps, {report['seconds']:.0f} s) -> {out}")
    if report["interrupted"]:
        print("interrupted: the best embedding so far was written", file=sys.stderr)
        return 130
    return 0


def _merge_users_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge-users", action="store_true", help="a user id found in two sources is one person: pool "
                   "their pairs (without it, refused)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=1e-4 or --set train.max_steps=500")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppd-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("size", help="adapter parameter counts for the released Stage C lite and full, and SDXL 1.0")
    p.add_argument("--embed-dim", type=_positive, default=3584,
                   help="user-embedding width (3584: LLaVA-OV 7B, 896: 0.5B)")
    p.add_argument("--tokens", type=_positive, default=29, help="user-embedding tokens")
    p.set_defaults(func=_cmd_size)
    p = sub.add_parser("inspect", help="print an adapter file's metadata")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("embed", help="embed every user of a dataset into one table file (resumable)")
    p.add_argument("--pairs", nargs="+", required=True, help="pair folders and/or Pick-a-Pic parquet shards")
    _merge_users_arg(p)
    p.add_argument("--out", required=True, help="output table (.safetensors); rerun the same command to resume")
    p.add_argument("--vlm", help="local LLaVA-OneVision folder (transformers format)")
    p.add_argument("--clip", help="local CLIP vision folder: pair-difference embedder")
    p.add_argument("--mode", default="direct", choices=["direct", "cot"], help="VLM mode (default: direct)")
    p.add_argument("--layers", default="all", help="VLM layers: all, last, or e.g. -1,-8 (default: all)")
    p.add_argument("--n-pairs", type=_positive, default=4, help="pairs per user embedding (default: 4)")
    p.add_argument("--select", default="random", choices=["random", "first"], help="which pairs (default: random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=4, help="users per forward pass")
    p.add_argument("--max-new-tokens", type=_positive, default=1024, help="chain-of-thought generation length")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if _cuda() else "float32", choices=sorted(_DTYPES))
    p.add_argument("--quantize", default="none", choices=["none", "8bit", "4bit"],
                   help="load the VLM in 8 or 4 bits (bitsandbytes, CUDA only; docs/performance.md: GPU sizes)")
    p.add_argument("--offload", action="store_true",
                   help="keep what fits of the VLM on the GPU and the rest in CPU RAM (accelerate; CUDA only)")
    p.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                   help="with --offload: GiB of VLM weights on the GPU (default: 90%% of its free memory)")
    p.add_argument("--accelerate", action="store_true", help="split users over the processes of `accelerate launch`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("prepare", help="encode pairs into cached latents + text for training (Stage C or SDXL)")
    p.add_argument("--pairs", nargs="+", required=True, help="pair folders and/or Pick-a-Pic parquet shards")
    _merge_users_arg(p)
    p.add_argument("--effnet", help="Stage C: Stable Cascade's effnet_encoder.safetensors")
    p.add_argument("--clip-text", help="Stage C: local CLIP-G text encoder folder (transformers format)")
    p.add_argument("--sdxl", help="or SDXL: a local diffusers folder, or a single-file .safetensors checkpoint (its "
                   "VAE and text encoders)")
    _sdxl_file_args(p)
    p.add_argument("--embeddings", help="embedding table from `ppd-train embed`: keeps its users, drops their "
                   "embedding pairs")
    p.add_argument("--out", required=True, help="DPO data file (.safetensors)")
    p.add_argument("--image-size", type=_positive, help="image size (Stage C: 768 -> 24x24 latents; SDXL: 1024 -> "
                   "128x128 latents)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("fit", help="train a PPD adapter with the user-conditioned Diffusion-DPO loss")
    _config_args(p)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in out_dir")
    p.add_argument("--force", action="store_true", help="resume even if the config or data changed")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("eval", help="win rate and reward gain of PPD vs the base model, per user")
    _config_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("tune-user", help="fit one user's embedding to all their pairs (adapter and Stage C frozen)")
    _config_args(p)
    p.add_argument("--pairs", nargs="+", help="the user's pair folders and/or Pick-a-Pic shards (images)")
    p.add_argument("--data", help="or: a DPO data file from `ppd-train prepare`")
    _merge_users_arg(p)
    p.add_argument("--user", help="which user, when the pairs hold several")
    p.add_argument("--effnet", help="Stable Cascade's effnet_encoder.safetensors (with --pairs)")
    p.add_argument("--clip-text", help="local CLIP-G text encoder folder (with --pairs)")
    p.add_argument("--image-size", type=_positive, help="image size, as for prepare (Stage C 768, SDXL 1024)")
    p.add_argument("--stage-c", help="Stage C: diffusers folder or Stability single file")
    p.add_argument("--stage-c-config", help="diffusers config.json, only for single files of non-standard size")
    p.add_argument("--sdxl", help="or SDXL: diffusers folder or single-file .safetensors checkpoint")
    _sdxl_file_args(p)
    p.add_argument("--adapter", required=True, help="the PPD adapter (.safetensors)")
    p.add_argument("--embedding", help="start: the user's embedding (from the embedder)")
    p.add_argument("--library", nargs="+", default=[], help="embedding tables / files of known users to mix")
    p.add_argument("--out", required=True, help="the tuned user embedding (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--mode", choices=["auto", "tokens", "mix", "mix+tokens"], help="what learns (default: auto)")
    p.add_argument("--steps", type=int, help="max steps per phase (default 200)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if _cuda() else "float32", choices=sorted(_DTYPES))
    p.set_defaults(func=_cmd_tune_user)

    p = sub.add_parser("demo", help="the synthetic-user world end to end (CPU, minutes)")
    _config_args(p)
    p.add_argument("--out", help="output folder (default: out_dir of the config, runs/demo)")
    p.add_argument("--sweep", metavar="FILE", help="run every world of a sweep file with this one recipe "
                   "(configs/sweep.toml); a table, sweep.json and sweep.png in the output folder")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed (on any world)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _positive(text: str) -> int:
    """argparse type for counts and sizes: a whole number >= 1 (0 would divide by zero or select nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PPDError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:  # fit says more (its step); embed and prepare resume or reuse their work when rerun
        print("error: interrupted. Rerun the same command to continue.", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _OS_HINTS:
            raise
        print(f"error: {e.strerror}: {e.filename or ''}. {_OS_HINTS[e.errno]}", file=sys.stderr)
        return 2


_OS_HINTS = {errno.ENOSPC: "Free some disk space and rerun the same command.",
             errno.EACCES: "Choose a location you can write, or fix its permissions.",
             errno.EPERM: "Choose a location you can write, or fix its permissions.",
             errno.EROFS: "That file system is read-only; choose another location."}


if __name__ == "__main__":
    sys.exit(main())
