"""Appending preference pairs to a pair folder, in exactly the format ``pairs.load_pair_folder`` reads.

A folder may be written by several prompts (and read by the Preference Pair Loader) at any moment, so:
- images get new names, chosen under the lock: an existing file (or link) is never overwritten;
- each image is written atomically (``atomic_write_bytes``: the umask applies, as to any file) before the row that
  names it exists, so a reader never sees a row whose image is missing or half written;
- nothing is written through a symbolic link: a pair set folder, ``pairs.jsonl`` or the lock file that is a link is
  refused, so files never land outside the folder;
- a row is one line for every reader: JSON escapes the characters some readers take as line breaks (U+2028, U+2029,
  U+0085), and rows are counted on newlines only;
- ``pairs.jsonl`` is replaced atomically (temporary file + rename) under a lock: a reader sees the old rows or the
  old rows plus the new one, never a partial line, and two writers never lose each other's rows.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .pairs import PairError
from .safetensors_io import atomic_write_bytes

PAIRS_FILE = "pairs.jsonl"
_LOCK = threading.Lock()  # writers in this process (ComfyUI runs one); the file lock covers other processes
_NAME = re.compile(r"^pair_(\d{5,})_")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / ".pairs.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with _LOCK, os.fdopen(fd, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows: the in-process lock is what ComfyUI needs
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _next_index(folder: Path) -> int:
    used = [int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(used, default=0) + 1


def _rows(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def _row(fields: dict) -> str:
    """One JSON line that stays one line for readers that split on every Unicode line break."""
    text = json.dumps(fields, ensure_ascii=False)  # escapes \n, \r and the other ASCII controls
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def check_target(folder: Path) -> None:
    """Refuse a folder the picker must not write: one whose pairs.csv a new pairs.jsonl would hide, or a folder,
    pairs.jsonl or lock file that is a symbolic link (the files would land elsewhere)."""
    if (folder / "pairs.csv").is_file() and not (folder / PAIRS_FILE).is_file():
        raise PairError(f"{folder} holds a pairs.csv; new pairs are written to pairs.jsonl, which would hide it from "
                        "the Preference Pair Loader. Choose another pair set name, or convert pairs.csv to "
                        "pairs.jsonl first.")
    for path in (folder, folder / PAIRS_FILE, folder / ".pairs.lock"):
        if path.is_symlink():
            raise PairError(f"{path} is a symbolic link; pairs are written only into real files and folders, never "
                            "through a link (the files would land elsewhere). Replace the link with a real folder or "
                            "file, or choose another pair set.")


def count_pairs(folder: str | os.PathLike) -> int:
    """Rows in the folder's ``pairs.jsonl`` (0 when there is none yet)."""
    path = Path(folder) / PAIRS_FILE
    return len(_rows(path.read_text(encoding="utf-8"))) if path.is_file() else 0


def append_pair(folder: str | os.PathLike, prompt: str, chosen: Image.Image, rejected: Image.Image,
                **extra: str | int | float) -> int:
    """Save both images as new PNGs in ``folder`` and append one row to its ``pairs.jsonl``.

    ``extra`` fields (e.g. ``user_id``) go into the row too. Returns the number of pairs in the folder afterwards.
    """
    folder = Path(folder)
    check_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = {"chosen": _png_bytes(chosen), "rejected": _png_bytes(rejected)}
    with _folder_lock(folder):
        index = _next_index(folder)
        names: dict[str, str] = {}
        for role, data in images.items():
            while os.path.lexists(folder / f"pair_{index:05d}_{role}.png"):
                index += 1  # a file we did not number (copied in by hand): take the next number
            names[role] = f"pair_{index:05d}_{role}.png"
            atomic_write_bytes(folder / names[role], data)
        path = folder / PAIRS_FILE
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"  # a row typed by hand without a final newline must not merge with ours
        atomic_write_bytes(path, (old + _row({"prompt": prompt, **names, **extra}) + "\n").encode("utf-8"))
        return len(_rows(old)) + 1
