"""The user embedding: tokens ``[T, D]`` plus how they were made, one file format, and interpolation.

Two embeddings are compatible when their ``embedder`` ids and token shapes match. The id names the embedder family,
the model, the mode and the layers (e.g. ``vlm:llava-onevision-qwen2-7b-ov-chat-hf:direct:all``), because tokens from
different models, modes or layers live in different spaces even when their shapes agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import IncompatibleError
from .guards import finite_number
from .safetensors_io import atomic_save_safetensors, check_format, dumps_json, read_json_metadata, read_safetensors

FORMAT_NAME = "ppd-user-embedding"
FORMAT_VERSION = 1
METADATA_KEY = "ppd_user_embedding"


@dataclass
class UserEmbedding:
    tokens: torch.Tensor  # [T, D], float32, CPU
    embedder: str
    meta: dict = field(default_factory=dict)  # model, mode, layers, n_pairs, content_hash, profile, user_id, ...

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise IncompatibleError(f"A user embedding is [tokens, width]; got shape {tuple(self.tokens.shape)}.")
        self.tokens = self.tokens.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(self.tokens).all():
            raise IncompatibleError(f"User embedding from '{self.embedder}' contains NaN or infinite values; "
                                    "re-embed the user (check the VLM runs in a dtype your device supports).")

    @property
    def profile(self) -> str:
        return str(self.meta.get("profile", ""))

    def describe(self) -> str:
        user = self.meta.get("user_id")
        return f"user embedding{f' of {user}' if user else ''} ({self.tokens.shape[0]} x {self.tokens.shape[1]}, " \
               f"embedder '{self.embedder}')"

    def save(self, path: str | os.PathLike) -> None:
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "embedder": self.embedder, **self.meta}
        atomic_save_safetensors({"tokens": self.tokens}, path, {"format": FORMAT_NAME,
                                                                METADATA_KEY: dumps_json(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> UserEmbedding:
        tensors, metadata = read_safetensors(path, "user embedding", floats_only=True)
        meta = read_json_metadata(metadata, METADATA_KEY, path, "user embedding")
        check_format(meta, path, "PPD user embedding", FORMAT_NAME, FORMAT_VERSION)
        if "tokens" not in tensors:
            raise IncompatibleError(f"{path} is not a PPD user embedding (it has no 'tokens' tensor).")
        meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
        try:
            return cls(tensors["tokens"], meta.pop("embedder"), meta)
        except IncompatibleError as e:
            raise IncompatibleError(f"{path}: {e}") from None


def check_compatible(embeddings: Sequence[UserEmbedding]) -> None:
    first = embeddings[0]
    for other in embeddings[1:]:
        if other.embedder != first.embedder or other.tokens.shape != first.tokens.shape:
            raise IncompatibleError(
                f"Cannot mix {first.describe()} with {other.describe()}: they come from different embedders or "
                "layers. Embed both users with the same embedder settings.")


def _slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per token; magnitudes are interpolated linearly."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    direction = (torch.sin((1 - w) * omega) * ua + torch.sin(w * omega) * ub) / so
    # (anti)parallel tokens: fall back to the linear path. The clamp above keeps sin(omega) >= ~5e-4 in float32, so
    # the threshold must sit above that to ever apply.
    parallel = so.abs() < 1e-3
    direction = torch.where(parallel, torch.lerp(ua, ub, w), direction)
    return direction * torch.lerp(na, nb, w)


def interpolate(a: UserEmbedding, b: UserEmbedding, weight: float, method: str = "lerp") -> UserEmbedding:
    """``weight`` 0 -> ``a`` exactly, 1 -> ``b`` exactly; ``method`` is "lerp" or "slerp"."""
    check_compatible([a, b])
    if method not in ("lerp", "slerp"):
        raise IncompatibleError(f"Unknown interpolation {method!r}; use 'lerp' or 'slerp'.")
    w = finite_number(weight, "Interpolation weight", 0.0, 1.0, "Use 0 (user A) to 1 (user B).")
    if w == 0.0:
        tokens = a.tokens.clone()
    elif w == 1.0:
        tokens = b.tokens.clone()
    else:
        tokens = torch.lerp(a.tokens, b.tokens, w) if method == "lerp" else _slerp(a.tokens, b.tokens, w)
    meta = {"mix": [{"user": a.meta.get("user_id", "a"), "weight": 1 - w},
                    {"user": b.meta.get("user_id", "b"), "weight": w}], "mix_method": method}
    return UserEmbedding(tokens, a.embedder, meta)


def mix(embeddings: Sequence[UserEmbedding], weights: Sequence[float]) -> UserEmbedding:
    """Weighted average of several users (weights are normalised to sum to 1)."""
    if not embeddings or len(embeddings) != len(weights):
        raise IncompatibleError(f"Give one weight per embedding ({len(embeddings)} embeddings, "
                                f"{len(weights)} weights).")
    check_compatible(embeddings)
    ws = [finite_number(w, f"Mix weight {i + 1}", 0.0, None, "Give each user a share >= 0.") for i, w in
          enumerate(weights)]
    top = max(ws)
    if top <= 0:
        raise IncompatibleError("Mix weights are all zero; give at least one user a share above 0.")
    ws = [w / top for w in ws]  # scaled first, so huge weights cannot overflow the sum
    total = sum(ws)
    norm = [w / total for w in ws]
    nonzero = [i for i, w in enumerate(norm) if w > 0]
    if len(nonzero) == 1:
        tokens = embeddings[nonzero[0]].tokens.clone()
    else:
        tokens = torch.stack([w * e.tokens for w, e in zip(norm, embeddings)]).sum(0)
    meta = {"mix": [{"user": e.meta.get("user_id", str(i)), "weight": w} for i, (e, w) in
                    enumerate(zip(embeddings, norm))], "mix_method": "lerp"}
    return UserEmbedding(tokens, embeddings[0].embedder, meta)


# ---------------------------------------------------------------------------------------------------- embedding tables
TABLE_FORMAT = "ppd-embedding-table"
TABLE_KEY = "ppd_embedding_table"


def save_embedding_table(path: str | os.PathLike, embeddings: dict[str, UserEmbedding],
                         info: dict | None = None) -> None:
    """Many users' embeddings in one safetensors file (keys ``user/<id>``), users sorted for a stable file."""
    if not embeddings:
        raise IncompatibleError("No embeddings to save.")
    ids = sorted(embeddings)
    check_compatible([embeddings[u] for u in ids])
    meta = {"format": TABLE_FORMAT, "format_version": FORMAT_VERSION, "embedder": embeddings[ids[0]].embedder,
            "info": info or {}, "users": {u: embeddings[u].meta for u in ids}}
    # one metadata entry only: safetensors writes several in hash order, and a resumed run must give the same bytes
    atomic_save_safetensors({f"user/{u}": embeddings[u].tokens for u in ids}, path,
                            {TABLE_KEY: dumps_json(meta)})


def load_embedding_table(path: str | os.PathLike) -> tuple[dict[str, UserEmbedding], dict]:
    """-> (user id -> embedding, the table's info dict)."""
    tensors, metadata = read_safetensors(path, "embedding table", floats_only=True)
    meta = read_json_metadata(metadata, TABLE_KEY, path, "embedding table (made by `ppd-train embed`)")
    check_format(meta, path, "PPD embedding table", TABLE_FORMAT, FORMAT_VERSION)
    users, info = meta.get("users", {}), meta.get("info", {})
    if not isinstance(users, dict) or not isinstance(info, dict):
        raise IncompatibleError(f"{path}: the table's 'users' or 'info' metadata is not a JSON object; the file is "
                                "damaged.")
    out = {}
    try:
        for uid, umeta in users.items():
            if f"user/{uid}" not in tensors:
                raise IncompatibleError(f"user {uid} is listed but has no tokens; the file is damaged")
            out[uid] = UserEmbedding(tensors[f"user/{uid}"], meta["embedder"], umeta)
        if out:
            check_compatible(list(out.values()))
    except IncompatibleError as e:
        raise IncompatibleError(f"{path}: {e}") from None
    return out, dict(info)


def load_embeddings(path: str | os.PathLike) -> dict[str, UserEmbedding]:
    """An embedding table (many users) or one user's embedding file -> user id -> embedding."""
    tensors, metadata = read_safetensors(path, "user embedding or embedding table")
    if TABLE_KEY in metadata:
        return load_embedding_table(path)[0]
    emb = UserEmbedding.load(path)
    return {str(emb.meta.get("user_id") or os.path.splitext(os.path.basename(path))[0]): emb}
