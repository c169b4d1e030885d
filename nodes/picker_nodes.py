"""Preference Picker: shows candidate pairs in the browser, waits for A / B / skip, appends each choice to a pair set.

The node runs in ComfyUI's execution thread and blocks there until the choice arrives through the pack's route
(``picker_routes.py``, answered by ``web/ppd_picker.js``), ComfyUI's Cancel / interrupt ends the wait (through the
same check every sampler step makes), or ``timeout_s`` passes. Every pair shown is one request with its own id, so
several queued prompts (and several pairs in one batch) each get their own answer. What a click means, where a pair
set may live and how long to wait are decided in ``ppd_train.picker`` (tested without ComfyUI); this file only
connects it to ComfyUI.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from ..ppd_train.pair_writer import count_pairs
from ..ppd_train.pairs import PairError
from ..ppd_train.picker import (
    CHOICES,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    PendingChoices,
    check_timeout,
    collect,
    pair_indices,
    pick_more,
    resolve_pair_set,
    status_text,
)
from .pair_nodes import comfy_images_to_pil
from .sockets import CATEGORY, EMBEDDING, tip

SHOW_EVENT, DONE_EVENT = "ppd-picker-show", "ppd-picker-done"
DEFAULT_TIMEOUT_S = 600  # per pair: long enough to look twice, short enough that a queue left alone moves on

PENDING = PendingChoices()


def input_pair_set(name: str) -> tuple[Path, str]:
    """The pair set's folder inside ComfyUI's input folder, and its name as shown."""
    import folder_paths

    return resolve_pair_set(name, folder_paths.get_input_directory())


class PPDPreferencePicker:
    DESCRIPTION = ("Shows each candidate pair side by side in the browser and waits for your pick (A, B or skip). "
                   "Every pick is added to the pair set input/<pair_set>/ (pairs.jsonl + PNGs), ready for the "
                   "Preference Pair Loader. Cancel the run to stop waiting; after timeout_s seconds without a "
                   "choice the run stops by itself. With the embedding made from the pair set connected, it shows "
                   "how sure those pairs were and how many more to pick.")
    CATEGORY = f"{CATEGORY}/pairs"
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("chosen", "pair_count", "status")
    OUTPUT_TOOLTIPS = ("The preferred image of each pair you decided (nothing runs downstream if you skipped all).",
                       "How many pairs the pair set holds now.",
                       "The pair set and its size now, and, with user_embedding connected, that embedding's pair "
                       "confidence and about how many more pairs to pick.")
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
                "timeout_s": ("INT", tip("Seconds to wait for each choice; then the run stops with a message "
                                         "(nothing saved for that pair), so a queue left without a browser tab "
                                         "moves on.", default=DEFAULT_TIMEOUT_S, min=MIN_TIMEOUT_S, max=MAX_TIMEOUT_S)),
                "user_embedding": (EMBEDDING, tip("The embedding made from this pair set (VLM User Embedder, or Load "
                                                  "User Embedding of your saved profile): the picker shows its pair "
                                                  "confidence and counts down how many more pairs to pick.")),
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
            input_pair_set(pair_set)
        except PairError as e:
            return str(e)
        return True

    def pick(self, images_a, prompt, pair_set, images_b=None, unique_id=None, timeout_s=DEFAULT_TIMEOUT_S,
             user_embedding=None):
        import comfy.model_management
        from comfy_execution.graph_utils import ExecutionBlocker

        folder, set_name = input_pair_set(pair_set)
        timeout_s = check_timeout(timeout_s)
        if not prompt.strip():
            raise PairError("The Preference Picker's prompt is empty: connect the prompt the candidates were made "
                            "from (it is saved with every pair and read by the VLM).")
        pair_indices(images_a.shape[0], None if images_b is None else images_b.shape[0])  # before any conversion
        side_b = images_a if images_b is None else images_b
        meta = None if user_embedding is None else user_embedding.meta
        previews: dict[int, list[dict]] = {}

        def ask(k: int, total: int, image_a, image_b) -> str:
            previews[k] = [_temp_preview(image_a), _temp_preview(image_b)]
            have = count_pairs(folder)
            request = PENDING.open({"node_id": unique_id, "prompt": prompt, "pair_set": set_name,
                                    "pairs_in_set": have, "index": k + 1, "total": total,
                                    "timeout_s": timeout_s, "a": previews[k][0], "b": previews[k][1],
                                    "confidence": pick_more(have, meta)})
            _send(SHOW_EVENT, request.payload)
            try:
                return PENDING.wait(request, comfy.model_management.throw_exception_if_processing_interrupted,
                                    timeout=timeout_s)
            finally:
                _send(DONE_EVENT, {"request_id": request.payload["request_id"]})

        picks = collect(folder, prompt, comfy_images_to_pil(images_a),
                        None if images_b is None else comfy_images_to_pil(images_b), ask)
        chosen = [(images_a if p.side == "A" else side_b)[p.index:p.index + 1] for p in picks]
        shown = [previews[p.pair][CHOICES.index(p.side)] for p in picks]
        out = batch_images(chosen) if chosen else ExecutionBlocker(None)
        have = count_pairs(folder)
        return {"ui": {"images": shown}, "result": (out, have, status_text(set_name, have, meta))}


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
