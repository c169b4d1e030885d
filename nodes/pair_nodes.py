"""Preference Pair Loader (folder or Pick-a-Pic shard) and Preference Pairs From Images (pairs built in the graph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..ppd_train.pairs import (
    PairError,
    PreferencePair,
    load_pair_folder,
    load_pickapic,
    pairs_from_images,
    select_pairs,
)
from . import folders
from .sockets import CATEGORY, PAIRS, tip

SELECTIONS = ["first", "random"]


def load_pair_source(path: Path, user_id: str, num_pairs: int, selection: str,
                     seed: int) -> tuple[list[PreferencePair], str]:
    """``num_pairs`` pairs of one user from a pair folder or a Pick-a-Pic parquet shard, and a readable summary."""
    user_id = user_id.strip()
    if path.suffix == ".parquet":
        if not user_id:
            users = load_pickapic(path)
            raise PairError(f"{path.name} holds the pairs of {len(users)} users; enter one in 'user_id' "
                            f"(for example {', '.join(sorted(users, key=lambda u: -len(users[u]))[:5])}).")
        pairs = load_pickapic(path, [user_id])[user_id]
    else:
        pairs = load_pair_folder(path)
        if user_id:
            found = sorted({p.user_id for p in pairs})
            pairs = [p for p in pairs if p.user_id == user_id]
            if not pairs:
                raise PairError(f"{path.name} has no pairs of user {user_id!r} (users there: {', '.join(found[:8])}). "
                                "Fix 'user_id' or leave it empty to use every pair of the folder.")
    who = f"user {user_id}" if user_id else path.name
    chosen = select_pairs(pairs, num_pairs, selection, seed, who)
    lines = [f"{len(chosen)} of {len(pairs)} pairs of {who} ({selection}):"]
    lines += [f"{i + 1}. {p.prompt[:80]!r} ({p.source})" for i, p in enumerate(chosen)]
    return chosen, "\n".join(lines)


def comfy_images_to_pil(images) -> list[Image.Image]:
    """ComfyUI IMAGE ``[B, H, W, C]`` floats in 0..1 -> 8-bit RGB PIL images."""
    if images is None or getattr(images, "dim", lambda: 0)() != 4:
        raise PairError("Expected an IMAGE batch [batch, height, width, channels]; connect an image output.")
    if not bool(images.isfinite().all()):
        raise PairError("The IMAGE batch holds NaN/inf values (a node upstream produced them); fix that node, or "
                        "load the images from files.")
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return [Image.fromarray(a[..., :3]) for a in arr]


def parse_winners(winners: str, n: int) -> list[bool]:
    """"A" / "B" for all pairs, or one letter per pair ("ABBA"; spaces and commas ignored) -> A-wins flags."""
    letters = [c for c in winners.upper() if c not in " ,;\n\t"]
    if any(c not in "AB" for c in letters) or not letters:
        raise PairError(f"'winners' must be letters A or B (one for all pairs, or one per pair); got {winners!r}.")
    if len(letters) == 1:
        letters *= n
    if len(letters) != n:
        raise PairError(f"'winners' has {len(letters)} letters for {n} pairs; give one letter per pair, or one for "
                        "all.")
    return [c == "A" for c in letters]


class PPDPreferencePairLoader:
    DESCRIPTION = ("Loads one user's 'I prefer A over B' examples: a folder with pairs.jsonl / pairs.csv (columns "
                   "prompt, chosen, rejected) or a Pick-a-Pic v2 parquet shard, from ComfyUI's input folder.")
    CATEGORY = f"{CATEGORY}/pairs"
    RETURN_TYPES = (PAIRS, "STRING")
    RETURN_NAMES = ("pairs", "summary")
    OUTPUT_TOOLTIPS = ("The selected preference pairs (feed the VLM User Embedder).",
                       "Which pairs were taken, for checking.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        sources = folders.list_pair_sources(folders.roots(folders.PAIRS))
        return {"required": {
            "source": (sources, tip("A pair folder or .parquet shard inside ComfyUI's input folder (or a 'ppd_pairs' "
                                    "folder from extra_model_paths.yaml). Press Refresh after adding one.")),
            "user_id": ("STRING", tip("Which user (required for a Pick-a-Pic shard; optional filter for a folder).",
                                      default="")),
            # up to 4096: Tune User Embedding reads all of a user's pairs, not only the embedder's 4
            "num_pairs": ("INT", tip("How many pairs to take: 4 describe the user to the VLM (the paper's N); for "
                                     "Tune User Embedding, all of them.", default=4, min=1, max=4096)),
            "selection": (SELECTIONS, tip("Take the first pairs, or a seeded random choice.")),
            # no "control after generate": a seed changing on every queue would re-run everything downstream
            "seed": ("INT", tip("Seed of the random choice (only used when selection is 'random').", default=0,
                                min=0, max=2**31 - 1, control_after_generate=False)),
        }}

    @classmethod
    def IS_CHANGED(cls, source, **_):
        try:
            return folders.fingerprint(folders.find(folders.PAIRS, source, "Pair source"))
        except Exception:  # the real error is reported when the node runs
            return float("nan")

    def load(self, source, user_id, num_pairs, selection, seed):
        path = folders.find(folders.PAIRS, source, "Preference pair source")
        return load_pair_source(path, user_id, num_pairs, selection, seed)


class PPDPreferencePairsFromImages:
    DESCRIPTION = ("Builds preference pairs from images already in the graph: image A[i] vs image B[i], one caption "
                   "each.")
    CATEGORY = f"{CATEGORY}/pairs"
    RETURN_TYPES = (PAIRS,)
    RETURN_NAMES = ("pairs",)
    OUTPUT_TOOLTIPS = ("The preference pairs (feed the VLM User Embedder).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images_a": ("IMAGE", tip("The A image of each pair (a batch).")),
            "images_b": ("IMAGE", tip("The B image of each pair (a batch of the same size).")),
            "captions": ("STRING", tip("The prompt of each pair, one per line (one line = the same for all).",
                                       multiline=True, default="")),
            "winners": ("STRING", tip("Which image was preferred: 'A' or 'B' for all pairs, or one letter per pair "
                                      "such as 'ABBA'.", default="A")),
        }}

    def build(self, images_a, images_b, captions, winners):
        a, b = comfy_images_to_pil(images_a), comfy_images_to_pil(images_b)
        # one caption per \n line (a textarea's line end); a caption may hold U+2028 and other Unicode breaks
        lines = [line.strip() for line in captions.split("\n") if line.strip()]
        if not lines:
            raise PairError("Give at least one caption (the prompt the images were made for).")
        return (pairs_from_images(lines, a, b, parse_winners(winners, len(a))),)
