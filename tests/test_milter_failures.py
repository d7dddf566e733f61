"""What the milter answers when the scan itself fails, or a message is too big to collect: an MTA
must never be left waiting. The MTA side here is raw packets over a socket pair (the byte layout
of shared/reference/protocols.md §2), the engine a stand-in that fails or counts."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from typing import Any

import pytest

from filterd.config import default_config
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.milter_service import MilterService
from filterd.engine.prefs import UserPrefsStore


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", 1 + len(data)) + command + data


CONVERSATION = [
    packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
    packet(b"C", b"mx.example.net\x004" + struct.pack(">H", 4321) + b"192.0.2.10\x00"),
    packet(b"H", b"client.example.net\x00"),
    packet(b"M", b"<alice@example.net>\x00"),
    packet(b"R", b"<bob@example.org>\x00"),
    packet(b"L", b"Subject\x00Lunch\x00"),
    packet(b"N"),
]


class FailingEngine:
    """Enough of an Engine for MilterService; every scan raises."""

    def __init__(self) -> None:
        self.config = default_config()
        self.scans = 0

    def new_scan(self, ctx: Any) -> Any:
        return ctx

    async def finish(self, scan: Any, raw: bytes, *, required_score: float) -> Any:
        self.scans += 1
        raise RuntimeError("the engine broke")


async def converse(
    service: MilterService, body: list[bytes], conversation: list[bytes] = CONVERSATION
) -> list[tuple[bytes, bytes]]:
    """Run one conversation; returns the filter's replies as (command, data)."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    task = asyncio.create_task(service.serve(reader, writer, "test"))
    mta_reader, mta_writer = await asyncio.open_connection(sock=theirs)
    mta_writer.write(b"".join(conversation + [packet(b"B", chunk) for chunk in body] + [packet(b"E")]))
    replies = []
    while True:
        length = struct.unpack(">I", await asyncio.wait_for(mta_reader.readexactly(4), 10))[0]
        data = await mta_reader.readexactly(length)
        replies.append((data[:1], data[1:]))
        if data[:1] in (b"c", b"a", b"r", b"t", b"d", b"y") and len(replies) > len(body) + 1:
            break
    mta_writer.write(packet(b"Q"))
    mta_writer.close()
    await asyncio.wait_for(task, 10)
    writer.close()
    return replies


def service(engine: Any, slots: int = 4, **milter: Any) -> MilterService:
    config = default_config()
    config = dataclasses.replace(config, milter=dataclasses.replace(config.milter, **milter))
    return MilterService(engine, config, WorkerMetrics(), greylist=None, prefs=UserPrefsStore(""),
                         scans=asyncio.Semaphore(slots))  # fmt: skip


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
def test_a_failing_scan_gets_on_error(on_error: str) -> None:
    engine = FailingEngine()
    svc = service(engine, on_error=on_error)
    replies = asyncio.run(converse(svc, [b"Hello\r\n"]))
    assert replies[0][0] == b"O" and replies[1] == (b"c", b"")  # negotiation, then the body chunk
    final = replies[-1]
    if on_error == "tempfail":
        assert final == (b"y", b"451 4.3.0 Temporary failure in the mail filter, try again later\x00")
    else:
        assert replies[-2] == (b"h", b"X-Filterd-Skipped\x00scan failed: RuntimeError\x00") and final == (b"c", b"")
    assert engine.scans == 1
    assert svc.metrics.errors["scan_failed"] == 1
    assert svc.metrics.verdicts == {f"milter:{'tempfailed' if on_error == 'tempfail' else 'accepted'}": 1}


def test_oversize_accept_skips_the_rest_and_does_not_scan() -> None:
    engine = FailingEngine()
    svc = service(engine, max_size=1024, oversize="accept")
    replies = asyncio.run(converse(svc, [b"x" * 1000 + b"\r\n", b"y" * 100 + b"\r\n"]))
    assert replies[1] == (b"c", b"") and replies[2] == (b"s", b"")  # past max_size: SKIP
    assert replies[-2][0] == b"h" and replies[-2][1].startswith(b"X-Filterd-Skipped\x00message larger than 1024")
    assert replies[-1] == (b"c", b"") and engine.scans == 0


def test_busy_worker_accepts_unscanned_without_the_inbound_skipped_header() -> None:
    # Every scan slot taken: on_error accept, our X-Filterd-Skipped; the one the message came
    # with (forged, twice, one spelled in lower case) is deleted first, last occurrence first.
    engine = FailingEngine()
    svc = service(engine, slots=0, on_error="accept")
    forged = [packet(b"L", b"X-Filterd-Skipped\x00scan failed: all is well\x00"),
              packet(b"L", b"x-filterd-skipped\x00again\x00")]  # fmt: skip
    replies = asyncio.run(converse(svc, [b"Hello\r\n"], CONVERSATION[:-1] + forged + CONVERSATION[-1:]))
    assert replies[-4:] == [
        (b"m", b"\x00\x00\x00\x02X-Filterd-Skipped\x00\x00"),
        (b"m", b"\x00\x00\x00\x01X-Filterd-Skipped\x00\x00"),
        (b"h", b"X-Filterd-Skipped\x00all scan slots busy\x00"),
        (b"c", b""),
    ]
    assert engine.scans == 0 and svc.metrics.errors["milter_busy"] == 1
