"""Preference pairs: one typed structure, loaded from a folder, Pick-a-Pic parquet shards, or images in memory.

Images stay encoded (file path or bytes) until an embedder asks for them, so a dataset of thousands of users costs
little memory, and the content hash of a pair set is computed from the encoded bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import stat
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import PPDError
from .paths import confined

MAX_PIXELS = 64_000_000  # refuse larger images: certainly not a real preference example, maybe a decompression bomb
MAX_SIDE = 1536  # larger images are downscaled on load; every embedder works far below this
MAX_IMAGE_BYTES = 256 * 2**20  # a larger file is no preference example; refused before it is read


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
            self._check_size()
            try:
                return self.path.read_bytes()
            except OSError as e:
                raise PairError(f"{self.where}: cannot read image {self.path} ({e.strerror}). "
                                "Check the path.") from None
        assert self.pil is not None
        return self.pil.tobytes() + repr((self.pil.mode, self.pil.size)).encode()

    def _check_size(self) -> None:
        assert self.path is not None
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise PairError(f"{self.where}: cannot read image {self.path} ({e.strerror}). Check the path.") from None
        if size > MAX_IMAGE_BYTES:
            raise PairError(f"{self.where}: {self.path} is {size / 2**20:.0f} MB, more than any preference image "
                            f"needs (at most {MAX_IMAGE_BYTES // 2**20} MB); downscale or replace it.")

    def check(self) -> None:
        """The cheap check made when pairs are loaded: size, header and structure, without decoding the pixels."""
        if self.pil is None:
            self._decode(full=False)

    def load(self) -> Image.Image:
        """Decode to an 8-bit RGB image, refusing what cannot be a real preference image."""
        if self.pil is not None:
            return to_rgb(self.pil, self.where)
        return to_rgb(self._decode(full=True), self.where)

    def _decode(self, full: bool) -> Image.Image:
        if self.path is not None:
            self._check_size()  # before reading anything: a 600 MB junk file is refused unread
        source = io.BytesIO(self.raw_bytes()) if full or self.path is None else self.path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)  # reads the header only
                _check_dims(img, self.where)
                if not full:
                    with img:
                        img.verify()
                    return img
                img.load()
                upright = ImageOps.exif_transpose(img)  # a phone photo as it was shown, not lying on its side
        except PairError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PairError(f"{self.where}: image is too large to be decoded safely. Downscale it first.") from None
        except Exception as e:  # PIL raises many types for corrupt data
            src = self.path or "embedded image bytes"
            raise PairError(f"{self.where}: {src} is not a readable image ({type(e).__name__}: {e}). "
                            "Replace the file or remove this pair.") from None
        return upright


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
    _check_dims(img, where)
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        size = (round(img.width * scale), round(img.height * scale))
        if min(size) < 8:  # named by the size the user knows, not by the one it was scaled to
            raise PairError(f"{where}: image is {img.width}x{img.height}, too narrow for its length: scaled to "
                            f"{MAX_SIDE} px on its long side it would be {size[0]}x{size[1]} (< 8 px). Crop it to a "
                            "less extreme aspect ratio.")
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def _check_dims(img: Image.Image, where: str) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise PairError(f"{where}: image is {img.width}x{img.height}, larger than PPD accepts "
                        f"({MAX_PIXELS // 1_000_000} Mpx). Downscale it first.")
    if min(img.size) < 8:
        raise PairError(f"{where}: image is only {img.width}x{img.height} pixels; use a real picture (>= 8 px).")


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


# ---------------------------------------------------------------------------------------------------------- identity
def canonical_user_id(value, where: str) -> str | None:
    """The one spelling of a user id, whatever type the file gave it: whole numbers as integer text (``3``, ``3.0``
    and ``"3"`` are one user), text stripped (``"3.0"`` stays text). ``None`` for a missing id (null, NaN, blank
    text): the caller decides what a pair without a user is. A fractional number, a boolean or any other value names
    no one and is refused."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise PairError(f"{where}: user id {value!r} names no user; use text or a whole number (a fractional or boolean "
                    "id comes from a broken column or converter: fix the file).")


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file that can be read ("not found", "a folder, not a file", ...), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return f"not readable ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):  # a FIFO would block the reader forever; a device is no data file
        return "not a regular file (a FIFO, socket or device)"
    return None


def comparison_key(pair: PreferencePair) -> tuple[tuple, bytes]:
    """(what was compared: user, prompt and the two images in either order; which image won). Two pairs with one key
    are a repeat (the same winner) or a contradiction (the other winner), in whatever order they come."""
    won, lost = hashlib.sha256(pair.chosen.raw_bytes()).digest(), hashlib.sha256(pair.rejected.raw_bytes()).digest()
    return (pair.user_id, pair.prompt, min(won, lost), max(won, lost)), won


class _Comparisons:
    """The comparisons met so far, to refuse a repeat or a reversal of one of them."""

    def __init__(self) -> None:
        self._first: dict[tuple, tuple[bytes, str]] = {}

    def conflict(self, pair: PreferencePair, where: str, short: str) -> str | None:
        """None for a new comparison, else the refusal (``where`` names this pair, ``short`` is how later ones will
        name it)."""
        key, winner = comparison_key(pair)
        if key not in self._first:
            self._first[key] = (winner, short)
            return None
        first_winner, first = self._first[key]
        if first_winner == winner:
            return (f"{where} repeats {first} (same prompt and images); a repeated pair would count twice. Delete "
                    "one of them.")
        return (f"{where} reverses {first} (same prompt and images, the other image preferred): the two cancel out "
                "and say nothing of the user. Delete the wrong one, or both.")


# ------------------------------------------------------------------------------------------------------------ folder
def _inside(folder: Path, rel, where: str) -> Path:
    try:
        path = confined(folder, rel, f"{where}: image path", f"use a path relative to the pair folder {folder}")
    except PPDError as e:
        raise PairError(str(e)) from None
    problem = file_problem(path)
    if problem == "not found":
        raise PairError(f"{where}: image {rel!r} not found in {folder}. Fix the path or add the file.")
    if problem:
        raise PairError(f"{where}: image {rel!r} in {folder} is {problem}; name an image file.")
    return path


def _read_text(path: Path) -> str:
    """A pair file's text: UTF-8 (with or without the BOM Excel writes), else Windows-1252 (Excel's "CSV" on
    Windows), which decodes nearly any byte string, so only when UTF-8 fails."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        raise PairError(f"{path} is neither UTF-8 nor Windows-1252 text; save it as UTF-8 (in Excel: "
                        "'CSV UTF-8').") from None


def jsonl_lines(text: str) -> list[str]:
    """JSONL's lines: split on "\\n" only (a "\\r" before it is JSON whitespace). A JSON string may hold U+2028,
    U+0085 and the other Unicode line breaks raw (``json.dumps(..., ensure_ascii=False)`` writes them so):
    ``str.splitlines`` would cut a prompt there and break the whole file."""
    return text.split("\n")


def _pair_file(path: Path) -> bool:
    """Whether the pair file ``path`` is there (a folder or FIFO of that name is refused, not read or skipped)."""
    problem = file_problem(path)
    if problem in (None, "not found"):
        return problem is None
    raise PairError(f"{path} is {problem}; the pair file must be a plain text file.")


def _rows(folder: Path) -> list[tuple[str, dict]]:
    jsonl, csv_path = folder / "pairs.jsonl", folder / "pairs.csv"
    rows: list[tuple[str, dict]] = []
    has_jsonl, has_csv = _pair_file(jsonl), _pair_file(csv_path)
    if has_jsonl and has_csv:
        raise PairError(f"{folder} has both pairs.jsonl and pairs.csv; PPD would read only one of them. Keep one "
                        "(merge the rows into it) and delete the other.")
    if has_jsonl:
        for i, line in enumerate(jsonl_lines(_read_text(jsonl)), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairError(f"{jsonl} line {i}: not valid JSON ({e.msg}). Fix or delete the line.") from None
            if not isinstance(row, dict):
                raise PairError(f"{jsonl} line {i}: expected a JSON object with prompt, chosen, rejected.")
            rows.append((f"{jsonl.name} line {i}", row))
    elif has_csv:
        reader = csv.DictReader(io.StringIO(_read_text(csv_path), newline=""))
        for i, row in enumerate(reader, start=2):
            if None in row or None in row.values():  # DictReader's marks for too many / too few fields
                n = len(row) - (None in row) + len(row.get(None) or []) - sum(v is None for v in row.values())
                raise PairError(f"{csv_path} row {i} has {n} field(s) but the header has {len(reader.fieldnames or [])}"
                                f" ({', '.join(reader.fieldnames or [])}); quote fields that contain commas, and give "
                                "every row all columns.")
            rows.append((f"{csv_path.name} row {i}", row))
    else:
        raise PairError(f"{folder} has no pairs.jsonl or pairs.csv. Create one with the columns prompt, chosen, "
                        "rejected (image paths relative to the folder).")
    if not rows:
        raise PairError(f"{folder}: the pair file has no rows.")
    return rows


def load_pair_folder(folder: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from ``pairs.jsonl`` or ``pairs.csv`` (columns ``prompt, chosen, rejected``, optional ``user_id``).

    Image paths are relative to the folder and may not leave it. Every image is checked (size, header), and a row
    whose two images are the same, that repeats an earlier row, or that reverses one (the same prompt and images, the
    other image preferred) is refused: each would pass for a preference that is not there. Pairs come in file order.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if os.path.lexists(folder):
            raise PairError(f"{folder} is not a folder; give the pair folder that holds pairs.jsonl or pairs.csv "
                            "and the images (not the pair file itself).")
        raise PairError(f"Pair folder not found: {folder}.")
    pairs: list[PreferencePair] = []
    seen = _Comparisons()
    for where, row in _rows(folder):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise PairError(f"{folder / where}: missing field(s) {missing}; each row needs prompt, chosen, rejected.")
        loc = f"{folder.name}/{where}"
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PairError(f"{loc}: 'prompt' is {'empty' if isinstance(prompt, str) else repr(prompt)}; give the "
                            "prompt the two images were made for.")
        chosen = ImageRef(path=_inside(folder, row["chosen"], loc), where=f"{loc} (chosen)")
        rejected = ImageRef(path=_inside(folder, row["rejected"], loc), where=f"{loc} (rejected)")
        chosen.check()
        rejected.check()
        user = canonical_user_id(row.get("user_id"), f"{loc}: 'user_id'")
        pair = PreferencePair(prompt, chosen, rejected, user or folder.name, loc)
        (_, _, lo, hi), _ = comparison_key(pair)
        if lo == hi:
            raise PairError(f"{loc}: 'chosen' and 'rejected' are the same image ({row['chosen']!r}, "
                            f"{row['rejected']!r}); a pair needs two different images. Fix or delete the row.")
        problem = seen.conflict(pair, loc, where)
        if problem:
            raise PairError(problem)
        pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------------------------- Pick-a-Pic
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id")


def _label(value) -> float | None:
    """A Pick-a-Pic label, or None when missing or not a finite number (NaN would make jpg_1 "win")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _note(items: list[str], what: str) -> str:
    return f"{len(items)} {what}: " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else "")


def _read_shard(path: Path, wanted: set[str] | None, present: set[str]):
    """The rows of one shard that may hold a wanted user (all rows when ``wanted`` is None), as a pyarrow table with
    the file's own row numbers in ``_row``; ``present`` collects every user id the shard holds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    problem = file_problem(path)
    if problem == "not found":
        raise PairError(f"Parquet shard not found: {path}.")
    if problem:
        raise PairError(f"{path} is {problem}; give a Pick-a-Pic .parquet file.")
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise PairError(f"{path} is not a readable parquet file ({e}).") from None
    missing = [c for c in PICKAPIC_COLUMNS if c not in schema.names]
    if missing:
        raise PairError(f"{path} is not a Pick-a-Pic v2 shard: missing column(s) {missing} (has {schema.names[:8]}"
                        "...). Use a shard of yuvalkirstain/pickapic_v2 or convert to its schema.")
    extra = [c for c in ("are_different", "has_label") if c in schema.names]
    table = pq.read_table(path, columns=list(PICKAPIC_COLUMNS) + extra)
    if not table.num_rows:
        raise PairError(f"{path} holds no rows (an empty shard); remove it from the sources or use a shard with "
                        "data.")
    table = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))  # the file's row numbers
    ids = [(v, canonical_user_id(v, f"{path} column 'user_id'")) for v in pc.unique(table["user_id"]).to_pylist()]
    present.update(c for _, c in ids if c is not None)
    if wanted is not None:  # filter on the raw values that spell a wanted id: the images of others stay unread
        keep = pa.array([v for v, c in ids if c in wanted], type=table.schema.field("user_id").type)
        table = table.filter(pc.is_in(table["user_id"], value_set=keep))
    return table


def load_pickapic(paths: str | os.PathLike | Iterable[str | os.PathLike],
                  user_ids: Iterable[str | int] | None = None,
                  problems: list[str] | None = None) -> dict[str, list[PreferencePair]]:
    """Pairs grouped by user from Pick-a-Pic v2 parquet shards (one dataset: a user's rows may span shards).

    User ids follow :func:`canonical_user_id` (``3``, ``3.0`` and ``"3"`` are one user). Dropped, as carrying no
    preference: ties, unlabeled or NaN-labelled rows, rows whose two images are the same bytes (whatever
    ``are_different`` says), repeats of a comparison (the same user, caption and two images: kept once, the first in
    file order), and comparisons the same user made both ways (each image preferred once: all of its rows are dropped).
    Rows without a user id or a caption and rows with an unreadable image are dropped too. The dropped rows that are
    not plain ties, unlabeled or repeats are reported (in ``problems`` when given, else as a warning on stderr) with
    the file and row, so one bad row never stops a dataset. Which pairs come out does not depend on the rows' order;
    a user's pairs are in file order (shards in the order given). Row numbers are the file's own.
    """
    shard_paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    wanted = None
    if user_ids is not None:
        wanted = set()
        for u in user_ids:
            uid = canonical_user_id(u, "the user_id asked for")
            if uid is None:
                raise PairError(f"The user_id asked for is empty ({u!r}); give the id of a user in the shard.")
            wanted.add(uid)
    present: set[str] = set()
    dropped: dict[str, list[str]] = {"no user id": [], "no caption": []}
    comparisons: dict[tuple, list[tuple[bytes, PreferencePair]]] = {}
    for path in shard_paths:
        for row in _read_shard(path, wanted, present).to_pylist():
            if row.get("has_label") is False or row.get("are_different") is False:
                continue
            l0, l1 = _label(row["label_0"]), _label(row["label_1"])
            if l0 is None or l1 is None or l0 == l1:
                continue  # ties and unlabeled rows carry no preference
            loc = f"{path.name} row {row['_row']}"
            uid = canonical_user_id(row["user_id"], loc)
            caption = row["caption"]
            if uid is None or not isinstance(caption, str) or not caption.strip():
                dropped["no user id" if uid is None else "no caption"].append(loc)
                continue
            good, bad_side = ("jpg_0", "jpg_1") if l0 > l1 else ("jpg_1", "jpg_0")
            a, b = row[good], row[bad_side]
            if not isinstance(a, bytes) or not isinstance(b, bytes) or a == b:
                continue  # no image, or the same image twice: no preference
            pair = PreferencePair(caption, ImageRef(data=a, where=f"{loc} ({good}, user {uid})"),
                                  ImageRef(data=b, where=f"{loc} ({bad_side}, user {uid})"), uid, loc)
            key, winner = comparison_key(pair)
            comparisons.setdefault(key, []).append((winner, pair))
    users: dict[str, list[PreferencePair]] = {}
    bad: list[str] = []
    reversed_: list[str] = []
    for found in comparisons.values():  # in the order each comparison first appears: file order
        if len({winner for winner, _ in found}) > 1:
            reversed_.append(" vs ".join(p.source for _, p in found) + f" (user {found[0][1].user_id})")
            continue
        pair = found[0][1]  # a repeat adds no information and would count twice: the first row stands for all
        try:
            pair.chosen.check()
            pair.rejected.check()
        except PairError as e:
            bad.append(str(e))
            continue
        users.setdefault(pair.user_id, []).append(pair)
    notes = [_note(items, what) for items, what in (
        (bad, "Pick-a-Pic row(s) skipped for unreadable images"),
        (dropped["no user id"], "Pick-a-Pic row(s) skipped without a user id (null or blank 'user_id')"),
        (dropped["no caption"], "Pick-a-Pic row(s) skipped without a caption (null or blank 'caption'; a pair "
                                "needs the prompt its images were made for)"),
        (reversed_, "Pick-a-Pic comparison(s) dropped because the same user preferred each image once (same "
                    "caption and images: the rows cancel out)")) if items]
    for note in notes:
        if problems is not None:
            problems.append(note)
        else:
            print(f"warning: {note}", file=sys.stderr)
    if wanted is not None:
        shards = ", ".join(p.name for p in shard_paths)
        for uid in sorted(wanted - set(users)):
            if uid not in present:
                some = ", ".join(sorted(present, key=lambda u: (len(u), u))[:8])
                raise PairError(f"User {uid} is not in {shards} (it holds {len(present)} users, for example {some}). "
                                "Check the user_id, or pick the shard that holds this user.")
            raise PairError(f"User {uid} has no usable pairs in {shards}: every row of this user is a tie, unlabeled, "
                            "shows the same image twice, has no caption, is contradicted by another row, or has an "
                            "unreadable image. Pick another user.")
    return users


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


def load_users(sources: Iterable[str | os.PathLike], problems: list[str] | None = None,
               merge_users: bool = False) -> dict[str, list[PreferencePair]]:
    """Users and their pairs from pair folders and/or Pick-a-Pic parquet shards.

    One user is one user: a user id found in two sources (two pair folders, or a folder and the shards) is refused,
    naming both, unless ``merge_users`` says they are one person; then their pairs are pooled, and a pair that
    repeats or reverses one of the other source is refused. The Pick-a-Pic shards are one source (one dataset split
    into files: its users span shards). A source given twice is refused. With ``problems`` given, a pair folder that
    cannot be read is skipped and its error appended there (a dataset of many users is not stopped by one of them);
    otherwise it raises.
    """
    given: dict[Path, Path] = {}
    folders: list[Path] = []
    shards: list[Path] = []
    for src in map(Path, sources):
        real = src.resolve()
        if real in given:
            raise PairError(f"{src} is given twice (also as {given[real]}); its pairs would count twice. Give each "
                            "pair folder or shard once.")
        given[real] = src
        (shards if src.suffix == ".parquet" else folders).append(src)
    found: list[tuple[str, dict[str, list[PreferencePair]]]] = []
    if shards:
        found.append((", ".join(map(str, shards)), load_pickapic(shards, problems=problems)))
    for folder in folders:
        try:
            folder_pairs = load_pair_folder(folder)
        except PairError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        by_user: dict[str, list[PreferencePair]] = {}
        for p in folder_pairs:
            by_user.setdefault(p.user_id, []).append(p)
        found.append((str(folder), by_user))
    users: dict[str, list[PreferencePair]] = {}
    owner: dict[str, str] = {}
    for source, by_user in found:
        for uid, pairs in by_user.items():
            if uid not in users:
                users[uid], owner[uid] = list(pairs), source
                continue
            if not merge_users:
                raise PairError(f"User {uid!r} is in both {owner[uid]} and {source}: PPD would take two people for "
                                "one (or count one person's pairs twice). Give one of them another user_id (or rename "
                                "its folder), or pass --merge-users if both hold the same person's pairs.")
            seen = _Comparisons()
            for p in users[uid] + pairs:
                problem = seen.conflict(p, p.source, p.source)
                if problem:
                    raise PairError(f"Merging user {uid!r} of {owner[uid]} and {source}: {problem}")
            users[uid] += pairs
            owner[uid] += f" and {source}"
    if not users:
        raise PairError(f"No usable preference pairs in {', '.join(map(str, given.values())) or 'no sources'}." + (
            f" Problems: {'; '.join(problems[:5])}" if problems else ""))
    return users
