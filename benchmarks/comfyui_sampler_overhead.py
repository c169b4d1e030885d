"""Sampler overhead of the nodes' path: ComfyUI's own Stage C with the PPD patch vs the same model without it.

Needs a ComfyUI checkout (``COMFYUI_DIR``) and its Python. One CFG batch (cond + uncond chunks, the uncond chunk gets
no user, as in sampling); patched and vanilla forwards interleaved; medians and ratios over user-token counts.

    COMFYUI_DIR=... <comfy python> benchmarks/comfyui_sampler_overhead.py [--kind small|lite|full] [--size 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from measure import count_ops, fmt, spread, timed  # noqa: E402  (same folder)

REPO = Path(__file__).resolve().parents[1]


def load_comfy():
    folder = os.environ.get("COMFYUI_DIR")
    if not folder:
        sys.exit("Set COMFYUI_DIR to a ComfyUI checkout and run this with ComfyUI's Python.")
    sys.path.insert(0, folder)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("ppd_pack", REPO / "__init__.py")
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ppd_pack"] = pack
    spec.loader.exec_module(pack)


def stage_c(kind: str, device: torch.device, dtype: torch.dtype):
    import comfy.model_patcher
    import comfy.supported_models

    config: dict = {"stable_cascade_stage": "c"}  # ComfyUI's defaults: Stage C full
    if kind == "lite":
        config.update(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]])
    elif kind == "small":  # lite's depth at a CPU-friendly width
        config.update(c_cond=256, c_hidden=[256, 256], nhead=[4, 4], blocks=[[4, 12], [12, 4]], c_clip_text=256,
                      c_clip_text_pooled=256)
    model_config = comfy.supported_models.Stable_Cascade_C(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(dtype) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--kind", default="lite" if cuda else "small", choices=["small", "lite", "full"])
    ap.add_argument("--size", type=int, default=24 if cuda else 16, help="latent side (24 = a 1024px image)")
    ap.add_argument("--tokens", default="4,16,29,64")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default="comfyui_sampler_overhead.json")
    args = ap.parse_args()
    load_comfy()
    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    embedding_mod = importlib.import_module("ppd_pack.ppd_train.embedding")
    patch = importlib.import_module("ppd_pack.nodes.stage_c_patch")
    sockets = importlib.import_module("ppd_pack.nodes.sockets")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, config = stage_c(args.kind, device, dtype)
    _, info = patch.stage_c_of(model)
    text_width = config.get("c_clip_text", 1280)
    g = torch.Generator().manual_seed(1)
    inputs = [t.to(device, dtype) for t in (torch.randn(2, 16, args.size, args.size, generator=g),
                                            torch.rand(2, generator=g), torch.randn(2, 77, text_width, generator=g),
                                            torch.randn(2, 1, text_width, generator=g), torch.zeros(2, 1, 768))]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        cfg = adapter_mod.AdapterConfig.for_model(info, embed_dim=896, num_tokens=tokens, embedder="bench")
        adapter = adapter_mod.PPDAdapter(cfg)
        torch.nn.init.normal_(adapter.blocks[0].to_v.weight)  # non-zero, so the user term is really computed
        user = embedding_mod.UserEmbedding(torch.randn(tokens, 896, generator=g), "bench")
        patched = patch.apply_adapter(model, sockets.NamedAdapter("bench", adapter), user, 1.0, 0.0, 1.0)

        def run(patcher, measure=lambda f: timed(f, device)):
            # as in ComfyUI's sampling: every model call brings a new sigmas tensor on the sampling device
            options = {"cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 1.0, device=device)}
            patcher.patch_model()
            try:
                with torch.no_grad():
                    return measure(lambda: patcher.model.diffusion_model(*inputs, transformer_options=options))
            finally:
                patcher.unpatch_model()

        run(model), run(patched)  # warm-up (the first patched call also computes K_u/V_u)
        base, ppd = [], []
        for _ in range(args.repeats):
            base.append(run(model))
            ppd.append(run(patched))
        (ops_base, syncs_base), (ops_ppd, syncs_ppd) = run(model, count_ops), run(patched, count_ops)
        rows.append({"tokens": tokens, "base_ms": 1000 * statistics.median(base),
                     "ppd_ms": 1000 * statistics.median(ppd),
                     "ratio_per_repeat": spread([p / b for p, b in zip(ppd, base)]),  # the spread beside the medians
                     "ops_base": ops_base, "ops_ppd": ops_ppd,
                     "syncs_base": syncs_base, "syncs_ppd": syncs_ppd})
    print(f"ComfyUI Stage C '{args.kind}' ({len(info.block_widths)} attention blocks), latent {args.size}x{args.size}, "
          f"batch 2 (cond + uncond), {device} {dtype}, median of {args.repeats}")
    print(f"{'tokens':>6s} {'base ms':>8s} {'PPD ms':>8s} {'ratio':>6s} {'per-repeat ratio':>20s} "
          f"{'ops base/PPD':>13s} {'syncs':>6s}")
    for r in rows:
        print(f"{r['tokens']:6d} {r['base_ms']:8.1f} {r['ppd_ms']:8.1f} {r['ppd_ms'] / r['base_ms']:6.3f} "
              f"{fmt(r['ratio_per_repeat'], 3):>20s} {r['ops_base']:6d}/{r['ops_ppd']:<6d} "
              f"{r['syncs_base']}/{r['syncs_ppd']}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "comfyui_sampler_overhead",
                   "kind": args.kind, "device": str(device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
