"""The one rule for names that come from files or workflows: they stay inside their folder.

Names are checked as written (no ``..`` climbing out, no absolute paths or drive letters, no NUL); symlinks placed
inside a folder are followed, as ComfyUI itself does for every model folder. Pair folders, model folders and save
prefixes all go through :func:`confined`, so the policy is the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PPDError


def confined(root: str | os.PathLike, name: str, what: str = "path",
             hint: str = "use a path relative to the folder") -> Path:
    """``root / name`` as an absolute path, refusing names that would leave ``root``."""
    if not isinstance(name, str):
        raise PPDError(f"{what} must be text, got {name!r}; {hint}.")
    if "\x00" in name:
        raise PPDError(f"{what} {name!r} contains a NUL character, which no file name can hold; {hint}.")
    if not name.strip():
        raise PPDError(f"{what} is empty; {hint}.")
    root_abs = Path(os.path.abspath(root))
    path = Path(os.path.abspath(root_abs / name))
    if Path(name).is_absolute() or Path(name).drive or not path.is_relative_to(root_abs):
        raise PPDError(f"{what} {name!r} points outside {root_abs}; {hint}.")
    return path
