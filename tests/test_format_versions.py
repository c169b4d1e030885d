"""A file written by a newer PPD (higher format version) is refused with advice, never read as if it were ours."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import trained_looking_adapter
from safetensors import safe_open
from safetensors.torch import save_file

from ppd_train.adapter import load_adapter, save_adapter
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


NEWER = r"format version 2; this version of PPD reads up to 1\. Update the PPD pack"
DAMAGED = r"format_version is {!r}, not a whole number >= 1: the file is damaged or was edited"
# a newer file asks for an update; a version that is no version at all (null, text, 0, true) says the file is damaged
VERSIONS = [(1, None), (2, NEWER), ("1", DAMAGED), (None, DAMAGED), (0, DAMAGED), (True, DAMAGED)]


def _refused_or_read(read, path, version, refusal) -> object:
    if refusal is None:
        return read(path)
    with pytest.raises(PPDError, match=refusal.format(version)):
        read(path)
    return None


@pytest.mark.parametrize("version, refusal", VERSIONS)
def test_adapter_version(tmp_path, version, refusal):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_looking_adapter(build_tiny_stage_c()), path)
    _rewrite_version(path, "ppd_adapter", version)
    adapter = _refused_or_read(load_adapter, path, version, refusal)
    assert refusal or adapter.config.block_widths == (32,) * 4


def _embedding() -> UserEmbedding:
    return UserEmbedding(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), "x", {"user_id": "u"})


@pytest.mark.parametrize("version, refusal", VERSIONS)
def test_user_embedding_version(tmp_path, version, refusal):
    path = tmp_path / "u.safetensors"
    _embedding().save(path)
    _rewrite_version(path, "ppd_user_embedding", version)
    emb = _refused_or_read(UserEmbedding.load, path, version, refusal)
    assert refusal or torch.equal(emb.tokens, _embedding().tokens)


@pytest.mark.parametrize("version, refusal", VERSIONS)
def test_embedding_table_version(tmp_path, version, refusal):
    path = tmp_path / "t.safetensors"
    save_embedding_table(path, {"u": _embedding()})
    _rewrite_version(path, "ppd_embedding_table", version)
    table = _refused_or_read(load_embedding_table, path, version, refusal)
    assert refusal or list(table[0]) == ["u"]
