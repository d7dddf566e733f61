"""Durability helpers shared by the spool and the local delivery agents.

The order every writer follows (STYLE.md): write the file and fsync it, then rename or link it
into place, then fsync the directory that holds the new name, and only then reply.
"""

from __future__ import annotations

__all__ = ["fsync_dir", "make_dirs", "write_all"]

import errno
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory *path* durable (a new, renamed or removed name): Linux needs
    the directory itself fsync'd for them to survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until everything is written (a short write is followed by the real error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def make_dirs(path: Path) -> None:
    """mkdir -p, each new directory made durable in its parent (fsync); a directory another
    delivery makes at the same moment is fine; a file in the way is NotADirectoryError."""
    if path.is_dir():
        return
    if path.parent != path:
        make_dirs(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path)) from None
        return
    fsync_dir(path.parent)
