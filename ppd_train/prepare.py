"""``ppd-train prepare``: encode a dataset's pairs once into the DPO data file the trainer reads.

Images -> Stage C latents with Stable Cascade's EfficientNet encoder; captions -> CLIP-G text tokens (last hidden
state, 77 tokens) and pooled embedding (``text_embeds``), as Stability's Stage C training does. Each user's embedding
pairs (recorded in the embedding table) are left out, so the model never trains on what describes the user.
The file records a preprocessing key; running ``prepare`` again with the same inputs and key reuses it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dpo_data import DPOData
from .effnet import load_effnet, preprocess
from .embedding import UserEmbedding
from .errors import PPDError
from .pairs import PreferencePair
from .safetensors_io import require_safetensors

PREPROCESS_VERSION = "shorter-side-bicubic+center-crop+imagenet-norm/clip-g-last-hidden+text-embeds/v1"


class ClipTextEncoder:
    """CLIP-G text encoder from a local folder (transformers format, safetensors only)."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise PPDError(f"{self.folder} is not a CLIP text model folder (no config.json). Use the text_encoder "
                           "folder of stabilityai/stable-cascade(-prior), or laion/CLIP-ViT-bigG-14.")
        require_safetensors(self.folder, "CLIP text encoder")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.model = CLIPTextModelWithProjection.from_pretrained(self.folder, use_safetensors=True,
                                                                 local_files_only=True,
                                                                 dtype=dtype).to(self.device).eval()  # type: ignore[arg-type]

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, truncation=True, padding="max_length", max_length=77, return_tensors="pt")
        out = self.model(**tokens.to(self.device), output_hidden_states=True)
        return out.hidden_states[-1].float().cpu(), out.text_embeds.unsqueeze(1).float().cpu()


def _file_key(path: Path) -> str:
    """Cheap identity of a weight file: size + first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def _pairs_key(users: dict[str, list[PreferencePair]]) -> str:
    """What the data is made of: each user's pairs by source, prompt and image bytes (another dataset with the same
    folder names, prompts and file names is another key)."""
    h = hashlib.sha256()
    for uid in sorted(users):
        h.update(uid.encode())
        for p in users[uid]:
            h.update(p.source.encode())
            h.update(p.digest())
    return h.hexdigest()[:16]


def encode_pairs(users: dict[str, list[PreferencePair]], effnet_path: str | os.PathLike,
                 text_encoder_folder: str | os.PathLike, image_size: int = 768, batch_size: int = 8,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 show_progress: bool = True) -> DPOData:
    """Pairs -> Stage C latents (EfficientNet) and CLIP-G text: the one image path of ``prepare`` and ``tune-user``."""
    effnet = load_effnet(effnet_path, device=device, dtype=dtype)
    text_encoder = ClipTextEncoder(text_encoder_folder, device=device, dtype=dtype)
    return encode_pairs_with(users, effnet, text_encoder.encode, image_size, batch_size, device, dtype, show_progress)


def encode_pairs_with(users: dict[str, list[PreferencePair]], effnet: torch.nn.Module,
                      encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], image_size: int = 768,
                      batch_size: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      show_progress: bool = True, on_batch: Callable[[int], None] | None = None) -> DPOData:
    """:func:`encode_pairs` with the encoders already loaded (the ComfyUI node passes the VAE's EfficientNet and
    ComfyUI's CLIP): ``encode_text(captions)`` -> (tokens ``[C, L, c]``, pooled ``[C, 1, c]``), the same ``L`` for
    every call. ``on_batch(pairs_done)`` runs after each image batch (a progress bar, an interrupt check)."""
    flat = [(u, p) for u, pairs in users.items() for p in pairs]
    captions: dict[str, int] = {}
    ws, ls, cap_idx, user_idx = [], [], [], []
    user_ids = list(users)
    with tqdm(total=len(flat), desc="encoding pairs", unit="pair", disable=not show_progress) as bar:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            images = [img for _, p in chunk for img in (p.chosen.load(), p.rejected.load())]
            with torch.inference_mode():
                lat = effnet(preprocess(images, image_size).to(device, dtype)).float().cpu()
            ws.append(lat[0::2])
            ls.append(lat[1::2])
            for u, p in chunk:
                cap_idx.append(captions.setdefault(p.prompt, len(captions)))
                user_idx.append(user_ids.index(u))
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(start + len(chunk))
    texts = list(captions)
    tok, pooled = [], []
    for start in range(0, len(texts), batch_size):
        t, pl = encode_text(texts[start:start + batch_size])
        tok.append(t)
        pooled.append(pl)
    return DPOData(torch.cat(ws), torch.cat(ls), torch.tensor(cap_idx), torch.tensor(user_idx), torch.cat(tok),
                   torch.cat(pooled), user_ids, {"captions": len(texts)})


def prepare_dpo_data(users: dict[str, list[PreferencePair]], effnet_path: str | os.PathLike,
                     text_encoder_folder: str | os.PathLike, out: str | os.PathLike,
                     embeddings: dict[str, UserEmbedding] | None = None, image_size: int = 768,
                     batch_size: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     show_progress: bool = True) -> DPOData:
    out = Path(out)
    if embeddings is not None:  # train only users that have an embedding, never on the pairs that made it
        held = {u: set(e.meta.get("pair_sources", [])) for u, e in embeddings.items()}
        users = {u: [p for p in pairs if p.source not in held[u]] for u, pairs in users.items() if u in held}
    users = {u: pairs for u, pairs in sorted(users.items()) if pairs}
    if not users:
        raise PPDError("No pairs left to train on (no user has both an embedding and pairs beyond its embedding "
                       "pairs). Check that --embeddings was made from the same dataset.")
    key = {"preprocess": PREPROCESS_VERSION, "image_size": image_size, "effnet": _file_key(Path(effnet_path)),
           "text_encoder": Path(text_encoder_folder).name, "pairs": _pairs_key(users)}
    if out.is_file():
        try:
            cached = DPOData.load(out)
            if cached.info.get("key") == key:
                print(f"{out} is up to date (same pairs and preprocessing); reusing it")
                return cached
        except PPDError:
            pass
    # the encoders load only now: an up-to-date file costs no model load
    data = encode_pairs(users, effnet_path, text_encoder_folder, image_size, batch_size, device, dtype, show_progress)
    data.info = {"key": key, "captions": len(data.text)}
    data.save(out)
    return data
