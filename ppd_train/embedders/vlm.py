"""The paper's user embedder: LLaVA-OneVision reads N preference pairs; its hidden states become the user tokens.

``cot`` (the paper): greedy generation of a step-by-step analysis ending in a short user profile; tokens = hidden
states of the **last decoding step** at the selected layers; the generated text is kept as the profile.
``direct``: one forward pass over the same prompt, no generation; tokens = the last prompt token at each selected
layer. Orders of magnitude cheaper, which is what makes embedding thousands of training users affordable.

Models load from a local folder in transformers format only (``local_files_only``, safetensors, no remote code).
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..confidence import pair_confidence
from ..embedding import UserEmbedding
from ..errors import PPDError
from ..pairs import PreferencePair, content_hash
from ..safetensors_io import require_safetensors

PROMPT_INTRO = (
    "You are shown {n} pairs of images. Both images of a pair were generated from the same caption, and in every "
    "pair this user preferred the first image over the second.\n"
)
PROMPT_PAIR = "Pair {i}. Caption: \"{caption}\"\nPreferred image: {img}\nDispreferred image: {img}\n"
PROMPT_TASK = (
    "Think step by step about the style, visual quality and aesthetics this user prefers. Describe each pair, "
    "then finish with a short user profile starting with 'User profile:'."
)
MODES = ("direct", "cot")
QUANTIZE = ("none", "8bit", "4bit")
_BYTES = {torch.float32: 4.0, torch.float16: 2.0, torch.bfloat16: 2.0}


def vlm_load_kwargs(device: str | torch.device, dtype: torch.dtype, quantize: str = "none", offload: bool = False,
                    max_gpu_gib: float | None = None) -> dict[str, Any]:
    """The one place that turns the VLM load options into ``from_pretrained`` keyword arguments.

    ``quantize`` "8bit"/"4bit": bitsandbytes through transformers (CUDA only); ``offload``: accelerate's device map
    keeps what fits on the GPU (at most ``max_gpu_gib``, default 90% of its free memory) and the rest in CPU RAM.
    With either, the weights are placed while loading (``device_map`` in the result); otherwise the caller moves the
    model to ``device``.
    """
    device = torch.device(device)
    if quantize not in QUANTIZE:
        raise PPDError(f"Unknown VLM quantize option {quantize!r}; use one of {list(QUANTIZE)}.")
    if dtype not in _BYTES:
        raise PPDError(f"VLM dtype {dtype} is not supported; use float32, float16 or bfloat16.")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize == "none" and not offload:
        return kwargs
    if device.type != "cuda":
        option = f"quantize={quantize}" if quantize != "none" else "offload"
        raise PPDError(f"The VLM option {option} needs a CUDA GPU (it is for fitting the VLM into a GPU's memory); "
                       f"this run's device is {device.type}. Use quantize=none and offload off there.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if quantize != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise PPDError(f"The VLM option quantize={quantize} needs the bitsandbytes package: "
                           "`pip install bitsandbytes` in the Python that runs PPD, or set quantize=none.")
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float32 else torch.float16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload) if quantize == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                    llm_int8_enable_fp32_cpu_offload=offload))
    if offload:
        import psutil

        if max_gpu_gib is None or max_gpu_gib <= 0:
            gpu = int(0.9 * torch.cuda.mem_get_info(index)[0])
        else:
            gpu = int(max_gpu_gib * 2**30)
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {index: gpu, "cpu": int(psutil.virtual_memory().available)}
    else:
        kwargs["device_map"] = {"": index}
    return kwargs


def vlm_gpu_bytes(folder: str | os.PathLike, dtype: torch.dtype, quantize: str = "none", offload: bool = False,
                  max_gpu_gib: float | None = None) -> int:
    """About how much GPU memory the VLM's weights take with these options (parameters counted from the safetensors
    headers, nothing loaded): what a caller frees before loading."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    per = {"none": _BYTES.get(dtype, 4.0), "8bit": 1.0, "4bit": 0.5}[quantize]
    size = int(n * per)
    if offload and max_gpu_gib:
        size = min(size, int(max_gpu_gib * 2**30))
    return size


def parse_layers(spec: str | Sequence[int], num_states: int) -> list[int]:
    """``"all"``, ``"last"``, ``"-1,-8"`` or a list of ints -> indices into the ``num_states`` hidden states
    (embedding output + one per decoder layer)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(num_states))
        if s == "last":
            return [num_states - 1]
        try:
            spec = [int(x) for x in s.replace(" ", "").split(",") if x]
        except ValueError:
            raise PPDError(f"Layers {spec!r}: use 'all', 'last' or comma-separated integers like '-1,-8'.") from None
    out = []
    for i in spec:
        j = i + num_states if i < 0 else i
        if not 0 <= j < num_states:
            raise PPDError(f"Layer {i} does not exist: this VLM has hidden states 0..{num_states - 1} "
                           f"(or -1..-{num_states}).")
        if j in out:  # e.g. "-1,27" on a 28-layer VLM: the same state twice would weigh one layer double
            raise PPDError(f"Layer {i} is the same hidden state as an earlier one in {spec!r}; list each layer once.")
        out.append(j)
    if not out:
        raise PPDError("Select at least one layer.")
    return out


def build_prompt(pairs: Sequence[PreferencePair], image_token: str) -> str:
    """The pairs in order, preferred image first, each image placed next to its own caption."""
    body = "".join(PROMPT_PAIR.format(i=i + 1, caption=p.prompt.replace("\n", " "), img=image_token)
                   for i, p in enumerate(pairs))
    return PROMPT_INTRO.format(n=len(pairs)) + body + PROMPT_TASK


def check_vlm_folder(folder: Path) -> None:
    """Refuse, before any weights load, a folder that is not a local LLaVA-OneVision checkpoint in safetensors."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PPDError(f"{folder} is not a model folder (no config.json). Put a LLaVA-OneVision checkpoint in "
                       "transformers format there (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf).")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as e:
        raise PPDError(f"{config_path} is not readable JSON ({e}).") from None
    if model_type != "llava_onevision":
        raise PPDError(f"{folder} holds a '{model_type}' model, not a LLaVA-OneVision VLM. Use a "
                       "llava-onevision-qwen2-*-hf checkpoint.")
    require_safetensors(folder, "VLM")


class VLMEmbedder:
    """Embeds users with a local LLaVA-OneVision folder. ``embed([...pairs per user...])`` -> UserEmbeddings."""

    family = "vlm"

    def __init__(self, folder: str | os.PathLike, mode: str = "direct", layers: str | Sequence[int] = "all",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, max_new_tokens: int = 1024,
                 batch_size: int = 1, quantize: str = "none", offload: bool = False,
                 max_gpu_gib: float | None = None) -> None:
        from transformers import LlavaOnevisionForConditionalGeneration

        from .llava_processor import ImageOnlyLlavaOnevisionProcessor

        if mode not in MODES:
            raise PPDError(f"Unknown embedding mode {mode!r}; use 'direct' (fast) or 'cot' (the paper's "
                           "chain-of-thought).")
        self.folder = Path(folder)
        check_vlm_folder(self.folder)
        load = vlm_load_kwargs(device, dtype, quantize, offload, max_gpu_gib)  # refuses bad options before loading
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = dtype
        self.quantize = quantize
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, int(batch_size))
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(self.folder, use_safetensors=True,
                                                                       local_files_only=True, **load)
        # placed while loading when quantized or offloaded (such a model refuses .to()); inputs go to self.device
        self.model = (model if "device_map" in load else model.to(self.device)).eval()  # type: ignore[arg-type]
        self.processor = ImageOnlyLlavaOnevisionProcessor.from_pretrained(self.folder, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # the last position must be every row's real last token
        num_states = self.model.config.text_config.num_hidden_layers + 1
        self.layers = parse_layers(layers, num_states)
        layer_id = "all" if self.layers == list(range(num_states)) else ",".join(map(str, self.layers))
        self.id = f"vlm:{self.folder.name}:{mode}:{layer_id}"
        self.width = int(self.model.config.text_config.hidden_size)

    def _inputs(self, users: Sequence[Sequence[PreferencePair]]):
        tok = self.processor.tokenizer
        texts, images = [], []
        for pairs in users:
            content = [{"type": "text", "text": build_prompt(pairs, self.processor.image_token)}]
            message: Any = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False))
            images.append([img for p in pairs for img in (p.chosen.load(), p.rejected.load())])
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        if tok.pad_token_id is None:
            raise PPDError(f"The tokenizer in {self.folder} has no pad token; batch size must be 1.")
        return inputs.to(self.device)

    @torch.inference_mode()
    def _pair_evidence(self, inputs, users: Sequence[Sequence[PreferencePair]]) -> list[torch.Tensor]:
        """Per user ``[N, d]``: the VLM's own vision tower, mean-pooled over the base tile (the whole image), of the
        preferred minus the dispreferred image of each pair: what :mod:`ppd_train.confidence` reads. One extra
        vision pass over one tile per image, small beside the language model's pass."""
        feats = self.model.model.vision_tower(pixel_values=inputs["pixel_values"][:, 0]).last_hidden_state
        feats = feats.float().mean(1).cpu()  # images in order: user by user, pair by pair, preferred first
        out, start = [], 0
        for pairs in users:
            f = feats[start:start + 2 * len(pairs)].view(len(pairs), 2, -1)
            out.append(f[:, 0] - f[:, 1])
            start += 2 * len(pairs)
        return out

    @torch.inference_mode()
    def _embed_batch(self, users: Sequence[Sequence[PreferencePair]],
                     on_token: Callable[[], None] | None = None) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
        inputs = self._inputs(users)
        evidence = self._pair_evidence(inputs, users)
        if self.mode == "direct":
            out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
            states = torch.stack([out.hidden_states[i][:, -1] for i in self.layers], dim=1)
            return [(states[b].float().cpu(), "", evidence[b]) for b in range(len(users))]
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _EachToken(StoppingCriteria):  # a hook, never a stop: lets callers show progress or interrupt
            def __call__(self, input_ids, scores, **kwargs):
                if on_token is not None:
                    on_token()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        tok = self.processor.tokenizer
        gen = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                  output_hidden_states=True, return_dict_in_generate=True,
                                  pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([_EachToken()]))
        new = gen.sequences[:, inputs["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        results = []
        for b in range(len(users)):
            ids = new[b].tolist()
            # the last decoding step of *this* row: the one that produced its end-of-sequence token
            last = next((k for k, t in enumerate(ids) if t in eos_ids), len(gen.hidden_states) - 1)
            last = min(last, len(gen.hidden_states) - 1)
            step = gen.hidden_states[last]
            tokens = torch.stack([step[i][b, -1] for i in self.layers]).float().cpu()
            results.append((tokens, tok.decode(ids[: last + 1], skip_special_tokens=True).strip(), evidence[b]))
        return results

    def embed(self, users: Sequence[Sequence[PreferencePair]], user_ids: Sequence[str] | None = None,
              progress=None, on_token: Callable[[], None] | None = None) -> list[UserEmbedding]:
        """One embedding per user, ``batch_size`` users per forward; ``progress(n_done)`` is called per batch and
        ``on_token()`` per generated token in ``cot`` mode (either may raise to abort)."""
        out: list[UserEmbedding] = []
        for start in range(0, len(users), self.batch_size):
            chunk = users[start:start + self.batch_size]
            for j, (tokens, text, evidence) in enumerate(self._embed_batch(chunk, on_token)):
                pairs = chunk[j]
                uid = user_ids[start + j] if user_ids is not None else (pairs[0].user_id if pairs else "")
                meta = {"model": self.folder.name, "mode": self.mode, "layers": self.layers, "n_pairs": len(pairs),
                        "content_hash": content_hash(pairs), "profile": text, "user_id": uid,
                        "pair_sources": [p.source for p in pairs],
                        # how the VLM ran: an adapter is best used with embeddings made the way its training ones were
                        "dtype": str(self.dtype).removeprefix("torch."), "quantize": self.quantize}
                if pairs:
                    meta["confidence"] = pair_confidence(evidence)
                out.append(UserEmbedding(tokens, self.id, meta))
            if progress is not None:
                progress(len(chunk))
        return out

    def unload(self) -> None:
        """Free the VLM (the nodes call this after each job)."""
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
