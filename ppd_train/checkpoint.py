"""Training checkpoints as one safetensors file each (no pickles): adapter, optimizer state, run metadata.

Written through a temporary file and an atomic rename, so a kill or a full disk while saving leaves the previous
checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .errors import FileFormatError, PPDError
from .safetensors_io import atomic_save_safetensors, dumps_json, read_json_metadata, read_safetensors

METADATA_KEY = "ppd_checkpoint"


def save_checkpoint(path: str | os.PathLike, adapter: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict) -> None:
    tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    state = optimizer.state_dict()
    scalars: dict = {}
    for i, per_param in state["state"].items():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    meta = {**meta, "optimizer": {"param_groups": state["param_groups"], "scalars": scalars}}
    atomic_save_safetensors(tensors, path, {METADATA_KEY: dumps_json(meta)})


_DAMAGED = ("delete it and rerun the same command: the run resumes from the checkpoint before it, or starts over "
            "when there is none")


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, metadata = read_safetensors(path, "training checkpoint", advice=_DAMAGED)
    return tensors, read_json_metadata(metadata, METADATA_KEY, path, "training checkpoint")


def load_checkpoint(path: str | os.PathLike, adapter: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return _apply(path, *_read(path), adapter, optimizer)


def load_latest(folder: str | os.PathLike, adapter: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[Path, dict] | None:
    """Load the newest readable checkpoint. A damaged newest one (a copy cut short, a disk error) is skipped with a
    warning for the one before it: checkpoints are written atomically, so damage means something outside PPD."""
    found = _checkpoints(Path(folder))
    for newer, path in zip([None, *found[::-1]], found[::-1]):
        try:
            tensors, meta = _read(path)
        except FileFormatError as e:
            if path == found[0]:
                raise
            print(f"warning: skipping a damaged checkpoint: {e}", file=sys.stderr)
            continue
        if newer is not None:
            print(f"warning: resuming from the older checkpoint {path.name}", file=sys.stderr)
        return path, _apply(path, tensors, meta, adapter, optimizer)
    return None


def _apply(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, adapter: torch.nn.Module,
           optimizer: torch.optim.Optimizer) -> dict:
    try:
        adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    except RuntimeError as e:
        raise FileFormatError(f"{path} holds another adapter (other Stage C or embedding shape): "
                              f"{str(e).splitlines()[-1].strip()}. Use another out_dir for this model.") from None
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    for k, v in meta["optimizer"]["scalars"].items():
        i, name = k.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": meta["optimizer"]["param_groups"]})
    except PPDError as e:  # the optimizer's own refusal, already saying why and what to do
        raise FileFormatError(f"{path}: {e}") from None
    except (ValueError, KeyError) as e:
        raise FileFormatError(f"{path}: optimizer state does not fit this adapter ({e}).") from None
    return meta


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def read_meta(path: str | os.PathLike) -> dict | None:
    """A checkpoint's run metadata (step, config) without reading its tensors; None when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[METADATA_KEY])
    except Exception:  # damaged: load_latest reports it properly
        return None


def find_latest(folder: str | os.PathLike) -> Path | None:
    found = _checkpoints(Path(folder))
    return found[-1] if found else None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    for old in _checkpoints(Path(folder))[:-keep]:
        old.unlink(missing_ok=True)
