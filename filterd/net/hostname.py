"""This machine's name, as the headers we write show it."""

from __future__ import annotations

import functools
import socket

__all__ = ["fqdn"]


@functools.cache
def fqdn() -> str:
    """This host's fully qualified name ("localhost" if it has none). Looked up once per process:
    `socket.getfqdn` may ask DNS."""
    try:
        return socket.getfqdn() or "localhost"
    except OSError:
        return "localhost"
