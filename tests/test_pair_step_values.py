"""The DPO pair step (``pair_step.py``) half by half against a float64 reference written out here: which rows are the
preferred images, which pass is the reference (adapter off), and what the loss and its gradient are."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import trained_looking_adapter

from ppd_train.adapter import AdapterConfig, PPDAdapter
from ppd_train.dpo_data import DPOData
from ppd_train.pair_step import noised_pairs, pair_loss
from ppd_train.schedule import alpha_bar
from ppd_train.stage_c import PPDBinding, stage_c_info
from ppd_train.tiny import build_tiny_stage_c

B, CLIP = 3, 32


def _pairs(seed: int = 0) -> DPOData:
    """Three pairs over two captions, with distinct preferred and dispreferred latents."""
    g = torch.Generator().manual_seed(seed)
    return DPOData(torch.randn(B, 16, 4, 4, generator=g), torch.randn(B, 16, 4, 4, generator=g) + 0.5,
                   torch.tensor([1, 0, 0]), torch.zeros(B, dtype=torch.long),
                   torch.randn(2, 77, CLIP, generator=g), torch.randn(2, 1, CLIP, generator=g), ["ann"])


def _draws(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.2, 0.5, 0.8])
    return t, torch.randn(B, 16, 4, 4, generator=g), torch.randn(B, 5, 24, generator=g)  # t, eps, one user per pair


def _swap(data: DPOData) -> DPOData:
    return DPOData(data.latents_l, data.latents_w, data.caption_idx, data.user_idx, data.text, data.pooled,
                   data.user_ids)


def _step(binding: PPDBinding, data: DPOData, t, eps, users, beta: float, weights=1.0, backward: bool = False):
    inputs = noised_pairs(data, torch.arange(B), t, eps, torch.zeros(1, 1, CLIP), "cpu")
    binding.adapter.zero_grad(set_to_none=True)
    stats = pair_loss(binding, inputs, eps, lambda: binding.adapter(torch.cat([users, users])), beta, weights,
                      backward=(lambda loss: loss.backward()) if backward else None)
    return stats


def _grads(adapter: PPDAdapter) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in adapter.parameters()])


def reference64(unet, adapter, data: DPOData, t, eps, users, beta: float):
    """Per pair, in float64, each of the four passes on its own: the preferred (w) and dispreferred (l) image, each
    noised with the pair's eps at its t, through Stage C with the adapter off (the reference) and with the pair's user
    on; d = (mse(model_w) - mse(ref_w)) - (mse(model_l) - mse(ref_l)); loss = mean(-log sigmoid(-beta d)).
    -> (loss (differentiable in the float64 adapter's weights), margins -d, the float64 adapter)."""
    unet64, adapter64 = copy.deepcopy(unet).double(), copy.deepcopy(adapter).double()
    binding = PPDBinding(unet64, adapter64)
    losses, margins = [], []
    for i in range(B):
        ab = alpha_bar(t[i:i + 1].double())
        cap = int(data.caption_idx[i])
        kw = dict(timestep_ratio=t[i:i + 1].double(), clip_text_pooled=data.pooled[cap][None].double(),
                  clip_text=data.text[cap][None].double(), clip_img=torch.zeros(1, 1, CLIP, dtype=torch.float64))
        e = eps[i:i + 1].double()
        err = {}
        for name, x0 in (("w", data.latents_w[i:i + 1]), ("l", data.latents_l[i:i + 1])):
            x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * e
            with binding.adapter_off(), torch.no_grad():
                err["ref_" + name] = (unet64(x_t, **kw).sample - e).pow(2).mean()
            with binding.user(adapter64(users[i:i + 1].double()), 1.0):
                err["model_" + name] = (unet64(x_t, **kw).sample - e).pow(2).mean()
        d = (err["model_w"] - err["ref_w"]) - (err["model_l"] - err["ref_l"])
        losses.append(-F.logsigmoid(-beta * d))
        margins.append(-d.detach())
    binding.detach()
    return torch.stack(losses).mean(), torch.stack(margins), adapter64


def test_noised_pairs_puts_the_preferred_images_first_each_with_its_caption():
    data = _pairs()
    t, eps, _ = _draws()
    idx = torch.tensor([2, 0])
    inputs = noised_pairs(data, idx, t[:2], eps[:2], torch.zeros(1, 1, CLIP), "cpu")
    ab = alpha_bar(t[:2].double()).view(-1, 1, 1, 1)
    for rows, latents in ((slice(0, 2), data.latents_w), (slice(2, 4), data.latents_l)):
        expected = ab.sqrt() * latents[idx].double() + (1 - ab).sqrt() * eps[:2].double()
        assert torch.allclose(inputs["sample"][rows].double(), expected, atol=1e-6)
        assert torch.equal(inputs["clip_text"][rows], data.text[data.caption_idx[idx]])
        assert torch.equal(inputs["clip_text_pooled"][rows], data.pooled[data.caption_idx[idx]])
    assert inputs["timestep_ratio"].tolist() == [*t[:2].tolist(), *t[:2].tolist()]
    assert inputs["clip_img"].shape == (4, 1, CLIP) and not inputs["clip_img"].any()


def test_the_pair_step_matches_a_float64_reference_half_by_half():
    unet = build_tiny_stage_c(seed=0)
    adapter = trained_looking_adapter(unet, embed_dim=24, num_tokens=5, seed=3)
    data, (t, eps, users), beta = _pairs(), _draws(), 300.0
    loss64, margins64, adapter64 = reference64(unet, adapter, data, t, eps, users, beta)  # on copies
    binding = PPDBinding(unet, adapter)
    stats = _step(binding, data, t, eps, users, beta, backward=True)
    scale = margins64.abs().max().item()
    assert scale > 1e-3  # the adapter moves the predictions: each half matters
    assert torch.allclose(stats.margins.double(), margins64, atol=1e-4 * scale, rtol=0)
    assert stats.loss.item() == pytest.approx(loss64.item(), rel=1e-4)
    assert stats.implicit_acc == pytest.approx((margins64 > 0).double().mean().item())
    assert 0 < stats.implicit_acc < 1  # pairs of both signs: a sign error shows
    loss64.backward()
    g64 = _grads(adapter64)
    assert torch.allclose(_grads(adapter).double(), g64, rtol=1e-3, atol=1e-4 * g64.abs().max().item())

    # A pair at weight 0 (its rows in both halves) runs with the adapter off: margin exactly 0, the others unchanged
    dropped = _step(binding, data, t, eps, users, beta, weights=torch.tensor([1.0, 0.0, 1.0] * 2))
    assert dropped.margins[1] == 0
    assert torch.allclose(dropped.margins[[0, 2]], stats.margins[[0, 2]], atol=1e-5 * scale, rtol=0)


def test_a_zero_adapter_gives_the_loss_at_zero_margin():
    unet = build_tiny_stage_c(seed=0)
    fresh = PPDAdapter(AdapterConfig.for_model(stage_c_info(unet), embed_dim=24, num_tokens=5, embedder="test"))
    data, (t, eps, users) = _pairs(), _draws()
    stats = _step(PPDBinding(unet, fresh), data, t, eps, users, beta=2500.0)
    assert torch.equal(stats.margins, torch.zeros(B))  # the user path adds exactly nothing
    assert stats.loss.item() == pytest.approx(math.log(2), rel=1e-7)  # -log sigmoid(0) for every pair
    assert stats.model_mse == stats.ref_mse and stats.implicit_acc == 0.0


def test_swapping_preferred_and_dispreferred_flips_the_gradient():
    unet = build_tiny_stage_c(seed=0)
    data, (t, eps, users), beta = _pairs(), _draws(), 300.0
    # At a zero adapter (margin 0) the two gradients are exact opposites
    fresh = PPDAdapter(AdapterConfig.for_model(stage_c_info(unet), embed_dim=24, num_tokens=5, embedder="test"))
    binding = PPDBinding(unet, fresh)
    _step(binding, data, t, eps, users, beta, backward=True)
    g = _grads(fresh)
    _step(binding, _swap(data), t, eps, users, beta, backward=True)
    assert g.abs().max() > 0 and torch.allclose(_grads(fresh), -g, rtol=1e-4, atol=1e-6 * g.abs().max().item())
    binding.detach()

    # Anywhere, for one pair: d -> -d, so the gradient is -exp(beta * margin) times the other's
    adapter = trained_looking_adapter(unet, embed_dim=24, num_tokens=5, seed=3)
    binding = PPDBinding(unet, adapter)
    one = data.subset(torch.tensor([0]))
    inputs = noised_pairs(one, torch.arange(1), t[:1], eps[:1], torch.zeros(1, 1, CLIP), "cpu")
    swapped = noised_pairs(_swap(one), torch.arange(1), t[:1], eps[:1], torch.zeros(1, 1, CLIP), "cpu")
    grads, margins = [], []
    for x in (inputs, swapped):
        adapter.zero_grad(set_to_none=True)
        stats = pair_loss(binding, x, eps[:1], lambda: adapter(torch.cat([users[:1], users[:1]])), beta, 1.0,
                          backward=lambda loss: loss.backward())
        grads.append(_grads(adapter))
        margins.append(stats.margins.item())
    assert margins[1] == pytest.approx(-margins[0], rel=1e-4) and abs(margins[0]) * beta > 0.05
    factor = math.exp(beta * margins[0])
    assert torch.allclose(grads[1], -factor * grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max().item())
