"""Appending a message to an mbox file, locked the way other mail programs lock it.

Format (mboxrd): a ``From <sender> <asctime date>`` line, the message with every line that
matches ``^>*From `` given one more ``>`` (so readers can undo it exactly; filterd.mailbox
does), a final newline if the message lacked one, and an empty line.

Locking, in this order, both held while writing:

1. a dot-lock, ``PATH.lock``, created with O_EXCL. One older than ``stale`` seconds is taken as
   left over by a crash and removed (Postfix's ``stale_lock_time`` rule). Where the directory
   does not let us create it (a mail spool we may not write to) we go on with the kernel lock
   alone, as mutt does.
2. a POSIX record lock over the whole file: ``fcntl.lockf`` (fcntl F_SETLK), not ``flock``.
   It is what Debian's Postfix (``mailbox_delivery_lock = fcntl, dotlock``), procmail, mutt
   and Dovecot (``mbox_write_locks = fcntl dotlock``) use, and it also works over NFS.

Both are retried with backoff (10 ms doubling to 1 s, with jitter) until ``timeout``; then
`TemporaryDeliveryError`. The size is noted under the locks; if writing or fsync fails, the
file is truncated back to it, so a failed delivery leaves the mbox byte for byte as it was.
"""

from __future__ import annotations

__all__ = ["MboxLock", "deliver_mbox", "from_line", "mbox_entry", "quote_from_lines"]

import contextlib
import errno
import fcntl
import os
import random
import re
import stat
import time
from pathlib import Path
from types import TracebackType

from filterd.durable import fsync_dir, write_all
from filterd.errors import PermanentDeliveryError, TemporaryDeliveryError

_FROM_LINE = re.compile(rb"^(>*From )", re.M)
# the dot-lock cannot be made here, for good: fall back to the kernel lock alone
_NO_DOTLOCK = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def quote_from_lines(data: bytes) -> bytes:
    """mboxrd quoting: one more ``>`` before every line matching ``^>*From ``."""
    return _FROM_LINE.sub(rb">\1", data)


def from_line(sender: str | None, when: float) -> bytes:
    """The ``From `` separator line; the null or unknown sender is MAILER-DAEMON."""
    who = "".join("_" if c.isspace() else c for c in sender) if sender else "MAILER-DAEMON"
    return b"From %s %s\n" % (who.encode("utf-8", "surrogateescape"), time.asctime(time.localtime(when)).encode())


def mbox_entry(data: bytes, sender: str | None, when: float) -> bytes:
    """One message as it is appended: From line, quoted message, newline, empty line."""
    body = quote_from_lines(data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return from_line(sender, when) + body + b"\n"


class MboxLock:
    """Dot-lock plus fcntl lock of an open mbox, retried until a deadline (a context manager)."""

    def __init__(self, path: Path, fd: int, *, timeout: float, stale: float) -> None:
        self.path = path
        self.fd = fd
        self.timeout = timeout
        self.stale = stale
        self.dotlock: Path | None = None  # set while we hold one
        self.warnings: list[str] = []

    def __enter__(self) -> MboxLock:
        deadline = time.monotonic() + self.timeout
        self._dotlock(deadline)
        try:
            self._fcntl(deadline)
        except BaseException:
            self._release_dotlock()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self._release_dotlock()

    def _dotlock(self, deadline: float) -> None:
        lock = self.path.with_name(self.path.name + ".lock")
        delay = 0.01
        while True:
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                try:
                    if time.time() - os.stat(lock).st_mtime > self.stale:
                        os.unlink(lock)
                        self.warnings.append(f"removed stale lock {lock}")
                        continue
                except FileNotFoundError:
                    continue  # released meanwhile
            except OSError as exc:
                if exc.errno in _NO_DOTLOCK:
                    self.warnings.append(f"cannot create {lock} ({exc.strerror}); using the fcntl lock only")
                    return
                raise
            else:
                self.dotlock = lock  # ours from here on, even if the pid cannot be written
                try:
                    write_all(fd, b"%d\n" % os.getpid())  # who holds it, for humans
                except OSError:
                    pass  # an empty lock file locks as well
                finally:
                    os.close(fd)
                return
            delay = _wait(deadline, delay, f"{lock} is held by another program")

    def _fcntl(self, deadline: float) -> None:
        delay = 0.01
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            delay = _wait(deadline, delay, f"{self.path} is locked (fcntl) by another program")

    def _release_dotlock(self) -> None:
        if self.dotlock is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dotlock)
            self.dotlock = None


def _wait(deadline: float, delay: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TemporaryDeliveryError(f"lock timeout: {what}", "4.2.0")
    time.sleep(min(left, delay * random.uniform(0.5, 1.5)))
    return min(delay * 2, 1.0)


def deliver_mbox(
    path: str | Path,
    data: bytes,
    *,
    sender: str | None,
    lock_timeout: float = 60.0,
    stale_lock: float = 500.0,
    when: float | None = None,
) -> list[str]:
    """Append ``data`` to the mbox at ``path`` (created 0600 if missing) and fsync it.

    Returns warnings worth logging (a stale lock removed, no dot-lock possible). Raises
    `TemporaryDeliveryError` on lock timeout, `PermanentDeliveryError` when ``path`` is not a
    regular file, OSError when writing fails (the file is then back at its old size).
    """
    path = Path(path)
    entry = mbox_entry(data, sender, time.time() if when is None else when)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PermanentDeliveryError(f"{path} is not a regular file", "5.2.0")
        with MboxLock(path, fd, timeout=lock_timeout, stale=stale_lock) as lock:
            size = os.fstat(fd).st_size
            try:
                if size:
                    tail = os.pread(fd, 2, max(0, size - 2))
                    # the previous message must end with an empty line, or ours would not start one
                    entry = (b"" if tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n") + entry
                write_all(fd, entry)
                os.fsync(fd)
                if not size:  # a new file: its name must be durable too
                    fsync_dir(path.parent)
            except BaseException:
                _truncate(fd, size)
                raise
        return lock.warnings
    finally:
        os.close(fd)


def _truncate(fd: int, size: int) -> None:
    """Undo a partial append; the caller re-raises the error that caused it."""
    with contextlib.suppress(OSError):  # the original error is the one to report
        os.ftruncate(fd, size)
        os.fsync(fd)
