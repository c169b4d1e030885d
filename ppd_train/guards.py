"""Checks that turn silently wrong numbers into clear errors: non-finite values, out-of-range sizes, NaN in JSON.

One place for the rule "bad numbers are refused where they enter, naming the field and the fix".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from .errors import PPDError


def finite_number(value, name: str, lo: float | None = None, hi: float | None = None, fix: str = "") -> float:
    """``value`` as a float, refusing NaN, infinities, non-numbers and values outside ``[lo, hi]``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PPDError(f"{name} must be a number, got {value!r}.{_fix(fix)}") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise PPDError(f"{name} must be a finite number, got {value!r}.{_fix(fix)}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        span = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else (
            f">= {lo:g}" if lo is not None else f"<= {hi:g}")
        raise PPDError(f"{name} must be {span}, got {value!r}.{_fix(fix)}")
    return x


def _fix(fix: str) -> str:
    return f" {fix}" if fix else ""


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinite values."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_parameters(params: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
    """After an optimizer step: refuse to go on (and to save) once any weight became NaN/inf."""
    bad = non_finite({k: p.detach() for k, p in params})
    if bad:
        raise PPDError(f"After step {step} the adapter's weights hold NaN/inf ({', '.join(bad[:3])}); the update "
                       "diverged. Lower lr (or beta), then rerun the same command: it resumes from the last "
                       "checkpoint, which is intact.")


def json_safe(obj):
    """``obj`` with NaN/inf floats replaced by None, so ``json.dumps(..., allow_nan=False)`` writes valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
