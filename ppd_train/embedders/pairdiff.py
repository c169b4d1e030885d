"""Pair-difference embedder: one token per pair, ``phi(preferred) - phi(dispreferred)``.

The paper's suggested ablation, and the cheap, informative embedder of the synthetic world. ``phi`` is pluggable:
a CLIP vision model from a local folder for real images, or any function of a batch of inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..confidence import pair_confidence
from ..embedding import UserEmbedding
from ..errors import PPDError
from ..pairs import PreferencePair, content_hash
from ..safetensors_io import require_safetensors

Encoder = Callable[[Sequence], torch.Tensor]  # batch of images (or arrays) -> [B, D]


class PairDifferenceEmbedder:
    family = "pairdiff"

    def __init__(self, encode: Encoder, encoder_id: str) -> None:
        self.encode = encode
        self.id = f"pairdiff:{encoder_id}"

    @classmethod
    def from_clip(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> PairDifferenceEmbedder:
        """phi = the projected image embedding of a local CLIP vision checkpoint (safetensors only)."""
        from transformers import CLIPVisionModelWithProjection
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise PPDError(f"{folder} is not a CLIP vision checkpoint (no config.json).")
        require_safetensors(folder, "CLIP vision")
        model = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                              dtype=dtype).to(device).eval()  # type: ignore[arg-type]
        processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)

        @torch.inference_mode()
        def encode(images: Sequence) -> torch.Tensor:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, dtype)
            return model(pixel_values=pixels).image_embeds.float().cpu()

        return cls(encode, f"clip:{folder.name}")

    def embed_tokens(self, chosen: Sequence, rejected: Sequence) -> torch.Tensor:
        """Tokens ``[N, D]`` for one user's N pairs given as inputs ``phi`` accepts."""
        both = self.encode(list(chosen) + list(rejected))
        n = len(chosen)
        return both[:n] - both[n:]

    def embed(self, users: Sequence[Sequence[PreferencePair]], user_ids: Sequence[str] | None = None,
              progress=None) -> list[UserEmbedding]:
        out = []
        for u, pairs in enumerate(users):
            tokens = self.embed_tokens([p.chosen.load() for p in pairs], [p.rejected.load() for p in pairs])
            uid = user_ids[u] if user_ids is not None else (pairs[0].user_id if pairs else "")
            meta = {"n_pairs": len(pairs), "content_hash": content_hash(pairs), "user_id": uid,
                    "pair_sources": [p.source for p in pairs]}
            if pairs:
                meta["confidence"] = pair_confidence(tokens)  # each token is its pair's evidence
            out.append(UserEmbedding(tokens, self.id, meta))
            if progress is not None:
                progress(1)
        return out

    def unload(self) -> None:
        self.encode = None  # type: ignore[assignment]
