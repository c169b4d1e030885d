"""Real size: every path of the project run once at the released model configs, with random weights built here.

No downloads: Stage C lite (and full, on a GPU), Stable Cascade's EfficientNet encoder, the CLIP-G text encoder
Stage C reads, and LLaVA-OneVision 0.5B are built from their released configs with random weights (a locally trained
byte-level tokenizer stands in for the real vocabulary; the embedding matrices keep their real sizes). The 7B VLM and
Stage C full are also counted on the meta device (``sizes``). Each path runs in a fresh process, so its peak memory
is its own (CPU: peak resident set; CUDA: the allocator's peak), and the script writes one JSON of wall time and
peak memory per path. Any error fails the run (exit status 1) after the other paths have run. A path this machine
cannot run (ComfyUI not installed, Stage C full on a CPU, not enough free memory) is skipped, and the JSON's
``skipped`` says why.

Defaults follow the device: on CUDA bf16 and the paper's lengths (1024 chain-of-thought tokens, 20 sampling steps,
10 training steps); on a CPU float32 and short lengths (the shapes are real; only the number of repeats is cut).
``--tiny`` runs the same code at tiny sizes (the test suite does, in one process, with ``--same-process``).

    python benchmarks/realsize.py --out realsize.json [--only prepare,embed_direct] [--work DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from measure import peak_memory_mib  # noqa: E402  (same folder)

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# Released configs (Hugging Face: llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf, Qwen2 text + SigLIP so400m vision)
QWEN2 = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=152000, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False),
}
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, image_size=384,
              patch_size=14)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, max_position_embeddings=77, hidden_act="gelu")


@dataclass
class Ctx:
    work: Path
    tiny: bool
    device: torch.device
    dtype: torch.dtype
    cot_tokens: int
    sample_steps: int
    fit_steps: int
    image_px: int  # the pairs' image size on disk
    effnet_px: int  # prepare's EfficientNet input (768 -> 24x24 latents)
    result: dict
    reserve_gib: float = 0.0  # memory to leave to others (a shared machine)

    def path(self, name: str) -> Path:
        return self.work / name


PATHS: dict[str, tuple[tuple[str, ...], Callable[[Ctx], None]]] = {}


def path(*needs: str):
    """Register a path; ``needs`` run first when their outputs are missing from the work folder."""
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        PATHS[fn.__name__] = (needs, fn)
        return fn
    return register


def done(ctx: Ctx, name: str) -> bool:
    return ctx.path(f".{name}.done").is_file()


class Skip(Exception):
    """This machine cannot run the path (the reason is the message): recorded in ``skipped``, not a failure."""


def free_gib(device: torch.device) -> float:
    """Memory free for a new model: the GPU's free memory, or the system's available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")  # not Linux: cannot tell, try


def need_memory(ctx: Ctx, gib: float, what: str) -> None:
    """Skip rather than swap or be killed (on a shared machine the kernel may kill another process instead)."""
    free = free_gib(ctx.device) - ctx.reserve_gib
    if free < gib:
        raise Skip(f"{what} needs about {gib:.1f} GiB; {free:.1f} GiB is free on this {ctx.device.type}"
                   + (f" (after the {ctx.reserve_gib:g} GiB --reserve-gib)" if ctx.reserve_gib else ""))


# ------------------------------------------------------------------------------------------------------ builders
def stage_c(ctx: Ctx, kind: str = "lite"):
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    from ppd_train.stage_c import stage_c_config
    from ppd_train.tiny import build_tiny_stage_c

    if ctx.tiny:
        return build_tiny_stage_c().to(ctx.device, ctx.dtype).requires_grad_(False)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        unet = StableCascadeUNet(**stage_c_config(kind))
    return unet.to(ctx.dtype).eval().requires_grad_(False)


def llava_config(size: str):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**SIGLIP), text_config=Qwen2Config(
        **QWEN2[size], max_position_embeddings=32768, rope_theta=1e6), vision_feature_select_strategy="full",
        vision_feature_layer=-1, tie_word_embeddings=QWEN2[size]["tie_word_embeddings"])


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------------- paths
@path()
def sizes(ctx: Ctx) -> None:
    """Parameter counts at the released configs, on the meta device (no memory): what the GPU table multiplies."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlavaOnevisionForConditionalGeneration

    from ppd_train.effnet import EfficientNetEncoder
    from ppd_train.stage_c import adapter_parameter_count

    out: dict[str, dict] = {}
    with torch.device("meta"):
        for size in ("0.5b", "7b"):
            m = LlavaOnevisionForConditionalGeneration(llava_config(size))
            out[f"llava_onevision_{size}"] = {"params": count(m), "vision_params": count(m.model.vision_tower),
                                              # what bitsandbytes quantizes: the Linear layers but lm_head
                                              "linear_params": sum(x.weight.numel() for name, x in m.named_modules()
                                                                   if isinstance(x, torch.nn.Linear)
                                                                   and not name.endswith("lm_head"))}
        out["clip_g_text"] = {"params": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))}
        out["effnet_encoder"] = {"params": count(EfficientNetEncoder())}
    for kind in ("lite", "full"):
        ctx_kind = Ctx(**{**ctx.__dict__, "tiny": False, "device": torch.device("meta"), "dtype": torch.float32})
        out[f"stage_c_{kind}"] = {"params": count(stage_c(ctx_kind, kind))}
        for width, tokens in ((896, 25), (3584, 29)):
            out[f"adapter_{kind}_{width}"] = {"params": adapter_parameter_count(kind, width, tokens)["total"]}
    for v in out.values():
        v["gib_fp32"], v["gib_bf16"] = v["params"] * 4 / 2**30, v["params"] * 2 / 2**30
    for size in ("0.5b", "7b"):  # quantized Linear layers (4-bit: + one 16-bit scale per 64), the rest in bf16
        v = out[f"llava_onevision_{size}"]
        rest = v["params"] - v["linear_params"]
        v["gib_8bit"] = (v["linear_params"] + 2 * rest) / 2**30
        v["gib_4bit"] = (v["linear_params"] * (0.5 + 2 / 64) + 2 * rest) / 2**30
    ctx.result["sizes"] = out


@path()
def build_pairs(ctx: Ctx) -> None:
    """One artist's 8 pairs as a pair folder, the images at ``image_px`` (1024: what Stage C makes)."""
    from PIL import Image

    folder = ctx.path("pairs/artist")
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        names = []
        for side in ("a", "b"):  # smooth random images (photographs are smooth; white noise is not)
            low = torch.rand(1, 3, 16, 16, generator=g)
            img = torch.nn.functional.interpolate(low, size=(ctx.image_px, ctx.image_px), mode="bicubic")
            arr = (img[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            names.append(f"{i}{side}.png")
            Image.fromarray(arr).save(folder / names[-1])
        rows.append({"prompt": f"a lighthouse at dusk, study {i}", "chosen": names[0], "rejected": names[1]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx.result["image_px"] = ctx.image_px


@path()
def build_encoders(ctx: Ctx) -> None:
    """Stable Cascade's EfficientNet encoder (its one size) and CLIP-G's text encoder at its released config."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from ppd_train.effnet import EfficientNetEncoder

    torch.manual_seed(0)
    effnet = EfficientNetEncoder()
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, ctx.path("effnet_encoder.safetensors"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a lighthouse at dusk, study 0 1 2 3 4 5 6 7"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", model_max_length=77)
    cfg = CLIP_G if not ctx.tiny else dict(CLIP_G, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, projection_dim=32)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    clip.save_pretrained(ctx.path("clip_g"))
    tokenizer.save_pretrained(ctx.path("clip_g"))
    ctx.result.update(effnet_params=count(effnet), clip_params=count(clip))


@path()
def build_vlm(ctx: Ctx) -> None:
    """LLaVA-OneVision 0.5B at its released config (the stock image processor: 384 px tiles, anyres_max_9)."""
    from ppd_train.tiny import build_llava, build_tiny_llava

    folder = ctx.path("vlm")
    if ctx.tiny:
        build_tiny_llava(folder)
    else:
        build_llava(folder, llava_config("0.5b"), image_size=384, num_image_tokens=729)
    ctx.result["vlm_gib_on_disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30


def _users(ctx: Ctx, n_pairs: int = 8):
    from ppd_train.pairs import load_users

    users = load_users([str(ctx.path("pairs/artist"))])
    return {u: p[:n_pairs] for u, p in users.items()}


@path("build_pairs", "build_encoders")
def prepare(ctx: Ctx) -> None:
    """``prepare``: 8 pairs -> Stage C latents through the EfficientNet at ``effnet_px`` + CLIP-G text."""
    from ppd_train.prepare import encode_pairs

    data = encode_pairs(_users(ctx), ctx.path("effnet_encoder.safetensors"), ctx.path("clip_g"),
                        image_size=ctx.effnet_px, device=ctx.device, dtype=ctx.dtype, show_progress=False)
    data.info = {"captions": len(data.text)}
    data.save(ctx.path("data.safetensors"))
    ctx.result.update(latent_shape=list(data.latents_w.shape[1:]), text_shape=list(data.text.shape[1:]))


def _embed(ctx: Ctx, mode: str, dtype: torch.dtype, out: str) -> None:
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.vlm import VLMEmbedder

    embedder = VLMEmbedder(ctx.path("vlm"), mode=mode, device=ctx.device, dtype=dtype, max_new_tokens=ctx.cot_tokens)
    users = _users(ctx, 4)
    inputs = embedder._inputs(list(users.values()))
    loaded = peak_memory_mib(ctx.device)
    t = time.perf_counter()
    table = embed_users(users, embedder, ctx.path(out), n_pairs=4, select="first", show_progress=False)
    (emb,) = table.values()
    ctx.result.update(prompt_tokens=int(inputs["input_ids"].shape[1]), images=int(inputs["pixel_values"].shape[0]),
                      tiles_per_image=int(inputs["pixel_values"].shape[1]), user_tokens=list(emb.tokens.shape),
                      embed_s=time.perf_counter() - t, peak_above_loaded_mib=peak_memory_mib(ctx.device) - loaded)
    if mode == "cot":
        ctx.result["generated_chars"] = len(emb.profile)


@path("build_pairs", "build_vlm")
def embed_direct(ctx: Ctx) -> None:
    """``embed`` in direct mode (one forward over 4 pairs); also the prompt length at three image sizes."""
    from PIL import Image

    from ppd_train.embedders.vlm import VLMEmbedder
    from ppd_train.pairs import pairs_from_images

    _embed(ctx, "direct", ctx.dtype, "table.safetensors")
    processor = VLMEmbedder.__new__(VLMEmbedder)  # the processor alone: how image size changes the prompt
    from ppd_train.embedders.llava_processor import ImageOnlyLlavaOnevisionProcessor

    processor.processor = ImageOnlyLlavaOnevisionProcessor.from_pretrained(ctx.path("vlm"), local_files_only=True)
    processor.device = torch.device("cpu")
    lengths = {}
    for px in (384, 768, 1024, 1536) if not ctx.tiny else (32, 64):
        imgs = [Image.new("RGB", (px, px), (i * 20, 90, 140)) for i in range(8)]
        for n_pairs in (1, 4):
            pairs = pairs_from_images(["a lighthouse"], imgs[:n_pairs], imgs[4:4 + n_pairs])
            lengths[f"{px}px_{n_pairs}_pairs"] = int(processor._inputs([pairs])["input_ids"].shape[1])
    ctx.result["prompt_tokens_by_image_size"] = lengths


@path("build_pairs", "build_vlm")
def embed_cot(ctx: Ctx) -> None:
    """``embed`` in chain-of-thought mode (``cot_tokens`` generated tokens)."""
    _embed(ctx, "cot", ctx.dtype, "table_cot.safetensors")


def _precision(ctx: Ctx, dtype: torch.dtype, name: str) -> None:
    """How far the user tokens move when the VLM runs in ``dtype`` instead of float32 (relative L2 error)."""
    from ppd_train.embedding import load_embedding_table

    _embed(ctx, "direct", dtype, f"table_{name}.safetensors")
    (ref,) = load_embedding_table(ctx.path("table.safetensors"))[0].values()
    (got,) = load_embedding_table(ctx.path(f"table_{name}.safetensors"))[0].values()
    err = (got.tokens - ref.tokens).norm(dim=-1) / ref.tokens.norm(dim=-1)
    ctx.result.update(rel_error_all=float((got.tokens - ref.tokens).norm() / ref.tokens.norm()),
                      rel_error_last_layer=float(err[-1]), rel_error_max_layer=float(err.max()),
                      cosine_last_layer=float(torch.nn.functional.cosine_similarity(got.tokens[-1], ref.tokens[-1],
                                                                                   dim=0)))


@path("build_pairs", "build_vlm", "embed_direct")
def embed_bf16(ctx: Ctx) -> None:
    _precision(ctx, torch.bfloat16, "bf16")


@path("build_pairs", "build_vlm", "embed_direct")
def embed_fp16(ctx: Ctx) -> None:
    _precision(ctx, torch.float16, "fp16")


def _fit(ctx: Ctx, optimizer: str) -> None:
    from ppd_train.dpo_data import DPOData
    from ppd_train.embedding import load_embedding_table
    from ppd_train.train import TrainConfig, Trainer

    out = ctx.path(f"fit_{optimizer}")
    cfg = TrainConfig(out_dir=str(out), max_steps=ctx.fit_steps, batch_size=1, optimizer=optimizer,
                      mixed_precision="bf16" if ctx.dtype == torch.bfloat16 else "no", gradient_checkpointing=True,
                      val_fraction=0.0, heldout_users=0.0, select_metric="last", tensorboard=False,
                      checkpoint_every=10**6, log_every=10**6)
    cfg.validate()
    data = DPOData.load(ctx.path("data.safetensors"))
    tokens, embedder_id = data.user_tokens(load_embedding_table(ctx.path("table.safetensors"))[0])
    unet = stage_c(Ctx(**{**ctx.__dict__, "dtype": cfg.frozen_dtype()}))
    built = peak_memory_mib(ctx.device)
    trainer = Trainer(cfg, unet, data, tokens, embedder_id, show_progress=False)
    steps: list[float] = []
    t = [time.perf_counter()]

    def on_step(_step: int) -> None:
        steps.append(time.perf_counter() - t[0])
        t[0] = time.perf_counter()

    trainer.run(resume=False, on_step=on_step)
    ctx.result.update(steps=trainer.step, step_s=steps, peak_above_model_mib=peak_memory_mib(ctx.device) - built,
                      frozen_dtype=str(cfg.frozen_dtype()))


@path("prepare", "embed_direct")
def fit_adamw(ctx: Ctx) -> None:
    """``fit``: a few DPO steps (1 pair = 2 images per step, gradient checkpointing), AdamW."""
    _fit(ctx, "adamw")


@path("prepare", "embed_direct")
def fit_adamw8bit(ctx: Ctx) -> None:
    """``fit`` with the 8-bit optimizer state."""
    _fit(ctx, "adamw8bit")


def _adapter(ctx: Ctx):
    from ppd_train.adapter import load_adapter

    return load_adapter(ctx.path("fit_adamw/adapter.safetensors"), device=ctx.device)


def _fresh_adapter(unet, user):
    """A random adapter of the right shape for ``unet`` and ``user`` (its user attention switched on: to_v != 0),
    frozen as ``load_adapter`` returns one (else tune-user's backward would also fill 0.6 GiB of adapter gradients)."""
    from ppd_train.adapter import AdapterConfig, PPDAdapter
    from ppd_train.stage_c import stage_c_info

    adapter = PPDAdapter(AdapterConfig.for_model(stage_c_info(unet), embed_dim=user.tokens.shape[1],
                                                   num_tokens=user.tokens.shape[0], embedder=user.embedder))
    torch.nn.init.normal_(adapter.blocks[0].to_v.weight, std=0.02)
    return adapter.eval().requires_grad_(False)


@path("prepare", "embed_direct")
def tune_user(ctx: Ctx) -> None:
    """``tune-user``: a few steps on the artist's pairs (Stage C lite and a fresh adapter frozen, 2 pairs a step,
    gradient checkpointing: without it Stage C lite's activations passed 11 GiB at 2 pairs in float32)."""
    from ppd_train.dpo_data import DPOData
    from ppd_train.embedding import load_embedding_table
    from ppd_train.stage_c import PPDBinding
    from ppd_train.tune import TuneConfig, UserTuner, one_user

    data, _ = one_user(DPOData.load(ctx.path("data.safetensors")), None)
    (start,) = load_embedding_table(ctx.path("table.safetensors"))[0].values()
    unet = stage_c(ctx)
    binding = PPDBinding(unet, _fresh_adapter(unet, start).to(ctx.device, ctx.dtype))
    # no held-out scoring: those are no-grad passes (below a step's peak) that cost a third of the time on a CPU
    cfg = TuneConfig(mode="tokens", max_steps=ctx.fit_steps, batch_size=2, val_fraction=0.0,
                     gradient_checkpointing=True)
    tuner = UserTuner(binding, data, cfg, start)
    built = peak_memory_mib(ctx.device)
    steps: list[float] = []
    t = [time.perf_counter()]

    def on_step(_step: int) -> None:
        steps.append(time.perf_counter() - t[0])
        t[0] = time.perf_counter()

    tokens, report = tuner.run(show_progress=False, on_step=on_step)
    ctx.result.update(steps=report["steps"], step_s=steps, tokens=list(tokens.shape), val_pairs=report["val_pairs"],
                      peak_above_model_mib=peak_memory_mib(ctx.device) - built)


def _sample(ctx: Ctx, with_adapter: bool, kind: str = "lite") -> None:
    from ppd_train.dpo_data import DPOData
    from ppd_train.embedding import load_embedding_table
    from ppd_train.evaluate import Conditions, sample
    from ppd_train.stage_c import PPDBinding, clip_image_dim

    data = DPOData.load(ctx.path("data.safetensors"))
    (user,) = load_embedding_table(ctx.path("table.safetensors"))[0].values()
    if kind == "full":  # 3.6 B + a 0.54 B adapter, and the activations at 24x24
        need_memory(ctx, (0 if ctx.tiny else 4.2e9 * ctx.dtype.itemsize / 2**30) + 1.5, "Stage C full with an adapter")
    unet = stage_c(ctx, kind)
    adapter = _adapter(ctx) if kind == "lite" else _fresh_adapter(unet, user)  # no full adapter was trained
    binding = PPDBinding(unet, adapter.to(ctx.device, ctx.dtype))
    side = 24 if not ctx.tiny else data.latents_w.shape[-1]
    cond = Conditions(data.text.to(ctx.dtype), data.pooled.to(ctx.dtype), clip_image_dim(unet), (16, side, side))
    noise = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0)).to(ctx.dtype)
    built = peak_memory_mib(ctx.device)
    t = time.perf_counter()
    x = sample(binding, cond, torch.tensor([0]), noise, user.tokens[None].to(ctx.dtype) if with_adapter else None,
               steps=ctx.sample_steps)
    if not torch.isfinite(x).all():
        raise RuntimeError("the sample is not finite")
    ctx.result.update(sample_s=time.perf_counter() - t, steps=ctx.sample_steps, latent=list(x.shape[1:]),
                      peak_above_model_mib=peak_memory_mib(ctx.device) - built)


@path("prepare", "embed_direct", "fit_adamw")
def sample_base(ctx: Ctx) -> None:
    """The sampler (the project's DDIM, no CFG) at 24x24 without a user."""
    _sample(ctx, False)


@path("prepare", "embed_direct", "fit_adamw")
def sample_adapter(ctx: Ctx) -> None:
    """The sampler at 24x24 with the trained adapter and the artist's embedding."""
    _sample(ctx, True)


@path("prepare", "embed_direct")
def sample_full(ctx: Ctx) -> None:
    """Stage C full (3.6 B) sampling with an adapter; GPU only unless ``--full-on-cpu`` (14.4 GB in float32)."""
    _sample(ctx, True, "full")


@path("embed_direct")
def comfyui(ctx: Ctx) -> None:
    """The nodes' path: ComfyUI's own Stage C (lite config) patched by Apply PPD Adapter, one CFG forward each way.
    Runs in ComfyUI's Python (``--comfyui-python``) with ``COMFYUI_DIR`` set."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    from comfyui_sampler_overhead import load_comfy
    from comfyui_sampler_overhead import stage_c as comfy_stage_c

    load_comfy()
    embedding_mod = importlib.import_module("ppd_pack.ppd_train.embedding")
    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    patch = importlib.import_module("ppd_pack.nodes.stage_c_patch")
    sockets = importlib.import_module("ppd_pack.nodes.sockets")
    model, config = comfy_stage_c("small" if ctx.tiny else "lite", ctx.device, ctx.dtype)
    _, info = patch.stage_c_of(model)
    (user,) = embedding_mod.load_embedding_table(ctx.path("table.safetensors"))[0].values()
    cfg = adapter_mod.AdapterConfig.for_model(info, embed_dim=user.tokens.shape[1], num_tokens=user.tokens.shape[0],
                                                embedder=user.embedder)
    adapter = adapter_mod.PPDAdapter(cfg)
    torch.nn.init.normal_(adapter.blocks[0].to_v.weight, std=0.02)
    patched = patch.apply_adapter(model, sockets.NamedAdapter("realsize", adapter), user, 1.0, 0.0, 1.0)
    width, side = config.get("c_clip_text", 1280), 24 if not ctx.tiny else 4
    g = torch.Generator().manual_seed(1)
    inputs = [t.to(ctx.device, ctx.dtype) for t in (
        torch.randn(2, 16, side, side, generator=g), torch.rand(2, generator=g), torch.randn(2, 77, width, generator=g),
        torch.randn(2, 1, width, generator=g), torch.zeros(2, 1, 768))]
    built = peak_memory_mib(ctx.device)
    times, outs = {}, {}
    for name, patcher in (("base", model), ("ppd", patched)):
        options = {"cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 1.0, device=ctx.device)}
        patcher.patch_model()
        try:
            t = time.perf_counter()
            with torch.no_grad():
                outs[name] = patcher.model.diffusion_model(*inputs, transformer_options=options)
            times[name] = time.perf_counter() - t
        finally:
            patcher.unpatch_model()
    if torch.equal(outs["base"], outs["ppd"]) or not torch.isfinite(outs["ppd"]).all():
        raise RuntimeError("the patched ComfyUI Stage C gave the base output (or a non-finite one)")
    ctx.result.update(forward_s=times, peak_above_model_mib=peak_memory_mib(ctx.device) - built)


# ---------------------------------------------------------------------------------------------------- the runner
def run_one(name: str, ctx: Ctx) -> dict:
    """Run one path in this process: its result, wall time and peak memory."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = peak_memory_mib(ctx.device)
    t = time.perf_counter()
    ctx.result = {}
    try:
        PATHS[name][1](ctx)
    except Skip as e:
        return {"ok": True, "skipped": str(e)}
    ctx.path(f".{name}.done").touch()
    return {**ctx.result, "ok": True, "wall_s": time.perf_counter() - t, "peak_mib": peak_memory_mib(ctx.device),
            "peak_above_start_mib": peak_memory_mib(ctx.device) - start}


def with_needs(names: list[str], ctx: Ctx) -> list[str]:
    """``names`` in order, each preceded by the paths it needs whose outputs are not in the work folder yet."""
    order: list[str] = []

    def add(name: str, asked: bool) -> None:
        if name in order or (not asked and done(ctx, name)):
            return
        for need in PATHS[name][0]:
            add(need, False)
        order.append(name)

    for name in names:
        add(name, True)
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="realsize.json")
    ap.add_argument("--only", help=f"comma-separated paths (their missing prerequisites run first): {', '.join(PATHS)}")
    ap.add_argument("--skip", default="", help="comma-separated paths not to run")
    ap.add_argument("--work", help="folder for the built models and outputs (kept; default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, tiny images: the same code in seconds")
    ap.add_argument("--device", default="cuda" if CUDA else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--cot-tokens", type=int, help="chain-of-thought length (default: 1024 on CUDA, 8 on a CPU)")
    ap.add_argument("--sample-steps", type=int, help="sampling steps (default: 20 on CUDA, 2 on a CPU)")
    ap.add_argument("--fit-steps", type=int, help="DPO steps (default: 10 on CUDA, 2 on a CPU)")
    ap.add_argument("--full-on-cpu", action="store_true", help="also run Stage C full on a CPU (14.4 GB in float32)")
    ap.add_argument("--reserve-gib", type=float, default=0.0, help="memory to leave free (a shared machine): a path "
                    "that would need more than the rest is skipped, with the reason in the JSON")
    ap.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="the Python that runs the comfyui path (needs COMFYUI_DIR)")
    ap.add_argument("--merge", action="store_true", help="keep the paths of an existing --out file that this run "
                    "does not rerun (to fill a report piece by piece)")
    ap.add_argument("--same-process", action="store_true", help="run every path in this process (tests; the peaks "
                    "are then cumulative)")
    ap.add_argument("--path", help=argparse.SUPPRESS)  # a fresh process runs one path
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    work = Path(args.work or tempfile.mkdtemp(prefix="ppd-realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(work=work, tiny=args.tiny, device=device, dtype=dtype,
              cot_tokens=args.cot_tokens or (1024 if gpu else 8 if not args.tiny else 4),
              sample_steps=args.sample_steps or (20 if gpu else 2), fit_steps=args.fit_steps or (10 if gpu else 2),
              image_px=64 if args.tiny else 1024, effnet_px=64 if args.tiny else 768, result={},
              reserve_gib=args.reserve_gib)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.path:  # the fresh process of one path
        with open(args.result, "w") as f:
            json.dump(run_one(args.path, ctx), f)
        return
    unknown = [n for n in (args.only or "").split(",") + args.skip.split(",") if n and n not in PATHS]
    if unknown:
        sys.exit(f"Unknown path(s) {unknown}; the paths are: {', '.join(PATHS)}")
    skip = {n: "--skip" for n in args.skip.split(",") if n}
    if not gpu and not args.full_on_cpu:
        skip["sample_full"] = "Stage C full (3.6 B) on a CPU: 14.4 GB in float32; --full-on-cpu runs it"
    if not os.environ.get("COMFYUI_DIR"):
        skip["comfyui"] = "COMFYUI_DIR is not set (a ComfyUI checkout; --comfyui-python: its Python)"
    asked = args.only.split(",") if args.only else [n for n in PATHS if n not in skip]
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.merge and out.is_file() else {"paths": {}}
    results: dict[str, dict] = old["paths"]
    if isinstance(old.get("skipped"), dict):  # an earlier run's reasons (e.g. too little memory) stay
        skip.update(old["skipped"])
    for name in with_needs(asked, ctx):
        print(f"realsize: {name} ...", flush=True)
        if args.same_process:
            try:
                results[name] = run_one(name, ctx)
            except Exception as e:  # noqa: BLE001  (recorded and failed below, after the other paths)
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        else:
            python = args.comfyui_python if name == "comfyui" else sys.executable
            fd, result = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            argv = [python, __file__, "--path", name, "--result", result, "--work", str(work), "--device", args.device,
                    "--dtype", str(dtype).removeprefix("torch."), "--cot-tokens", str(ctx.cot_tokens),
                    "--sample-steps", str(ctx.sample_steps), "--fit-steps", str(ctx.fit_steps),
                    "--reserve-gib", str(args.reserve_gib)]
            t = time.perf_counter()
            proc = subprocess.run(argv + (["--tiny"] if args.tiny else []), env={**os.environ,
                                  "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
            if proc.returncode == 0:
                results[name] = json.loads(Path(result).read_text())
            else:
                results[name] = {"ok": False, "error": f"exit status {proc.returncode} (its output is above)",
                                 "wall_s": time.perf_counter() - t}
            os.unlink(result)
        r = results[name]
        if "skipped" in r:  # this machine cannot run it: why goes to "skipped", not into the paths
            skip[name] = results.pop(name)["skipped"]
        print(f"realsize: {name}: " + (f"skipped: {skip[name]}" if name in skip else
                                       f"{r['wall_s']:.1f} s, peak {r['peak_mib']:.0f} MiB" if r["ok"]
                                       else f"FAILED: {r['error']}"), flush=True)
        report = {"benchmark": "realsize", "device": str(device), "dtype": str(dtype), "tiny": args.tiny,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "work": str(work),
                  "skipped": {n: why for n, why in sorted(skip.items()) if n not in results}, "paths": results}
        out.write_text(json.dumps(report, indent=2))  # after every path: a stopped run keeps what it measured
    failed = [n for n, r in results.items() if not r["ok"]]
    if failed:
        sys.exit(f"realsize: FAILED: {', '.join(failed)} (details in {args.out})")
    print(f"realsize: {len(results)} paths OK -> {args.out}")


if __name__ == "__main__":
    main()
