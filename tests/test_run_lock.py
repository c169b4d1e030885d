"""The out_dir lock in one process (the catalogue's `two-fits-one-out-dir` case runs the holder as a second process):
flock locks belong to an open file, so a second open in the same process is refused just as another process is."""

from __future__ import annotations

import os
import socket

import pytest

from ppd_train.errors import PPDError
from ppd_train.run_lock import LOCK_NAME, _holder, out_dir_lock, prepare_out_dir

ME = f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_held_out_dir_is_refused_naming_its_holder(tmp_path):
    out = tmp_path / "a" / "run"  # parents are created
    with out_dir_lock(out):
        assert (out / LOCK_NAME).read_text() == ME
        with pytest.raises(PPDError) as refused, out_dir_lock(out):
            pytest.fail("a second lock on a held out_dir was granted")
        assert f"Another ppd-train run ({ME}) is training in {out};" in str(refused.value)
        assert (out / LOCK_NAME).read_text() == ME  # the refused run leaves the holder's name
        with out_dir_lock(tmp_path / "other"):  # another out_dir is free
            pass
    with out_dir_lock(out):  # released on exit; the file stays (two runs must lock one inode)
        assert (out / LOCK_NAME).read_text() == ME


def test_a_stale_lock_file_is_taken_over_and_rewritten_whole(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid 999999999 on a-much-longer-host-name-than-this-one")  # left by kill -9
    with out_dir_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == ME  # nothing of the longer old text is left


def test_prepare_out_dir(tmp_path):
    assert prepare_out_dir(tmp_path / "x" / "y") == tmp_path / "x" / "y" and (tmp_path / "x" / "y").is_dir()
    assert prepare_out_dir(str(tmp_path / "x")) == tmp_path / "x"  # an existing folder is fine
    (tmp_path / "f").write_text("")
    with pytest.raises(PPDError, match=f"out_dir {tmp_path / 'f'} exists and is a file"):
        prepare_out_dir(tmp_path / "f")


def test_holder_of_an_empty_or_missing_lock_file_is_unknown(tmp_path):
    assert _holder(tmp_path / "missing") == "unknown"
    (tmp_path / "empty").write_text("  \n")
    assert _holder(tmp_path / "empty") == "unknown"
    (tmp_path / "named").write_text(" pid 7 on h\n")
    assert _holder(tmp_path / "named") == "pid 7 on h"
