"""Safe, atomic safetensors reading and writing shared by every file format of the pack."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FileFormatError

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` through a temporary file in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file, turning every failure into a clear FileFormatError.

    ``what`` names the kind of file for messages ("PPD adapter", "user embedding").
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} file not found: {path}. Check the path (and the folder it was looked for in).")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise FileFormatError(
            f"{path} looks like a pickled PyTorch file ({path.suffix}); {what} files are loaded from .safetensors "
            "only, because pickles can run code. Re-export it as .safetensors."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for bad headers/truncation
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). It may be truncated (an interrupted "
            f"download or copy) or not a {what} file at all; download or export it again."
        ) from None
    return tensors, metadata


def read_json_metadata(metadata: dict[str, str], key: str, path: str | os.PathLike, what: str) -> dict:
    """Parse one JSON-valued metadata entry, with a clear message when it is missing or broken."""
    raw = metadata.get(key)
    if raw is None:
        raise FileFormatError(
            f"{path} is a safetensors file but not a {what} (no '{key}' metadata). "
            f"Pick a {what} file made by PPD (ppd-train or the PPD nodes)."
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: the '{key}' metadata is not valid JSON ({e}); the file is damaged.") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: the '{key}' metadata should be a JSON object; the file is damaged.")
    return value
