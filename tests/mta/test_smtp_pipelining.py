"""ESMTP PIPELINING (RFC 2920) in the SMTP client, against real servers: Postfix's smtp-sink
(which advertises it, unless -p, -f or -r), and aiosmtpd made to advertise it with recipients
refused one by one. What the client writes is recorded at the StreamWriter, so a test sees
which commands went out together."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.mta.smtp_client import SmtpOptions, send
from tests._servers import free_port, greeting, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary
from tests.mta.qmgr_helpers import MESSAGE
from tests.mta.smtp_sink import Sink
from tests.mta.smtp_sink import free_port as free_port_on

RCPTS = ["a@example.net", "b@example.net", "c@example.net"]
StartSink = Callable[..., int]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every StreamWriter.write of this process (the client's: the servers are not asyncio streams)."""
    written: list[bytes] = []
    original = asyncio.StreamWriter.write

    def write(self: asyncio.StreamWriter, data: bytes | bytearray | memoryview) -> None:
        written.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", write)
    return written


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[StartSink]:
    """A factory: ``smtp_sink(*options)`` starts Postfix's smtp-sink on loopback, returns its port."""
    binary = need_binary("smtp-sink")
    procs = []

    def start(*options: str) -> int:
        port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        log = tmp_path / f"sink-{port}.log"
        proc = spawn([binary, *user, *options, f"127.0.0.1:{port}", "16"], log)
        procs.append(proc)
        wait_until(
            lambda: greeting("127.0.0.1", port).startswith(b"220"), proc, name="smtp-sink",
            waiting_for=f"answer on {port}", log=lambda: log.read_text(errors="replace"),
        )  # fmt: skip
        return port

    yield start
    for proc in procs:
        stop_process(proc)


def _options(port: int) -> SmtpOptions:
    return SmtpOptions(helo_name="relay.example.org", port=port, connect_timeout=5, timeout=5, data_timeout=5)


def _send(address: str, port: int, recipients: list[str]) -> dict[str, tuple[int, str, bool]]:
    result = asyncio.run(send(address, _options(port), sender="alice@example.org", recipients=recipients, data=MESSAGE))
    return {r: (reply.code, reply.status, reply.local) for r, reply in result.replies.items()}


def _commands(writes: list[bytes]) -> list[list[str]]:
    """Each write's command verbs (the message itself shows as "<message>")."""
    out = []
    for data in writes:
        if data.startswith((b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT", b"HELO", b"RSET")):
            out.append([line.split(b" ")[0].split(b":")[0].decode() for line in data.split(b"\r\n") if line])
        else:
            out.append(["<message>"])
    return out


def test_mail_and_every_rcpt_go_out_in_one_write_when_pipelining_is_offered(
    smtp_sink: StartSink, writes: list[bytes]
) -> None:
    port = smtp_sink()
    assert _send("127.0.0.1", port, RCPTS) == {r: (250, "2.0.0", False) for r in RCPTS}
    assert _commands(writes) == [["EHLO"], ["MAIL", "RCPT", "RCPT", "RCPT"], ["DATA"], ["<message>"], ["QUIT"]]


def test_one_command_a_write_without_pipelining(smtp_sink: StartSink, writes: list[bytes]) -> None:
    port = smtp_sink("-p")
    assert _send("127.0.0.1", port, RCPTS) == {r: (250, "2.0.0", False) for r in RCPTS}
    assert _commands(writes) == [
        ["EHLO"], ["MAIL"], ["RCPT"], ["RCPT"], ["RCPT"], ["DATA"], ["<message>"], ["QUIT"],
    ]  # fmt: skip


def test_every_recipient_refused_means_no_data_then_quit(smtp_sink: StartSink, writes: list[bytes]) -> None:
    port = smtp_sink("-f", "RCPT")  # -f implies no PIPELINING
    got = _send("127.0.0.1", port, RCPTS)
    assert set(got) == set(RCPTS) and {code for code, _, _ in got.values()} == {500}  # smtp-sink's -f reply
    assert _commands(writes)[-1] == ["QUIT"] and ["DATA"] not in _commands(writes)


def test_mail_refused_without_pipelining(smtp_sink: StartSink, writes: list[bytes]) -> None:
    port = smtp_sink("-r", "MAIL")  # -r implies no PIPELINING
    got = _send("127.0.0.1", port, RCPTS)
    assert {v[0] for v in got.values()} == {450} and _commands(writes)[-2:] == [["MAIL"], ["QUIT"]]


def test_server_closing_with_421_mid_pipeline_defers_everyone(smtp_sink: StartSink, writes: list[bytes]) -> None:
    port = smtp_sink("-Q", "RCPT")  # 421 and hang up at the first RCPT; PIPELINING still offered
    got = _send("127.0.0.1", port, RCPTS)
    assert set(got) == set(RCPTS) and all(code == 421 for code, _, _ in got.values())
    assert _commands(writes) == [["EHLO"], ["MAIL", "RCPT", "RCPT", "RCPT"]]  # no DATA, no QUIT to a closed peer


def test_some_recipients_refused_within_a_pipeline_keep_exact_replies(writes: list[bytes]) -> None:
    async def scenario() -> None:
        port = free_port_on("127.0.0.2")
        sink = await Sink("127.0.0.2", port, pipelining=True).start()
        rcpts = ["ok@example.net", "temp@example.net", "no@example.net", "ok2@example.net"]
        try:
            result = await send("127.0.0.2", _options(port), sender="a@example.org", recipients=rcpts, data=MESSAGE)
            refused = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["no@x.net", "temp@x.net"], data=MESSAGE
            )
            mail_refused = await send(
                "127.0.0.2", _options(port), sender="refuse@example.org", recipients=["ok@x.net"], data=MESSAGE
            )
        finally:
            await sink.stop()
        assert {r: (v.code, v.status) for r, v in result.replies.items()} == {
            "ok@example.net": (250, "2.0.0"),
            "temp@example.net": (450, "4.2.1"),
            "no@example.net": (550, "5.1.1"),
            "ok2@example.net": (250, "2.0.0"),
        }
        assert {r: v.code for r, v in refused.replies.items()} == {"no@x.net": 550, "temp@x.net": 450}
        # MAIL refused: the RCPTs sent with it are answered 503, and every recipient gets the refusal
        replies = set(mail_refused.replies.values())
        assert len(replies) == 1 and str(replies.pop()) == "550 5.7.1 sender refused (in reply to MAIL FROM)"
        [got] = sink.messages  # neither of the others reached DATA
        ours = [c for c in _commands(writes) if c != ["<message>"]]  # the server's replies are written here too
        assert ["MAIL", "RCPT", "RCPT", "RCPT", "RCPT"] in ours and ["MAIL", "RCPT"] in ours
        assert got.rcpt_tos == ["ok@example.net", "ok2@example.net"] and got.data == MESSAGE

    asyncio.run(scenario())


def test_sender_refused_then_closed_keeps_the_refusal() -> None:
    # A pipelining server that refuses the sender and hangs up before answering the RCPTs: the
    # recipients get its 550 (a bounce), not a 451 for the lost connection (a retry until expiry).
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-sink\r\n250 PIPELINING\r\n")
        await reader.readline()  # MAIL FROM
        writer.write(b"550 5.7.1 sender refused\r\n")
        await writer.drain()
        writer.close()

    async def main() -> dict[str, tuple[int, str, bool]]:
        server = await asyncio.start_server(serve, "127.0.0.2", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["b@y.net"], data=MESSAGE
            )
        return {r: (x.code, x.text, x.local) for r, x in result.replies.items()}

    assert asyncio.run(main()) == {"b@y.net": (550, "5.7.1 sender refused (in reply to MAIL FROM)", False)}
