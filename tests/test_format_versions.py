"""A file written by a newer PPD (higher format version) is refused with advice, never read as if it were ours."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import trained_looking_adapter
from safetensors import safe_open
from safetensors.torch import save_file

from ppd_train.adapter import FORMAT_VERSION, load_adapter, save_adapter
from ppd_train.embedding import UserEmbedding, load_embedding_table, save_embedding_table
from ppd_train.errors import PPDError
from ppd_train.tiny import build_tiny_stage_c


def _rewrite_version(path, key: str, version) -> None:
    """The same file with its format version in metadata entry ``key`` replaced."""
    with safe_open(str(path), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata[key])
    meta["format_version"] = version
    save_file(tensors, path, metadata={**metadata, key: json.dumps(meta)})


@pytest.mark.parametrize("version, ok", [(FORMAT_VERSION, True), (FORMAT_VERSION + 1, False), ("1", False),
                                         (None, False)])
def test_adapter_version(tmp_path, version, ok):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(build_tiny_stage_c()), path)
    _rewrite_version(path, "ppd_adapter", version)
    if ok:
        assert load_adapter(path).config.block_widths == (32,) * 4
    else:
        with pytest.raises(PPDError, match=rf"format version {version}; this version of PPD reads up to 1\. Update"):
            load_adapter(path)


def _embedding() -> UserEmbedding:
    return UserEmbedding(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), "x", {"user_id": "u"})


@pytest.mark.parametrize("version, ok", [(1, True), (2, False), (None, False)])
def test_user_embedding_version(tmp_path, version, ok):
    path = tmp_path / "u.safetensors"
    _embedding().save(path)
    _rewrite_version(path, "ppd_user_embedding", version)
    if ok:
        assert torch.equal(UserEmbedding.load(path).tokens, _embedding().tokens)
    else:
        with pytest.raises(PPDError, match=f"user-embedding format {version}; update the PPD pack"):
            UserEmbedding.load(path)


@pytest.mark.parametrize("version, ok", [(1, True), (2, False), (None, False)])
def test_embedding_table_version(tmp_path, version, ok):
    path = tmp_path / "t.safetensors"
    save_embedding_table(path, {"u": _embedding()})
    _rewrite_version(path, "ppd_embedding_table", version)
    if ok:
        assert list(load_embedding_table(path)[0]) == ["u"]
    else:
        with pytest.raises(PPDError, match=f"embedding-table format {version}; update the PPD pack"):
            load_embedding_table(path)
