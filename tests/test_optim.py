"""The 8-bit AdamW option: its codes round-trip within their resolution, it follows torch's AdamW, its state is a
quarter of AdamW's, and a checkpoint of it (safetensors, no pickle) continues bit for bit."""

from __future__ import annotations

import pytest
import torch

from ppd_train import optim
from ppd_train.checkpoint import load_checkpoint, save_checkpoint
from ppd_train.optim import AdamW8bit, make_optimizer


def test_codes_round_trip_within_their_resolution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * optim.BLOCK + 17, generator=g) * torch.logspace(-6, 0, 3 * optim.BLOCK + 17)  # padded
    codes, scale = optim.quantize_signed(x)
    assert codes.dtype == torch.int8 and scale.shape == (4,)
    back = optim.dequantize_signed(codes, scale, x)
    blockmax = scale.repeat_interleave(optim.BLOCK)[:x.numel()]
    # sqrt companding: one level of sqrt(|x| / blockmax) is 1/127, so the error is at most ~1/127 of the block's max
    assert ((back - x).abs() <= blockmax / 127).all()
    assert torch.equal(back.sign(), x.sign() * (back != 0))
    assert (back.abs().amax() == x.abs().amax())  # the block's max is exact
    v = x.square()
    ucodes, uscale = optim.quantize_unsigned(v)
    assert ucodes.dtype == torch.uint8
    vback = optim.dequantize_unsigned(ucodes, uscale, v)
    assert ((vback - v).abs() <= uscale.repeat_interleave(optim.BLOCK)[:v.numel()] / 255).all()
    # values far below the block's max are not rounded to 0 (a linear code would zero everything under max/510)
    small = torch.tensor([1.0, *[1e-4] * (optim.BLOCK - 1)])
    assert (optim.dequantize_unsigned(*optim.quantize_unsigned(small), small) > 0).all()
    zeros = torch.zeros(optim.BLOCK)
    assert torch.equal(optim.dequantize_signed(*optim.quantize_signed(zeros), zeros), zeros)  # no NaN from 0 / 0


def _regression(make, steps: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(96, 70))  # 6720 values: 8-bit, with a padded last block
    b = torch.nn.Parameter(torch.zeros(70))  # small: float32 moments
    target = torch.randn(96, 70)
    opt = make([w, b])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 96, generator=g)
        opt.zero_grad()
        ((x @ w + b - x @ target - 1) ** 2).mean().backward()
        opt.step()
    return w.detach(), b.detach()


def test_follows_torch_adamw():
    hyper = dict(lr=1e-2, weight_decay=0.01)
    w_ref, b_ref = _regression(lambda p: torch.optim.AdamW(p, **hyper))
    w, b = _regression(lambda p: AdamW8bit(p, **hyper))
    moved = w_ref.norm()
    assert (w - w_ref).norm() < 0.03 * moved  # 60 steps of rounded moments stay within 3% of the exact path
    assert (b - b_ref).abs().max() < 0.03 * b_ref.abs().max()
    assert not torch.equal(w, w_ref)  # and it really is another optimizer


def test_state_is_a_quarter_of_adamw():
    w = torch.nn.Parameter(torch.zeros(64, 1024))
    opt = AdamW8bit([w])
    w.grad = torch.ones_like(w)
    opt.step()
    state = opt.state[w]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_sq_codes"].dtype == torch.uint8
    size = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    assert size / (2 * w.numel() * 4) == pytest.approx((1 + 4 / optim.BLOCK) / 4)  # 8 bytes -> 2.03 per value


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(96, 70), torch.nn.Linear(70, 1))

    def step(m, opt):
        opt.zero_grad()
        m(torch.linspace(-1, 1, 96)[None]).square().sum().backward()
        opt.step()

    a = model(0)
    opt_a = AdamW8bit(a.parameters(), lr=1e-2)
    for _ in range(3):
        step(a, opt_a)
    save_checkpoint(tmp_path / "c.safetensors", a, opt_a, {"step": 3})
    b = model(1)
    opt_b = AdamW8bit(b.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "c.safetensors", b, opt_b)
    codes = opt_b.state[b[0].weight]["exp_avg_codes"]
    assert codes.dtype == torch.int8  # not widened to float32 by torch's loader
    assert torch.equal(codes, opt_a.state[a[0].weight]["exp_avg_codes"])
    for _ in range(2):
        step(a, opt_a)
        step(b, opt_b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="adamw, adamw8bit"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.0)


def test_small_tensors_take_torchs_adamw_step_exactly_and_the_defaults_are_torchs():
    """Below MIN_8BIT_SIZE the moments stay float32 and the step is AdamW's own rule: torch's result to rounding,
    with a weight decay large enough that its sign shows in one step (shrink, not grow)."""
    hyper = dict(lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.5)
    ref = torch.nn.Parameter(torch.linspace(-2.0, 3.0, 10))
    ours = torch.nn.Parameter(ref.detach().clone())
    opts = torch.optim.AdamW([ref], **hyper), AdamW8bit([ours], **hyper)
    for k in range(4):
        grad = torch.linspace(1.0, -1.0, 10) * (k + 1)
        for p, opt in zip((ref, ours), opts):
            p.grad = grad.clone()
            opt.step()
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6), k
    assert opts[1].state[ours]["step"] == 4 and "exp_avg_codes" not in opts[1].state[ours]
    torch_defaults = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert AdamW8bit([torch.nn.Parameter(torch.zeros(1))]).defaults == {
        k: torch_defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
