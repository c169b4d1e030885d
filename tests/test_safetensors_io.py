"""Atomic writes and safe reads shared by every file format: temporaries live beside the target (so the final rename
is atomic), nothing is left behind, and each bad file gets its own clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ppd_train import safetensors_io
from ppd_train.errors import FileFormatError
from ppd_train.safetensors_io import (
    atomic_save_safetensors,
    atomic_write_bytes,
    read_json_metadata,
    read_safetensors,
    require_safetensors,
)


@pytest.fixture()
def renames(monkeypatch):
    """Every rename the writers make, (source, target), passed on to the real os.replace."""
    seen: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):
        seen.append((str(src), str(dst)))
        real(src, dst)

    monkeypatch.setattr(safetensors_io.os, "replace", spy)
    return seen


def test_atomic_write_bytes(tmp_path, renames):
    target = tmp_path / "new" / "deeper" / "file.bin"  # missing parent folders are made
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [os.path.dirname(src) for src, _ in renames] == [str(target.parent)] * 2  # same folder: atomic rename
    assert all(os.path.basename(src).startswith(".file.bin.") for src, _ in renames)
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_writes_keep_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")
    atomic_save_safetensors({"x": torch.ones(2)}, tmp_path / "t.safetensors", {"k": "v"})

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="No space"):
        atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors", {"k": "v"})
    assert target.read_bytes() == b"old"
    assert torch.equal(read_safetensors(tmp_path / "t.safetensors", "test")[0]["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "t.safetensors"]  # no temporary left


def test_atomic_save_safetensors(tmp_path, renames):
    target = tmp_path / "sub" / "deeper" / "t.safetensors"
    weight = torch.arange(6.0).view(2, 3).t().requires_grad_(True)  # non-contiguous, needs grad
    atomic_save_safetensors({"w": weight}, target, {"note": "hello"})
    tensors, meta = read_safetensors(target, "test")
    assert torch.equal(tensors["w"], weight.detach()) and meta == {"note": "hello"}
    assert [os.path.dirname(src) for src, _ in renames] == [str(target.parent)]
    assert os.path.basename(renames[0][0]).startswith(".t.safetensors.")  # hidden while it is written
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.safetensors"]


def test_read_refusals_name_the_file(tmp_path):
    for name in ("a.PT", "b.ckpt", "c.Pickle"):
        (tmp_path / name).write_bytes(b"\x80\x04 pickle")
        with pytest.raises(FileFormatError, match=rf"{name} looks like a pickled PyTorch file .*widget files"):
            read_safetensors(tmp_path / name, "widget")
    with pytest.raises(FileFormatError, match=r"widget file not found: .*nope\.safetensors"):
        read_safetensors(tmp_path / "nope.safetensors", "widget")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(FileFormatError, match=r"dir\.safetensors is a folder, not a widget file"):
        read_safetensors(tmp_path / "dir.safetensors", "widget")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert read_safetensors(tmp_path / "plain.safetensors", "widget")[1] == {}  # no metadata at all: empty, no error


def test_json_metadata_errors():
    assert read_json_metadata({"k": '{"a": 1}'}, "k", "f.safetensors", "widget") == {"a": 1}
    with pytest.raises(FileFormatError, match=r"f.safetensors is a safetensors file but not a widget \(no 'k' "):
        read_json_metadata({}, "k", "f.safetensors", "widget")
    with pytest.raises(FileFormatError, match="'k' metadata is not valid JSON"):
        read_json_metadata({"k": "{broken"}, "k", "f.safetensors", "widget")
    with pytest.raises(FileFormatError, match="'k' metadata should be a JSON object"):
        read_json_metadata({"k": "[1, 2]"}, "k", "f.safetensors", "widget")


def test_a_save_removes_only_the_temporaries_of_dead_writers(tmp_path):
    """Temporaries of the same target left by writers on this machine whose process is gone are removed before a save;
    those of live writers (and of this process), and those of other targets, stay; no writer is signalled."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # the live writer restores SIGHUP's default (a stray signal would end it even under nohup) and says when it has
    live = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                             "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        host = safetensors_io._HOST
        dead = tmp_path / f".a.safetensors.{host}-{gone.pid}.00.tmp"
        kept = [tmp_path / f".a.safetensors.{host}-{live.pid}.00.tmp",
                tmp_path / f".a.safetensors.{host}-{os.getpid()}.00.tmp",
                tmp_path / f".b.safetensors.{host}-{gone.pid}.00.tmp"]
        for f in (dead, *kept):
            f.write_bytes(b"x")
        atomic_write_bytes(tmp_path / "a.safetensors", b"new")
        assert (tmp_path / "a.safetensors").read_bytes() == b"new"
        assert not dead.exists() and all(f.exists() for f in kept)
        with pytest.raises(subprocess.TimeoutExpired):  # still running: asked with signal 0, never signalled
            live.wait(timeout=0.3)
    finally:
        live.kill()
        live.wait()


def test_every_model_load_asks_for_safetensors_and_no_remote_code():
    """Weights load from safetensors only: every ``from_pretrained`` of a model (not of a tokenizer or processor, which
    hold no weights) passes ``use_safetensors=True`` on its own line, and nothing passes ``trust_remote_code``."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in [*root.glob("ppd_train/**/*.py"), *root.glob("nodes/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert "trust_remote_code" not in line, f"{path.name}:{n}"
            weightless = re.search(r"(Tokenizer|Processor\w*)\.from_pretrained", line)
            if re.search(r"\w+\.from_pretrained\(", line) and not weightless:
                calls.append(f"{path.name}:{n}")
                assert "use_safetensors=True" in line, f"{path.name}:{n}: {line.strip()}"
    assert len(calls) >= 4, calls  # Stage C, the VLM, CLIP vision, CLIP text


def test_a_folder_without_safetensors_names_at_most_three_pickles(tmp_path):
    with pytest.raises(FileFormatError) as e:
        require_safetensors(tmp_path, "Stage C")
    assert str(e.value).startswith(f"{tmp_path} has no .safetensors weights; PPD loads Stage C weights from")
    for name in ("d.bin", "a.ckpt", "c.pt", "b.bin", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(FileFormatError) as e:
        require_safetensors(tmp_path, "Stage C")
    assert str(e.value).startswith(f"{tmp_path} has no .safetensors weights (it has a.ckpt, b.bin, c.pt: pickled "
                                   "weights, which can run code); PPD loads Stage C weights")


def test_a_writer_that_cannot_be_asked_counts_as_alive(monkeypatch):
    """A process of another user (kill(pid, 0) -> EPERM) still runs: its temporary must be kept, not swept."""
    def no_permission(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(safetensors_io.os, "kill", no_permission)
    assert safetensors_io._pid_alive(1) is True


def test_a_failed_write_reports_its_own_error_when_the_temporary_is_already_gone(tmp_path, monkeypatch):
    """The error that stopped a write reaches the caller, even when cleaning up finds no temporary (it was renamed
    before a late failure, or swept by another process)."""
    real = os.replace

    def replace_then_fail(src, dst):
        real(src, dst)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors_io.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="Input/output error"):
        safetensors_io.atomic_write_bytes(tmp_path / "f.bin", b"data")


def test_shape_mismatch_names_what_differs_and_nothing_when_equal():
    from ppd_train.safetensors_io import shape_mismatch

    t = torch.zeros
    want = {"a": t(2), "b": t(3), "c": t(4, 1), "d": t(1)}
    assert shape_mismatch(want, dict(want)) == ""
    got = {"a": t(2), "c": t(1, 4), "e": t(1), "f": t(1)}
    assert shape_mismatch(want, got) == "missing ['b', 'd']; unexpected ['e', 'f']; wrong shape ['c']"
    many = {f"k{i}": t(1) for i in range(5)}
    assert shape_mismatch(many, {}) == "missing ['k0', 'k1', 'k2']"  # three names at most
