"""Pre-queue filtering: `filterd mta --filter` against a real `filterd daemon --milter-listen`."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.config import default_config
from filterd.mta.queue import STATES, Queue
from filterd.mta.smtpd import SmtpServer
from filterd.protocols.milter import (
    ALL_ACTIONS,
    Accept,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    Continue,
    DeleteRecipient,
    Discard,
    EndOfMessage,
    Event,
    Header,
    InsertHeader,
    Negotiate,
    ProtocolFlag,
    Quarantine,
    Reply,
    ReplyCode,
    Shutdown,
    Tempfail,
)
from filterd.protocols.milter import Data as MilterData
from filterd.protocols.milter import MailFrom as MilterMailFrom
from filterd.protocols.milter import RcptTo as MilterRcptTo
from tests._servers import free_port
from tests.daemon_fixture import Daemon, milter_daemon, need_binary
from tests.mta.milter_helpers import Script, serve_filter
from tests.mta.mta_fixture import Mta, start_mta

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from milter_daemon(tmp_path_factory.mktemp("daemon"))


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, daemon: Daemon) -> Iterator[Mta]:
    port = daemon.milter_port()
    m = start_mta(
        tmp_path_factory.mktemp("mta"), "--filter", f"127.0.0.1:{port}", config="mta: {milter_timeout: 30s}\n"
    )
    yield m
    assert m.stop() == 0, m.log()


def swaks(mta: Mta, *args: str) -> tuple[int, str]:
    cmd = [need_binary("swaks"), "--server", f"{mta.host}:{mta.port}", "--helo", "client.example",
           "--from", "alice@example.org", "--to", "bob@localhost", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_gtube_is_rejected_before_the_queue(mta: Mta) -> None:
    before = mta.queue.ids("incoming")
    rc, out = swaks(mta, "--header", "Subject: test", "--body", f"hello\n{GTUBE}\n")
    assert rc != 0, out
    assert re.search(r"<\*\* +550 5\.7\.1 .*", out), out
    assert mta.queue.ids("incoming") == before
    assert re.search(r"milter reject: ", mta.log()), mta.log()


def test_clean_mail_is_queued_with_the_filter_headers(mta: Mta, daemon: Daemon) -> None:
    rc, out = swaks(mta, "--header", "Subject: lunch on friday?", "--body", "Shall we meet at noon?\n")
    assert rc == 0, out
    qid = re.search(r"queued as (\S+)", out)
    assert qid, out
    envelope, path = mta.queue.load(qid[1])
    data = path.read_bytes()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert data.startswith(b"Received: from client.example (unknown [127.0.0.1])")
    assert re.search(rb"\r\nX-Spam-Status: No, score=-?\d+\.\d+", head), head
    assert b"\n" not in data.replace(b"\r\n", b"")  # header edits keep CRLF line ends
    assert envelope.size == len(data)
    # the daemon saw our queue id (macro i) and the client's address ({client_addr})
    daemon.wait_for_log(re.escape(qid[1]))


@pytest.mark.parametrize("action", ["tempfail", "accept"])
def test_filter_down_applies_milter_default_action(tmp_path: Path, action: str) -> None:
    mta = start_mta(
        tmp_path,
        "--filter",
        f"127.0.0.1:{free_port()}",
        config=f"mta: {{milter_default_action: {action}, milter_connect_timeout: 2s}}\n",
    )
    try:
        rc, out = swaks(mta, "--header", "Subject: hi", "--body", "hello\n")
        if action == "tempfail":
            assert rc != 0 and "451 4.7.1 Service unavailable - try again later" in out, out
            assert mta.queue.ids("incoming") == []
        else:
            assert rc == 0, out
            [(_, data)] = mta.queued()
            assert b"X-Spam-Status" not in data
        assert f"milter_default_action={action}" in mta.log()
    finally:
        assert mta.stop() == 0, mta.log()


# -- each verdict, against a scripted filter (the sans-IO filter side) and an in-process server ----


def run_scripted(
    tmp_path: Path, script: Script, client: Callable[[smtplib.SMTP], object], *, leadspc: bool = False
) -> tuple[object, Queue]:
    wanted = Negotiate(
        actions=ALL_ACTIONS,
        protocol=ProtocolFlag.NOUNKNOWN | (ProtocolFlag.HDR_LEADSPC if leadspc else ProtocolFlag(0)),
    )
    queue = Queue(tmp_path / "queue")
    config = dataclasses.replace(
        default_config().mta, local_domains=("example.net",), hostname="mx.test", mailbox="{state_dir}/mail/{user}/"
    )

    def session(port: int) -> object:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            return client(smtp)

    async def main() -> object:
        milter, address, _ = await serve_filter(script, wanted)
        async with milter:
            server = SmtpServer(dataclasses.replace(config, milter=address), queue)
            [(_, port)] = await server.start(["127.0.0.1:0"])
            try:
                return await asyncio.to_thread(session, port)
            finally:
                await server.close()

    return asyncio.run(main()), queue


def _send(smtp: smtplib.SMTP, rcpts: list[str], body: str = "Subject: hi\r\n\r\nhello\r\n") -> object:
    try:
        return smtp.sendmail("alice@example.org", rcpts, body)
    except smtplib.SMTPException as exc:
        return exc


def test_reject_at_rcpt_refuses_that_recipient_only(tmp_path: Path) -> None:
    def script(event: Event) -> list[Reply]:
        if isinstance(event, MilterRcptTo) and "nobody" in event.recipient:
            return [ReplyCode(550, "No such user", "5.1.1")]
        return [Continue()]

    refused, queue = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net", "nobody@example.net"]))
    assert refused == {"nobody@example.net": (550, b"5.1.1 No such user")}
    [qid] = queue.ids("incoming")
    assert [r.address for r in queue.load(qid)[0].rcpts] == ["bob@example.net"]


def test_discard_answers_250_and_queues_nothing(tmp_path: Path) -> None:
    def script(event: Event) -> list[Reply]:
        return [Discard()] if isinstance(event, EndOfMessage) else [Continue()]

    result, queue = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net"]))
    assert result == {} and all(queue.ids(state) == [] for state in STATES)


def test_quarantine_queues_in_hold(tmp_path: Path) -> None:
    def script(event: Event) -> list[Reply]:
        return [Quarantine("looks like phishing"), Continue()] if isinstance(event, EndOfMessage) else [Continue()]

    _, queue = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net"]))
    [qid] = queue.ids("hold")
    assert queue.load(qid)[0].hold_reason == "looks like phishing" and queue.ids("incoming") == []


def test_tempfail_at_data_holds_for_a_retry_of_data(tmp_path: Path) -> None:
    def script(event: Event) -> list[Reply]:
        return [Tempfail()] if isinstance(event, MilterData) else [Continue()]

    def client(smtp: smtplib.SMTP) -> object:
        smtp.mail("alice@example.org")
        smtp.rcpt("bob@example.net")
        first = smtp.docmd("DATA")
        second = smtp.docmd("DATA")
        return first, second, smtp.docmd("RSET"), smtp.docmd("NOOP")

    result, queue = run_scripted(tmp_path, script, client)
    tempfail = (451, b"4.7.1 Service unavailable - try again later")
    assert result == (tempfail, tempfail, (250, b"2.0.0 Ok"), (250, b"2.0.0 Ok"))


def test_shutdown_closes_with_421(tmp_path: Path) -> None:
    def script(event: Event) -> list[Reply]:
        return [Shutdown()] if isinstance(event, MilterMailFrom) else [Continue()]

    result, _ = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net"]))
    assert isinstance(result, smtplib.SMTPSenderRefused) and result.smtp_code == 421


def test_the_filter_is_not_shown_our_received_header(tmp_path: Path) -> None:
    # As Postfix (milter8.c) and Sendmail: the filter reads the message as the client sent it,
    # so it scores the same behind either MTA; its ChangeHeader indexes count from there.
    seen: list[tuple[str, str]] = []

    def script(event: Event) -> list[Reply]:
        if isinstance(event, Header):
            seen.append((event.name, event.value))
        if not isinstance(event, EndOfMessage):
            return [Continue()]
        return [ChangeHeader(1, "Received", ""), Accept()]

    sent = (
        "Received: from laptop (laptop [192.0.2.20])\r\n\tby smtp.example; Mon, 12 Jan 2026 10:00:00 +0000\r\n"
        "Subject: hi\r\n\r\nhi\r\n"
    )
    _, queue = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net"], sent))
    assert [name for name, _ in seen] == ["Received", "Subject"] and "laptop" in seen[0][1]
    [qid] = queue.ids("incoming")
    data = queue.load(qid)[1].read_bytes()
    assert data.startswith(b"Received: from client.example") and b"laptop" not in data, data


@pytest.mark.parametrize("leadspc", [False, True])
def test_edits_to_headers_and_envelope_are_applied(tmp_path: Path, leadspc: bool) -> None:
    space = " " if leadspc else ""

    def script(event: Event) -> list[Reply]:
        if isinstance(event, Header) and event.name == "Subject":
            assert event.value == f"{space}hi"
        if not isinstance(event, EndOfMessage):
            return [Continue()]
        return [
            InsertHeader(0, "X-First", f"{space}top"),
            ChangeHeader(1, "Subject", f"{space}[SPAM] hi"),
            AddHeader("X-Spam-Status", f"{space}Yes, score=9.0\n\ttests=A,B"),
            AddRecipient("<quarantine@example.net>"),
            AddRecipient("<Quarantine@Example.NET>"),  # a repeat (any case) is kept once
            AddRecipient("<CAROL@example.net>"),  # already a recipient
            DeleteRecipient("<bob@example.net>"),
            ChangeFrom("<bounces@example.org>"),
            Accept(),
        ]

    _, queue = run_scripted(
        tmp_path, script, lambda s: _send(s, ["bob@example.net", "carol@example.net"]), leadspc=leadspc
    )
    [qid] = queue.ids("incoming")
    envelope, path = queue.load(qid)
    assert envelope.mail_from == "bounces@example.org"
    assert [r.address for r in envelope.rcpts] == ["carol@example.net", "quarantine@example.net"]
    data = path.read_bytes()
    assert data.startswith(b"X-First: top\r\nReceived: from client.example")
    assert b"\r\nSubject: [SPAM] hi\r\nX-Spam-Status: Yes, score=9.0\r\n\ttests=A,B\r\n\r\nhello\r\n" in data


def test_the_header_block_is_split_once_per_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hop count, the milter's header events and its edits all read one split of what the client sent.
    from filterd.mta import milter_client, smtpd

    splits: list[bytes] = []
    real = milter_client.split_headers

    def counting(data: bytes) -> milter_client.HeaderSplit:
        splits.append(data)
        return real(data)

    monkeypatch.setattr(milter_client, "split_headers", counting)
    monkeypatch.setattr(smtpd, "split_headers", counting)

    def script(event: Event) -> list[Reply]:
        if not isinstance(event, EndOfMessage):
            return [Continue()]
        return [ChangeHeader(1, "Subject", "[SPAM] hi"), Accept()]

    _, queue = run_scripted(tmp_path, script, lambda s: _send(s, ["bob@example.net"]))
    [qid] = queue.ids("incoming")
    assert b"\r\nSubject: [SPAM] hi\r\n\r\nhello\r\n" in queue.load(qid)[1].read_bytes()
    assert [data for data in splits if b"hello" in data] == [b"Subject: hi\r\n\r\nhello\r\n"]
