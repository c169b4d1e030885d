"""Small helpers shared by tests (no fixtures here: conftest holds those)."""

from __future__ import annotations

import torch

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.stage_c import stage_c_info


def trained_looking_adapter(unet, embed_dim: int = 24, num_tokens: int = 5, seed: int = 1,
                            embedder: str = "test") -> PPDAdapter:
    """An adapter whose weights are all non-zero, as after training (a fresh one adds exactly nothing)."""
    config = AdapterConfig.for_stage_c(stage_c_info(unet), embed_dim=embed_dim, num_tokens=num_tokens,
                                       embedder=embedder)
    adapter = PPDAdapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def stage_c_inputs(batch: int = 2, size: int = 6, clip_dim: int = 32, seed: int = 0) -> dict:
    """Stage C conditioning laid out like the real one: 77 text tokens, pooled text, CLIP image (zeros)."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 16, size, size, generator=g), timestep_ratio=torch.rand(batch, generator=g),
                clip_text_pooled=torch.randn(batch, 1, clip_dim, generator=g),
                clip_text=torch.randn(batch, 77, clip_dim, generator=g), clip_img=torch.zeros(batch, 1, clip_dim))
