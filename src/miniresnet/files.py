"""Writing a file so that a crash, a kill or a full disk leaves the old file or the new one, never
half of one: the one way every file of a run, a checkpoint, an export or a download is written.
And a file's hash, the one way checksums are computed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; when the block ends without an
    error, the file is flushed to disk and renamed over `path`, otherwise it is deleted. A
    leftover from a kill matches the pattern `.*.tmp` (what a resumed run clears)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; these are ordinary files
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def torch_save_atomically(obj, path: str | Path) -> None:
    """torch.save(obj) to `path` through atomic_path; a failed write (a full disk) is an OSError."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f, os_error_of_torch_writer():
        torch.save(obj, f)


@contextlib.contextmanager
def os_error_of_torch_writer() -> Iterator[None]:
    """For torch.save and torch.jit.save into an open file: when a write fails, the file's OSError
    (which says what happened) is followed by a RuntimeError from closing their zip writer, which
    does not; this raises the OSError. (Given a path instead, they raise only the RuntimeError.)"""
    try:
        yield
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def hexdigest(path: str | Path, algorithm: str) -> str:
    """A file's hash ("md5", "sha256", ...), read in 1 MB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # whatever the locale: class names may be any script


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (where the OS lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
