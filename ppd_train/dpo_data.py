"""Cached training data: latents of preferred/dispreferred images, text conditioning, user index, for one base model.

The trainer never sees images: real datasets are encoded once (Stage C: EfficientNet latents and CLIP-G text; SDXL: VAE
latents, both text encoders and each pair's size/crop numbers) into this file, and the synthetic world writes the same
file. Captions are stored once and referenced by index. The file records its base (a Stage C file, as ever, records
none), so data is never trained on a base it was not encoded for.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .adapter import BASES
from .embedding import UserEmbedding
from .errors import PPDError
from .safetensors_io import atomic_save_safetensors, dumps_json, read_json_metadata, read_safetensors

METADATA_KEY = "ppd_dpo_data"


def tensor_digest(*tensors: torch.Tensor, extra: str = "") -> str:
    """Short content hash of tensors (and a string): tells a resumed run whether its inputs are still the same."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def model_inputs(unet_config) -> tuple[str, int, int, int]:
    """(base, latent channels, text width, pooled text width) of a diffusers Stage C or SDXL UNet config."""
    if "addition_embed_type" in unet_config:  # SDXL: the pooled text shares the added embedding with 6 size numbers
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        return "sdxl", int(unet_config["in_channels"]), int(unet_config["cross_attention_dim"]), int(pooled)
    return ("stage_c", int(unet_config["in_channels"]), int(unet_config["clip_text_in_channels"]),
            int(unet_config["clip_text_pooled_in_channels"]))


@dataclass
class DPOData:
    latents_w: torch.Tensor  # [P, 16, h, w] preferred
    latents_l: torch.Tensor  # [P, 16, h, w] dispreferred
    caption_idx: torch.Tensor  # [P] long
    user_idx: torch.Tensor  # [P] long
    text: torch.Tensor  # [C, L, c] CLIP text tokens (SDXL: both encoders' penultimate states, concatenated)
    pooled: torch.Tensor  # [C, 1, c] pooled CLIP text (SDXL: the second encoder's)
    user_ids: list[str]
    info: dict = field(default_factory=dict)
    time_ids: torch.Tensor | None = None  # SDXL only: [P, 6] original size, crop top-left, target size of each pair
    base: str = "stage_c"  # the base model the data is encoded for (a key of adapter.BASES)

    def __post_init__(self) -> None:
        p = self.latents_w.shape[0]
        if not p:
            raise PPDError("The training data has no usable pairs (all ties or empty). Check the dataset.")
        if self.latents_l.shape != self.latents_w.shape or len(self.caption_idx) != p or len(self.user_idx) != p:
            raise PPDError("DPO data is inconsistent: latents, captions and users must have one entry per pair.")
        for name, top in (("caption_idx", len(self.text)), ("user_idx", len(self.user_ids))):
            idx = getattr(self, name)
            bad_type = idx.dtype.is_floating_point or idx.dtype == torch.bool
            if bad_type or bool((idx < 0).any()) or bool((idx >= top).any()):
                raise PPDError(f"DPO data: '{name}' holds entries outside 0..{top - 1}; the file is damaged. "
                               "Re-create it with `ppd-train prepare`.")
        if self.base not in BASES:
            raise PPDError(f"DPO data: base {self.base!r} is not one of {', '.join(BASES)}; the file is damaged.")
        if (self.time_ids is not None) != (self.base == "sdxl") or (
                self.time_ids is not None and tuple(self.time_ids.shape) != (p, 6)):
            raise PPDError("DPO data: SDXL data needs one row of 6 size/crop numbers per pair (time_ids), other data "
                           "none; the file is damaged. Re-create it with `ppd-train prepare`.")
        for name in ("latents_w", "latents_l", "text", "pooled") + (("time_ids",) if self.time_ids is not None else ()):
            if not torch.isfinite(getattr(self, name)).all():
                raise PPDError(f"DPO data: '{name}' contains NaN or infinite values; re-encode the dataset.")

    def check_fits(self, unet_config, path: str | os.PathLike = "the data",
                   stage_c: str | os.PathLike = "the Stage C") -> None:
        """Refuse data encoded for another base model, or another model of the same base (latent channels, text
        widths), before torch fails deep inside. ``stage_c`` names the model (a Stage C or an SDXL)."""
        base, channels, text, pooled = model_inputs(unet_config)
        if self.base != base:
            raise PPDError(f"{path} holds {BASES[self.base]} data, but {stage_c} is {BASES[base]}: latents and text "
                           f"encoded for one base mean nothing to the other. Re-run `ppd-train prepare` for "
                           f"{BASES[base]}, or train on the {BASES[self.base]} model the data was prepared for.")
        clip = "" if base == "sdxl" else "CLIP "
        want = {"latent channels": (self.latents_w.shape[1], channels),
                f"{clip}text width": (self.text.shape[-1], text),
                f"pooled {clip}text width": (self.pooled.shape[-1], pooled)}
        name = BASES[base]
        wrong = [f"{k} {have} ({name} takes {need})" for k, (have, need) in want.items() if int(have) != int(need)]
        if wrong:
            raise PPDError(f"{path} was encoded for another model than {stage_c}: {', '.join(wrong)}. Use the {name} "
                           "it was prepared for, or re-run `ppd-train prepare` with this model's text encoder.")

    def __len__(self) -> int:
        return int(self.latents_w.shape[0])

    def subset(self, idx: torch.Tensor) -> DPOData:
        return DPOData(self.latents_w[idx], self.latents_l[idx], self.caption_idx[idx], self.user_idx[idx], self.text,
                       self.pooled, self.user_ids, self.info,
                       None if self.time_ids is None else self.time_ids[idx], self.base)

    def digest(self) -> str:
        extra = () if self.time_ids is None else (self.time_ids,)  # Stage C data hashes as it always did
        return tensor_digest(self.latents_w, self.latents_l, self.caption_idx, self.user_idx, self.text, self.pooled,
                             *extra, extra=json.dumps(self.user_ids) + ("" if self.base == "stage_c" else self.base))

    def user_tokens(self, table: dict[str, UserEmbedding]) -> tuple[torch.Tensor, str]:
        """Stack the users' embeddings in this data's user order -> ([U, T, D], embedder id)."""
        missing = [u for u in self.user_ids if u not in table]
        if missing:
            raise PPDError(f"The embedding table has no embedding for {len(missing)} of the {len(self.user_ids)} "
                           f"training users (e.g. {', '.join(missing[:5])}). Run `ppd-train embed` on the same "
                           "dataset, or drop those users.")
        embs = [table[u] for u in self.user_ids]
        return torch.stack([e.tokens for e in embs]), embs[0].embedder

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: getattr(self, k) for k in ("latents_w", "latents_l", "caption_idx", "user_idx", "text", "pooled")}
        meta: dict = {"user_ids": self.user_ids, "info": self.info}
        if self.base != "stage_c":  # Stage C files stay exactly what they were before SDXL existed
            meta["base"] = self.base
        if self.time_ids is not None:
            tensors["time_ids"] = self.time_ids
        atomic_save_safetensors(tensors, path, {METADATA_KEY: dumps_json(meta, sort_keys=False)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> DPOData:
        tensors, metadata = read_safetensors(path, "DPO training data")
        meta = read_json_metadata(metadata, METADATA_KEY, path, "DPO training data")
        try:
            return cls(**{k: tensors[k] for k in ("latents_w", "latents_l", "caption_idx", "user_idx", "text",
                                                  "pooled")}, user_ids=meta["user_ids"], info=meta.get("info", {}),
                       time_ids=tensors.get("time_ids"), base=meta.get("base", "stage_c"))
        except KeyError as e:
            raise PPDError(f"{path}: DPO data is missing {e}; re-create it.") from None
