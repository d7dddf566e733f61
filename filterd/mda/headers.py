"""The header fields of a message, for `filterd deliver`: what the MTA prepended, what recipes
match, what we take out.

The same rules as the engine's parser (`filterd.engine.mime.split_header_block`, which the
delivery agent may not import): the header block ends where `filterd.headerblock` says (the
first empty line, LF or CRLF), or earlier, at the first line that is neither a field
(``name:``, the name printable ASCII without a colon) nor a continuation (leading space or tab)
— a message that lacks the empty line has its body start there, not its body read as fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from filterd.headerblock import header_block_bounds

__all__ = ["Field", "split_fields"]

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # as filterd.engine.mime._HEADER_NAME


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as it appeared."""

    name: bytes  # as written ("" for continuation lines with no field before them)
    raw: bytes  # the whole field: its line ends and continuation lines included

    @property
    def key(self) -> bytes:
        """The name in lower case."""
        return self.name.lower()

    @property
    def value(self) -> bytes:
        """Unfolded: each line stripped of its line end and surrounding blanks, joined by one space."""
        _, _, rest = self.raw.partition(b":")
        return b" ".join(part for line in rest.split(b"\n") if (part := line.strip(b" \t\r")))


def split_fields(message: bytes) -> tuple[list[Field], int]:
    """The header fields of ``message``, in order, and the offset where they end (the empty
    line, or the first line that is no part of a field; ``message[end:]`` is the rest)."""
    end, _ = header_block_bounds(message)
    fields: list[Field] = []
    at = 0
    while at < end:
        nl = message.find(b"\n", at, end)
        stop = end if nl < 0 else nl + 1
        line = message[at:stop]
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = Field(fields[-1].name, fields[-1].raw + line)
            else:  # continuation lines on top: kept as they are, belonging to no field
                fields.append(Field(b"", line))
        elif _FIELD_NAME.match(line):
            fields.append(Field(line.partition(b":")[0].rstrip(b" \t"), line))
        else:
            break
        at = stop
    return fields, at
