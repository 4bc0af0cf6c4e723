"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

A file is written under a temporary name in the same directory (so the final ``os.replace`` is a rename within one
file system, which POSIX makes atomic), flushed to disk with ``fsync`` and renamed over the target. The temporary
name is ``.<name>.<pid>.tmp``: hidden, and distinct per process, so two processes writing the same file (e.g. the
feature cache) never write into each other's temporary file. The file gets the usual mode from the umask.

Directories are not handled here: a checkpoint is a directory renamed into place (:mod:`raddino.checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class PendingFile:
    """A file being written at :attr:`tmp`; :meth:`commit` moves it to :attr:`path`, :meth:`discard` drops it.

    For writers that cannot take a ``with`` block (a shard stays open across many calls); otherwise use
    :func:`atomic_path`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def commit(self) -> None:
        """fsync the temporary file and rename it to ``path`` (the caller has closed its handles)."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (with any library); on success it replaces ``path``, on an
    exception it is removed and ``path`` is left as it was."""
    pending = PendingFile(path)
    try:
        yield pending.tmp
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (no newline translation: ``"\\n"`` stays ``"\\n"``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding, newline="")
