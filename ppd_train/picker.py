"""The Preference Picker's logic, free of ComfyUI: which images form a pair, what a click means, where a pair set may
live, the open questions waiting for an answer, and what the ``/ppd/picker/choose`` route answers.

``nodes/picker_nodes.py`` (the node) and ``nodes/picker_routes.py`` (the aiohttp route) only glue these to ComfyUI,
so everything that decides what is written, and what a request gets back, is tested without a server.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .confidence import confidence_text
from .errors import PPDError
from .pair_writer import PAIRS_FILE, append_pair, check_target
from .pairs import PairError
from .paths import confined

CHOICES = ("A", "B", "skip")

# A pair set is one folder, or a folder in a folder ("anna/portraits"): deep enough to group sets by person, shallow
# enough that a typo cannot create hundreds of folders. Each name stays well under the 255 bytes file systems allow.
MAX_SET_DEPTH = 2
MAX_SET_PART_BYTES = 100

MIN_TIMEOUT_S, MAX_TIMEOUT_S = 10, 7 * 24 * 3600  # per pair: time to look; a week is "until I am back"

# The route takes only {"request_id": <32 hex digits>, "choice": "A" | "B" | "skip"}: a few dozen bytes.
MAX_BODY_BYTES = 64 * 1024
USAGE = 'send JSON {"request_id": "<id from GET /ppd/picker/pending>", "choice": "A" | "B" | "skip"}'
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")

# Files a pair set may hold before its pairs.jsonl exists: what the picker itself writes first (a run cancelled
# between the images and the row leaves them).
_OWN_FILE = re.compile(r"pair_\d{5,}_(chosen|rejected)\.png")

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ pairs and clicks
def pair_indices(n_a: int, n_b: int | None) -> list[tuple[int, int]]:
    """Which images form each pair: ``A[i]`` vs ``B[i]``, or, with only A connected, consecutive images 0|1, 2|3..."""
    if n_b is None:
        if n_a < 2 or n_a % 2:
            raise PairError(f"images_a holds {n_a} image(s) and images_b is not connected: give an even number of "
                            "images (pairs are 1st|2nd, 3rd|4th, ...; e.g. batch_size 2), or connect images_b.")
        return [(i, i + 1) for i in range(0, n_a, 2)]
    if n_a != n_b:
        raise PairError(f"images_a holds {n_a} image(s) but images_b holds {n_b}; pair i is A[i] vs B[i], so give "
                        "both the same batch size.")
    return [(i, i) for i in range(n_a)]


def decide(choice: str, a: T, b: T) -> tuple[T, T] | None:
    """``(chosen, rejected)`` for a click on ``choice`` while ``a`` was shown as A and ``b`` as B; None for skip."""
    if choice == "A":
        return a, b
    if choice == "B":
        return b, a
    if choice == "skip":
        return None
    raise ValueError(f"choice must be one of {', '.join(CHOICES)}")


@dataclass(frozen=True)
class Pick:
    """A decided pair: its number (from 0), the side clicked, and where the chosen image lies (``images_a[index]``
    for side A; for side B, ``images_b[index]``, or ``images_a[index]`` when images_b is not connected)."""
    pair: int
    side: str
    index: int


def collect(folder: Path, prompt: str, images_a: Sequence[Any], images_b: Sequence[Any] | None,
            ask: Callable[[int, int, Any, Any], str]) -> list[Pick]:
    """Show every pair through ``ask(pair, total, image_a, image_b) -> "A" | "B" | "skip"`` and append each decided
    one to the pair set ``folder`` as (prompt, the clicked image, the other one).

    Pairs are asked one after another; whatever ``ask`` raises (Cancel, a timeout) stops the loop with nothing written
    for that pair or any later one, while pairs already answered stay saved.
    """
    pairs = pair_indices(len(images_a), None if images_b is None else len(images_b))
    side_b = images_a if images_b is None else images_b
    picks = []
    for k, (i, j) in enumerate(pairs):
        choice = ask(k, len(pairs), images_a[i], side_b[j])
        decided = decide(choice, images_a[i], side_b[j])
        if decided is None:
            continue
        append_pair(folder, prompt, *decided)
        picks.append(Pick(k, choice, i if choice == "A" else j))
    return picks


# ---------------------------------------------------------------------------------------------- how many more pairs
def pick_more(pairs_in_set: int, meta: dict | None) -> str | None:
    """What the picker says about the embedding made from its pair set (``meta``: that embedding's metadata, None when
    none is connected): the embedding's pair confidence, with "pick about N more" counted down from the pairs the
    set holds now. The picker has no image encoder, so it never measures the confidence itself: the embedder did
    (ppd_train.confidence); the picker only counts."""
    if meta is None:
        return None
    text = confidence_text(meta, have=pairs_in_set)
    conf = meta.get("confidence")
    made_from = conf.get("n_pairs") if isinstance(conf, dict) else None
    if isinstance(made_from, int) and made_from > pairs_in_set:
        text += (f" (That embedding was made from {made_from} pairs, more than this set holds: connect the one made "
                 "from this pair set.)")
    return text


def status_text(set_name: str, pairs_in_set: int, meta: dict | None) -> str:
    """The picker's ``status`` output: the pair set, its size, and how many more pairs to pick when known."""
    head = f"input/{set_name}: {pairs_in_set} pair{'' if pairs_in_set == 1 else 's'}. "
    more = pick_more(pairs_in_set, meta)
    if more is not None:
        return head + more[0].upper() + more[1:]
    return head + ("Do they say enough? Embed them (the build a user profile workflow; its confidence says how many "
                   "more to pick), then connect that embedding to the picker's user_embedding to count down here.")


# ------------------------------------------------------------------------------------------------------ pair sets
def resolve_pair_set(name: str, root: str | os.PathLike) -> tuple[Path, str]:
    """The folder a pair set name stands for inside ``root`` (ComfyUI's input folder), and the name as shown.

    Refused, each with its own message: an empty name, a name that leaves ``root`` (``..``, an absolute path
    elsewhere), hidden folders, more than :data:`MAX_SET_DEPTH` levels, a level longer than
    :data:`MAX_SET_PART_BYTES`, control characters, a symbolic link anywhere below ``root`` (files must land where
    the name says, never through a link), a file, and an existing folder that holds other files but no pairs.jsonl
    (a folder of images does not silently become a pair set). An absolute path inside ``root`` is taken as the name
    relative to it; ``root`` itself may be a link (where the user keeps ComfyUI's input folder is theirs to choose).
    """
    if not isinstance(name, str) or not name.strip():
        raise PairError("pair_set is empty: name the folder (inside ComfyUI's input folder) that collects the pairs, "
                        "e.g. 'my_pairs'.")
    typed = name.strip().replace("\\", "/")
    shown = _short(typed)
    if any(ord(c) < 32 or c == "\x7f" for c in typed):
        raise PairError(f"pair_set {shown} holds a control character (a line break or tab?); use a plain name such "
                        "as 'my_pairs'.")
    real_root = Path(os.path.realpath(root))
    rel = typed
    if os.path.isabs(typed):
        for r in dict.fromkeys((Path(os.path.abspath(root)), real_root)):
            if Path(os.path.abspath(typed)).is_relative_to(r):
                rel = Path(os.path.abspath(typed)).relative_to(r).as_posix()
                break
        else:
            raise PairError(f"pair_set {shown} is an absolute path outside ComfyUI's input folder {real_root}; use a "
                            "name inside it such as 'my_pairs'.")
    parts = [p for p in rel.split("/") if p]
    if not parts:
        raise PairError(f"pair_set {shown} names the input folder itself; name a folder inside it, e.g. 'my_pairs'.")
    if any(p.startswith(".") for p in parts):
        raise PairError(f"pair_set {shown} names a hidden folder or climbs out ('..'); use a plain name such as "
                        "'my_pairs' or 'anna/portraits'.")
    if len(parts) > MAX_SET_DEPTH:
        raise PairError(f"pair_set {shown} is {len(parts)} folders deep; a pair set is one folder, or one folder "
                        f"inside another (at most {MAX_SET_DEPTH} levels, e.g. 'anna/portraits').")
    if any(len(p.encode("utf-8")) > MAX_SET_PART_BYTES for p in parts):
        raise PairError(f"pair_set {shown} has a folder name longer than {MAX_SET_PART_BYTES} bytes; use a shorter "
                        "name such as 'my_pairs'.")
    try:  # the pack's one rule for names (drive letters, NUL, climbing out), as a last guard
        confined(real_root, "/".join(parts), "pair_set", "use a plain name such as 'my_pairs'")
    except PPDError as e:
        raise PairError(str(e)) from None
    path = real_root
    for p in parts:
        path = path / p
        if path.is_symlink():
            raise PairError(f"pair_set {shown}: {path} is a symbolic link; the picker writes only into real folders "
                            "inside the input folder, never through a link. Choose another name, or replace the link "
                            "with a folder.")
        if path.exists() and not path.is_dir():
            raise PairError(f"pair_set {shown}: {path} is a file, not a folder; choose another name.")
    check_target(path)
    if path.is_dir() and not (path / PAIRS_FILE).exists():
        others = sorted(e.name for e in path.iterdir()
                        if not e.name.startswith(".") and not _OWN_FILE.fullmatch(e.name))
        if others:
            raise PairError(f"pair_set {shown}: {path} already exists and holds other files ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}) but no {PAIRS_FILE}, so it is not a pair set; the "
                            "picker will not turn it into one. Choose a new name (the folder is created) or an "
                            "existing pair set.")
    return path, "/".join(parts)


def _short(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters: a message never repeats a huge input whole."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -------------------------------------------------------------------------------------------------- open questions
class PickerTimeout(PPDError):
    """No answer came in time."""


@dataclass
class Request:
    payload: dict
    event: threading.Event = field(default_factory=threading.Event)
    choice: str | None = None


class PendingChoices:
    """Open questions by request id; answered from the server's thread, waited on in the execution thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Request] = {}

    def open(self, payload: dict) -> Request:
        request = Request({**payload, "request_id": uuid.uuid4().hex})
        with self._lock:
            self._open[request.payload["request_id"]] = request
        return request

    def answer(self, request_id: str, choice: str) -> None:
        """Raises ValueError for a choice that is none of :data:`CHOICES`, KeyError for an id not open; neither
        message repeats the input."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        with self._lock:
            request = self._open.pop(request_id, None)
        if request is None:
            raise KeyError("no open preference question has this request_id (already answered, cancelled or timed "
                           "out); GET /ppd/picker/pending lists the open ones")
        request.choice = choice
        request.event.set()

    def close(self, request: Request) -> bool:
        """Close the question; False when it was no longer open (answered meanwhile)."""
        with self._lock:
            return self._open.pop(request.payload["request_id"], None) is not None

    def pending(self) -> list[dict]:
        with self._lock:
            return [r.payload for r in self._open.values()]

    def wait(self, request: Request, check_interrupt: Callable[[], None], timeout: float, poll: float = 0.1,
             clock: Callable[[], float] = time.monotonic) -> str:
        """The choice; whatever ``check_interrupt`` raises once the user cancels; or :class:`PickerTimeout` after
        ``timeout`` seconds without an answer. The question is closed in every case."""
        deadline = clock() + timeout
        try:
            while not request.event.wait(poll):
                check_interrupt()
                if clock() >= deadline and self.close(request):  # still open: no answer can arrive any more
                    raise PickerTimeout(
                        f"No choice came within {timeout:g} seconds for pair {request.payload.get('index', '?')} of "
                        f"{request.payload.get('total', '?')} (Preference Picker, pair set "
                        f"{request.payload.get('pair_set', '?')!r}); nothing was saved for it. Open ComfyUI in a "
                        "browser tab to answer (the picker shows there), or answer from a script: GET "
                        '/ppd/picker/pending, then POST /ppd/picker/choose {"request_id": ..., "choice": "A" | "B" '
                        '| "skip"}. Raise timeout_s to wait longer.')
            assert request.choice is not None
            return request.choice
        finally:
            self.close(request)


def check_timeout(value) -> float:
    """The picker's ``timeout_s`` (a linked value skips ComfyUI's own range check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise PPDError(f"timeout_s must be a number of seconds from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}, got "
                       f"{_short(str(value))}; it is how long the picker waits for each choice.")
    return float(value)


# ------------------------------------------------------------------------------------------------------- the route
async def read_body(content_length: int | None, chunks: AsyncIterator[bytes]) -> bytes | None:
    """A request body from its chunks, or None as soon as it is known to be over :data:`MAX_BODY_BYTES` (from the
    declared length, or once the chunks read pass it): the rest is never read. ComfyUI's own server accepts uploads of
    many megabytes, so the route must stop reading itself."""
    if content_length is not None and content_length > MAX_BODY_BYTES:
        return None
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            return None
    return bytes(data)


def choose_response(pending: PendingChoices, body: bytes | None) -> tuple[int, dict]:
    """HTTP status and JSON body for ``POST /ppd/picker/choose``; ``body`` is None when it was over
    :data:`MAX_BODY_BYTES` (the route stops reading there). No answer repeats what was sent."""
    if body is None or len(body) > MAX_BODY_BYTES:
        return 413, {"error": f"request body over {MAX_BODY_BYTES} bytes; {USAGE}"}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; nesting too deep for the parser
        return 400, {"error": f"the body is not JSON; {USAGE}"}
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str) \
            or not isinstance(data.get("choice"), str):
        return 400, {"error": USAGE}
    if not _REQUEST_ID.fullmatch(data["request_id"]):
        return 400, {"error": "request_id must be the 32 hexadecimal digits of an open question, as GET "
                              "/ppd/picker/pending lists them"}
    try:
        pending.answer(data["request_id"], data["choice"])
    except KeyError as e:
        return 404, {"error": e.args[0]}
    except ValueError as e:
        return 400, {"error": str(e)}
    return 200, {"ok": True}
