"""A client that pipelines commands and never reads the replies is dropped after smtpd_timeout,
as a silent one is: it must not hold one of max_connections for as long as TCP keeps it open."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

from filterd.config import Duration, default_config
from filterd.mta.queue import Queue
from filterd.mta.smtpd import SmtpServer
from tests.mta.qmgr_helpers import eventually


def test_a_client_that_reads_no_replies_is_dropped(tmp_path: Path) -> None:
    config = dataclasses.replace(
        default_config().mta,
        smtpd_timeout=Duration(1.0),
        max_connections=1,
        peername_lookup=False,
        hostname="mx.test",
    )

    async def main() -> bytes:
        server = SmtpServer(config, Queue(tmp_path / "queue"))
        [(host, port)] = await server.start(["127.0.0.1:0"])

        def flood() -> socket.socket:
            s = socket.create_connection((host, port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(0.5)
            try:  # until the server stops reading: its replies fill both socket buffers
                for _ in range(2000):
                    s.sendall(b"NOOP\r\n" * 10_000)
            except (TimeoutError, BlockingIOError):
                pass
            return s

        flooder = await asyncio.to_thread(flood)
        try:
            await eventually(lambda: server._connections == 0)  # the slot is free again

            def greeting() -> bytes:
                with socket.create_connection((host, port), timeout=10) as s:
                    return s.recv(200)

            return await asyncio.to_thread(greeting)
        finally:
            flooder.close()
            await server.close(grace=0.1)

    assert asyncio.run(main()).startswith(b"220 mx.test")
