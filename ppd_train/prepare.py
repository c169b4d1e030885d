"""``ppd-train prepare``: encode a dataset's pairs once into the DPO data file the trainer reads.

Stage C: images -> latents with Stable Cascade's EfficientNet encoder; captions -> CLIP-G text tokens (last hidden
state, 77 tokens) and pooled embedding (``text_embeds``), as Stability's Stage C training does.
SDXL: images -> VAE latents (the mean, times the VAE's scaling factor) with each pair's size/crop numbers; captions ->
both text encoders' penultimate hidden states concatenated and the second one's pooled output, as SDXL's pipeline and
the Diffusion-DPO SDXL recipe do (the dispreferred image is resized to the preferred one's size first, so one set of
size/crop numbers holds for the pair, as in the recipe).
Each user's embedding pairs (recorded in the embedding table) are left out, so the model never trains on what
describes the user. The file records a preprocessing key; running ``prepare`` again with the same inputs and key
reuses it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .dpo_data import DPOData
from .effnet import load_effnet, preprocess
from .embedding import UserEmbedding
from .errors import PPDError
from .pairs import PreferencePair
from .safetensors_io import require_safetensors

PREPROCESS_VERSION = "shorter-side-bicubic+center-crop+imagenet-norm/clip-g-last-hidden+text-embeds/v1"
SDXL_PREPROCESS_VERSION = ("sdxl/l-resized-to-w+shorter-side-bicubic+center-crop+[-1,1]/vae-mean*scaling/"
                           "clip-l+bigg-penultimate+bigg-pooled/time-ids/v1")
# Images, text -> (preferred latents, dispreferred latents, size/crop numbers or None) for a batch of pairs
EncodeImages = Callable[[list[PreferencePair]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


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


class SDXLEncoders:
    """SDXL's VAE and two text encoders from local files (safetensors only): a diffusers pipeline folder, or a
    single-file checkpoint with ``config`` and ``tokenizer`` as :mod:`ppd_train.sdxl_file` takes them."""

    PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None) -> None:
        self.device = torch.device(device)
        self.vae: Any
        path = Path(path)
        if path.is_dir():
            if tokenizer or config:
                raise PPDError(f"{path} is a diffusers folder, which brings its own configs and tokenizers: the SDXL "
                               "config and tokenizer options are for a single-file checkpoint only. Leave them out.")
            self.vae, self.tokenizers, text_encoders = self._from_folder(path, dtype)
        else:
            from .sdxl_file import ENCODERS, load_part, read_sdxl_file, sdxl_tokenizers

            weights = read_sdxl_file(path, ENCODERS)  # pickles, other models, damaged files: refused first
            self.tokenizers = sdxl_tokenizers(tokenizer, config)
            self.vae, *text_encoders = [load_part(path, weights, part, config, dtype) for part in ENCODERS]
        self.vae = self.vae.to(self.device)
        self.text_encoders = [m.to(self.device) for m in text_encoders]

    @classmethod
    def _from_folder(cls, folder: Path, dtype: torch.dtype) -> tuple[Any, list, list[Any]]:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        missing = [p for p in cls.PARTS if not (folder / p).is_dir()]
        if missing:
            raise PPDError(f"{folder} is not an SDXL diffusers folder (no {', '.join(missing)}/). Use the folder "
                           "of stabilityai/stable-diffusion-xl-base-1.0 (or of a fine-tune in diffusers format), "
                           "or a single-file SDXL checkpoint: prepare needs its VAE, both text encoders and their "
                           "tokenizers.")
        for part in ("vae", "text_encoder", "text_encoder_2"):
            require_safetensors(folder / part, f"SDXL {part}")
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True,
                                            torch_dtype=dtype).eval()
        tokenizers = [AutoTokenizer.from_pretrained(folder / p, local_files_only=True)
                      for p in ("tokenizer", "tokenizer_2")]
        text_encoders = [
            c.from_pretrained(folder / p, use_safetensors=True, local_files_only=True,
                              dtype=dtype).eval()  # type: ignore[arg-type]
            for c, p in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
        return vae, tokenizers, text_encoders

    @torch.inference_mode()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (both encoders' penultimate states concatenated ``[C, 77, c1 + c2]``, pooled ``[C, 1, c2]``)."""
        states, pooled = [], None
        for tokenizer, model in zip(self.tokenizers, self.text_encoders):
            tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = model(tokens.input_ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float().cpu())
            pooled = out[0]  # the last encoder's (bigG's) projected pooled output
        assert pooled is not None
        return torch.cat(states, dim=-1), pooled.float().cpu().unsqueeze(1)

    @torch.inference_mode()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, S, S]`` in [-1, 1] -> the VAE's latent mean times its scaling factor, as SDXL trains."""
        vae = self.vae
        lat = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        return lat.float().cpu()


def sdxl_pair_images(pairs: list[PreferencePair], image_size: int,
                     encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's image path of ``prepare`` (and of the Tune User Embedding node, with ComfyUI's VAE as ``encode``): each
    pair's dispreferred image resized to the preferred one's size, both through :func:`sdxl_preprocess`, then
    ``encode(pixels in [-1, 1])`` -> scaled latents. -> (preferred latents, dispreferred latents, size/crop numbers
    ``[P, 6]``: original height and width, crop top and left, target height and width)."""
    images, time_ids = [], []
    for p in pairs:
        chosen = p.chosen.load().convert("RGB")
        rejected = p.rejected.load().convert("RGB").resize(chosen.size, Image.Resampling.BICUBIC)
        x, top, left = sdxl_preprocess(chosen, image_size)
        images += [x, sdxl_preprocess(rejected, image_size)[0]]
        time_ids.append([chosen.height, chosen.width, top, left, image_size, image_size])
    lat = encode(torch.stack(images))
    return lat[0::2], lat[1::2], torch.tensor(time_ids, dtype=torch.float32)


def sdxl_preprocess(img: Image.Image, image_size: int) -> tuple[torch.Tensor, int, int]:
    """An RGB image -> ``[3, S, S]`` in [-1, 1] (shorter side to ``S``, bicubic, centre crop) and the crop's top-left,
    which SDXL takes as conditioning."""
    scale = image_size / min(img.size)
    w, h = max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x, top, left


def _file_key(path: Path) -> str:
    """Cheap identity of a weight file: size + first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def _folder_key(folder: Path) -> str:
    """Cheap identity of SDXL's text encoders: each weight file's :func:`_file_key`."""
    files = sorted(f for part in ("text_encoder", "text_encoder_2") for f in (folder / part).glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(_file_key(f).encode())
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

    def encode_images(pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, None]:
        images = [img for p in pairs for img in (p.chosen.load(), p.rejected.load())]
        with torch.inference_mode():
            lat = effnet(preprocess(images, image_size).to(device, dtype)).float().cpu()
        return lat[0::2], lat[1::2], None

    return _encode(users, encode_images, encode_text, batch_size, show_progress, on_batch, "stage_c")


def encode_sdxl_pairs(users: dict[str, list[PreferencePair]], sdxl: str | os.PathLike,
                      image_size: int = 1024, batch_size: int = 8, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, show_progress: bool = True,
                      config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None) -> DPOData:
    """Pairs -> SDXL latents, size/crop numbers and text (see the module's docstring): the image path of ``prepare``
    and ``tune-user`` for SDXL (``sdxl``: a diffusers folder, or a single-file checkpoint with ``config`` and
    ``tokenizer`` as :class:`SDXLEncoders` takes them)."""
    enc = SDXLEncoders(sdxl, device=device, dtype=dtype, config=config, tokenizer=tokenizer)
    return encode_sdxl_pairs_with(users, enc.latents, enc.encode_text, image_size, batch_size, show_progress)


def encode_sdxl_pairs_with(users: dict[str, list[PreferencePair]], latents: Callable[[torch.Tensor], torch.Tensor],
                           encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
                           image_size: int = 1024, batch_size: int = 8, show_progress: bool = True,
                           on_batch: Callable[[int], None] | None = None) -> DPOData:
    """:func:`encode_sdxl_pairs` with the encoders already loaded (the ComfyUI node passes ComfyUI's VAE and CLIP):
    ``latents(pixels in [-1, 1])`` -> scaled latents, ``encode_text`` as in :func:`encode_pairs_with`."""
    return _encode(users, lambda pairs: sdxl_pair_images(pairs, image_size, latents), encode_text, batch_size,
                   show_progress, on_batch, "sdxl")


def _encode(users: dict[str, list[PreferencePair]], encode_images: EncodeImages,
            encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], batch_size: int,
            show_progress: bool, on_batch: Callable[[int], None] | None, base: str) -> DPOData:
    flat = [(u, p) for u, pairs in users.items() for p in pairs]
    captions: dict[str, int] = {}
    ws, ls, times, cap_idx, user_idx = [], [], [], [], []
    user_ids = list(users)
    with tqdm(total=len(flat), desc="encoding pairs", unit="pair", disable=not show_progress) as bar:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            lat_w, lat_l, time_ids = encode_images([p for _, p in chunk])
            ws.append(lat_w)
            ls.append(lat_l)
            if time_ids is not None:
                times.append(time_ids)
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
                   torch.cat(pooled), user_ids, {"captions": len(texts)}, torch.cat(times) if times else None, base)


def prepare_dpo_data(users: dict[str, list[PreferencePair]], effnet_path: str | os.PathLike | None,
                     text_encoder_folder: str | os.PathLike | None, out: str | os.PathLike,
                     embeddings: dict[str, UserEmbedding] | None = None, image_size: int = 768,
                     batch_size: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     show_progress: bool = True, sdxl: str | os.PathLike | None = None,
                     sdxl_config: str | os.PathLike | None = None,
                     sdxl_tokenizer: str | os.PathLike | None = None) -> DPOData:
    """Encode for Stage C (``effnet_path`` and ``text_encoder_folder``) or for SDXL (``sdxl``, its diffusers folder or
    single-file checkpoint; ``sdxl_config`` and ``sdxl_tokenizer`` for a single file, see :class:`SDXLEncoders`)."""
    if (sdxl is None) == (effnet_path is None or text_encoder_folder is None):
        raise PPDError("prepare: give Stage C's encoders (--effnet and --clip-text) or an SDXL model (--sdxl), not "
                       "both.")
    out = Path(out)
    if embeddings is not None:  # train only users that have an embedding, never on the pairs that made it
        held = {u: set(e.meta.get("pair_sources", [])) for u, e in embeddings.items()}
        users = {u: [p for p in pairs if p.source not in held[u]] for u, pairs in users.items() if u in held}
    users = {u: pairs for u, pairs in sorted(users.items()) if pairs}
    if not users:
        raise PPDError("No pairs left to train on (no user has both an embedding and pairs beyond its embedding "
                       "pairs). Check that --embeddings was made from the same dataset.")
    if sdxl is not None and Path(sdxl).is_file():  # a single-file checkpoint: VAE and text encoders in one file
        key = {"preprocess": SDXL_PREPROCESS_VERSION, "image_size": image_size, "base": "sdxl",
               "checkpoint": _file_key(Path(sdxl)), "pairs": _pairs_key(users)}
    elif sdxl is not None:
        vae_files = sorted((Path(sdxl) / "vae").glob("*.safetensors"))
        key = {"preprocess": SDXL_PREPROCESS_VERSION, "image_size": image_size, "base": "sdxl",
               "vae": _file_key(vae_files[0]) if vae_files else "", "text_encoders": _folder_key(Path(sdxl)),
               "pairs": _pairs_key(users)}
    else:
        assert effnet_path is not None and text_encoder_folder is not None
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
    if sdxl is not None:
        data = encode_sdxl_pairs(users, sdxl, image_size, batch_size, device, dtype, show_progress, sdxl_config,
                                 sdxl_tokenizer)
    else:
        assert effnet_path is not None and text_encoder_folder is not None
        data = encode_pairs(users, effnet_path, text_encoder_folder, image_size, batch_size, device, dtype,
                            show_progress)
    data.info = {"key": key, "captions": len(data.text)}
    data.save(out)
    return data
