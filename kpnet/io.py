"""Atomic file output: every result, report and checkpoint is written to a temporary file
in the same directory and renamed over the target, so a reader never sees half a file.

A write that fails for a reason of the disk (ENOSPC, EIO, EROFS, EDQUOT, EFBIG, ...) raises a
`KpnetError` naming the target and the errno; the previous file is left as it was. A run folder
is claimed with `run_lock`, an flock the kernel drops when its process dies however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kpnet.errors import KpnetError

LOCK_NAME = ".kpnet-train.lock"
PENDING: set[Path] = set()  # temporary files being written now (a process exiting at once removes them)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: Path, e: OSError, replaced: bool) -> KpnetError:
    """The one-line error for an OSError met while writing `path`: its strerror and errno name."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    kept = "the previous file is unchanged" if replaced else "nothing was written"
    return KpnetError(path, f"cannot write: {e.strerror or e} ({name}); {kept}")


def atomic_write(path: str | Path, write: Callable[[Path], None], verify: Callable[[Path], None] | None = None) -> Path:
    """`write(tmp)`, `verify(tmp)`, rename tmp over `path` (mode 0666 less the umask); disk errors are KpnetErrors."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp_path = Path(tmp)
        PENDING.add(tmp_path)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp_path)
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno is None:
            raise
        raise write_error(path, e, path.exists()) from None
    finally:
        if tmp_path is not None:
            PENDING.discard(tmp_path)
            if tmp_path.exists():
                tmp_path.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


class _CountingFile:
    """A binary file that counts what it wrote and keeps the first OSError (torch re-raises it as RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.written, self.error = f, 0, None

    def write(self, data: bytes) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: str | Path, obj: Any, verify: Callable[[Path], None] | None = None) -> Path:
    """`torch.save` atomically; the file is checked to hold every byte written, then `verify(tmp)` runs."""
    import torch

    written = 0

    def save(p: Path) -> None:
        nonlocal written
        with open(p, "wb") as f:
            counted = _CountingFile(f)
            try:
                torch.save(obj, counted)
            except RuntimeError:
                if counted.error is not None:
                    raise counted.error from None
                raise
        written = counted.written

    def check(p: Path) -> None:
        size = p.stat().st_size
        if size != written:
            raise KpnetError(path, f"the checkpoint did not write back whole ({size} of {written} bytes on disk); "
                                   "the previous file is unchanged")
        if verify is not None:
            verify(p)

    return atomic_write(path, save, check)


def atomic_savefig(path: str | Path, fig: Any, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", **kwargs))


def atomic_imwrite(path: str | Path, image: Any) -> Path:
    """Write an image (BGR uint8, encoded by the target's suffix) atomically."""
    import cv2

    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"{path}: could not encode image")
    return atomic_write_bytes(path, buf.tobytes())


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder`'s run lock for the duration; another holder makes this a KpnetError naming its pid."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process"
                os.close(fd)
                raise KpnetError(folder, f"another `kpnet train` is running in this folder ({holder}); "
                                         "wait for it to end or pick another --out") from None
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break  # not unlinked by a holder that ended between our open and our flock
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except OSError as e:
        raise write_error(path, e, False) from None
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
