"""A raw message's header block, split without parsing: one definition of where the block ends
and what its fields are, for the parser (`filterd.engine.mime.split_header_block`), the
delivery agent (`filterd.mda.headers`), the tools that edit a message without parsing it
(spamd's too-big path, `filterd eval`'s X-Spam-* stripping), and anything else that must not
pull in the engine.

The rules: a field starts with a line ``name:`` (the name printable ASCII without a colon,
blanks allowed before the colon), and continuation lines (a leading space or tab) belong to the
field above them. The block ends at the first empty line (LF or CRLF), or earlier, at the first
line that is neither a field nor a continuation: a message that lacks the empty line has its
body start there, not its body read as fields.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["HeaderFields", "header_block_bounds", "mbox_from_end", "split_header_fields", "without_fields"]

_HEADER_END = re.compile(rb"\n\r?\n")  # the empty line after a header block

# One field: the name and its colon, the rest of that line, then its continuation lines; each
# line with its line end (only the last line of the data may lack one). Possessive throughout:
# a line is taken whole or not at all, so a match never ends inside a line.
_FIELD = re.compile(rb"([!-9;-~]++)[ \t]*+:[^\n]*+\n?+(?:[ \t][^\n]*+\n?+)*+")
_FOLDS = re.compile(rb"(?:[ \t][^\n]*+\n?+)++")  # continuation lines with no field above them


class HeaderFields(NamedTuple):
    """How `split_header_fields` cut a message."""

    fields: list[tuple[bytes, bytes]]
    """(name, raw) per field, in order: the name as written (``b""`` for continuation lines at
    the very top, kept together as one nameless field), raw the field's bytes as they came, its
    line ends and continuation lines included; ``b"".join`` of them is ``data[:end]``."""
    end: int
    """Where the fields end: the empty line, the first line that is no part of a field, or
    ``len(data)``."""
    body: int
    """Where the body starts: after the empty line when the fields end there, else ``end``."""
    cut: bool
    """The fields ended before an empty line or the end of the data: at a line that is neither
    a field nor a continuation, or at a field past ``max_fields``."""


def split_header_fields(data: bytes, max_fields: int | None = None) -> HeaderFields:
    """The header fields of ``data`` (a whole message, or a MIME part), where they end and where
    the body starts. At most ``max_fields`` fields (the nameless one on top counts): a field
    beyond them ends the block, as a line that is no field would. Any bytes give a result."""
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    folds = _FOLDS.match(data)
    if folds is not None:
        fields.append((b"", folds.group()))
        pos = folds.end()
    limit = len(data) if max_fields is None else max_fields
    match = _FIELD.match
    append = fields.append
    while len(fields) < limit and (m := match(data, pos)) is not None:
        append((m[1], m[0]))
        pos = m.end()
    if data.startswith(b"\n", pos):
        return HeaderFields(fields, pos, pos + 1, False)
    if data.startswith(b"\r\n", pos):
        return HeaderFields(fields, pos, pos + 2, False)
    return HeaderFields(fields, pos, pos, pos < len(data))


def header_block_bounds(data: bytes) -> tuple[int, int]:
    """Where a message's header block ends (after its last line's newline) and where its body
    starts (after the empty line); both ``len(data)`` when there is no empty line. A message
    that starts with the empty line has no header block: callers check ``data[:1]``. Only the
    empty line counts here; `split_header_fields` also ends the block at a line that is no
    field."""
    m = _HEADER_END.search(data)
    return (len(data), len(data)) if m is None else (m.start() + 1, m.end())


def mbox_from_end(data: bytes) -> int:
    """Where the header block starts: after an mbox ``From `` line on top (procmail hands one
    over, mbox files and the SpamAssassin corpus carry one), else 0. That line is no field."""
    if not data.startswith(b"From "):
        return 0
    nl = data.find(b"\n")
    return nl + 1 if nl >= 0 else len(data)


def without_fields(data: bytes, name: bytes) -> bytes:
    """``data`` without its header fields called ``name`` (lower case), continuation lines and
    all; what follows the fields (`split_header_fields`' end) comes back unread. ``data`` itself
    when there is none."""
    split = split_header_fields(data)
    if not any(field.lower() == name for field, _ in split.fields):
        return data
    return b"".join(raw for field, raw in split.fields if field.lower() != name) + data[split.end :]
