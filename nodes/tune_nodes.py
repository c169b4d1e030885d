"""Tune User Embedding: fit a user's embedding to all of their pairs inside ComfyUI (``ppd-train tune-user`` as a node).

The tuning itself is ``ppd_train.tune.UserTuner`` on the diffusers binding, unchanged, for either base. What this
module adds is the adaptation of ComfyUI's objects to it:

- **The model**: a diffusers UNet built from the weights of the connected ComfyUI MODEL (patched, as ComfyUI samples
  with them): Stage C with keys mapped directly from ComfyUI's layout, SDXL through diffusers' own single-file (LDM)
  conversion, since ComfyUI's SDXL UNet keeps that layout. ComfyUI loads models under ``torch.inference_mode()``, and
  inference tensors cannot be saved for backward, so the weights are *copied* once (in the model's compute dtype) and
  ComfyUI's own copy is unloaded from the device while tuning: one model in device memory, two for a moment while
  copying.
- **Images**: Stage C: the connected VAE must be the Stage C VAE (``effnet_encoder.safetensors``, what
  ``StableCascade_StageC_VAEEncode`` uses). Its EfficientNet weights run in ``ppd_train``'s encoder with ``prepare``'s
  preprocessing (PIL bicubic, centre crop), so the latents are those ``ppd-train prepare`` gives the adapter in
  training; ComfyUI's VAE encode resizes with torch's bicubic (no antialiasing), which gives other latents.
  SDXL: ``prepare``'s own SDXL image path (the dispreferred image resized to the preferred one, PIL bicubic, centre
  crop, each pair's size/crop numbers) with ComfyUI's VAE as the encoder and the MODEL's latent format for the scale.
- **Text**: ComfyUI's CLIP, i.e. the conditioning ComfyUI gives the model when sampling (for SDXL: both text encoders'
  penultimate states and the pooled output), cut to 77 tokens as ``prepare`` does.

Everything that needs no ComfyUI (key and config mapping, the EfficientNet weights, the report) is a plain function
here that ``make test`` checks; ComfyUI is imported inside the node only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from ..ppd_train.adapter import ModelInfo, check_base, check_embedding
from ..ppd_train.dpo_data import DPOData
from ..ppd_train.effnet import EfficientNetEncoder
from ..ppd_train.embedding import UserEmbedding
from ..ppd_train.errors import IncompatibleError, PPDError
from ..ppd_train.pairs import PreferencePair, content_hash
from ..ppd_train.prepare import encode_pairs_with, encode_sdxl_pairs_with
from .sockets import ADAPTER, CATEGORY, EMBEDDING, PAIRS, NamedAdapter, tip

MAX_TEXT_TOKENS = 77  # prepare's CLIP length; longer prompts are cut, as its tokenizer does


# ------------------------------------------------------------------------------------------ Stage C, ComfyUI-free
def diffusers_config(unet_config: dict) -> dict:
    """diffusers ``StableCascadeUNet`` config of a ComfyUI Stage C ``unet_config`` (``model_config.unet_config``).

    Only Stage C's own structure is accepted (two equal-width levels of ResBlock, TimestepBlock, AttnBlock), which the
    released lite/full and the tests' tiny model share; anything else is refused rather than mis-built."""
    from ..ppd_train.stage_c import stage_c_shape

    c = {**_COMFY_STAGE_C_DEFAULTS, **unet_config}
    width, heads = c["c_hidden"], c["nhead"]
    down, up = c["blocks"]
    same = (width[0] == width[1] == c["c_cond"] and heads[0] == heads[1] and list(up) == list(down)[::-1]
            and c["level_config"] == ["CTA", "CTA"] and c["block_repeat"] == [[1, 1], [1, 1]] and c["self_attn"]
            and c["switch_level"] == [False] and list(c["t_conds"]) == ["sca", "crp"] and c["c_r"] == 64
            and c["patch_size"] == 1 and c["kernel_size"] == 3 and c["c_in"] == c["c_out"] == 16
            and c["c_clip_seq"] == 4 and c["c_clip_text"] == c["c_clip_text_pooled"])
    if not same:
        raise IncompatibleError("Tune User Embedding supports Stable Cascade Stage C (lite or full); this MODEL's "
                                "structure differs. Connect the Stage C checkpoint the adapter was trained on.")
    return stage_c_shape(int(width[0]), int(heads[0]), (int(down[0]), int(down[1])), int(c["c_clip_text"]),
                         int(c["c_clip_img"]), 0.0)


# ComfyUI's StageC defaults (comfy/ldm/cascade/stage_c.py), for keys a model config leaves out
_COMFY_STAGE_C_DEFAULTS = dict(c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=[2048, 2048],
                               nhead=[32, 32], blocks=[[8, 24], [24, 8]], block_repeat=[[1, 1], [1, 1]],
                               level_config=["CTA", "CTA"], c_clip_text=1280, c_clip_text_pooled=1280,
                               c_clip_img=768, c_clip_seq=4, kernel_size=3, self_attn=True, t_conds=["sca", "crp"],
                               switch_level=[False])


def diffusers_key(comfy_key: str) -> str:
    """ComfyUI Stage C state-dict key -> diffusers ``StableCascadeUNet`` key (only the attention names differ)."""
    return comfy_key.replace(".attention.attn.out_proj.", ".attention.to_out.0.").replace(".attention.attn.to_",
                                                                                          ".attention.to_")


def unet_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], device: torch.device | str,
                         dtype: torch.dtype):
    """A diffusers Stage C holding ``state_dict``'s weights on ``device`` in ``dtype``, frozen and in eval mode.

    Built on the meta device and filled with ``assign=True``: a tensor already on ``device`` in ``dtype`` (and not an
    inference tensor, which autograd cannot save) is used as is, anything else is copied once."""
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    with torch.device("meta"):
        unet = StableCascadeUNet(**config)
    weights = {diffusers_key(k): _usable(v, device, dtype) for k, v in state_dict.items()}
    missing, unexpected = unet.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise IncompatibleError(f"The MODEL's Stage C weights do not map onto diffusers' Stage C (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]}); is it a Stable Cascade Stage C?")
    return unet.eval().requires_grad_(False)


def _usable(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``: as is when it already is (shared, no second copy), else copied once; an
    inference tensor (which autograd cannot save for backward) is always copied."""
    t = t.to(device=device, dtype=dtype)
    return t.clone() if t.is_inference() else t


# --------------------------------------------------------------------------------------------- SDXL, ComfyUI-free
SDXL_TIME_DIM = 256  # ComfyUI's SDXL embeds each of the 6 size/crop numbers in 256 (comfy.model_base.SDXL.embedder)
_SDXL_UNSUPPORTED = ("use_temporal_attention", "use_temporal_resblock", "disable_self_attentions",
                     "num_attention_blocks", "disable_middle_self_attn", "use_spatial_context")


def sdxl_diffusers_config(unet_config: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` config of a ComfyUI SDXL ``unet_config`` (``model_config.unet_config``, as
    ``comfy.model_detection`` reads it from a checkpoint).

    Only SDXL's structure is accepted (each level with equal blocks and one transformer depth, the middle as deep as
    the last level, linear transformer projections, pooled text and 6 size numbers in the added embedding), which SDXL
    1.0, its fine-tunes and the tests' tiny model share; anything else is refused rather than mis-built."""
    c = unet_config
    refuse = IncompatibleError("Tune User Embedding supports SDXL's UNet layout (SDXL 1.0 and its fine-tunes); this "
                               "MODEL's structure differs. Connect the SDXL checkpoint the adapter was trained on.")
    try:
        mult = [int(m) for m in c["channel_mult"]]
        levels = len(mult)
        blocks = c["num_res_blocks"]
        blocks = [int(blocks)] * levels if isinstance(blocks, int) else [int(b) for b in blocks]
        n = blocks[0]
        depth = [int(d) for d in c["transformer_depth"]]
        out = [int(d) for d in c["transformer_depth_output"]]
        per_level = [depth[i * n] for i in range(levels)]
        widths = [int(c["model_channels"]) * m for m in mult]
        head_channels, num_heads = int(c.get("num_head_channels", -1)), int(c.get("num_heads", -1))
        per_head = [head_channels if head_channels > 0 else w // num_heads for w in widths]
        heads = [w // d for w, d in zip(widths, per_head)]
        pooled = int(c["adm_in_channels"]) - 6 * SDXL_TIME_DIM
        same = (blocks == [n] * levels and depth == [d for d in per_level for _ in range(n)]
                and out == [d for d in per_level for _ in range(n + 1)] and per_level[-1] > 0
                and int(c.get("transformer_depth_middle", -1)) == per_level[-1]
                and all(d > 0 and w % d == 0 for w, d in zip(widths, per_head)) and pooled > 0
                and c.get("in_channels") == c.get("out_channels") == 4 and c.get("num_classes") == "sequential"
                and c.get("use_linear_in_transformer") and not c.get("legacy", False)
                and not any(c.get(k) for k in _SDXL_UNSUPPORTED))
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
        raise refuse from None
    if not same:
        raise refuse
    from ..ppd_train.sdxl import sdxl_shape

    return sdxl_shape(tuple(widths), tuple(heads), tuple(per_level), n, (int(c["context_dim"]), 0), pooled,
                      SDXL_TIME_DIM, 32, 128)


def sdxl_unet_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], device: torch.device | str,
                              dtype: torch.dtype):
    """A diffusers SDXL UNet holding the weights of ComfyUI's SDXL UNet (``diffusion_model.state_dict()``: the
    single-file layout without its ``model.diffusion_model.`` prefix), frozen and in eval mode; weights as in
    :func:`unet_from_state_dict` (shared when usable, else copied once)."""
    from ..ppd_train.sdxl import LDM_UNET_PREFIX, unet_from_ldm

    unet = unet_from_ldm({LDM_UNET_PREFIX + k: v for k, v in state_dict.items()}, config,
                         "The MODEL's SDXL weights do not map onto diffusers' SDXL UNet",
                         "Is it an SDXL checkpoint (stock Load Checkpoint)?", lambda t: _usable(t, device, dtype))
    return unet.eval().requires_grad_(False)


def vae_latents(vae, latent_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pixels in [-1, 1], [N, 3, S, S]`` -> latents as the UNet sees them when sampling: ComfyUI's VAE encode (which
    takes ``[N, S, S, 3]`` images in [0, 1]) and the MODEL's latent format (SDXL's scale, as ``prepare``'s
    ``scaling_factor``)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        raw = vae.encode(((pixels + 1) / 2).movedim(1, -1))
        return latent_format.process_in(raw.float().cpu())

    return encode


def check_sdxl_vae(latent_channels: int, downscale_ratio) -> None:
    """The connected VAE must make SDXL's latents (4 channels, 1/8 of the image size)."""
    if latent_channels != 4 or downscale_ratio != 8:
        raise IncompatibleError(f"The VAE is not an SDXL VAE (it makes {latent_channels}-channel latents, not SDXL's "
                                "4 channels at 1/8 of the image size). Connect the VAE output of the SDXL checkpoint's "
                                "Load Checkpoint (or a Load VAE of an SDXL VAE), not a Stable Cascade or other VAE.")


def check_clip(tokens: torch.Tensor, pooled: torch.Tensor, unet_config: dict, model_name: str) -> None:
    """The connected CLIP must give the text widths the MODEL reads (a CLIP of another model would not)."""
    from ..ppd_train.dpo_data import model_inputs

    _, _, text, pooled_width = model_inputs(unet_config)
    if (tokens.shape[-1], pooled.shape[-1]) != (text, pooled_width):
        raise IncompatibleError(f"The CLIP gives text of width {tokens.shape[-1]} (pooled {pooled.shape[-1]}), but "
                                f"{model_name} reads {text} (pooled {pooled_width}). Connect the CLIP of the same "
                                "checkpoint as the MODEL (Load Checkpoint's CLIP output).")


# ---------------------------------------------------------------------------------------- images, ComfyUI-free
def effnet_from_vae_weights(state_dict: dict[str, torch.Tensor]) -> EfficientNetEncoder:
    """``ppd_train``'s EfficientNet with the weights of ComfyUI's Stage C VAE (``StageC_coder``: keys ``encoder.*``).

    ComfyUI builds that VAE from the effnet file, the previewer file, or both: with the previewer alone the encoder
    keeps its initial BatchNorm statistics (mean 0, variance 1 everywhere), which is refused here."""
    weights = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
    weights.pop("mean", None)  # ComfyUI's constants for the ImageNet normalisation ppd_train's preprocess does
    weights.pop("std", None)
    with torch.inference_mode(False):  # a module made under ComfyUI's inference_mode could not take the weights
        model = EfficientNetEncoder()
    expected = model.state_dict()
    wrong = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape]
    if wrong or not weights:
        raise IncompatibleError("The VAE is not the Stable Cascade Stage C VAE. Connect a Load VAE of "
                                "effnet_encoder.safetensors (the VAE that StableCascade_StageC_VAEEncode uses), not "
                                "Stage A or another model's VAE.")
    var, mean = weights["mapper.1.running_var"], weights["mapper.1.running_mean"]
    if bool((var == 1).all()) and bool((mean == 0).all()):
        raise IncompatibleError("This Stage C VAE has no EfficientNet encoder weights (it is the previewer only). "
                                "Load effnet_encoder.safetensors with Load VAE and connect that.")
    with torch.inference_mode(False):
        model.load_state_dict({k: v.detach().float().cpu().clone() for k, v in weights.items()})
    return model.eval().requires_grad_(False)


def text_tokens(cond: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's CLIP output of one prompt (``[1, 77k, c]``, pooled ``[1, c]``) -> ``([77, c], [1, c])`` float32."""
    return cond[0, :MAX_TEXT_TOKENS].float().cpu().clone(), pooled.reshape(1, -1).float().cpu().clone()


def pairs_data(pairs: Sequence[PreferencePair], user: str, effnet: EfficientNetEncoder,
               encode_one: Callable[[str], tuple[torch.Tensor, torch.Tensor]], image_size: int,
               device: torch.device | str = "cpu", on_batch: Callable[[int], None] | None = None) -> DPOData:
    """The Stage C DPO data of one user's pairs, through ``prepare``'s own encoding loop; ``encode_one(caption)`` ->
    (tokens ``[L, c]``, pooled ``[1, c]``)."""
    _need_pairs(pairs)
    effnet = effnet.to(device)
    try:
        return encode_pairs_with({user: list(pairs)}, effnet, _batched(encode_one), image_size, device=device,
                                 show_progress=False, on_batch=on_batch)
    finally:
        effnet.to("cpu")


def sdxl_pairs_data(pairs: Sequence[PreferencePair], user: str, latents: Callable[[torch.Tensor], torch.Tensor],
                    encode_one: Callable[[str], tuple[torch.Tensor, torch.Tensor]], image_size: int,
                    on_batch: Callable[[int], None] | None = None) -> DPOData:
    """The SDXL DPO data of one user's pairs, through ``prepare``'s own SDXL encoding; ``latents(pixels in [-1, 1],
    [N, 3, S, S])`` -> scaled latents, ``encode_one`` as in :func:`pairs_data`."""
    _need_pairs(pairs)
    return encode_sdxl_pairs_with({user: list(pairs)}, latents, _batched(encode_one), image_size, show_progress=False,
                                  on_batch=on_batch)


def _need_pairs(pairs: Sequence[PreferencePair]) -> None:
    if not pairs:
        raise PPDError("No preference pairs to tune on; connect a Preference Pair Loader (raise num_pairs to use "
                       "all of the user's pairs).")


def _batched(encode_one: Callable[[str], tuple[torch.Tensor, torch.Tensor]]):
    def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = [encode_one(c) for c in captions]
        return torch.stack([t for t, _ in out]), torch.stack([p for _, p in out])

    return encode_text


def report_text(report: dict, user: str) -> str:
    """The node's STRING output: what was tuned, held-out DPO loss / accuracy before -> after, steps, seconds."""
    before, after = report["val_before"], report["val_after"]
    lines = [f"Tuned {user or 'the user'} on {report['pairs']} pairs ({report['train_pairs']} to learn from, "
             f"{report['val_pairs']} held out): {report['steps']} steps in {report['seconds']:.1f} s."]
    if before:
        lines.append(f"Held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, implicit accuracy "
                     f"{before['implicit_acc']:.0%} -> {after['implicit_acc']:.0%} (lower loss is better).")
        kept = report["selected"].get("delta", {}).get("step", 0)
        lines.append("The start scored best on the held-out pairs: the embedding is unchanged." if kept == 0 else
                     f"Kept the embedding of step {kept}, the best on the held-out pairs.")
    else:
        lines.append("No held-out pairs (a single pair): the last step is kept, unchecked. Give more pairs.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- node
def _inputs() -> dict:
    return {
        "pairs": (PAIRS, tip("All of the user's pairs: a Preference Pair Loader with num_pairs raised (e.g. the "
                             "picker's folder). A quarter is held out to check the tuning.")),
        "model": ("MODEL", tip("The model the adapter was trained on: Stable Cascade Stage C (stable_cascade_stage_c "
                               "/ lite) or SDXL (Load Checkpoint's MODEL).")),
        "clip": ("CLIP", tip("The model's text encoder, for the pairs' captions: Stage C's CLIP-G, or the SDXL "
                             "checkpoint's CLIP (both text encoders).")),
        "vae": ("VAE", tip("For the pairs' images. Stage C: Load VAE of effnet_encoder.safetensors (what "
                           "StableCascade_StageC_VAEEncode uses). SDXL: the checkpoint's VAE.")),
        "ppd_adapter": (ADAPTER, tip("From PPD Adapter Loader; it stays frozen.")),
        "user_embedding": (EMBEDDING, tip("The start: from VLM User Embedder or Load User Embedding. Tuning never "
                                          "returns something that scores worse on the held-out pairs.")),
        "steps": ("INT", tip("Most optimisation steps (stops early when held-out pairs stop improving).",
                             default=200, min=1, max=10000)),
        # no control_after_generate: a seed that changed on every queue would re-run minutes of tuning
        "seed": ("INT", tip("Seed of the held-out split, noise and timesteps: same inputs + seed = same result.",
                            default=0, min=0, max=0xFFFFFFFF, control_after_generate=False)),
        "lr": ("FLOAT", tip("Learning rate (Adam), in units of the embedding's own scale. Lower it if the loss "
                            "jumps.", default=0.05, min=0.001, max=1.0, step=0.001)),
        "batch_size": ("INT", tip("Pairs per step. Device memory grows with it: lower it on out-of-memory.",
                                  default=4, min=1, max=64)),
        "image_size": ("INT", tip("Image size the pairs are encoded at, as ppd-train prepare's --image-size. Stage "
                                  "C: EfficientNet input, 768 gives 24x24 latents (Stage C's 1024x1024). SDXL: the "
                                  "square crop, 1024 for SDXL 1.0. Use the size the adapter was trained with.",
                                  default=768, min=64, max=2048, step=32)),
    }


_NUMBERS = ("steps", "seed", "lr", "batch_size", "image_size")


class PPDTuneUserEmbedding:
    DESCRIPTION = ("Fits a user's embedding to all of their preference pairs with the DPO loss the adapter was "
                   "trained with (adapter and model frozen; Stable Cascade Stage C or SDXL), like ppd-train "
                   "tune-user. Minutes on a GPU; the input embedding is not changed.")
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = (EMBEDDING, "STRING")
    RETURN_NAMES = ("user_embedding", "report")
    OUTPUT_TOOLTIPS = ("The tuned user (same embedder, so the adapter accepts it); save it with Save User Embedding.",
                       "Held-out DPO loss and accuracy before -> after, steps, seconds.")
    FUNCTION = "tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, steps=None, seed=None, lr=None, batch_size=None, image_size=None):
        # ComfyUI skips its own min/max check for inputs named here; linked values arrive as None and are checked
        # when the node runs
        return _number_problem(steps=steps, seed=seed, lr=lr, batch_size=batch_size, image_size=image_size) or True

    def tune(self, pairs, model, clip, vae, ppd_adapter, user_embedding, steps, seed, lr, batch_size, image_size):
        problem = _number_problem(steps=steps, seed=seed, lr=lr, batch_size=batch_size, image_size=image_size)
        if problem:
            raise PPDError(problem)
        return tune_in_comfyui(pairs, model, clip, vae, ppd_adapter, user_embedding, int(steps), int(seed),
                               float(lr), int(batch_size), int(image_size))


def _number_problem(**values) -> str | None:
    from .checks import number_problem

    specs = _inputs()
    for name, value in values.items():
        if value is not None:
            problem = number_problem(name, value, specs[name][1])
            if problem:
                return problem
    return None


def check_fit(adapter: NamedAdapter, info: ModelInfo, embedding: UserEmbedding,
              model_name: str = "the connected Stage C") -> None:
    """The sampler's refusals, before any heavy work: adapter vs model, embedding vs adapter."""
    check_base(adapter.adapter.config, info, f"PPD adapter '{adapter.name}'", model_name)
    check_embedding(adapter.adapter.config, tuple(embedding.tokens.shape), embedding.embedder,
                    f"PPD adapter '{adapter.name}'")


def tune_in_comfyui(pairs, model, clip, vae, adapter: NamedAdapter, start: UserEmbedding, steps: int, seed: int,
                    lr: float, batch_size: int, image_size: int) -> tuple[UserEmbedding, str]:
    import comfy.model_management as mm
    import comfy.utils

    from ..ppd_train.binding import PPDBinding
    from ..ppd_train.tune import TuneConfig, UserTuner
    from .sdxl_patch import check_noise_prediction, is_sdxl, sdxl_of
    from .stage_c_patch import stage_c_of

    sdxl = is_sdxl(model)
    model_name = "the connected SDXL model" if sdxl else "the connected Stage C"
    info = sdxl_of(model)[1] if sdxl else stage_c_of(model)[1]
    check_fit(adapter, info, start, model_name)
    unet_config = model.model.model_config.unet_config
    config = sdxl_diffusers_config(unet_config) if sdxl else diffusers_config(unet_config)
    if sdxl:  # before any heavy work, as the Stage C VAE's refusals below
        check_noise_prediction(model)
        check_sdxl_vae(int(vae.latent_channels), vae.downscale_ratio)
    # checkpointing: the base's activations for backward are what an 8-12 GB card runs out of (docs/performance.md)
    cfg = TuneConfig(mode="tokens", max_steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                     gradient_checkpointing=True)
    cfg.validate()
    user = str(start.meta.get("user_id", "") or (pairs[0].user_id if pairs and pairs[0].user_id else ""))
    device = mm.get_torch_device()
    mm.throw_exception_if_processing_interrupted()
    # ComfyUI runs nodes under inference_mode; tuning needs autograd. Nothing the user connected is modified: the
    # weights, the adapter and the start are copied.
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            def encode_one(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
                cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
                return text_tokens(cond, pooled)

            if pairs:  # a CLIP of another model is refused before the images are encoded
                check_clip(*encode_one(pairs[0].prompt), config, model_name)

            def interrupted(_: int) -> None:
                mm.throw_exception_if_processing_interrupted()

            if sdxl:
                latents = vae_latents(vae, model.get_model_object("latent_format"))
                data = sdxl_pairs_data(pairs, user or "user", latents, encode_one, image_size, on_batch=interrupted)
            else:
                effnet = effnet_from_vae_weights(vae.first_stage_model.state_dict())
                data = pairs_data(pairs, user or "user", effnet, encode_one, image_size, device, on_batch=interrupted)
                del effnet
            data.check_fits(config, "the pairs", "the MODEL")
            mm.load_models_gpu([model], force_full_load=True)  # ComfyUI's patched weights, on its device
            base = model.model
            dtype = base.manual_cast_dtype or base.get_dtype()
            build = sdxl_unet_from_state_dict if sdxl else unet_from_state_dict
            unet = build(config, base.diffusion_model.state_dict(), device, dtype)
            mm.free_memory(1e30, device)  # ComfyUI's own copy leaves the device while ours tunes
            ppd = copy.deepcopy(adapter.adapter).to(device=device, dtype=torch.float32).requires_grad_(False)
        binding = PPDBinding(unet, ppd)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step: int) -> None:
            bar.update_absolute(min(step, steps))
            mm.throw_exception_if_processing_interrupted()  # ends the prompt as interrupted; the queue goes on

        try:
            tuner = UserTuner(binding, data, cfg, start=start)  # it autocasts a bf16/fp16 Stage C itself
            tokens, report = tuner.run(show_progress=False, on_step=on_step)
            embedding = tuner.embedding(tokens, report, user, start_name=start.describe(),
                                        pairs_hash=content_hash(pairs))
        finally:
            binding.detach()
            del binding, unet, ppd
            mm.soft_empty_cache()
    bar.update_absolute(steps)
    return embedding, report_text(report, user)
