"""clamd's INSTREAM exchange, client side, sans-IO: the bytes to send and what the reply means.

    client: b"zINSTREAM\\0", then (u32 length, chunk)..., then u32 0 as the end marker
    clamd:  b"stream: OK\\0" | b"stream: <Name> FOUND\\0" | b"<text> ERROR\\0", then it closes

(shared/reference/protocols.md §5). The ``z`` form (NUL-terminated command and replies) is the
one clamd recommends, and INSTREAM requires a prefix. As clamdscan does, a reply is judged by
its suffix: `` FOUND`` infected, `` ERROR`` failed, ``OK`` clean. With ``AllMatch`` clamd may
send several FOUND replies before closing, so the whole answer up to the close is parsed.
Past ``StreamMaxLength`` clamd answers ``INSTREAM size limit exceeded. ERROR`` and closes
while the client may still be sending; the client should read that reply even if a write fails.
"""

from __future__ import annotations

__all__ = ["CHUNK_SIZE", "INSTREAM_COMMAND", "MAX_REPLY", "ScanReply", "instream_frames", "parse_reply"]

from collections.abc import Iterator
from dataclasses import dataclass

from filterd.errors import RemoteProtocolError

INSTREAM_COMMAND = b"zINSTREAM\0"
CHUNK_SIZE = 64 * 1024  # the client's choice; clamd counts only the sum against StreamMaxLength
MAX_REPLY = 64 * 1024  # a longer answer is not clamd talking
_END = b"\0\0\0\0"


def instream_frames(data: bytes, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes | memoryview]:
    """What follows the command: each chunk after its u32 length, then the zero-length end marker.

    Chunks are views into ``data`` (no copies of a large message)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        chunk = view[start : start + chunk_size]
        yield len(chunk).to_bytes(4, "big")
        yield chunk
    yield _END


@dataclass(frozen=True, slots=True)
class ScanReply:
    """What clamd said about one stream: signature names (infected), an error, or neither (clean)."""

    found: tuple[str, ...] = ()
    error: str = ""

    @property
    def clean(self) -> bool:
        return not self.found and not self.error


def _without_stream_prefix(text: str) -> str:
    return text[len("stream: ") :] if text.startswith("stream: ") else text


def parse_reply(data: bytes) -> ScanReply:
    """clamd's whole answer to INSTREAM (everything it sent before closing).

    Raises RemoteProtocolError for an empty answer or a line that is neither OK, FOUND nor ERROR
    (``UNKNOWN COMMAND``, say, or something that is not clamd)."""
    if len(data) > MAX_REPLY:
        raise RemoteProtocolError(f"clamd reply longer than {MAX_REPLY} bytes")
    found: list[str] = []
    errors: list[str] = []
    seen_ok = False
    # A reply cut short of its NUL is still read: clamd closed, so nothing else will come.
    for record in data.split(b"\0"):
        line = record.decode("utf-8", "replace").strip()
        if not line:
            continue
        if line.endswith(" FOUND"):
            name = _without_stream_prefix(line[: -len(" FOUND")]).strip()
            if name and name not in found:
                found.append(name)
        elif line.endswith(" ERROR"):
            errors.append(_without_stream_prefix(line[: -len(" ERROR")]).strip() or "unspecified error")
        elif line == "OK" or line.endswith(": OK"):
            seen_ok = True
        else:
            raise RemoteProtocolError(f"unexpected clamd reply {line[:200]!r}")
    if not (found or errors or seen_ok):
        raise RemoteProtocolError("clamd closed the connection without a reply")
    return ScanReply(found=tuple(found), error="; ".join(errors))
