"""The header fields of a message, for `filterd deliver`: what the MTA prepended, what recipes
match, what we take out.

Split by `filterd.headerblock.split_header_fields`, as the engine's parser splits them (which
the delivery agent may not import): the header block ends at the first empty line (LF or CRLF),
or earlier, at the first line that is neither a field (``name:``, the name printable ASCII
without a colon) nor a continuation (leading space or tab) — a message that lacks the empty
line has its body start there, not its body read as fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from filterd.headerblock import split_header_fields

__all__ = ["Field", "split_fields"]


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
    line, or the first line that is no part of a field; ``message[end:]`` is the rest).
    Continuation lines on top, with no field above them, are one field named ``b""``."""
    split = split_header_fields(message)
    return [Field(name, raw) for name, raw in split.fields], split.end
