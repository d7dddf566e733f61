"""Delivery into a Maildir (qmail's maildir(5)) and its Maildir++ subfolders.

A message is written to ``tmp/<unique>``, fsync'd and closed, hard-linked to ``new/<unique>``
(rename where the file system has no hard links), its ``tmp`` name removed, and ``new/``
fsync'd: only then does `Maildir.deliver` return, so a crash loses nothing that was
acknowledged. Linking, unlike rename, never replaces an existing file.

Unique names follow maildir(5)'s modern form, ``<sec>.M<usec>P<pid>Q<n>R<random>.<host>``:
the microseconds and pid separate processes, ``Q<n>`` deliveries of one process, and 64
random bits cover clocks that step back and pids reused across containers. As Dovecot does,
``,S=<bytes>,W=<bytes with CRLF line ends>`` may follow, so IMAP servers need not stat or read
the file to learn its size.

Folders are Maildir++: ``INBOX`` is the Maildir itself, ``Junk`` is ``.Junk``, ``Lists/dev``
(or ``Lists.dev``) is ``.Lists.dev``, each made on first use with ``cur``, ``new``, ``tmp`` and
the empty ``maildirfolder`` file Maildir++ readers look for. Names outside ASCII are stored in
IMAP's modified UTF-7, as Dovecot and Courier store them.
"""

from __future__ import annotations

__all__ = ["Maildir", "folder_dirname", "imap_utf7"]

import base64
import contextlib
import errno
import itertools
import os
import socket
import time
from pathlib import Path

from filterd.durable import fsync_dir, make_dirs, write_all

_SUBDIRS = ("cur", "new", "tmp")
# errors of link() that mean "this file system cannot hard-link": fall back to rename()
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


def imap_utf7(name: str) -> str:
    """``name`` in IMAP's modified UTF-7 (RFC 3501 5.1.3): ``&`` is ``&-``, non-ASCII runs are
    UTF-16BE in base64 with ``,`` for ``/`` between ``&`` and ``-``."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            encoded = base64.b64encode("".join(run).encode("utf-16-be")).rstrip(b"=")
            out.append("&" + encoded.decode("ascii").replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def folder_dirname(folder: str) -> str | None:
    """The directory of a Maildir++ folder under the Maildir: None for INBOX, ``.Junk`` for
    ``Junk``. ``/`` and ``.`` both separate levels; a leading ``INBOX.`` or ``INBOX/`` (Courier's
    namespace) is dropped. Raises ValueError for names that cannot be a folder."""
    name = folder.strip()
    if name.upper() == "INBOX":
        return None
    if name[:6].upper() in ("INBOX.", "INBOX/"):
        name = name[6:]
    parts = name.replace("/", ".").split(".")
    if not name or any(not p or p != p.strip() for p in parts):
        raise ValueError(f"{folder!r} is not a folder name (empty level, or spaces around one)")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ValueError(f"{folder!r} is not a folder name (control characters)")
    return "." + ".".join(imap_utf7(p) for p in parts)


def _escaped_host() -> str:
    # maildir(5): "/" and ":" in the host name are written as octal escapes; "," too, because
    # readers take ",S=" fields from the name.
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


class Maildir:
    """One Maildir (created on first delivery, with missing parent directories)."""

    def __init__(self, root: str | Path, *, sizes: bool = True) -> None:
        self.root = Path(root)
        self.sizes = sizes
        self._host = _escaped_host()
        self._count = itertools.count(1)

    def folder_path(self, folder: str = "INBOX") -> Path:
        """The directory of ``folder`` (see `folder_dirname`); ValueError for a bad name."""
        dirname = folder_dirname(folder)
        return self.root if dirname is None else self.root / dirname

    def unique_name(self, data: bytes) -> str:
        usec = time.time_ns() // 1000
        name = f"{usec // 1_000_000}.M{usec % 1_000_000}P{os.getpid()}Q{next(self._count)}R{os.urandom(8).hex()}"
        name += "." + self._host
        if self.sizes:
            # W= is the size an IMAP client sees, every LF sent as CRLF
            crlf_size = len(data) + data.count(b"\n") - data.count(b"\r\n")
            name += f",S={len(data)},W={crlf_size}"
        return name

    def ensure(self, folder: str = "INBOX") -> Path:
        """Create ``folder`` (and the Maildir) if missing; returns its directory."""
        path = self.folder_path(folder)
        if not (path / "tmp").is_dir() or not (path / "new").is_dir() or not (path / "cur").is_dir():
            make_dirs(self.root)
            for sub in _SUBDIRS:
                make_dirs(self.root / sub)
            if path != self.root:
                make_dirs(path)
                for sub in _SUBDIRS:
                    make_dirs(path / sub)
                marker = path / "maildirfolder"
                if not marker.exists():
                    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    os.close(fd)
                    fsync_dir(path)
        return path

    def deliver(self, data: bytes, folder: str = "INBOX") -> Path:
        """Store ``data`` in ``folder``'s new/ durably; returns the file's path. Raises OSError
        (the temporary file is removed) or ValueError for a bad folder name."""
        path = self.ensure(folder)
        while True:
            name = self.unique_name(data)
            tmp = path / "tmp" / name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                try:
                    write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                final = path / "new" / name
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    os.unlink(tmp)
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_LINKS:
                        raise
                    os.rename(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _unlink_quietly(tmp)  # already in new/: a leftover tmp file is only litter
            fsync_dir(path / "new")
            return final


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
