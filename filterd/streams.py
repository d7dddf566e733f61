"""Writing to a client that may never read: every wait on the peer is bounded (the daemon's
spamd, milter and policy connections, the MTA's SMTP sessions).

asyncio's ``drain()`` and ``wait_closed()`` wait as long as the peer keeps its window shut, and a
transport closed with data still queued keeps it (and the connection) until the peer reads. A
client that sends a request and never reads its answer would hold a connection slot and the
answer's bytes for as long as TCP lives; these drop it instead.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["WriteTimeout", "close", "drain"]


class WriteTimeout(ConnectionError):
    """The peer did not take what we wrote in time; the connection was aborted."""


async def drain(writer: asyncio.StreamWriter, seconds: float) -> None:
    """``writer.drain()``, for ``seconds`` at most; past it the connection is aborted
    (queued bytes dropped) and WriteTimeout raised."""
    try:
        async with asyncio.timeout(seconds):
            await writer.drain()
    except TimeoutError:
        writer.transport.abort()
        raise WriteTimeout(f"the peer took nothing for {seconds:.0f}s") from None


async def close(writer: asyncio.StreamWriter, seconds: float) -> bool:
    """Close, letting the queued bytes go for ``seconds`` at most, then abort; False if
    it had to abort."""
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()
    try:
        async with asyncio.timeout(seconds):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
        return False
    except (OSError, RuntimeError):  # the peer reset: closed all the same
        pass
    return True
