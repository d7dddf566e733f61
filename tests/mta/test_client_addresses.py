"""Which addresses the SMTP client sends on: every path our server accepts (quoted local parts
with spaces included) goes out byte-exact, to Postfix's smtp-sink, which records the command
arguments it got; an address that cannot be written in a command (a control character from a
milter's ADDRCPT, say) is a permanent failure of that recipient alone (of every recipient when
it is the sender's), decided before any connection, while the others are delivered."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filterd.mta.delivery import RemoteDelivery
from filterd.mta.qmgr import QueueManager
from filterd.mta.queue import Queue
from filterd.mta.smtp_client import SmtpOptions, send, unsendable
from filterd.net.dns import Resolver
from filterd.protocols import smtp_server
from filterd.protocols.smtp_client import ClientConnection, path_problem
from tests._servers import free_port, greeting, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary
from tests.mta.qmgr_helpers import MESSAGE, all_ids, enqueue, mta_config, run_until
from tests.mta.smtp_sink import Refuser, Sink
from tests.mta.smtp_sink import free_port as free_port_on

# -- which paths can go: the server's grammar against the client's check ------------------------


@given(st.from_regex(smtp_server._MAILBOX, fullmatch=True))
def test_every_mailbox_the_server_accepts_can_be_sent_as_it_is(path: str) -> None:
    for keyword, verb in (("FROM", "MAIL"), ("TO", "RCPT")):
        try:
            accepted, _ = smtp_server.parse_path(f"{keyword}:<{path}>", keyword)
        except ValueError:
            continue  # the regex alone is looser than the server (a '>' in an address literal)
        assert path_problem(accepted) == ""
        conn = ClientConnection()
        conn.receive_data(b"220 hi\r\n")
        conn.next_event()
        line = conn.send(verb, f"{keyword}:<{accepted}>")
        assert smtp_server.parse_path(line[5:-2].decode(), keyword)[0] == accepted


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("ba\td@example.net", "control character U+0009"),
        ("bad\r\nRCPT TO:<x@example.net>", "control character U+000D"),
        ("bad\0@example.net", "control character U+0000"),
        ("bad\x7f@example.net", "control character U+007F"),
        ("bad\x85@example.net", "control character U+0085"),
        (b"bad\xff@example.net".decode("utf-8", "surrogateescape"), "invalid UTF-8 (U+DCFF)"),
        ("john doe@example.net", "space outside a quoted string"),
        ("a@example.net>NOTIFY=NEVER", "'>' outside a quoted string"),
        ("<a@example.net", "'<' outside a quoted string"),
        ('"john doe@example.net', "unterminated quoted string"),
        ('"john\\"@example.net', "unterminated quoted string"),
        ('"john" doe@example.net', "quoted string not followed by @"),
        ('john"doe"@example.net', "'\"' outside a quoted string"),
        ("a@[127.0.0.1>x]", "'>' in an address literal"),
    ],
)
def test_what_cannot_be_written_in_a_command_is_refused_with_the_reason(address: str, problem: str) -> None:
    assert path_problem(address) == problem
    assert unsendable("a@example.org", [address, "ok@example.net"]) == {
        address: unsendable("a@example.org", [address])[address]
    }
    [reply] = unsendable("a@example.org", [address]).values()
    assert (reply.code, reply.status, reply.local) == (501, "5.1.3", True) and problem in reply.text
    assert {r: reply.status for r, reply in unsendable(address, ["x@example.net", "y@example.net"]).items()} == {
        "x@example.net": "5.1.7",
        "y@example.net": "5.1.7",
    }


# -- byte-exact on the wire: Postfix's smtp-sink records the arguments of MAIL and RCPT ----------

DumpedSink = tuple[int, Callable[[], list[bytes]]]


@pytest.fixture
def dumping_sink(tmp_path: Path) -> Iterator[DumpedSink]:
    """smtp-sink on loopback, dumping each transaction (X-Mail-Args:, X-Rcpt-Args: lines with the
    arguments as received, then the message) to a file: its port and a reader of the dumps."""
    binary = need_binary("smtp-sink")
    # smtp-sink runs as the postfix user, which cannot enter pytest's 0700 directories.
    root = Path(tempfile.mkdtemp(prefix="filterd-sink-"))
    root.chmod(0o711)
    dumps = root / "dumps"
    dumps.mkdir()
    user = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postfix")
        os.chown(dumps, owner.pw_uid, owner.pw_gid)
        user = ["-u", "postfix"]
    port = free_port()
    log = tmp_path / "sink.log"
    proc = spawn([binary, *user, "-d", f"{dumps}/%H%M%S.", f"127.0.0.1:{port}", "16"], log)
    try:
        wait_until(
            lambda: greeting("127.0.0.1", port).startswith(b"220"), proc, name="smtp-sink",
            waiting_for=f"answer on {port}", log=lambda: log.read_text(errors="replace"),
        )  # fmt: skip

        def read() -> list[bytes]:
            return [p.read_bytes() for p in sorted(dumps.iterdir())]

        yield port, read
    finally:
        stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)


def _dumped(read: Callable[[], list[bytes]]) -> bytes:
    """The one transaction dumped, once complete (smtp-sink ends a dump with an empty line)."""
    for _ in range(400):
        found = read()
        if found and found[0].endswith(b"\n\n"):
            [dump] = found
            return dump
        time.sleep(0.05)
    raise AssertionError(f"smtp-sink dumped nothing complete: {read()!r}")


def _args(dump: bytes, field: bytes) -> list[bytes]:
    return re.findall(rb"^" + field + rb": (.*)$", dump, re.MULTILINE)


def _options(port: int) -> SmtpOptions:
    return SmtpOptions(helo_name="relay.example.org", port=port, connect_timeout=5, timeout=5, data_timeout=5)


QUOTED = ['"john doe"@example.net', '"a <b> c"@example.net', '"say \\"hi\\" \\\\ bye"@[127.0.0.1]']


def test_quoted_recipients_arrive_byte_exact(dumping_sink: DumpedSink) -> None:
    port, read = dumping_sink
    rcpts = [*QUOTED, "plain@example.net"]
    for rcpt in rcpts:  # what our server takes in, the client sends on
        assert smtp_server.parse_path(f"TO:<{rcpt}>", "TO")[0] == rcpt
    result = asyncio.run(send("127.0.0.1", _options(port), sender="a@example.org", recipients=rcpts, data=MESSAGE))
    assert {r: (reply.code, reply.local) for r, reply in result.replies.items()} == dict.fromkeys(rcpts, (250, False))
    dump = _dumped(read)
    assert _args(dump, b"X-Rcpt-Args") == [f"<{r}>".encode() for r in rcpts]
    assert _args(dump, b"X-Mail-Args") == [b"<a@example.org>"]


def test_a_quoted_sender_arrives_byte_exact(dumping_sink: DumpedSink) -> None:
    port, read = dumping_sink
    sender = '"john doe"@example.org'
    assert smtp_server.parse_path(f"FROM:<{sender}>", "FROM")[0] == sender
    result = asyncio.run(send("127.0.0.1", _options(port), sender=sender, recipients=["b@example.net"], data=MESSAGE))
    assert result.replies["b@example.net"].code == 250
    dump = _dumped(read)
    assert _args(dump, b"X-Mail-Args") == [b'<"john doe"@example.org>']
    assert _args(dump, b"X-Rcpt-Args") == [b"<b@example.net>"]


# -- an address that can never be sent: that recipient fails for good, the others go ------------


def test_send_refuses_a_bad_recipient_alone_and_sends_the_others(dumping_sink: DumpedSink) -> None:
    port, read = dumping_sink
    rcpts = ["ok@example.net", "ba\td@example.net", '"john doe"@example.net']
    result = asyncio.run(send("127.0.0.1", _options(port), sender="a@example.org", recipients=rcpts, data=MESSAGE))
    bad = result.replies["ba\td@example.net"]
    assert (bad.code, bad.status, bad.local) == (501, "5.1.3", True)
    assert bad.text == "5.1.3 bad recipient address syntax: control character U+0009"
    assert result.replies["ok@example.net"].code == result.replies['"john doe"@example.net'].code == 250
    assert _args(_dumped(read), b"X-Rcpt-Args") == [b"<ok@example.net>", b'<"john doe"@example.net>']


def test_send_does_not_connect_when_nothing_can_go() -> None:
    async def scenario() -> None:
        port = free_port_on("127.0.0.2")
        refuser = await Refuser("127.0.0.2", port).start()  # a connection would make it a 421
        try:
            bad_sender = await send(
                "127.0.0.2", _options(port), sender="ali\nce@example.org", recipients=["a@x.net", "b@x.net"],
                data=MESSAGE,
            )  # fmt: skip
            bad_rcpt = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["b\0@x.net"], data=MESSAGE
            )
        finally:
            await refuser.stop()
        assert {r: str(reply) for r, reply in bad_sender.replies.items()} == dict.fromkeys(
            ["a@x.net", "b@x.net"], "501 5.1.7 bad sender address syntax: control character U+000A"
        )
        assert str(bad_rcpt.replies["b\0@x.net"]) == "501 5.1.3 bad recipient address syntax: control character U+0000"
        assert refuser.connections == 0

    asyncio.run(scenario())


# -- remote delivery: decided before the MX lookup, and through the queue ------------------------


def test_remote_delivery_delivers_the_others_and_bounces_the_bad_recipient(tmp_path: Path) -> None:
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    rcpts = ["ok@[127.0.0.2]", "ba\td@[127.0.0.2]", '"john doe"@[127.0.0.2]']

    async def scenario() -> None:
        port = free_port_on("127.0.0.2")
        config = mta_config(tmp_path, smtp_port=port, smtp_connect_timeout=2.0)
        sink = await Sink("127.0.0.2", port, pipelining=True).start()
        remote = RemoteDelivery(config, Resolver(config.dns), hostname="relay.example.org")
        try:
            results = await remote.deliver("QID", "alice@example.org", "[127.0.0.2]", rcpts, data)
        finally:
            await sink.stop()
        assert [r.recipient for r in results] == rcpts
        by = {r.recipient: r for r in results}
        assert by["ok@[127.0.0.2]"].outcome == by['"john doe"@[127.0.0.2]'].outcome == "delivered"
        bad = by["ba\td@[127.0.0.2]"]
        assert (bad.outcome, bad.status, bad.reply_code) == ("bounced", "5.1.3", 0)
        assert bad.detail == "501 5.1.3 bad recipient address syntax: control character U+0009"
        assert bad.diagnostic == f"x-filterd; {bad.detail}"
        [got] = sink.messages
        assert got.rcpt_tos == ["ok@[127.0.0.2]", '"john doe"@[127.0.0.2]']

    asyncio.run(scenario())


def test_remote_delivery_decides_before_the_mx_lookup(tmp_path: Path) -> None:
    """With no DNS server answering, the good recipient waits for DNS (deferred); the bad one
    and a bad sender's recipients are failed for good at once, not held up by the lookup."""
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    config = mta_config(tmp_path)  # its resolver asks 127.0.0.1:9, where nothing answers
    remote = RemoteDelivery(config, Resolver(config.dns), hostname="relay.example.org")
    rcpts = ["ok@example.net", "ba\td@example.net"]
    results = asyncio.run(remote.deliver("QID", "alice@example.org", "example.net", rcpts, data))
    assert [(r.recipient, r.outcome, r.status[:2]) for r in results] == [
        ("ok@example.net", "deferred", "4."),
        ("ba\td@example.net", "bounced", "5."),
    ]
    assert results[1].status == "5.1.3" and "control character U+0009" in results[1].detail
    results = asyncio.run(remote.deliver("QID", "ali\rce@example.org", "example.net", rcpts, data))
    assert [(r.recipient, r.status) for r in results] == [("ok@example.net", "5.1.7"), ("ba\td@example.net", "5.1.7")]
    assert results[0].detail == "501 5.1.7 bad sender address syntax: control character U+000D"


def test_through_the_queue_the_good_recipient_is_delivered_and_the_bad_one_bounced_at_once(tmp_path: Path) -> None:
    """A milter's ADDRCPT with a TAB used to make the whole transaction 4.3.0, retried until
    both recipients bounced days later; now one attempt delivers one and bounces the other
    (the next attempt would be a minute away)."""

    async def scenario() -> None:
        port = free_port_on("127.0.0.2")
        config = mta_config(tmp_path, smtp_port=port, smtp_connect_timeout=2.0, min_backoff=60.0, max_backoff=60.0)
        queue = Queue(config.state_path / "queue")
        out = tmp_path / "out"
        sink = await Sink("127.0.0.2", port).start()
        qid = enqueue(queue, "ok@[127.0.0.2]", "ba\td@[127.0.0.2]")  # the sender, alice, is local
        qmgr = QueueManager(config, queue, Resolver(config.dns), poll_interval=0.05)
        try:
            await run_until(qmgr, lambda: not all_ids(queue) and (out / "alice@example.org.1").exists())
        finally:
            await sink.stop()
        assert (qmgr.stats.delivered, qmgr.stats.bounced, qmgr.stats.dsns) == (2, 1, 1)  # ok, the DSN; bad
        [got] = sink.messages
        assert got.rcpt_tos == ["ok@[127.0.0.2]"]
        dsn = (out / "alice@example.org.1").read_bytes()
        assert f"X-Filterd-Queue-ID: {qid}".encode() in dsn
        assert b"Final-Recipient: utf-8; ba\\x{9}d@[127.0.0.2]" in dsn and b"Status: 5.1.3" in dsn
        reason = b"Diagnostic-Code: x-filterd; 501 5.1.3 bad recipient address syntax: control character U+0009"
        assert reason in b" ".join(dsn.split())  # unfolded
        assert b"ok@[127.0.0.2]" not in dsn.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]

    asyncio.run(scenario())
