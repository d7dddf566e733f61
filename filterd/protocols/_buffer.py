"""The receive buffer every sans-IO protocol machine parses from.

Bytes arrive in whatever pieces the network hands over; parsers take whole lines or exact byte
counts out of the front. Taking a line enforces its cap *while the line is still incomplete*, so
a peer that never sends a line feed is refused once it passes the cap instead of filling memory.
The search for a line feed resumes where the last one stopped, so bytes trickling in one at a
time cost linear, not quadratic, work.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer", "strip_line_ending"]

from filterd.errors import LocalProtocolError, RemoteProtocolError

_LF = 0x0A
_CR = 0x0D


def strip_line_ending(line: bytes) -> bytes:
    """Drop a trailing CRLF or bare LF (only one), as spamd and Postfix policy readers do."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


class ReceiveBuffer:
    """Received bytes not yet parsed. Lines end at LF; a CR just before it is part of the ending."""

    __slots__ = ("_data", "_searched", "closed")

    def __init__(self) -> None:
        self._data = bytearray()
        # Bytes at the front already known to contain no LF: the next search starts here.
        self._searched = 0
        self.closed = False  # the peer closed its side: what is buffered is all there will be

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __repr__(self) -> str:
        return f"<ReceiveBuffer {len(self._data)} bytes>"

    def append(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._data += data

    def receive(self, data: bytes, *, keep: bool = True) -> None:
        """A protocol's ``receive_data``: ``b""`` means the peer closed its side (`closed`).

        Bytes after that are the caller's bug (LocalProtocolError). With ``keep`` False (the
        protocol reads nothing more: it is done or failed) they are dropped.
        """
        if not data:
            self.closed = True
            return
        if self.closed:
            raise LocalProtocolError("received data after the peer closed")
        if keep:
            self._data += data

    def find_line(self, max_length: int) -> int | None:
        """Return the offset just past the first line's LF, or None if no full line is here yet.

        ``max_length`` caps the line's content, its CRLF/LF not counted. Raises
        RemoteProtocolError (without a reply; the protocol adds its own) as soon as the line is
        certain to be longer, complete or not.
        """
        index = self._data.find(b"\n", self._searched)
        if index < 0:
            self._searched = len(self._data)
            # A final CR may still turn out to be half of a CRLF, so it does not count yet.
            pending = len(self._data) - (1 if self._data.endswith(b"\r") else 0)
            if pending > max_length:
                raise RemoteProtocolError(f"line longer than {max_length} bytes")
            return None
        content = index - (1 if index > 0 and self._data[index - 1] == _CR else 0)
        if content > max_length:
            raise RemoteProtocolError(f"line longer than {max_length} bytes")
        return index + 1

    def take_line(self, max_length: int) -> bytes | None:
        """Remove and return the first line with its ending, or None if it is not complete yet."""
        end = self.find_line(max_length)
        return None if end is None else self._take(end)

    def take(self, count: int) -> bytes | None:
        """Remove and return exactly ``count`` bytes, or None (taking nothing) if fewer are here."""
        if count < 0:
            raise ValueError("count must be >= 0")
        return self._take(count) if len(self._data) >= count else None

    def take_at_most(self, count: int) -> bytes:
        """Remove and return up to ``count`` bytes (fewer if that is all there is)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        return self._take(min(count, len(self._data)))

    def take_all(self) -> bytes:
        """Remove and return everything buffered."""
        return self._take(len(self._data))

    def clear(self) -> None:
        """Drop everything buffered (data the protocol will never read)."""
        self._data.clear()
        self._searched = 0

    def _take(self, count: int) -> bytes:
        out = bytes(self._data[:count])
        del self._data[:count]
        self._searched = max(0, self._searched - count)
        return out
