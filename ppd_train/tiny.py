"""Tiny real models with the structure of the real ones, for tests, the synthetic world and CPU benchmarks."""

from __future__ import annotations

import json
from typing import cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

from .sdxl import sdxl_shape
from .stage_c import stage_c_shape


def tiny_stage_c_config(width: int = 32, heads: int = 2, clip_dim: int = 32, layers: int = 1) -> dict:
    """Stage C's shape scaled down: two levels without spatial down-sampling, an attention block in every layer."""
    return stage_c_shape(width, heads, (layers, layers), clip_dim, clip_dim, 0.0)


def build_tiny_stage_c(seed: int = 0, **kw) -> StableCascadeUNet:
    """A randomly initialised tiny Stage C (~124k parameters at the defaults, 4 attention blocks)."""
    torch.manual_seed(seed)
    unet = StableCascadeUNet(**tiny_stage_c_config(**kw))
    # diffusers zero-initialises some output layers only in _init_weights (never called); random weights everywhere
    # make every test sensitive to every block.
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet.eval()


# A stand-in for Qwen2's chat format (ChatML); the real template is richer, this one keeps content in order.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_CORPUS = (
    "You are shown pairs of images made for the same caption. In each pair the user preferred the first image. "
    "Think step by step about style, visual quality, colour, composition and aesthetics; describe each pair, "
    "then finish with a short user profile. Pair 1 2 3 4 caption preferred rejected bright dark soft sharp."
)


def _chatml_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's special tokens, trained here on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


def build_llava(folder, config, image_size: int, num_image_tokens: int, pinpoints=None, seed: int = 0) -> None:
    """Write a LLaVA-OneVision checkpoint folder with random weights for ``config`` (its vocabulary size kept; the
    local tokenizer uses its first ids), the PIL image processor (tiles of ``image_size``, ``pinpoints``: the
    config's) and the processor: it loads exactly like a downloaded one. No hub, no torchvision."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .embedders.llava_processor import ImageOnlyLlavaOnevisionProcessor

    tokenizer = _chatml_tokenizer()
    pinpoints = pinpoints or config.image_grid_pinpoints
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=pinpoints)
    processor = ImageOnlyLlavaOnevisionProcessor(image_processor, tokenizer, num_image_tokens=num_image_tokens,
                                                 vision_feature_select_strategy=config.vision_feature_select_strategy,
                                                 chat_template=_CHATML)
    config.image_token_index = int(tokenizer.convert_tokens_to_ids("<image>"))  # type: ignore[arg-type]
    config.video_token_index = int(tokenizer.convert_tokens_to_ids("<video>"))  # type: ignore[arg-type]
    config.image_grid_pinpoints = pinpoints
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_llava(folder, seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 32) -> None:
    """Write a tiny real LLaVA-OneVision checkpoint folder (model, byte-level BPE tokenizer, PIL image processor,
    processor) that loads exactly like a downloaded one. No hub, no torchvision."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size]]
    patch = image_size // 4
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=400,
                                max_position_embeddings=8192),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    build_llava(folder, config, image_size, num_image_tokens=16, pinpoints=pinpoints, seed=seed)


# ------------------------------------------------------------------------------------------------------------- SDXL
def tiny_sdxl_config(widths: tuple[int, ...] = (16, 32, 64), heads: tuple[int, ...] = (1, 2, 4),
                     transformer_layers: tuple[int, ...] = (0, 1, 2), text_widths: tuple[int, int] = (16, 32)) -> dict:
    """SDXL's UNet scaled down: its first level without attention, two attention levels of different widths (11
    cross-attention layers at the defaults), cross-attention over two text encoders' states concatenated, pooled text
    and size/crop numbers through ``text_time``."""
    return sdxl_shape(widths, heads, transformer_layers, 1, text_widths, text_widths[1], 8, 8, 8)


def build_tiny_sdxl_unet(seed: int = 0, **kw) -> UNet2DConditionModel:
    """A randomly initialised tiny SDXL UNet, with non-zero weights everywhere (as in :func:`build_tiny_stage_c`)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_config(**kw))
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet.eval()


_CLIP_SPECIAL = ["<unk>", "<|startoftext|>", "<|endoftext|>"]


def _tiny_clip_tokenizer(pad_token: str):
    """A byte-level BPE tokenizer trained here that frames every text as CLIP's does (start, text, end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_CORPUS + " a lighthouse at dusk, version 0 1 2 3 4 5 6 7 8 9 ! ."] * 3,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=_CLIP_SPECIAL,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token=pad_token, model_max_length=77)


def build_tiny_sdxl(folder, seed: int = 0, text_widths: tuple[int, int] = (16, 32), **unet_kw) -> None:
    """Write a tiny real SDXL pipeline folder in diffusers' layout (``unet/``, ``vae/``, ``text_encoder/`` (CLIP-L's
    class), ``text_encoder_2/`` (bigG's class, with projection), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``,
    ``model_index.json``), safetensors weights, loadable offline like a downloaded one. The VAE halves the image size
    (SDXL's divides it by 8): 16-pixel images make 8x8 latents."""
    from pathlib import Path

    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    build_tiny_sdxl_unet(seed, text_widths=text_widths, **unet_kw).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.13025)
    vae.save_pretrained(folder / "vae")  # type: ignore[attr-defined]
    # SDXL's tokenizers differ only in the padding token ("<|endoftext|>" vs "!")
    for i, (width, cls, pad) in enumerate(((text_widths[0], CLIPTextModel, "<|endoftext|>"),
                                           (text_widths[1], CLIPTextModelWithProjection, "!"))):
        suffix = "_2" if i else ""
        tokenizer = _tiny_clip_tokenizer(pad)
        ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos_token_id", "<|startoftext|>"),
                                                                   ("eos_token_id", "<|endoftext|>"),
                                                                   ("pad_token_id", pad))}
        torch.manual_seed(seed + 2 + i)
        model = cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=3, num_attention_heads=2, projection_dim=width,
                                   max_position_embeddings=77, hidden_act="gelu", **ids))
        model.save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(folder / "scheduler")  # type: ignore[attr-defined]
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def sdxl_unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights in the single-file (LDM) layout SDXL checkpoints ship in (``model.diffusion_model.*``):
    the inverse of diffusers' ``convert_ldm_unet_checkpoint``, for writing single-file test checkpoints."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    from .sdxl import LDM_UNET_PREFIX

    per = int(unet.config["layers_per_block"]) + 1
    mapping = cast(dict[str, dict[str, str]], DIFFUSERS_TO_LDM_MAPPING["unet"])
    fixed = {**mapping["layers"], **mapping["addition_embed_type"]}
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            down = parts[0] == "down_blocks"
            blocks, first = ("input_blocks", 1 + b * per) if down else ("output_blocks", b * per)
            if kind == "resnets":
                new = f"{blocks}.{first + j}.0.{_ldm_resnet(rest)}"
            elif kind == "attentions":
                new = f"{blocks}.{first + j}.1.{rest}"
            elif down:  # downsamplers.0.conv.*
                new = f"input_blocks.{first + per - 1}.0.op.{parts[-1]}"
            else:  # upsamplers.0.conv.*: after the block's last resnet (and attention, if it has one)
                slot = 2 if hasattr(unet.up_blocks[b], "attentions") else 1
                new = f"output_blocks.{first + per - 1}.{slot}.conv.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_ldm_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no single-file name for {key}")
        out[LDM_UNET_PREFIX + new] = value
    return out


def _ldm_resnet(rest: str) -> str:
    for ours, theirs in _RESNET_TO_LDM:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


_VAE_ATTENTION_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def sdxl_vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights in the single-file layout (``first_stage_model.*``; attention as 1x1 convolutions): the
    inverse of diffusers' ``convert_ldm_vae_checkpoint``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = cast(dict[str, str], DIFFUSERS_TO_LDM_MAPPING["vae"])
    levels = len(vae.config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        side, group, *rest = key.split(".")
        if key in direct:
            new = direct[key]
        elif group == "mid_block" and rest[0] == "resnets":
            new = f"{side}.mid.block_{int(rest[1]) + 1}.{'.'.join(rest[2:])}".replace("conv_shortcut", "nin_shortcut")
        elif group == "mid_block":  # attentions.0.<part>.<weight|bias>
            part = ".".join(rest[2:-1])
            new = f"{side}.mid.attn_1.{dict(_VAE_ATTENTION_TO_LDM)[part]}.{rest[-1]}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:  # {down,up}_blocks.i.{resnets.j,downsamplers.0,upsamplers.0}.*
            i = int(rest[0]) if side == "encoder" else levels - 1 - int(rest[0])
            level = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
            if rest[1] == "resnets":
                new = f"{level}.block.{rest[2]}.{'.'.join(rest[3:])}".replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}"
        out["first_stage_model." + new] = value
    return out


_OPENCLIP = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def sdxl_bigg_to_openclip(model) -> dict[str, torch.Tensor]:
    """bigG's weights in OpenCLIP's layout (``conditioner.embedders.1.model.*``: fused q/k/v, ``text_projection``
    transposed): the inverse of diffusers' ``convert_open_clip_checkpoint``."""
    prefix, out = "conditioner.embedders.1.model.", {}
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif ".self_attn.q_proj." in key:
            layer, kind = key.split(".")[2], key.rsplit(".", 1)[1]
            qkv = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            new = key.replace("encoder.layers.", "transformer.resblocks.")
            for ours, theirs in _OPENCLIP:
                new = new.replace(ours, theirs)
            out[prefix + new] = value
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # OpenCLIP's, in released files; no text model reads it
    return out


def sdxl_single_file_tensors(unet, vae, clip_l, bigg) -> dict[str, torch.Tensor]:
    """SDXL's four models as one checkpoint in the original layout artists download (UNet, VAE, CLIP-L, bigG under
    ``model.diffusion_model.`` / ``first_stage_model.`` / ``conditioner.embedders.{0,1}.``)."""
    tensors = {**sdxl_unet_to_ldm(unet), **sdxl_vae_to_ldm(vae), **sdxl_bigg_to_openclip(bigg)}
    for key, value in clip_l.state_dict().items():  # CLIP-L keeps transformers' names, under the original's prefix
        tensors["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    n = clip_l.config.max_position_embeddings  # released files carry this computed buffer too
    tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return tensors


def write_tiny_sdxl_single_file(folder, path) -> None:
    """Write a diffusers SDXL folder (e.g. :func:`build_tiny_sdxl`'s) as one ``.safetensors`` checkpoint in the
    original layout (:func:`sdxl_single_file_tensors`), for testing the single-file loader."""
    from pathlib import Path

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    models = [cls.from_pretrained(folder / part, use_safetensors=True, local_files_only=True)  # type: ignore[attr-defined]
              for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder"),
                                (CLIPTextModelWithProjection, "text_encoder_2"))]
    tensors = sdxl_single_file_tensors(*models)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
