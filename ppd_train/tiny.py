"""Tiny real models with the structure of the real ones, for tests, the synthetic world and CPU benchmarks."""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

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
