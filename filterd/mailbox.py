"""Reading messages out of the places mail admins keep them: Maildir, mbox, plain directories.

`iter_messages(path)` walks one path (recursively) and yields each message as raw bytes with
an identifier for logs; whatever is not mail is yielded as a skip with the reason, so callers
can warn and count without stopping.

mbox: messages start at a line beginning with "From " at the start of the file or after an
empty line. Lines that were quoted on the way in (">From ", ">>From ", ...) lose one ">"
(mboxrd; for mboxo files this also turns an original ">From " into "From ", which changes
nothing a classifier cares about).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filterd.headerblock import mbox_from_end

__all__ = ["MailItem", "count_sources", "iter_messages", "looks_like_mail"]

_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.M)
_MAX_MESSAGE = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MailItem:
    """One message (data) or one thing that was not a message (skipped, with the reason)."""

    identifier: str
    data: bytes = b""
    skipped: str = ""


def looks_like_mail(data: bytes) -> bool:
    """A header field in the first non-empty line (after an mbox "From " line, if any)."""
    start = mbox_from_end(data)
    first = data[start : start + 1000].lstrip(b"\r\n")
    return bool(_HEADER_LINE.match(first))


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _message_starts(data: bytes) -> list[int]:
    """Where messages start: "From " at the start of the file or right after an empty line.

    bytes.find jumps from one "\nFrom " to the next at C speed; a regular expression made of
    look-behinds tries every position (0.2 ms on a 5 KB message, most of reading a folder)."""
    starts = [0] if data.startswith(b"From ") else []
    pos = data.find(b"\nFrom ")
    while pos >= 0:
        if data[pos - 1 : pos] == b"\n" or data[pos - 2 : pos] == b"\n\r":
            starts.append(pos + 1)
        pos = data.find(b"\nFrom ", pos + 6)
    return starts


def _split_mbox(data: bytes, name: str) -> Iterator[MailItem]:
    starts = _message_starts(data)
    if not starts:
        yield _single(data, name)
        return
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        message = data[start:end]
        if b">From " in message:
            message = _QUOTED_FROM.sub(rb"\1", message)
        yield _single(message, f"{name}#{i + 1}" if len(starts) > 1 else name)


def _single(data: bytes, ident: str) -> MailItem:
    if not data.strip():
        return MailItem(ident, skipped="empty")
    if not looks_like_mail(data):
        return MailItem(ident, skipped="not a mail message (no header lines at the start)")
    return MailItem(ident, data)


def _read_file(path: Path) -> Iterator[MailItem]:
    try:
        size = path.stat().st_size
        if size > _MAX_MESSAGE:
            yield MailItem(str(path), skipped=f"larger than {_MAX_MESSAGE // (1024 * 1024)} MiB")
            return
        data = path.read_bytes()
    except OSError as exc:
        yield MailItem(str(path), skipped=f"cannot read: {exc.strerror or exc}")
        return
    if data.startswith(b"From "):
        yield from _split_mbox(data, str(path))
    else:
        yield _single(data, str(path))


def _maildir_files(path: Path) -> Iterator[Path]:
    for sub in ("new", "cur"):
        folder = path / sub
        if folder.is_dir():
            yield from sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # Maildir++ subfolders (.Junk, .Archive.2026, ...)
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") and child.is_dir() and _is_maildir(child):
            yield from _maildir_files(child)


def _walk(path: Path) -> Iterator[Path]:
    if _is_maildir(path):
        yield from _maildir_files(path)
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(root)
        if here != path and _is_maildir(here):
            dirs[:] = []
            yield from _maildir_files(here)
            continue
        if here.name == "tmp" and _is_maildir(here.parent):
            continue  # messages still being delivered
        for name in sorted(files):
            if not name.startswith("."):
                yield here / name


def iter_messages(path: str | Path) -> Iterator[MailItem]:
    """Every message under ``path``: a Maildir, a directory (recursive), an mbox or one-message
    file, or "-" for standard input (an mbox or one message)."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        if data.startswith(b"From "):
            yield from _split_mbox(data, "<stdin>")
        else:
            yield _single(data, "<stdin>")
        return
    p = Path(path)
    if p.is_dir():
        for file in _walk(p):
            yield from _read_file(file)
    elif p.exists():
        yield from _read_file(p)
    else:
        yield MailItem(str(p), skipped="no such file or directory")


def count_sources(path: str | Path) -> int:
    """How many files `iter_messages` will open (an mbox counts once): for progress estimates."""
    if str(path) == "-":
        return 1
    p = Path(path)
    if p.is_dir():
        return sum(1 for _ in _walk(p))
    return 1
