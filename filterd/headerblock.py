"""Where a raw message's header block ends: one definition for the parser, the tools that edit
a message without parsing it (spamd's too-big path, `filterd eval`'s X-Spam-* stripping), and
anything else that must not pull in the engine."""

from __future__ import annotations

import re

__all__ = ["header_block_bounds"]

_HEADER_END = re.compile(rb"\n\r?\n")  # the empty line after a header block


def header_block_bounds(data: bytes) -> tuple[int, int]:
    """Where a message's header block ends (after its last line's newline) and where its body
    starts (after the empty line); both ``len(data)`` when there is no empty line. A message
    that starts with the empty line has no header block: callers check ``data[:1]``."""
    m = _HEADER_END.search(data)
    return (len(data), len(data)) if m is None else (m.start() + 1, m.end())
