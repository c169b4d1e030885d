"""Preference Picker: shows candidate pairs in the browser, waits for A / B / skip, appends each choice to a pair set.

The node runs in ComfyUI's execution thread and blocks there until the choice arrives through the pack's route
(``picker_routes.py``, answered by ``web/ppd_picker.js``). Every pair shown is one request with its own id, so
several queued prompts (and several pairs in one batch) each get their own answer; ComfyUI's Cancel / interrupt ends
the wait through the same check every sampler step makes. Everything except :meth:`PPDPreferencePicker.pick` and
:func:`resolve_pair_set` is plain Python, tested without ComfyUI.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..ppd_train.pair_writer import append_pair, count_pairs
from ..ppd_train.pairs import PairError
from . import folders
from .pair_nodes import comfy_images_to_pil
from .sockets import CATEGORY, tip

CHOICES = ("A", "B", "skip")
SHOW_EVENT, DONE_EVENT = "ppd-picker-show", "ppd-picker-done"


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
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}")
        with self._lock:
            request = self._open.pop(request_id, None)
        if request is None:
            raise KeyError(f"no open preference question {request_id!r} (already answered or cancelled)")
        request.choice = choice
        request.event.set()

    def close(self, request: Request) -> None:
        with self._lock:
            self._open.pop(request.payload["request_id"], None)

    def pending(self) -> list[dict]:
        with self._lock:
            return [r.payload for r in self._open.values()]

    def wait(self, request: Request, check_interrupt: Callable[[], None], poll: float = 0.1) -> str:
        """The choice, or whatever ``check_interrupt`` raises once the user cancels; the question is closed either
        way."""
        try:
            while not request.event.wait(poll):
                check_interrupt()
            assert request.choice is not None
            return request.choice
        finally:
            self.close(request)


PENDING = PendingChoices()


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


def check_set_name(name: str) -> str:
    """The pair set name as typed, stripped; refuses empty names and hidden folders (``folders.inside`` refuses
    names that leave the input folder)."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise PairError("pair_set is empty: name the folder (inside ComfyUI's input folder) that collects the pairs, "
                        "e.g. 'my_pairs'.")
    if any(part.startswith(".") for part in name.split("/") if part):
        raise PairError(f"pair_set {name!r} names a hidden folder or climbs out ('..'); use a plain name such as "
                        "'my_pairs' or 'anna/portraits'.")
    return name


def resolve_pair_set(name: str, root: Path | None = None) -> Path:
    """``<ComfyUI input>/<name>``, never outside it."""
    if root is None:
        import folder_paths

        root = Path(folder_paths.get_input_directory())
    path = folders.inside(root, check_set_name(name))
    if path.exists() and not path.is_dir():
        raise PairError(f"pair_set {name!r} is a file in {root}; choose a folder name.")
    return path


class PPDPreferencePicker:
    DESCRIPTION = ("Shows each candidate pair side by side in the browser and waits for your pick (A, B or skip). "
                   "Every pick is added to the pair set input/<pair_set>/ (pairs.jsonl + PNGs), ready for the "
                   "Preference Pair Loader. Cancel the run to stop waiting.")
    CATEGORY = f"{CATEGORY}/pairs"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("chosen", "pair_count")
    OUTPUT_TOOLTIPS = ("The preferred image of each pair you decided (nothing runs downstream if you skipped all).",
                       "How many pairs the pair set holds now.")
    FUNCTION = "pick"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images_a": ("IMAGE", tip("Candidates. Alone: an even batch, paired 1st|2nd, 3rd|4th, ... "
                                          "With images_b: the A side of each pair.")),
                "prompt": ("STRING", tip("The prompt both candidates were made from (saved with the pair).",
                                         multiline=True, default="")),
                "pair_set": ("STRING", tip("Folder inside ComfyUI's input folder that collects your pairs; pick it "
                                           "in the Preference Pair Loader afterwards.", default="my_pairs")),
            },
            "optional": {
                "images_b": ("IMAGE", tip("The B side of each pair (same batch size as images_a).")),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # every run asks again, even for the same images

    @classmethod
    def VALIDATE_INPUTS(cls, pair_set=None):  # only pair_set: ComfyUI keeps checking the other inputs itself
        if pair_set is None:  # linked from another node: checked when it runs
            return True
        try:
            resolve_pair_set(pair_set)
        except PairError as e:
            return str(e)
        return True

    def pick(self, images_a, prompt, pair_set, images_b=None, unique_id=None):
        import comfy.model_management
        from comfy_execution.graph_utils import ExecutionBlocker

        folder = resolve_pair_set(pair_set)
        if not prompt.strip():
            raise PairError("The Preference Picker's prompt is empty: connect the prompt the candidates were made "
                            "from (it is saved with every pair and read by the VLM).")
        pairs = pair_indices(images_a.shape[0], None if images_b is None else images_b.shape[0])
        side_b = images_a if images_b is None else images_b
        pil_a = comfy_images_to_pil(images_a)
        pil_b = pil_a if images_b is None else comfy_images_to_pil(images_b)
        chosen, shown = [], []
        for k, (i, j) in enumerate(pairs):
            previews = [_temp_preview(pil_a[i]), _temp_preview(pil_b[j])]
            request = PENDING.open({"node_id": unique_id, "prompt": prompt, "pair_set": check_set_name(pair_set),
                                    "pairs_in_set": count_pairs(folder), "index": k + 1, "total": len(pairs),
                                    "a": previews[0], "b": previews[1]})
            _send(SHOW_EVENT, request.payload)
            try:
                choice = PENDING.wait(request, comfy.model_management.throw_exception_if_processing_interrupted)
            finally:
                _send(DONE_EVENT, {"request_id": request.payload["request_id"]})
            if choice == "skip":
                continue
            win, lose = ((pil_a[i], pil_b[j]) if choice == "A" else (pil_b[j], pil_a[i]))
            append_pair(folder, prompt, win, lose)
            chosen.append(images_a[i:i + 1] if choice == "A" else side_b[j:j + 1])
            shown.append(previews[0 if choice == "A" else 1])
        out = batch_images(chosen) if chosen else ExecutionBlocker(None)
        return {"ui": {"images": shown}, "result": (out, count_pairs(folder))}


def batch_images(images: list):
    """One IMAGE batch from ``[1, H, W, C]`` images; sizes that differ (A and B made at two sizes) are resized to the
    first one's, since a batch has one size."""
    import torch
    import torch.nn.functional as F

    h, w = images[0].shape[1:3]
    same = [im if im.shape[1:3] == (h, w) else
            F.interpolate(im.movedim(-1, 1), size=(h, w), mode="bilinear", align_corners=False).movedim(1, -1)
            for im in images]
    return torch.cat(same)


def _temp_preview(img) -> dict:
    """Save a preview PNG in ComfyUI's temp folder; the browser shows it through /view."""
    import folder_paths

    sub = "ppd_picker"
    folder = Path(folder_paths.get_temp_directory()) / sub
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{uuid.uuid4().hex}.png"
    img.save(folder / name, compress_level=1)
    return {"filename": name, "subfolder": sub, "type": "temp"}


def _send(event: str, data: dict) -> None:
    from server import PromptServer

    PromptServer.instance.send_sync(event, data)  # to every open tab: any of them may answer
