"""VLM Loader and VLM User Embedder: LLaVA-OneVision reads a user's pairs and becomes a user embedding.

The VLM is loaded for the job and freed right after it, so it never competes with Stage C for GPU memory, and the
result is cached by content (VLM files, settings, pairs' captions and image bytes): re-queuing a workflow, or a pair
loader that re-ran on unchanged files, does not run the VLM again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ppd_train.confidence import confidence_text
from ..ppd_train.embedders.vlm import QUANTIZE, VLMEmbedder, check_vlm_folder, vlm_gpu_bytes, vlm_load_kwargs
from ..ppd_train.embedding import UserEmbedding
from ..ppd_train.errors import PPDError
from ..ppd_train.pairs import PreferencePair, content_hash
from . import folders
from .sockets import CATEGORY, EMBEDDING, PAIRS, VLM, tip

MODES = {"direct": "direct", "chain-of-thought": "cot"}  # widget value -> ppd_train mode
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CACHE: OrderedDict[tuple, UserEmbedding] = OrderedDict()
_CACHE_SIZE = 32


@dataclass(frozen=True)
class VLMHandle:
    """Where a VLM lives and how to run it; the weights are loaded only while a job needs them."""

    folder: Path
    dtype: str = "auto"
    quantize: str = "none"  # "8bit" / "4bit": bitsandbytes, CUDA only
    offload: bool = False  # what does not fit on the GPU stays in CPU RAM (accelerate)
    max_gpu_gib: float = 0.0  # with offload: GiB of weights on the GPU (0 = 90% of what is free)

    def check(self) -> None:
        check_vlm_folder(self.folder)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise PPDError(f"Unknown dtype {name!r}; use one of {list(DTYPES)}.")
    dtype = DTYPES[name]
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def embed_pairs(vlm: VLMHandle, pairs: Sequence[PreferencePair], mode: str, layers: str, max_new_tokens: int,
                device: torch.device, on_token: Callable[[], None] | None = None,
                before_load: Callable[[int], None] | None = None) -> UserEmbedding:
    """One user embedding from ``pairs`` (all of them, in order), served from the cache when nothing changed.

    ``before_load(bytes)`` may free memory for the VLM's weights; the VLM is released before returning.
    """
    if mode not in MODES:
        raise PPDError(f"Unknown mode {mode!r}; use one of {list(MODES)}.")
    if not pairs:
        raise PPDError("No preference pairs to embed; connect a Preference Pair Loader.")
    vlm.check()
    dtype = resolve_dtype(vlm.dtype, device)
    # offloading moves weights, not numbers: only quantize is part of what the embedding is
    key = (str(vlm.folder.resolve()), folders.fingerprint(vlm.folder), str(dtype), vlm.quantize, mode,
           layers.strip(), int(max_new_tokens) if mode == "chain-of-thought" else 0, content_hash(pairs))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    max_gpu = vlm.max_gpu_gib or None
    vlm_load_kwargs(device, dtype, vlm.quantize, vlm.offload, max_gpu)  # refuse options before freeing anything
    if before_load is not None:
        before_load(vlm_gpu_bytes(vlm.folder, dtype, vlm.quantize, vlm.offload, max_gpu))
    embedder = VLMEmbedder(vlm.folder, MODES[mode], layers.strip() or "all", device=device, dtype=dtype,
                           max_new_tokens=int(max_new_tokens), quantize=vlm.quantize, offload=vlm.offload,
                           max_gpu_gib=max_gpu)
    try:
        (embedding,) = embedder.embed([list(pairs)], on_token=on_token)
    finally:
        embedder.unload()
    _CACHE[key] = embedding
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return embedding


class PPDVLMLoader:
    DESCRIPTION = ("Picks a LLaVA-OneVision folder from models/LLM (transformers format, local files only). The "
                   "weights load only while the VLM User Embedder runs.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (VLM,)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The VLM to embed users with.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (folders.list_model_folders(folders.roots(folders.LLM)),
                      tip("A folder in models/LLM holding config.json and *.safetensors of llava-onevision-qwen2-*"
                          "-hf. The adapter must have been trained with embeddings from the same model.")),
            "dtype": (list(DTYPES), tip("auto: bf16 on GPUs that support it (else fp16), fp32 on the CPU.")),
        }, "optional": {  # appended later: optional, so API prompts written before them still validate
            "quantize": (list(QUANTIZE), tip("8bit / 4bit: load the VLM's weights in 8 or 4 bits (bitsandbytes; "
                                             "CUDA GPUs only; `pip install bitsandbytes`). The 7B VLM's weights "
                                             "take ~15 GiB in bf16, ~8.5 in 8 bits, ~5.5 in 4 bits. The adapter "
                                             "should be used with embeddings made the same way.")),
            "offload": ("BOOLEAN", tip("Keep what fits of the VLM on the GPU and the rest in CPU RAM (slower; "
                                       "CUDA only).", default=False)),
            "max_gpu_gib": ("FLOAT", tip("With offload: GiB of VLM weights on the GPU (0 = 90% of what is free).",
                                         default=0.0, min=0.0, max=1024.0, step=0.5)),
        }}

    def load(self, model, dtype, quantize="none", offload=False, max_gpu_gib=0.0):
        if quantize not in QUANTIZE:
            raise PPDError(f"Unknown quantize option {quantize!r}; use one of {list(QUANTIZE)}.")
        handle = VLMHandle(folders.find(folders.LLM, model, "VLM folder"), dtype, quantize, bool(offload),
                           float(max_gpu_gib))
        handle.check()
        return (handle,)


class PPDVLMUserEmbedder:
    DESCRIPTION = ("Turns a user's preference pairs into a user embedding with the VLM (the paper's method), plus "
                   "the profile text the VLM wrote (chain-of-thought mode).")
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = (EMBEDDING, "STRING", "STRING")
    RETURN_NAMES = ("user_embedding", "profile", "confidence")
    OUTPUT_TOOLTIPS = ("The user's taste, for the PPD sampler (or to save and share).",
                       "What the VLM wrote about the user (empty in direct mode).",
                       "Do the pairs say enough? How sure the pairs are about your taste (0-1) and, when LOW, about "
                       "how many more pairs to pick in the Preference Picker. Saved in the embedding file too.")
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vlm": (VLM, tip("From VLM Loader.")),
            "pairs": (PAIRS, tip("From Preference Pair Loader (the paper uses 4 pairs).")),
            "mode": (list(MODES), tip("direct: one forward pass (seconds). chain-of-thought: the VLM reasons about "
                                      "the pairs first (the paper's method; minutes). Use the mode the adapter was "
                                      "trained with.")),
            "layers": ("STRING", tip("Which hidden layers become tokens: 'all', 'last', or e.g. '-1,-8'. Must match "
                                     "the adapter.", default="all")),
            "max_new_tokens": ("INT", tip("Longest chain-of-thought answer.", default=1024, min=16, max=4096)),
        }}

    def embed(self, vlm, pairs, mode, layers, max_new_tokens):
        import comfy.model_management as mm
        import comfy.utils

        device = mm.get_torch_device()
        bar = comfy.utils.ProgressBar(int(max_new_tokens) if mode == "chain-of-thought" else 1)

        def on_token() -> None:
            mm.throw_exception_if_processing_interrupted()
            bar.update(1)

        mm.throw_exception_if_processing_interrupted()
        try:
            # ComfyUI unloads models (Stage C among them) until the VLM fits; the VLM is freed before this returns
            embedding = embed_pairs(vlm, pairs, mode, layers, max_new_tokens, device, on_token,
                                    before_load=lambda size: mm.free_memory(int(size * 1.3), device))
        finally:
            mm.soft_empty_cache()
        bar.update_absolute(bar.total)
        return (embedding, embedding.profile, confidence_text(embedding.meta))
