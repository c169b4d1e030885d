"""One ``ppd-train fit`` per out_dir: a lock file naming the pid that holds it.

The lock is an OS file lock (``flock``), so it dies with its process: a run killed with kill -9 leaves only a stale
file, which the next run takes over. Where ``flock`` is missing (Windows) the pid in the file decides.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PPDError

LOCK_NAME = ".ppd-train.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (refusing a file, or a folder this user cannot write) before any work starts."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PPDError(f"out_dir {out} exists and is a file, not a folder; set out_dir to a folder.") from None
    except OSError as e:
        raise PPDError(f"Cannot create out_dir {out} ({e.strerror}); set out_dir to a folder you can write "
                       "(--set out_dir=...).") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PPDError(f"out_dir {out} is not writable by this user; set out_dir to a folder you can write "
                       "(--set out_dir=...) or fix its permissions.")
    return out


@contextmanager
def out_dir_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the out_dir for one run; refuse, naming the other run's pid, while another process holds it."""
    out = prepare_out_dir(out_dir)
    path = out / LOCK_NAME
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PPDError(_busy(out, _holder(path))) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, me.encode())
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays (unlinking it would let two runs lock two inodes)
        return
    try:  # pragma: no cover - Windows
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # pragma: no cover
        holder = _holder(path)
        pid = holder.split()[1] if holder.startswith("pid ") else ""
        if pid.isdigit() and _alive(int(pid)):
            raise PPDError(_busy(out, holder)) from None
        path.unlink(missing_ok=True)  # stale: its process is gone
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:  # pragma: no cover
        os.write(fd, me.encode())
        os.close(fd)
        yield
    finally:  # pragma: no cover
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:  # pragma: no cover - Windows path
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _busy(out: Path, holder: str) -> str:
    return (f"Another ppd-train run ({holder}) is training in {out}; two runs in one out_dir would overwrite each "
            "other's checkpoints and adapter. Wait for it to finish, stop it, or use another out_dir.")
