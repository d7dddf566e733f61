"""A remote server's reply in a legacy charset (Latin-1 bytes, not UTF-8) is kept in the
envelope with U+FFFD for what cannot be decoded: the envelope must stay writable, else every
attempt fails on the save and the message never leaves the queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

from filterd.mta.queue import Queue
from tests.mta.qmgr_helpers import all_ids, enqueue, make_qmgr, mta_config, run_until


def test_a_reply_in_latin_1_is_stored_and_the_message_deferred(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            if verb == b"RCPT":
                writer.write(b"450 4.2.0 Postfach voll, sp\xe4ter wieder versuchen\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async def main() -> tuple[str, str]:
        server = await asyncio.start_server(serve, "127.0.0.2", 0)
        port = server.sockets[0].getsockname()[1]
        config = mta_config(tmp_path, smtp_port=port, smtp_connect_timeout=2.0, min_backoff=3600.0)
        queue = Queue(tmp_path / "queue")
        qid = enqueue(queue, "bob@[127.0.0.2]")
        qmgr = make_qmgr(config, queue)
        async with server:
            await run_until(qmgr, lambda: qid in queue.ids("deferred"))
        [rcpt] = queue.load(qid)[0].rcpts
        return rcpt.last_error, " ".join(all_ids(queue))

    last_error, ids = asyncio.run(main())
    assert "Postfach voll, sp\ufffdter wieder versuchen" in last_error, last_error
    assert ids  # still queued, deferred for a later attempt
