"""A single-file SDXL checkpoint holds no tokenizer: the pack then takes ComfyUI's own (``comfy/sd1_tokenizer``). With
SDXL's two paddings it gives the token ids ComfyUI's own SDXL text encoders get (``comfy.sdxl_clip.SDXLTokenizer``),
77 per caption, for both encoders. One known difference, kept on purpose: the second tokenizer reads a "!" in the
text as its padding token (id 0), as diffusers' SDXL ``tokenizer_2`` does (diffusers issue #4153), where ComfyUI and
OpenCLIP give "!</w>" (256): a single file encodes exactly as the diffusers folder does."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
CAPTIONS = ["a lighthouse at dusk, oil painting", "A Portrait of an old sailor; soft light.", "cat"]


def test_comfyuis_tokenizer_gives_comfyuis_sdxl_token_ids(comfy):
    from comfy.sdxl_clip import SDXLTokenizer

    sdxl_file = importlib.import_module("ppd_pack.ppd_train.sdxl_file")
    assert COMFYUI_DIR
    folder = Path(COMFYUI_DIR) / "comfy" / "sd1_tokenizer"
    assert sdxl_file.comfyui_tokenizer(Path(COMFYUI_DIR) / "custom_nodes" / "ppd" / "ppd_train" / "x.py") == folder
    ours = sdxl_file.sdxl_tokenizers(folder)
    theirs = SDXLTokenizer()

    def comfy_ids(caption: str) -> dict[str, list[int]]:
        return {k: [t[0] for t in v[0]] for k, v in theirs.tokenize_with_weights(caption).items()}

    for caption in CAPTIONS:
        got = [t(caption, padding="max_length", max_length=77, truncation=True).input_ids for t in ours]
        want = comfy_ids(caption)
        assert got == [want["l"], want["g"]] and len(got[0]) == 77
    got_g = ours[1]("soft light!", padding="max_length", max_length=77).input_ids
    want_g = comfy_ids("soft light!")["g"]
    assert want_g[3] == 256 and got_g[3] == 0 and got_g[:3] + got_g[4:] == want_g[:3] + want_g[4:]
