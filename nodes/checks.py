"""Checks of node inputs that ComfyUI does not make: a value arriving through a link skips its widget's min/max.

Each check returns a message (for ``VALIDATE_INPUTS``, which shows it when the prompt is queued) or raises it (when the
node runs with a linked value), so a bad number is never silently used.
"""

from __future__ import annotations

from ..ppd_train.errors import PPDError
from ..ppd_train.guards import finite_number


def number_problem(name: str, value, spec: dict) -> str | None:
    """What is wrong with ``value`` for the FLOAT/INT widget ``name`` described by ``spec`` (min/max), or None."""
    lo, hi = spec.get("min"), spec.get("max")
    fix = f"Give it a number from {lo:g} to {hi:g}" if lo is not None and hi is not None else "Give it a number"
    try:
        finite_number(value, f"'{name}'", lo, hi, f"{fix} (a linked value skips ComfyUI's own range check).")
    except PPDError as e:
        return str(e)
    return None


def strength_problem(specs: dict, weight=None, start_percent=None, end_percent=None) -> str | None:
    """Weight and start/end window of the user's influence; None for inputs not known yet (linked, at queue time)."""
    values = {"weight": weight, "start_percent": start_percent, "end_percent": end_percent}
    for name, value in values.items():
        if value is not None:
            problem = number_problem(name, value, specs[name][1])
            if problem:
                return problem
    if start_percent is not None and end_percent is not None and float(start_percent) > float(end_percent):
        return (f"start_percent ({start_percent}) is after end_percent ({end_percent}): the user would never count. "
                "Make start_percent <= end_percent (0 and 1 = the whole run).")
    if start_percent is not None and end_percent is not None and float(start_percent) == float(end_percent):
        return (f"start_percent and end_percent are both {start_percent}: an empty window, so the user would never "
                "count and the node would change nothing. Make start_percent < end_percent (0 and 1 = the whole run), "
                "or set weight 0 to sample without the user.")
    return None


def check_strength(specs: dict, weight, start_percent, end_percent) -> None:
    problem = strength_problem(specs, weight, start_percent, end_percent)
    if problem:
        raise PPDError(problem)
