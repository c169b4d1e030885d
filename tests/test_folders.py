"""Path confinement of names from workflows (``nodes/folders.py``): an absolute path is judged by where it points."""

from __future__ import annotations

import importlib

import pytest


def test_an_absolute_path_inside_the_folder_is_accepted(pack, tmp_path):
    folders = importlib.import_module(f"{pack.__name__}.nodes.folders")
    errors = importlib.import_module(f"{pack.__name__}.ppd_train.errors")
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "sub").mkdir(parents=True)
    first.mkdir()
    (second / "sub" / "a.safetensors").write_bytes(b"x")
    assert folders.inside(second, str(second / "sub" / "a.safetensors")) == second / "sub" / "a.safetensors"
    # found in the folder it lies in, not refused by the first folder searched
    assert folders.find("ppd_adapters", str(second / "sub" / "a.safetensors"), "PPD adapter",
                        [first, second]) == second / "sub" / "a.safetensors"
    (tmp_path / "link").symlink_to(second, target_is_directory=True)  # the folder as registered is a link
    assert folders.inside(tmp_path / "link", str(second / "sub" / "a.safetensors")) == \
        tmp_path / "link" / "sub" / "a.safetensors"
    with pytest.raises(errors.PPDError, match=r"is an absolute path outside the folders for PPD adapter \(.*first, "
                                              r".*second\); only files inside ComfyUI's own folders"):
        folders.find("ppd_adapters", str(tmp_path / "elsewhere.safetensors"), "PPD adapter", [first, second])
    for bad in (str(second / ".." / "x"), str(second), "/etc/passwd"):
        with pytest.raises(errors.PPDError, match="points outside"):
            folders.inside(second, bad)
