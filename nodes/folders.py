"""Where the pack's files live inside ComfyUI, and the rule that a path from a workflow never leaves those folders.

Folders are registered through ``folder_paths`` so ``extra_model_paths.yaml`` entries with the same names work:
``ppd_adapters`` (adapter files), ``ppd_embeddings`` (saved user embeddings: one folder for saving *and* loading),
``LLM`` (VLM folders in transformers format, shared with other packs) and ``ppd_pairs`` (extra roots for preference
pair sets besides ComfyUI's input folder).

Everything except :func:`register` and the ``folder_paths`` look-ups is plain path logic, tested without ComfyUI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..ppd_train.errors import PPDError
from ..ppd_train.paths import confined

ADAPTERS, EMBEDDINGS, LLM, PAIRS = "ppd_adapters", "ppd_embeddings", "LLM", "ppd_pairs"
WEIGHT_EXTENSIONS = {".safetensors"}
PAIR_FILES = ("pairs.jsonl", "pairs.csv")


def register() -> None:
    """Add the pack's model folders to ComfyUI (keeping paths that extra_model_paths.yaml already gave)."""
    import folder_paths

    for name, extensions in ((ADAPTERS, WEIGHT_EXTENSIONS), (EMBEDDINGS, WEIGHT_EXTENSIONS), (LLM, set()),
                             (PAIRS, set())):
        default = os.path.join(folder_paths.models_dir, name) if name != PAIRS else None
        paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default is not None and default not in paths:
            paths.append(default)  # after folders from extra_model_paths.yaml: saving goes where the user pointed
        # a union: LLM is shared with other packs (an empty set lists every file), never narrow what they list there
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | extensions)


def roots(kind: str) -> list[Path]:
    import folder_paths

    if kind == PAIRS:
        extra = folder_paths.folder_names_and_paths.get(PAIRS, ([], set()))[0]
        return [Path(folder_paths.get_input_directory()), *map(Path, extra)]
    return [Path(p) for p in folder_paths.get_folder_paths(kind)]


_HINT = "only files inside ComfyUI's own folders can be used: move the file there and pick it from the list"


def relative_to_root(root: Path, name: str) -> str | None:
    """An absolute ``name`` that lies inside ``root`` (as given, or with links in ``root``'s own path resolved) as a
    path relative to it; None for any other name."""
    if not isinstance(name, str) or "\x00" in name or not os.path.isabs(name):
        return None
    path = Path(os.path.abspath(name))
    for base in dict.fromkeys((Path(os.path.abspath(root)), Path(os.path.realpath(root)))):
        if path.is_relative_to(base) and path != base:
            return path.relative_to(base).as_posix()
    return None


def inside(root: Path, name: str) -> Path:
    """``root / name``, refusing names that climb out of ``root`` (``..``, absolute paths elsewhere, drive letters,
    NUL). An absolute path that lies inside ``root`` is the same file as its relative name, and is accepted."""
    return confined(root, relative_to_root(root, name) or name, "File name", _HINT)


def find(kind: str, name: str, what: str, search: list[Path] | None = None) -> Path:
    """The first existing ``root/name`` over the folders of ``kind``, or an error listing where it looked. An
    absolute ``name`` is looked for only in the folders it lies in."""
    search = roots(kind) if search is None else search
    if isinstance(name, str) and os.path.isabs(name) and "\x00" not in name:
        within = [root for root in search if relative_to_root(root, name) is not None]
        if not within:
            where = ", ".join(str(r) for r in search) or "(no folder registered)"
            raise PPDError(f"File name {name!r} is an absolute path outside the folders for {what} ({where}); "
                           f"{_HINT}.")
        search = within
    for root in search:
        path = inside(root, name)
        if path.exists():
            return path
    where = ", ".join(str(r) for r in search) or "(no folder registered)"
    raise PPDError(f"{what} {name!r} not found. Looked in: {where}. Put it there (or add a '{kind}:' entry to "
                   "extra_model_paths.yaml) and press 'Refresh' in ComfyUI.")


# ------------------------------------------------------------------------------------------------------- listings
def _walk(root: Path, depth: int):
    if depth < 0 or not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        yield entry
        if entry.is_dir():
            yield from _walk(entry, depth - 1)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def list_pair_sources(search: list[Path], depth: int = 2) -> list[str]:
    """Pair folders (holding pairs.jsonl/csv) and Pick-a-Pic parquet shards, relative to their root."""
    found: list[str] = []
    for root in search:
        for entry in _walk(root, depth):
            if (entry.is_dir() and any((entry / f).is_file() for f in PAIR_FILES)) or (
                    entry.is_file() and entry.suffix == ".parquet"):
                found.append(_rel(root, entry))
    return sorted(set(found))


def list_model_folders(search: list[Path]) -> list[str]:
    """Sub-folders holding a transformers ``config.json`` (one or two levels deep)."""
    found = [_rel(root, e) for root in search for e in _walk(root, 1) if e.is_dir() and (e / "config.json").is_file()]
    return sorted(set(found))


def fingerprint(path: Path) -> str:
    """Changes when a file, or any file inside a folder, changes (name, size, modification time)."""
    h = hashlib.sha256()
    entries = [path] if path.is_file() else [e for e in _walk(path, 8) if e.is_file()] if path.is_dir() else []
    for e in entries:
        st = e.stat()
        h.update(f"{e}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
