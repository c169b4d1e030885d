"""Embedding Interpolate / Mix, and Save / Load User Embedding (one folder, models/ppd_embeddings, for both)."""

from __future__ import annotations

import re
from pathlib import Path

from ..ppd_train.embedding import UserEmbedding, interpolate, mix
from ..ppd_train.errors import PPDError
from . import folders
from .sockets import CATEGORY, EMBEDDING, tip

_MAX_PART, _MAX_PREFIX = 200, 1000  # bytes per name (file systems allow 255, minus the counter), whole prefix
_NAME = re.compile(r"^[\w\-. ]+(/[\w\-. ]+)*$")


def next_free_path(folder: Path, prefix: str) -> Path:
    """``folder/<prefix>_00001.safetensors`` with the first unused counter; ``prefix`` may name sub-folders."""
    prefix = prefix.strip().strip("/")
    if not prefix or not _NAME.match(prefix) or any(part in ("..", ".") for part in prefix.split("/")):
        raise PPDError(f"File name prefix {prefix!r} is not allowed; use letters, digits, '-', '_', '.', spaces and "
                       "'/' for sub-folders, e.g. 'artists/anna'.")
    long = [part for part in prefix.split("/") if len(part.encode()) > _MAX_PART]
    if long or len(prefix) > _MAX_PREFIX:
        raise PPDError(f"File name prefix is too long ({len(prefix)} characters{', one name' if long else ''}); file "
                       f"systems refuse longer names. Keep each folder or file name under {_MAX_PART} characters and "
                       f"the whole prefix under {_MAX_PREFIX}.")
    base = folders.inside(folder, prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in base.parent.glob(f"{base.name}_*.safetensors")}
    counter = 1
    while f"{base.name}_{counter:05d}.safetensors" in taken:
        counter += 1
    return base.parent / f"{base.name}_{counter:05d}.safetensors"


def save_embedding(embedding: UserEmbedding, folder: Path, prefix: str, note: str = "") -> Path:
    path = next_free_path(folder, prefix)
    if note.strip():
        embedding = UserEmbedding(embedding.tokens, embedding.embedder, {**embedding.meta, "note": note.strip()})
    embedding.save(path)
    return path


class PPDEmbeddingInterpolate:
    DESCRIPTION = "Blends two users' tastes: weight 0 is user A exactly, 1 is user B exactly."
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = (EMBEDDING,)
    RETURN_NAMES = ("user_embedding",)
    OUTPUT_TOOLTIPS = ("The blended user.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embedding_a": (EMBEDDING, tip("User A.")),
            "embedding_b": (EMBEDDING, tip("User B (same embedder and layers as A).")),
            "weight": ("FLOAT", tip("0 = A, 1 = B.", default=0.5, min=0.0, max=1.0, step=0.01)),
            "method": (["lerp", "slerp"], tip("lerp: straight line. slerp: keeps each token's length, turning "
                                              "between the two directions.")),
        }}

    def run(self, embedding_a, embedding_b, weight, method):
        return (interpolate(embedding_a, embedding_b, weight, method),)


class PPDEmbeddingMix:
    DESCRIPTION = "Weighted blend of two to four users (weights are normalised to sum to 1)."
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = (EMBEDDING,)
    RETURN_NAMES = ("user_embedding",)
    OUTPUT_TOOLTIPS = ("The blended user.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        weight = tip("Share of this user (relative to the other weights).", default=1.0, min=0.0, max=100.0,
                     step=0.05)
        return {"required": {
            "embedding_1": (EMBEDDING, tip("First user.")),
            "weight_1": ("FLOAT", weight),
            "embedding_2": (EMBEDDING, tip("Second user.")),
            "weight_2": ("FLOAT", weight),
            "weight_3": ("FLOAT", weight),
            "weight_4": ("FLOAT", weight),
        }, "optional": {
            "embedding_3": (EMBEDDING, tip("Optional third user.")),
            "embedding_4": (EMBEDDING, tip("Optional fourth user.")),
        }}

    def run(self, embedding_1, weight_1, embedding_2, weight_2, weight_3, weight_4, embedding_3=None,
            embedding_4=None):
        pairs = [(embedding_1, weight_1), (embedding_2, weight_2), (embedding_3, weight_3), (embedding_4, weight_4)]
        used = [(e, w) for e, w in pairs if e is not None]
        return (mix([e for e, _ in used], [w for _, w in used]),)


class PPDSaveUserEmbedding:
    DESCRIPTION = ("Saves a user embedding (safetensors + metadata, no images) to models/ppd_embeddings, where Load "
                   "User Embedding finds it. Share the file to share a taste without sharing pictures.")
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "user_embedding": (EMBEDDING, tip("The embedding to save.")),
            "filename_prefix": ("STRING", tip("File name start; '/' makes sub-folders. A counter is appended, "
                                              "nothing is overwritten.", default="ppd/user")),
            "note": ("STRING", tip("Free text stored in the file (who, which pairs).", default="", multiline=True)),
        }}

    def save(self, user_embedding, filename_prefix, note):
        folder = folders.roots(folders.EMBEDDINGS)[0]
        path = save_embedding(user_embedding, folder, filename_prefix, note)
        return {"ui": {"text": [path.relative_to(folder).as_posix()]}}


class PPDLoadUserEmbedding:
    DESCRIPTION = ("Loads a user embedding saved by Save User Embedding (or made by ppd-train) from "
                   "models/ppd_embeddings.")
    CATEGORY = f"{CATEGORY}/embedding"
    RETURN_TYPES = (EMBEDDING, "STRING")
    RETURN_NAMES = ("user_embedding", "profile")
    OUTPUT_TOOLTIPS = ("The saved user.", "The profile text stored with it (empty for direct-mode embeddings).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "embedding": (folder_paths.get_filename_list(folders.EMBEDDINGS),
                          tip("A .safetensors file in models/ppd_embeddings. Press Refresh after adding one.")),
        }}

    def load(self, embedding):
        emb = UserEmbedding.load(folders.find(folders.EMBEDDINGS, embedding, "User embedding"))
        return (emb, emb.profile)
