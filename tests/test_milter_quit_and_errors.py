"""The milter's end of a connection and its own failures, in raw packets (the byte layout of
shared/reference/protocols.md §2): QUIT closes, QUIT_NC keeps the connection for another client,
and a reply the protocol layer refuses still goes out as a framed packet (a tempfail), never as
bare text that the MTA would read as a packet length."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import smtplib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.config import default_config, load_config
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.milter_service import MilterService
from filterd.engine.engine import Engine
from filterd.engine.prefs import UserPrefsStore
from filterd.errors import ConfigError
from filterd.greylist import Greylist
from filterd.state import open_state_store
from tests.daemon_fixture import Daemon, milter_daemon
from tests.postfix_fixture import start_postfix

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EN_DASH_MESSAGE = "451 4.7.1 Greylisted \u2013 please retry later"


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", 1 + len(data)) + command + data


NEGOTIATE = packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))


def connect(client: bytes) -> bytes:
    return packet(b"C", b"mx.example.net\x004" + struct.pack(">H", 4321) + client + b"\x00")


def read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    """One packet from the filter as (command, data); its length must be that of a real packet."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        return data

    head = exactly(4)
    (length,) = struct.unpack(">I", head)
    assert 1 <= length <= 65536, f"not a milter packet: {head!r}"
    body = exactly(length)
    return body[:1], body[1:]


def read_verdict(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """The replies to end of message: edits, then the final one."""
    replies = [read_packet(sock)]
    while replies[-1][0] not in b"acrtdy":
        replies.append(read_packet(sock))
    return replies


# -- QUIT and QUIT_NC, against a daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from milter_daemon(tmp_path_factory.mktemp("milter_quit"))


def test_quit_closes_and_quit_nc_keeps_the_connection_for_a_new_client(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.milter_port()), timeout=30) as sock:
        sock.sendall(NEGOTIATE)
        assert read_packet(sock)[0] == b"O"
        sock.sendall(connect(b"192.0.2.10") + packet(b"H", b"one.example.net\x00"))
        sock.sendall(packet(b"M", b"<a@example.net>\x00"))
        # QUIT_NC: the MTA keeps the connection and the next CONNECT is another client's session.
        sock.sendall(packet(b"A") + packet(b"K") + connect(b"192.0.2.11") + packet(b"H", b"two.example.net\x00"))
        sock.sendall(
            packet(b"M", b"<b@example.net>\x00")
            + packet(b"R", b"<bob@example.org>\x00")
            + packet(b"L", b"Subject\x00test\x00")
            + packet(b"N")
            + packet(b"B", GTUBE + b"\r\n")
            + packet(b"E")
        )
        assert read_packet(sock) == (b"c", b"")  # the body chunk (SKIP was offered, so chunks are answered)
        verdict = read_verdict(sock)
        assert verdict[-1][0] == b"y" and verdict[-1][1].startswith(b"550 5.7.1 "), verdict  # GTUBE, scanned
        # QUIT: the filter closes its side (it used to keep reading until its idle timeout).
        sock.sendall(packet(b"Q"))
        assert sock.recv(100) == b""
    daemon.wait_for_log(r"client=192\.0\.2\.11 from=<b@example\.net> rcpt=<bob@example\.org> .*verdict=rejected")


# -- greylist.message ----------------------------------------------------------------------------


def test_a_greylist_message_that_is_not_ascii_is_refused_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "filterd.yaml"
    cfg.write_text(f"greylist:\n  enabled: true\n  message: '{EN_DASH_MESSAGE}'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(cfg)
    assert f"{cfg}:3: greylist.message: expected one line of printable ASCII" in str(raised.value)


def test_a_reply_the_protocol_layer_refuses_goes_out_as_a_framed_tempfail(tmp_path: Path) -> None:
    """A greylist.message the milter cannot send (config checks skipped, as a bug would): each
    greylisted RCPT gets a framed 451 4.3.0 and the session goes on in step with the MTA; it used
    to get the text "451 4.3.0 ..." unframed, which an MTA reads as a packet of 0x34353120 bytes
    (Postfix: then milter_default_action for the rest of the session, unscanned)."""
    with (
        serving_milter(tmp_path, EN_DASH_MESSAGE) as (port, metrics),
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
    ):
        sock.sendall(NEGOTIATE)
        replies = [read_packet(sock)]
        sock.sendall(connect(b"192.0.2.10") + packet(b"H", b"c.example.net\x00"))
        sock.sendall(packet(b"M", b"<a@example.net>\x00") + packet(b"R", b"<bob@example.org>\x00"))
        replies.append(read_packet(sock))
        sock.sendall(packet(b"R", b"<carol@example.org>\x00"))  # in step: the next RCPT is answered
        replies.append(read_packet(sock))
        sock.sendall(packet(b"Q"))
        assert sock.recv(100) == b""
    assert replies[0][0] == b"O"
    tempfail = (b"y", b"451 4.3.0 Internal error in the mail filter, try again later\x00")
    assert replies[1:] == [tempfail, tempfail]
    assert metrics.errors["milter_internal"] == 2


@contextlib.contextmanager
def serving_milter(tmp_path: Path, message: str) -> Iterator[tuple[int, WorkerMetrics]]:
    """A MilterService (greylisting on, ``message`` not checked) served on a loopback port from a
    loop in a thread, closing each connection when it ends as the worker does."""
    base = default_config()
    config = dataclasses.replace(
        base,
        network=dataclasses.replace(base.network, enabled=False),
        greylist=dataclasses.replace(base.greylist, enabled=True, message=message),
    )
    engine = Engine.load(config, state_dir=str(tmp_path))
    store = open_state_store(config, tmp_path)
    metrics = WorkerMetrics()
    loop = asyncio.new_event_loop()
    service = MilterService(engine, config, metrics, greylist=Greylist.from_config(config, store),
                            prefs=UserPrefsStore(""), scans=asyncio.Semaphore(4))  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await service.serve(reader, writer, "postfix")
        finally:
            writer.close()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(serve, "127.0.0.1", 0), loop).result(30)
    try:
        yield server.sockets[0].getsockname()[1], metrics
    finally:
        server.close()
        asyncio.run_coroutine_threadsafe(store.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_through_postfix_a_refused_reply_tempfails_the_recipient_not_the_whole_session(tmp_path: Path) -> None:
    """The reviewer's case behind Postfix 3.7 with milter_default_action=accept: the greylisted
    RCPT used to pass and the GTUBE message be delivered unscanned (Postfix read '451 ' as a
    packet length and gave up on the milter); now the RCPT gets 451 4.3.0."""
    with serving_milter(tmp_path, EN_DASH_MESSAGE) as (port, metrics):
        pf = start_postfix(tmp_path / "postfix", services={
            "milter": {"smtpd_milters": f"inet:127.0.0.1:{port}", "milter_default_action": "accept"},
        })  # fmt: skip
        try:
            s = smtplib.SMTP("127.0.0.1", pf.ports["milter"], local_hostname="client.example.net", timeout=60)
            with s:
                s.ehlo()
                code, text = s.docmd("XCLIENT", "ADDR=192.0.2.10 NAME=mail.example.net")
                assert code == 220, (code, text)
                s.ehlo()
                assert s.mail("alice@example.net")[0] == 250
                assert s.rcpt("bob@example.org") == (451, b"4.3.0 Internal error in the mail filter, try again later")
                assert s.rcpt("carol@example.org")[0] == 451  # still in step with the milter
            assert metrics.errors["milter_internal"] == 2
        finally:
            pf.stop()
