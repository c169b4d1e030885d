"""Preference pairs: one typed structure, loaded from a folder, Pick-a-Pic parquet shards, or images in memory.

Images stay encoded (file path or bytes) until an embedder asks for them, so a dataset of thousands of users costs
little memory, and the content hash of a pair set is computed from the encoded bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PPDError

MAX_PIXELS = 64_000_000  # refuse larger images: certainly not a real preference example, maybe a decompression bomb
MAX_SIDE = 1536  # larger images are downscaled on load; every embedder works far below this


class PairError(PPDError):
    """A problem with preference-pair data; the message names the file/row and the fix."""


@dataclass(frozen=True)
class ImageRef:
    """An image not yet decoded: a file path, encoded bytes, or an in-memory PIL image."""

    path: Path | None = None
    data: bytes | None = None
    pil: Image.Image | None = None
    where: str = ""  # for messages: "pairs.jsonl row 3, 'chosen'"

    def raw_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is not None:
            try:
                return self.path.read_bytes()
            except OSError as e:
                raise PairError(f"{self.where}: cannot read image {self.path} ({e.strerror}). "
                                "Check the path.") from None
        assert self.pil is not None
        return self.pil.tobytes() + repr((self.pil.mode, self.pil.size)).encode()

    def load(self) -> Image.Image:
        """Decode to an 8-bit RGB image, refusing what cannot be a real preference image."""
        if self.pil is not None:
            return to_rgb(self.pil, self.where)
        raw = self.raw_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw))
                if img.width * img.height > MAX_PIXELS:
                    raise PairError(f"{self.where}: image is {img.width}x{img.height}, larger than PPD accepts "
                                    f"({MAX_PIXELS // 1_000_000} Mpx). Downscale it first.")
                img.load()
        except PairError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PairError(f"{self.where}: image is too large to be decoded safely. Downscale it first.") from None
        except Exception as e:  # PIL raises many types for corrupt data
            src = self.path or "embedded image bytes"
            raise PairError(f"{self.where}: {src} is not a readable image ({type(e).__name__}: {e}). "
                            "Replace the file or remove this pair.") from None
        return to_rgb(img, self.where)


def to_rgb(img: Image.Image, where: str = "") -> Image.Image:
    """Any PIL mode (palette, alpha, grey, 16-bit, float, CMYK) to 8-bit RGB; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    if min(img.size) < 8:
        raise PairError(f"{where}: image is only {img.width}x{img.height} pixels; use a real picture (>= 8 px).")
    return img


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: ImageRef
    rejected: ImageRef
    user_id: str = ""
    source: str = ""  # "pairs.jsonl row 3", "shard.parquet row 17"

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for part in (self.prompt.encode(), self.chosen.raw_bytes(), self.rejected.raw_bytes()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()


def content_hash(pairs: Sequence[PreferencePair]) -> str:
    """Hash of the pairs' captions and encoded images, in order (order matters to the VLM prompt)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.digest())
    return h.hexdigest()


def select_pairs(pairs: Sequence[PreferencePair], n: int, mode: str = "first", seed: int = 0,
                 who: str = "this user") -> list[PreferencePair]:
    """N pairs, the first ones or a seeded random choice (in original order)."""
    if n <= 0:
        raise PairError(f"Asked for {n} pairs; ask for at least 1.")
    if len(pairs) < n:
        raise PairError(f"{who} has {len(pairs)} usable preference pair(s) but {n} were asked for. "
                        "Add more pairs or lower the number of pairs.")
    if mode == "first":
        return list(pairs[:n])
    if mode == "random":
        idx = sorted(random.Random(seed).sample(range(len(pairs)), n))
        return [pairs[i] for i in idx]
    raise PairError(f"Unknown pair selection {mode!r}; use 'first' or 'random'.")


def split_user_pairs(pairs: Sequence[PreferencePair], n_embed: int, seed: int = 0,
                     who: str = "this user") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Disjoint (embedding pairs, training pairs): the embedding never sees the pairs it is trained on."""
    if len(pairs) <= n_embed:
        raise PairError(f"{who} has {len(pairs)} pairs; at least {n_embed + 1} are needed ({n_embed} to describe the "
                        "user, the rest to train on).")
    chosen = select_pairs(pairs, n_embed, "random", seed, who)
    ids = {id(p) for p in chosen}
    return chosen, [p for p in pairs if id(p) not in ids]


# ------------------------------------------------------------------------------------------------------------ folder
def _inside(folder: Path, rel: str, where: str) -> Path:
    if not rel:
        raise PairError(f"{where}: empty image path. Give a path relative to the folder.")
    path = (folder / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise PairError(f"{where}: image path {rel!r} leaves the pair folder; use paths relative to {folder}.")
    if not path.is_file():
        raise PairError(f"{where}: image {rel!r} not found in {folder}. Fix the path or add the file.")
    return path


def load_pair_folder(folder: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from ``pairs.jsonl`` or ``pairs.csv`` (columns ``prompt, chosen, rejected``, optional ``user_id``).

    Image paths are relative to the folder and may not leave it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PairError(f"Pair folder not found: {folder}.")
    jsonl, csv_path = folder / "pairs.jsonl", folder / "pairs.csv"
    rows: list[tuple[str, dict]] = []
    if jsonl.is_file():
        for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairError(f"{jsonl} line {i}: not valid JSON ({e.msg}). Fix or delete the line.") from None
            if not isinstance(row, dict):
                raise PairError(f"{jsonl} line {i}: expected a JSON object with prompt, chosen, rejected.")
            rows.append((f"{jsonl.name} line {i}", row))
    elif csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                rows.append((f"{csv_path.name} row {i}", row))
    else:
        raise PairError(f"{folder} has no pairs.jsonl or pairs.csv. Create one with the columns prompt, chosen, "
                        "rejected (image paths relative to the folder).")
    if not rows:
        raise PairError(f"{folder}: the pair file has no rows.")
    pairs = []
    for where, row in rows:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise PairError(f"{folder / where}: missing field(s) {missing}; each row needs prompt, chosen, rejected.")
        loc = f"{folder.name}/{where}"
        chosen = ImageRef(path=_inside(folder, str(row["chosen"]), loc), where=f"{loc} (chosen)")
        rejected = ImageRef(path=_inside(folder, str(row["rejected"]), loc), where=f"{loc} (rejected)")
        pairs.append(PreferencePair(str(row["prompt"]), chosen, rejected, str(row.get("user_id") or folder.name), loc))
    return pairs


# ---------------------------------------------------------------------------------------------------------- Pick-a-Pic
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id")


def load_pickapic(paths: str | os.PathLike | Iterable[str | os.PathLike],
                  user_ids: Iterable[str | int] | None = None) -> dict[str, list[PreferencePair]]:
    """Pairs grouped by user from Pick-a-Pic v2 parquet shards; ties, unlabeled and identical-image rows dropped."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    wanted = None if user_ids is None else {str(u) for u in user_ids}
    users: dict[str, list[PreferencePair]] = {}
    for path in map(Path, paths):
        try:
            schema = pq.read_schema(path)
        except FileNotFoundError:
            raise PairError(f"Parquet shard not found: {path}.") from None
        except Exception as e:
            raise PairError(f"{path} is not a readable parquet file ({e}).") from None
        missing = [c for c in PICKAPIC_COLUMNS if c not in schema.names]
        if missing:
            raise PairError(f"{path} is not a Pick-a-Pic v2 shard: missing column(s) {missing} (has {schema.names[:8]}"
                            "...). Use a shard of yuvalkirstain/pickapic_v2 or convert to its schema.")
        extra = [c for c in ("are_different", "has_label") if c in schema.names]
        table = pq.read_table(path, columns=list(PICKAPIC_COLUMNS) + extra)
        if wanted is not None:
            table = table.filter(pc.is_in(pc.cast(table["user_id"], "string"), value_set=_pa_strings(wanted)))
        for i, row in enumerate(table.to_pylist()):
            if row.get("has_label") is False or row.get("are_different") is False:
                continue
            l0, l1 = row["label_0"], row["label_1"]
            if l0 is None or l1 is None or l0 == l1:
                continue  # ties carry no preference
            good, bad = ("jpg_0", "jpg_1") if l0 > l1 else ("jpg_1", "jpg_0")
            uid = str(row["user_id"])
            loc = f"{path.name} row {i}"
            users.setdefault(uid, []).append(PreferencePair(
                str(row["caption"] or ""), ImageRef(data=row[good], where=f"{loc} ({good})"),
                ImageRef(data=row[bad], where=f"{loc} ({bad})"), uid, loc))
    if wanted is not None:
        for uid in wanted - set(users):
            raise PairError(f"User {uid} has no usable (non-tie, labelled) pairs in {', '.join(map(str, paths))}.")
    return users


def _pa_strings(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


# ------------------------------------------------------------------------------------------------------------ memory
def pairs_from_images(prompts: Sequence[str], images_a: Sequence[Image.Image], images_b: Sequence[Image.Image],
                      a_wins: Sequence[bool] | bool = True, user_id: str = "") -> list[PreferencePair]:
    """Pairs from images already in memory (e.g. a ComfyUI graph): ``a_wins[i]`` says which side was preferred."""
    n = len(images_a)
    if len(images_b) != n:
        raise PairError(f"Got {n} 'A' images but {len(images_b)} 'B' images; give one B image per A image.")
    if len(prompts) == 1 and n > 1:
        prompts = list(prompts) * n
    if len(prompts) != n:
        raise PairError(f"Got {len(prompts)} captions for {n} image pairs; give one caption per pair (or one for all).")
    wins = [a_wins] * n if isinstance(a_wins, bool) else list(a_wins)
    if len(wins) != n:
        raise PairError(f"Got {len(wins)} winner flags for {n} pairs.")
    out = []
    for i, (p, a, b, w) in enumerate(zip(prompts, images_a, images_b, wins)):
        ra, rb = ImageRef(pil=a, where=f"pair {i + 1} (A)"), ImageRef(pil=b, where=f"pair {i + 1} (B)")
        out.append(PreferencePair(str(p), ra if w else rb, rb if w else ra, user_id, f"pair {i + 1}"))
    return out


def load_users(sources: Iterable[str | os.PathLike]) -> dict[str, list[PreferencePair]]:
    """Users and their pairs from pair folders and/or Pick-a-Pic parquet shards."""
    users: dict[str, list[PreferencePair]] = {}
    for src in map(Path, sources):
        if src.suffix == ".parquet":
            found = load_pickapic(src)
        else:
            found = {}
            for p in load_pair_folder(src):
                found.setdefault(p.user_id, []).append(p)
        for uid, pairs in found.items():
            users.setdefault(uid, []).extend(pairs)
    if not users:
        raise PairError("No usable preference pairs in the given sources.")
    return users
