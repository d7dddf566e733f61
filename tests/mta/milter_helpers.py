"""A small milter filter served on loopback from the sans-IO `MilterServerConnection`, for the
MTA-side tests: it negotiates ``wanted`` and answers each event that needs an answer with what
``script`` returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from filterd.protocols import NeedData
from filterd.protocols.milter import Event, MilterServerConnection, Negotiate, OptionNegotiation, Reply

Script = Callable[[Event], list[Reply]]


async def serve_filter(script: Script, wanted: Negotiate) -> tuple[asyncio.Server, str, list[Event]]:
    """Start the filter; returns the server, its ``127.0.0.1:port`` and the events it saw, in order.

    A script that leaves an event unanswered (an empty list) makes the filter go quiet until
    the MTA hangs up: that is how a stuck filter looks from the MTA.
    """
    seen: list[Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = MilterServerConnection()
        try:
            while data := await reader.read(65536):
                conn.receive_data(data)
                while not isinstance(event := conn.next_event(), NeedData):
                    seen.append(event)
                    if isinstance(event, OptionNegotiation):
                        writer.write(conn.send(wanted))
                    elif conn.pending is not None:
                        for reply in script(event):
                            writer.write(conn.send(reply))
                        if conn.pending is not None:
                            await reader.read()
                            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
