"""The adapter's optimizer, chosen by ``TrainConfig.optimizer``: torch's AdamW, or AdamW with 8-bit moments.

``adamw8bit`` keeps both AdamW moments as 8-bit codes with three float32 scales per block of 256 values (2.05 bytes
per parameter instead of 8): the update itself runs in float32 on the dequantized moments, exactly AdamW's rule, and
only what is carried to the next step is rounded. Plain torch, no compiler and no extra dependency, so it runs
wherever the trainer runs; its state is ordinary int8/uint8/float32 tensors, which the safetensors checkpoint stores
as they are, so resume stays bit-for-bit. Why this and not torchao's ``AdamW8bit``: docs/performance.md.
"""

from __future__ import annotations

import math

import torch

from .errors import FileFormatError

OPTIMIZERS = ("adamw", "adamw8bit")
BLOCK = 256  # values per absmax scale: a block's largest value sets its resolution, so outliers stay local
MIN_8BIT_SIZE = 4096  # smaller tensors (norms, biases, scales) keep float32 moments: they cost nothing, stay exact
CHUNK_BLOCKS = 1024  # blocks updated at once on a CPU (1 MiB of float32): small enough to stay in cache
_TINY = torch.finfo(torch.float32).tiny  # an all-zero block keeps a scale > 0: its codes are 0, not NaN


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return adamw(params, lr, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for these parameters: on Stage C lite's adapter the optimizer
    step alone runs 3-6x faster on a CPU than torch's other AdamW implementations (under 1% of a DPO step there) and,
    unlike the for-each one (torch's CUDA default), holds no adapter-sized temporary (benchmarks/optimizer_step.py).
    Same update rule and state, so checkpoints resume either way; torch builds without the kernel get the default."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or torch version
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# Both moments are kept bias-corrected, as AdamW's update uses them. The second as its square root s = sqrt(v_hat) (what
# the update divides by), on a log scale from the block's largest value down to its smallest nonzero one, the span
# rounded up to whole half decades: every value keeps the same relative resolution, one code = 10**(span / 254):
# 0.45% over a half decade, 5.6% over six decades, 9.5% over the widest span allowed (ROOT_DECADES). So a block whose
# gradients span six decades keeps its smallest ones, where a code without that range (square-root companding, before
# issue 25) rounded them to 0 and turned m / sqrt(v) into m / eps. Whole half decades keep the scale still while the
# smallest value jitters: each move of the scale re-rounds every code in the block.
# The first moment is kept as its ratio to s as stored, r = m_hat / s: the step in units of lr (about 1 at most),
# signed, companded as sign * sqrt(|r| / absmax) on 127 levels. It needs no range of its own: a small gradient's m is
# as small as its s, and its step's error is a share of lr whatever the gradient's scale.
ROOT_DECADES = 10  # a block's log scale spans at most this many decades below its largest value
ROOT_FLOOR = 1e-2  # ... and reaches no lower than this times eps: below it, s moves the denominator s + eps by < 1%
# the value of code c (1-255) on a scale spanning k half decades, as a share of the block's largest; code 0 is 0
_ROOT_UNITS = torch.tensor([[0.0] + [10 ** (-k / 2 * (255 - c) / 254) for c in range(1, 256)]
                            for k in range(2 * ROOT_DECADES + 1)], dtype=torch.float64).float()
_ROOT_UNITS_ON: dict[torch.device, torch.Tensor] = {}
STATE_BYTES = 2 + (4 + 4 + 1) / BLOCK  # per value: two 1-byte codes; per block the ratio's and the root's scales, span
STATE_KEYS = {"step", "exp_avg", "exp_avg_sq",  # float32 moments of small tensors (and of torch's AdamW)
              "exp_avg_ratio_codes", "exp_avg_ratio_scale", "exp_avg_sq_root_codes", "exp_avg_sq_root_scale",
              "exp_avg_sq_root_span"}


def quantize_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(x)
    unit = blocks.abs()
    scale = unit.amax(dim=1, keepdim=True).clamp_min_(_TINY)
    unit.div_(scale).sqrt_().mul_(127).round_()
    return torch.copysign(unit, blocks).to(torch.int8), scale.squeeze(1)


def dequantize_signed(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    unit = codes.float()
    return _unblock(unit.abs().mul_(unit).mul_(scale[:, None] / 127**2), like)


def quantize_root(x: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``x`` >= 0 (0 for exactly 0, else 1-255 log-spaced up to the block's largest value), that value and
    the scale's span in half decades, per block. A value below the scale's bottom rounds up to it (it can only take a
    smaller step): the bottom is the block's smallest nonzero value, but no more than ROOT_DECADES under its largest
    and not under ``floor``."""
    blocks = _blocks(x)
    hi = blocks.amax(dim=1, keepdim=True).clamp_min_(_TINY)
    lo = torch.where(blocks > 0, blocks, hi).amin(dim=1, keepdim=True)
    span = hi.div(lo).log10_().mul_(2).ceil_().clamp_(0, 2 * ROOT_DECADES)
    span = torch.minimum(span, hi.div(floor).log10_().mul_(2).floor_().clamp_min_(0))  # floor 0: no limit
    per_code = span.mul(0.5 / 254).clamp_min_(_TINY)  # decades per code; span 0: every value rounds to the top
    codes = blocks.div(hi).log10_().div_(per_code).add_(255).round_().clamp_(1, 255).masked_fill_(blocks <= 0, 0)
    return codes.to(torch.uint8), hi.squeeze(1), span.squeeze(1).to(torch.uint8)


def dequantize_root(codes: torch.Tensor, scale: torch.Tensor, span: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    index = codes.int().add_(span.int()[:, None] * 256).view(-1)  # a table look-up: 4x faster than exp on a CPU
    if codes.device not in _ROOT_UNITS_ON:  # copied once per device, not at every step
        _ROOT_UNITS_ON[codes.device] = _ROOT_UNITS.to(codes.device)
    units = _ROOT_UNITS_ON[codes.device].view(-1).index_select(0, index).view_as(codes)
    return _unblock(units.mul_(scale[:, None]), like)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().float().reshape(-1)
    pad = -flat.numel() % BLOCK
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, BLOCK)


def _unblock(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return blocks.reshape(-1)[:like.numel()].view_as(like)


def _adamw(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
           betas: tuple[float, float], eps: float, wd: float, t: int) -> torch.Tensor:
    """One AdamW step (torch's rule) of ``p`` on float32 moments ``m``, ``v``, updated in place; returns sqrt(v)."""
    beta1, beta2 = betas
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    root = v.sqrt()
    p.mul_(1 - lr * wd)
    p.addcdiv_(m, root.div(math.sqrt(1 - beta2 ** t)).add_(eps), value=-lr / (1 - beta1 ** t))
    return root


def _store(quantized: tuple[torch.Tensor, ...], state: dict, keys: tuple[str, ...], blocks: slice) -> None:
    for value, key in zip(quantized, keys, strict=True):
        state[key][blocks].copy_(value)


RATIO, ROOT = ("exp_avg_ratio_codes", "exp_avg_ratio_scale"), ("exp_avg_sq_root_codes", "exp_avg_sq_root_scale",
                                                               "exp_avg_sq_root_span")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, torch's defaults) with blockwise 8-bit moments.

    State per parameter: ``step`` and, for tensors of at least ``MIN_8BIT_SIZE`` values, ``exp_avg_ratio_codes``
    (int8, of m / sqrt(v)) with ``exp_avg_ratio_scale`` (float32, one per block) and ``exp_avg_sq_root_codes`` (uint8,
    of sqrt(v)) with ``exp_avg_sq_root_scale`` (float32) and ``exp_avg_sq_root_span`` (uint8, half decades) per
    block; smaller tensors keep float32
    ``exp_avg`` / ``exp_avg_sq``. Each step dequantizes ``CHUNK_BLOCKS`` blocks at a time, so the float32 working copy
    is a few MiB whatever the adapter's size.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    zeros = torch.zeros_like(p, dtype=torch.float32)
                    if p.numel() < MIN_8BIT_SIZE:
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                    else:
                        state.update(zip(RATIO, quantize_signed(zeros)))
                        state.update(zip(ROOT, quantize_root(zeros, 0.0)))
                state["step"] += 1
                hyper = (lr, betas, eps, wd, state["step"])
                if "exp_avg" in state:
                    _adamw(p, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], *hyper)
                    continue
                # on a CPU a chunk at a time, so the ~40 passes over the float32 working copy stay in cache (2-3x
                # faster than whole tensors); an accelerator takes each tensor at once, one kernel launch per pass
                flat, grad, n = p.view(-1), p.grad.view(-1), state["exp_avg_ratio_scale"].numel()
                chunk = CHUNK_BLOCKS if p.device.type == "cpu" else n
                for a in range(0, n, chunk):
                    b = a + chunk
                    blocks = slice(a, b)
                    part = flat[a * BLOCK:b * BLOCK]
                    root, m = self._load(state, blocks, part, betas, state["step"] - 1)
                    root = _adamw(part, grad[a * BLOCK:b * BLOCK].float(), m, root.square_(), *hyper)
                    self._save(state, blocks, part, betas, state["step"], m, root, eps)
        return loss

    @staticmethod
    def _root(state: dict, blocks: slice, part: torch.Tensor) -> torch.Tensor:
        return dequantize_root(state["exp_avg_sq_root_codes"][blocks], state["exp_avg_sq_root_scale"][blocks],
                               state["exp_avg_sq_root_span"][blocks], part)

    @staticmethod
    def _load(state: dict, blocks: slice, part: torch.Tensor, betas: tuple[float, float],
              t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 sqrt(v) and m after step ``t`` (zeros at t = 0)."""
        root = AdamW8bit._root(state, blocks, part)
        m = dequantize_signed(state["exp_avg_ratio_codes"][blocks], state["exp_avg_ratio_scale"][blocks], part)
        m.mul_(root).mul_(1 - betas[0] ** t)
        return root.mul_(math.sqrt(1 - betas[1] ** t)), m

    @staticmethod
    def _save(state: dict, blocks: slice, part: torch.Tensor, betas: tuple[float, float], t: int, m: torch.Tensor,
              root: torch.Tensor, eps: float) -> None:
        _store(quantize_root(root.div_(math.sqrt(1 - betas[1] ** t)), ROOT_FLOOR * eps), state, ROOT, blocks)
        # divided by the root as stored, so that m comes back as ratio * root with the ratio's rounding alone
        root_hat = AdamW8bit._root(state, blocks, part)
        ratio = m.div_(1 - betas[0] ** t).div_(root_hat).masked_fill_(root_hat == 0, 0)  # 0: all gradients were 0
        _store(quantize_signed(ratio), state, RATIO, blocks)

    def load_state_dict(self, state_dict: dict) -> None:
        unknown = sorted({k for s in state_dict["state"].values() for k in s} - STATE_KEYS)
        if unknown:  # e.g. exp_avg_scale: the sqrt-companded codes before issue 25, read as these they would be wrong
            raise FileFormatError(
                f"the optimizer state holds {', '.join(unknown)}, which this version's adamw8bit does not store: 8-bit "
                "AdamW moments from an earlier PPD (their code changed: the second moment is now log-scaled) cannot "
                "be continued here. Finish that run with the version that started it, or train it again from the "
                "start (another out_dir, or --no-resume).")
        # torch's loader casts every state tensor of a float parameter to that parameter's dtype, which would turn the
        # codes into float32 (four times their size, for the whole adapter at once): set them aside and put them back
        def integer(v) -> bool:
            return torch.is_tensor(v) and not v.is_floating_point()

        codes = {i: {k: v for k, v in s.items() if integer(v)} for i, s in state_dict["state"].items()}
        rest = {i: {k: v for k, v in s.items() if not integer(v)} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for k, v in codes.get(i, {}).items():
                self.state[p][k] = v.to(p.device)
