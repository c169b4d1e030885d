"""Safe, atomic safetensors reading and writing shared by every file format of the pack."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FileFormatError, PPDError
from .guards import json_safe

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


def dumps_json(obj, sort_keys: bool = True, indent: int | None = None) -> str:
    """JSON for files: always valid JSON (NaN/inf become null, which strict readers accept), by default with sorted
    keys for stable bytes."""
    return json.dumps(json_safe(obj), sort_keys=sort_keys, indent=indent, allow_nan=False)


_HOST = re.sub(r"[^A-Za-z0-9]", "-", socket.gethostname()) or "host"


def shape_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between two state dicts' names and shapes ("" when they agree), for a refusal's message: up to
    three names each of the missing, unexpected and wrong-shaped tensors."""
    want = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in found.items()}
    return "; ".join(f"{label} {keys[:3]}" for label, keys in (
        ("missing", sorted(set(want) - set(got))),
        ("unexpected", sorted(set(got) - set(want))),
        ("wrong shape", sorted(k for k in set(want) & set(got) if want[k] != got[k]))) if keys)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot be asked): keep its file
    return True


def _new_temp(path: Path) -> str:
    """A fresh temporary file next to ``path``, named ``.<name>.<host>-<pid>.<random>.tmp``.

    Created with mode 0666 so the umask applies, as for any ordinary file (mkstemp would force 0600, and a ComfyUI
    running as another user could not read a shared adapter). Temporaries left by killed writers of the same target
    on this machine (their pid is gone) are removed first, so a kill during a save does not leave a checkpoint-sized
    file forever.
    """
    refuse_link(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder; PPD writes a file there only when that name is free or a file. "
                              "Choose another file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{_HOST}-{os.getpid()}"
    for old in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_HOST)}-*.tmp"):
        pid = old.name[len(path.name) + len(_HOST) + 3:].split(".", 1)[0]  # only this machine's pids can be asked
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{me}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def refuse_link(path: Path) -> None:
    """The one policy for links on writes: never write over (or through) a symbolic link. Replacing it would leave the
    file it points to stale while the link's name now holds other bytes; writing into it would change a file outside
    the folder the user chose."""
    if path.is_symlink():
        raise FileFormatError(f"{path} is a symbolic link (to {os.readlink(path)}); PPD does not write over or through "
                              "links. Remove the link or choose another file name.")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    tmp = _new_temp(path)
    try:
        with open(tmp, "wb") as f:
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
    tmp = _new_temp(path)
    mode = os.stat(tmp).st_mode  # 0666 less the umask; save_file would leave the file 0600
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors are not OSErrors: give callers the usual one for a full disk
            if "os error 28" in str(e):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def diffusers_folder(path: Path, sub: str, what: str) -> Path:
    """The folder holding a diffusers model's ``config.json``: ``path`` or its ``sub`` folder (a pipeline folder),
    refused unless it exists and holds safetensors weights."""
    folder = path / sub if (path / sub / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileFormatError(f"{path} has no config.json (nor {sub}/config.json): not a diffusers {what} folder.")
    require_safetensors(folder, what)
    return folder


def require_safetensors(folder: str | os.PathLike, what: str) -> None:
    """Refuse a model folder without .safetensors weights before any loader looks at it: a folder holding only
    ``.bin`` (pickle) files would otherwise go through ``torch.load``, which can run code."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in _PICKLE_SUFFIXES)
    found = f" (it has {', '.join(pickles[:3])}: pickled weights, which can run code)" if pickles else ""
    raise FileFormatError(f"{folder} has no .safetensors weights{found}; PPD loads {what} weights from safetensors "
                          "only. Download the .safetensors version of the model, or convert it once with a tool you "
                          "trust.")


def read_safetensors(path: str | os.PathLike, what: str, advice: str = "download or export it again",
                     floats_only: bool = False, select: Callable[[list[str]], Iterable[str]] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file, turning every failure into a clear FileFormatError.

    ``what`` names the kind of file for messages ("PPD adapter", "user embedding"); ``advice`` is the fix for a damaged
    one. ``floats_only``: refuse integer and boolean tensors (weights and tokens are floats: a cast would hide the
    damage). ``select(names)``: the names to read, from all the file's names (only those are loaded: a checkpoint's
    other parts stay on disk); it may raise a PPDError to refuse the file before any tensor is read.
    """
    path = Path(path)
    require_file(path, what)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise FileFormatError(
            f"{path} looks like a pickled PyTorch file ({path.suffix}); {what} files are loaded from .safetensors "
            "only, because pickles can run code. Re-export it as .safetensors."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in (select(names) if select is not None else names)}
    except PermissionError:
        raise _unreadable(path, what) from None
    except PPDError:  # refused by ``select``
        raise
    except Exception as e:  # safetensors raises its own error types (and OSError) for bad headers/truncation
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). It may be truncated (an interrupted "
            f"download or copy) or not a {what} file at all; {advice}."
        ) from None
    if floats_only:
        ints = [f"'{k}' ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items()
                if not t.is_floating_point()]
        if ints:
            raise FileFormatError(f"{path}: tensor {', '.join(ints[:3])} is not floating point; a {what} holds float "
                                  "weights only (an integer tensor would be silently rounded into one). The file was "
                                  f"edited or is not a {what}; {advice}.")
    return tensors, metadata


def require_file(path: Path, what: str) -> None:
    """``path`` is an existing regular file that this process may read; else say which of those it is not."""
    try:
        _require_file(path, what)
    except PermissionError:  # a folder on the way, or the file itself
        raise _unreadable(path, what) from None


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder, not a {what} file. Give the file inside it.")
    if path.exists() and not path.is_file():
        raise FileFormatError(f"{path} is not a regular file (a pipe, socket or device); give a {what} file.")
    if not path.exists():
        raise FileFormatError(f"{what} file not found: {path}. Check the path (and the folder it was looked for in).")
    with open(path, "rb"):  # safetensors reports a file it may not open as "No such file": ask the OS first
        pass


def _unreadable(path: Path, what: str) -> FileFormatError:
    return FileFormatError(f"Cannot read {what} file {path}: permission denied (reading it, not writing). Make it "
                           "readable for this user (chmod/chown), or copy it somewhere this user can read.")


def check_format(meta: dict, path: str | os.PathLike, what: str, name: str, newest: int) -> int:
    """The header every PPD file's metadata starts with: ``format`` (which kind of file), ``format_version`` (a whole
    number from 1 to ``newest``) and ``embedder`` (the id of what made the tokens; adapters check it against
    embeddings). Returns the version. One rule for adapters, user embeddings and embedding tables."""
    if meta.get("format") != name:
        raise FileFormatError(f"{path} is not a {what} (format={meta.get('format')!r}, expected {name!r}). Pick a "
                              "file made by PPD (ppd-train or the PPD nodes).")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FileFormatError(f"{path}: the {what}'s format_version is {version!r}, not a whole number >= 1: the "
                              "file is damaged or was edited. Export it again with PPD.")
    if version > newest:
        raise FileFormatError(f"{path} uses {what} format version {version}; this version of PPD reads up to "
                              f"{newest}. Update the PPD pack.")
    embedder = meta.get("embedder")
    if not isinstance(embedder, str) or not embedder.strip():
        raise FileFormatError(f"{path}: the {what} does not say which embedder made its tokens (metadata 'embedder' "
                              f"is {embedder!r}): the file is damaged or was edited. Export it again with PPD.")
    return version


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
