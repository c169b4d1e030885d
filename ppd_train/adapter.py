"""The PPD adapter: decoupled user cross-attention for a diffusion model, and its one file format.

A base model (Stable Cascade Stage C, the paper's and the default; SDXL) only says where the adapter attaches: its
attention layers in forward order, each with a width and a head count (:class:`ModelInfo`). In every such layer the
query that already attends to ``[image tokens ; text tokens]`` also attends to the
user tokens, through new key/value projections, and the result is added before the block's output projection::

    out = out_proj( Attn(q, K, V) + w * Attn(q, K_u, V_u) ),   K_u = P(u) W'_k,  V_u = P(u) W'_v

``P`` is one projector shared by all blocks (LayerNorm -> Linear D->c, plus a learned per-token position, because
attention is blind to token order and our tokens are distinct VLM layers). ``W'_v`` starts at zero, so a fresh adapter
changes nothing. ``K_u, V_u`` depend only on the user: :meth:`PPDAdapter.forward` computes them once and bindings reuse
them for every sampling step.

This module knows no model framework. ``stage_c.py`` binds it to diffusers, ``nodes/`` to ComfyUI; both call
:func:`apply_user_attention`, so the math lives here only.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import FileFormatError, IncompatibleError
from .guards import non_finite
from .safetensors_io import (
    atomic_save_safetensors,
    check_format,
    dumps_json,
    read_json_metadata,
    read_safetensors,
    shape_mismatch,
)

FORMAT_NAME = "ppd-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "ppd_adapter"

# Base models an adapter can attach to; "stage_c" is the default and what files without a ``base`` were made for.
BASES = {"stage_c": "Stage C", "sdxl": "SDXL"}
# Attention-block layout of the released Stage C checkpoints: kind -> (width, heads, block count).
KNOWN_STAGE_C = {"lite": (1536, 24, 32), "full": (2048, 32, 64)}
# SDXL 1.0's cross-attention (attn2) layers in forward order: 4 at width 640, 20 + 10 (mid) + 30 at 1280, 6 at 640.
Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (widths, heads) of the attention layers in forward order
KNOWN_SDXL: dict[str, Layout] = {"base": ((640,) * 4 + (1280,) * 60 + (640,) * 6, (10,) * 4 + (20,) * 60 + (10,) * 6)}
# Sane upper bounds for sizes read from a file's metadata, checked before anything is allocated (a damaged or hostile
# header could otherwise ask for terabytes): far above any real Stage C or VLM.
MAX_BLOCKS, MAX_WIDTH, MAX_TOKENS = 1024, 65536, 4096


@dataclass(frozen=True)
class ModelInfo:
    """What an adapter needs to know about a base model: which base, and its attention layers in forward order."""

    block_widths: tuple[int, ...]
    block_heads: tuple[int, ...]
    base: str = "stage_c"

    @property
    def kind(self) -> str:
        known: dict[str, Layout]
        if self.base == "sdxl":
            known = dict(KNOWN_SDXL)
        else:
            known = {name: ((w,) * n, (h,) * n) for name, (w, h, n) in KNOWN_STAGE_C.items()}
        for name, (widths, heads) in known.items():
            if self.block_widths == widths and self.block_heads == heads:
                return name
        return "custom"

    def describe(self) -> str:
        widths = sorted(set(self.block_widths))
        return (f"{BASES.get(self.base, self.base)} {self.kind} ({len(self.block_widths)} attention blocks, "
                f"width {'/'.join(map(str, widths))})")


@dataclass(frozen=True)
class AdapterConfig:
    """Everything that fixes the adapter's shapes, plus where its user embeddings must come from."""

    block_widths: tuple[int, ...]
    block_heads: tuple[int, ...]
    embed_dim: int  # D: width of one user-embedding token
    num_tokens: int  # T: tokens per user embedding
    proj_dim: int = 0  # c: width of the shared user projector (0 = widest block)
    embedder: str = "unknown"  # id of the embedder whose embeddings this adapter reads (see embedding.py)
    base: str = "stage_c"  # the base model it attaches to (a key of BASES)
    training: dict = field(default_factory=dict, compare=False)  # summary written by the trainer

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_widths", tuple(int(w) for w in self.block_widths))
        object.__setattr__(self, "block_heads", tuple(int(h) for h in self.block_heads))
        if len(self.block_widths) != len(self.block_heads) or not self.block_widths:
            raise IncompatibleError("Adapter config: block_widths and block_heads must be non-empty and equally long.")
        if not self.proj_dim:
            object.__setattr__(self, "proj_dim", max(self.block_widths))
        for w, h in zip(self.block_widths, self.block_heads):
            if w < 1 or h < 1:
                raise IncompatibleError(f"Adapter config: a block of width {w} with {h} heads; both must be >= 1.")
            if w % h:
                raise IncompatibleError(f"Adapter config: block width {w} is not divisible by its {h} heads.")
        if self.embed_dim <= 0 or self.num_tokens <= 0:
            raise IncompatibleError("Adapter config: embed_dim and num_tokens must be positive.")
        if self.base not in BASES:
            raise IncompatibleError(f"Adapter config: base {self.base!r} is not one of {', '.join(BASES)}.")

    @classmethod
    def for_model(cls, info: ModelInfo, embed_dim: int, num_tokens: int, **kw) -> AdapterConfig:
        return cls(block_widths=info.block_widths, block_heads=info.block_heads, embed_dim=embed_dim,
                   num_tokens=num_tokens, base=info.base, **kw)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(self.block_widths, self.block_heads, self.base)

    def to_json(self) -> str:
        d = asdict(self)
        if self.base == "stage_c":  # Stage C files stay exactly what they were before SDXL existed
            del d["base"]
            d.update(stage_c_kind=self.model.kind)
        else:
            d.update(model_kind=self.model.kind)
        d.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, block_count=len(self.block_widths))
        return dumps_json(d)

    @classmethod
    def from_dict(cls, d: dict, path: str | os.PathLike = "<adapter>") -> AdapterConfig:
        check_format(d, path, "PPD adapter", FORMAT_NAME, FORMAT_VERSION)
        try:
            sizes = {"embed_dim": (d["embed_dim"], MAX_WIDTH), "num_tokens": (d["num_tokens"], MAX_TOKENS),
                     "proj_dim": (d["proj_dim"], MAX_WIDTH)}
            widths, heads = list(d["block_widths"]), list(d["block_heads"])
            sizes.update({f"block_widths[{i}]": (w, MAX_WIDTH) for i, w in enumerate(widths)})
            sizes.update({f"block_heads[{i}]": (h, MAX_WIDTH) for i, h in enumerate(heads)})
            for key, (value, top) in sizes.items():
                low = 0 if key == "proj_dim" else 1  # proj_dim 0: the widest block
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
                    raise ValueError(f"{key} = {value!r} is not a whole number between {low} and {top}")
            if len(widths) > MAX_BLOCKS:
                raise ValueError(f"{len(widths)} blocks (at most {MAX_BLOCKS})")
            base = d.get("base", "stage_c")  # files written before SDXL support are Stage C adapters
            if base not in BASES:
                raise ValueError(f"base = {base!r} is not one of {', '.join(BASES)}")
            return cls(block_widths=tuple(widths), block_heads=tuple(heads), embed_dim=d["embed_dim"],
                       num_tokens=d["num_tokens"], proj_dim=d["proj_dim"], embedder=d["embedder"], base=base,
                       training=_training(d.get("training")))
        except (KeyError, TypeError, ValueError, IncompatibleError) as e:
            detail = str(e) if isinstance(e, ValueError) else repr(e)
            raise FileFormatError(f"{path}: adapter metadata is incomplete or damaged ({detail}). The file was edited "
                                  "or damaged; export it again with ppd-train.") from None


def _training(summary) -> dict:
    """The trainer's summary, checked where others take numbers from it (``tune-user`` tunes with the adapter's own
    beta and timestep range: a negative beta would tune towards the rejected images)."""
    if summary is None:
        return {}
    if not isinstance(summary, dict):
        raise ValueError(f"training = {summary!r} is not a JSON object")
    for key, low, high in (("beta", 0.0, math.inf), ("t_min", 0.0, 1.0), ("t_max", 0.0, 1.0)):
        value = summary.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high or (key == "beta" and value == 0):
            span = "a finite number > 0" if key == "beta" else "a number from 0 to 1"
            raise ValueError(f"training.{key} = {value!r} is not {span}")
    if summary.get("t_min") is not None and summary.get("t_max") is not None and summary["t_min"] >= summary["t_max"]:
        raise ValueError(f"training.t_min = {summary['t_min']!r} is not below training.t_max = {summary['t_max']!r}")
    return dict(summary)


@dataclass
class UserKV:
    """Per-block user keys and values ``[B, T, width]`` (merged heads), computed once per user and sampling run."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UserKV:
        return UserKV([k.to(device=device, dtype=dtype) for k in self.keys],
                      [v.to(device=device, dtype=dtype) for v in self.values])


class _BlockKV(nn.Module):
    def __init__(self, proj_dim: int, width: int) -> None:
        super().__init__()
        self.to_k = nn.Linear(proj_dim, width, bias=False)
        self.to_v = nn.Linear(proj_dim, width, bias=False)
        nn.init.zeros_(self.to_v.weight)  # a fresh adapter adds exactly nothing


class PPDAdapter(nn.Module):
    """User projector + per-block K/V projections. ``forward(tokens) -> UserKV`` (run it through DDP when training)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        c = config.proj_dim
        self.user_norm = nn.LayerNorm(config.embed_dim)
        self.user_proj = nn.Linear(config.embed_dim, c)
        self.token_pos = nn.Parameter(torch.zeros(config.num_tokens, c))
        self.blocks = nn.ModuleList(_BlockKV(c, w) for w in config.block_widths)

    def forward(self, tokens: torch.Tensor) -> UserKV:
        """tokens ``[B, T, D]`` (or ``[T, D]`` for one user) -> per-block keys/values ``[B, T, width]``."""
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        cfg = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.embed_dim):
            raise IncompatibleError(
                f"User embedding of shape {tuple(tokens.shape)} does not fit this adapter, which reads "
                f"[{cfg.num_tokens} tokens, width {cfg.embed_dim}] from embedder '{cfg.embedder}'. "
                "Make the embedding with the embedder (and layers) the adapter was trained with."
            )
        param = self.user_proj.weight
        u = self.user_proj(self.user_norm(tokens.to(device=param.device, dtype=param.dtype))) + self.token_pos
        blocks = [typing.cast(_BlockKV, b) for b in self.blocks]
        return UserKV([b.to_k(u) for b in blocks], [b.to_v(u) for b in blocks])


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def apply_user_attention(out: torch.Tensor, q: torch.Tensor, k_u: torch.Tensor, v_u: torch.Tensor,
                         weight: float | torch.Tensor, attend: Attend) -> torch.Tensor:
    """``out + weight * attend(q, k_u, v_u)``, the one place where user attention joins a block.

    ``out`` and ``q`` have the batch first; ``k_u, v_u`` have batch B or 1 (one user for the whole batch). ``weight``
    is a number or a ``[B]`` CPU tensor; rows whose weight is 0 (e.g. the unconditional half of CFG) are not touched at
    all, so they stay bit-identical to the base model. ``attend`` is the binding's native attention in its own layout.

    This runs in every attention block at every step, so the usual case (one run of rows sharing one weight: all rows,
    or the conditional chunk of CFG) adds only the attention and one in-place add: slices are views, the weight is a
    Python number, nothing is gathered, copied to the device or read back. Other patterns gather the rows they need.
    """
    batch = out.shape[0]
    if k_u.shape[0] == 1:
        k_u, v_u = k_u.expand(batch, -1, -1), v_u.expand(batch, -1, -1)
    k_u, v_u = k_u.to(q.dtype), v_u.to(q.dtype)
    # The row bookkeeping is plain Python: no tensor reads, so no device syncs in the hot path.
    if isinstance(weight, (int, float)):
        ws = [float(weight)] * batch
    else:
        ws = torch.as_tensor(weight, dtype=torch.float32).flatten().tolist()
        ws = ws * batch if len(ws) == 1 else ws
    if len(ws) != batch:
        raise IncompatibleError(f"Adapter weight has {len(ws)} entries for a batch of {batch}.")
    rows = [i for i, x in enumerate(ws) if x != 0.0]
    if not rows:
        return out
    first, last, alpha = rows[0], rows[-1] + 1, ws[rows[0]]
    if last - first != len(rows) or any(ws[i] != alpha for i in rows):
        idx = torch.tensor(rows, device=out.device)
        w = torch.tensor([ws[i] for i in rows], device=out.device, dtype=out.dtype).view((-1,) + (1,) * (out.dim() - 1))
        return out.index_add(0, idx, w * attend(q[idx], k_u[idx], v_u[idx]))
    span = slice(first, last)
    extra = attend(q[span], k_u[span], v_u[span])
    if out.requires_grad:  # autograd may keep ``out`` for the backward pass: build a new tensor
        if first == 0 and last == batch:
            return torch.add(out, extra, alpha=alpha)
        return torch.cat([out[:first], torch.add(out[span], extra, alpha=alpha), out[last:]])
    out[span].add_(extra, alpha=alpha)
    return out


# ---------------------------------------------------------------------------------------------------------- file format
def save_adapter(adapter: PPDAdapter, path: str | os.PathLike, training: dict | None = None) -> None:
    """Write the adapter (keys ``user_*``, ``token_pos``, ``blocks.{i}.to_k/to_v.weight``) atomically."""
    config = adapter.config
    if training is not None:
        config = AdapterConfig(**{**asdict(config), "training": training})
    bad = non_finite(adapter.state_dict())
    if bad:
        raise FileFormatError(f"Not saving {path}: the adapter's weights hold NaN/inf ({', '.join(bad[:3])}). "
                              "Training diverged; lower lr or beta and train again.")
    atomic_save_safetensors(dict(adapter.state_dict()), path, {"format": FORMAT_NAME, METADATA_KEY: config.to_json()})


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    tensors, metadata = read_safetensors(path, "PPD adapter", floats_only=True)
    config = AdapterConfig.from_dict(read_json_metadata(metadata, METADATA_KEY, path, "PPD adapter"), path)
    return config, tensors


def load_adapter(path: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> PPDAdapter:
    """Load an adapter file; the tensors must match its own metadata exactly (else the file is damaged)."""
    config, tensors = read_adapter_config(path)
    with torch.device("meta"):  # shapes only: nothing is allocated before the metadata agrees with the tensors
        problems = shape_mismatch(PPDAdapter(config).state_dict(), tensors)
    if problems:
        raise FileFormatError(
            f"{path}: tensors do not match the adapter's own metadata ({problems}). "
            "The file is damaged or was edited; export it again."
        )
    bad = non_finite(tensors)
    if bad:
        raise FileFormatError(f"{path}: the adapter's weights hold NaN/inf ({', '.join(bad[:3])}); it would turn every "
                              "image into noise. It comes from a training run that diverged: train it again with a "
                              "lower lr or beta.")
    adapter = PPDAdapter(config)
    adapter.load_state_dict(tensors)
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- compatibility
def check_base(config: AdapterConfig, model: ModelInfo, adapter_name: str = "the adapter",
               model_name: str = "the Stage C model") -> None:
    """Refuse an adapter made for another base model (or another size of it), naming both sides."""
    if config.model != model:
        fix = ("Load the Stage C checkpoint the adapter was trained on (lite vs full)" if model.base == config.base
               == "stage_c" else "Load the model the adapter was trained on")
        raise IncompatibleError(
            f"{adapter_name} was made for {config.model.describe()}, but {model_name} is {model.describe()}. "
            f"{fix}, or pick an adapter for this model."
        )


def check_embedding(config: AdapterConfig, shape: tuple[int, ...], embedder: str,
                    adapter_name: str = "the adapter", embedding_name: str = "the user embedding") -> None:
    """Refuse a user embedding from another embedder or with another token layout, naming both sides."""
    tokens = tuple(shape[-2:])
    if tokens != (config.num_tokens, config.embed_dim) or (
            config.embedder != "unknown" and embedder != config.embedder):
        raise IncompatibleError(
            f"{embedding_name} ({tokens[0]} tokens x {tokens[1]} from embedder '{embedder}') does not fit "
            f"{adapter_name}, which reads {config.num_tokens} tokens x {config.embed_dim} from embedder "
            f"'{config.embedder}'. Re-embed the user with the embedder the adapter was trained with."
        )


def count_adapter_parameters(model: ModelInfo, embed_dim: int, num_tokens: int) -> dict[str, int]:
    """Trainable parameters of the default adapter for a model, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        adapter = PPDAdapter(AdapterConfig.for_model(model, embed_dim=embed_dim, num_tokens=num_tokens))
    blocks = sum(p.numel() for p in adapter.blocks.parameters())
    total = sum(p.numel() for p in adapter.parameters())
    return {"blocks": blocks, "projector": total - blocks, "total": total, "block_count": len(model.block_widths)}
