"""X-Spam-* and X-Filterd-Skipped headers a message arrives with, on every milter path that lets
it through.

They are forged or another filter's; delivery rules (Sieve, procmail) believe ours, so only ours
may reach the mailbox, as with spamd and spamass-milter. A message accepted without a scan
(past ``milter.max_size`` with ``oversize: accept``; a scan that fails or outlives
``scan_timeout`` with ``on_error: accept``) carries no X-Spam-* at all, only our X-Filterd-Skipped
saying why: an outsider's ``X-Spam-Status: No`` must not speak for us there either. A scanned
message carries no X-Filterd-Skipped: a forged one must not make rules or the delivery agent
think we let it through unscanned (or that it was, when it was not).

A real `filterd daemon`, driven by the project's own MTA-side milter client; the time-out comes
from a real DNS peer that never answers (a UDP socket nobody reads).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from filterd.mta.milter_client import MessageEdits, Verdict, apply_edits, split_headers
from filterd.protocols.milter import AddHeader, ChangeHeader
from tests.daemon_fixture import Daemon, start_daemon
from tests.daemon_fixture import through_milter as milter_transaction

CLIENT = "11.22.33.44"  # routable: documentation ranges are never looked up
INBOUND = (
    b"X-Spam-Flag: NO\r\n"
    b"X-Spam-Status: No, score=-5.0 required=5.0 tests=ALL_TRUSTED\r\n\tautolearn=ham\r\n"
    b"x-spam-status: No, score=-1.0\r\n"
    b"X-Spam-Level: \r\n"
    b"X-Filterd-Skipped: message larger than 1 bytes, not scanned\r\n"
)
FORGED_AR = b"Authentication-Results: mx.local.test; dmarc=pass header.from=bank.example\r\n"


def message(extra: bytes = INBOUND, body: bytes = b"Lunch at noon?\r\n") -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@local.test\r\nSubject: lunch\r\n" + extra
        + b"Message-ID: <1@sender.test>\r\nDate: " + formatdate().encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def through_milter(daemon: Daemon, data: bytes) -> tuple[Verdict, MessageEdits]:
    return milter_transaction(daemon, data, client=CLIENT, queue_id="4XS1")


def spam_headers(data: bytes) -> list[tuple[str, str]]:
    headers, _, _ = split_headers(data)
    return [(name, " ".join(value.split())) for name, value, _ in headers if name.lower().startswith("x-spam-")]


def skipped(data: bytes) -> list[str]:
    headers, _, _ = split_headers(data)
    return [" ".join(value.split()) for name, value, _ in headers if name.lower() == "x-filterd-skipped"]


def deleted(edits: MessageEdits) -> list[ChangeHeader]:
    return [e for e in edits.headers if isinstance(e, ChangeHeader) and not e.value]


def added(edits: MessageEdits) -> list[tuple[str, str]]:
    return [(e.name, e.value) for e in edits.headers if isinstance(e, AddHeader)]


@pytest.fixture(scope="module")
def oversize_accept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = "milter: {max_size: 1024, oversize: accept}\nauth: {authserv_id: mx.local.test}\n"
    d = start_daemon(tmp_path_factory.mktemp("xs-accept"), "--milter-listen", "127.0.0.1:0", config=config,
                     workers=1, metrics=False)  # fmt: skip
    yield d
    assert d.stop() == 0, d.log()


def test_oversize_accept_deletes_inbound_spam_headers(oversize_accept: Daemon) -> None:
    data = message(body=(b"x" * 60 + b"\r\n") * 20)
    verdict, edits = through_milter(oversize_accept, data)
    assert verdict.kind == "continue", oversize_accept.log()[-3000:]
    # Last occurrence first, so that the indexes of the earlier ones stay right.
    assert deleted(edits) == [
        ChangeHeader(1, "X-Spam-Flag", ""),
        ChangeHeader(2, "X-Spam-Status", ""),
        ChangeHeader(1, "X-Spam-Status", ""),
        ChangeHeader(1, "X-Spam-Level", ""),
        ChangeHeader(1, "X-Filterd-Skipped", ""),
    ]
    assert added(edits) == [("X-Filterd-Skipped", "message larger than 1024 bytes, not scanned")]
    delivered = apply_edits(data, edits, leadspc=False)
    assert spam_headers(delivered) == []
    assert skipped(delivered) == ["message larger than 1024 bytes, not scanned"]  # ours alone
    oversize_accept.wait_for_log(r"milter qid=4XS1 .* verdict=skipped .* truncated")


def test_scanned_message_loses_the_inbound_ones(oversize_accept: Daemon) -> None:
    data = message()  # under max_size: scanned
    verdict, edits = through_milter(oversize_accept, data)
    assert verdict.kind == "continue", oversize_accept.log()[-3000:]
    assert ChangeHeader(1, "X-Filterd-Skipped", "") in deleted(edits)
    delivered = apply_edits(data, edits, leadspc=False)
    assert skipped(delivered) == []
    assert [value for name, value in spam_headers(delivered) if name == "X-Spam-Status"][0].startswith("No, score=")
    assert len(spam_headers(delivered)) == len([n for n, _ in added(edits) if n.startswith("X-Spam-")])


def test_oversize_accept_also_deletes_those_past_the_size_limit(oversize_accept: Daemon) -> None:
    # The milter stops collecting at max_size, but an X-Spam-* field must not hide behind padding.
    data = message(extra=b"X-Pad: " + b"p" * 1100 + b"\r\n" + INBOUND + FORGED_AR)
    verdict, edits = through_milter(oversize_accept, data)
    assert verdict.kind == "continue", oversize_accept.log()[-3000:]
    delivered = apply_edits(data, edits, leadspc=False)
    assert spam_headers(delivered) == []
    assert b"Authentication-Results" not in delivered
    assert b"X-Pad: ppp" in delivered and skipped(delivered) == ["message larger than 1024 bytes, not scanned"]


def test_scanned_oversize_message_loses_those_past_the_size_limit(tmp_path: Path) -> None:
    # oversize: scan - the part collected is scanned and our X-Spam-* are added; the inbound
    # ones past the cut go as well, or the user would see two verdicts, one of them forged.
    config = "milter: {max_size: 1024, oversize: scan}\n"
    d = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", config=config, workers=1, metrics=False)
    try:
        data = message(extra=b"X-Pad: " + b"p" * 1100 + b"\r\n" + INBOUND)
        verdict, edits = through_milter(d, data)
        assert verdict.kind == "continue", d.log()[-3000:]
        ours = [(name, " ".join(value.split())) for name, value in added(edits) if name.startswith("X-Spam-")]
        assert ("X-Spam-Status", "No") not in ours and any(name == "X-Spam-Status" for name, _ in ours), ours
        delivered = apply_edits(data, edits, leadspc=False)
        assert spam_headers(delivered) == ours
        assert skipped(delivered) == []  # it was scanned: the forged one past the cut goes too
    finally:
        assert d.stop() == 0, d.log()


def test_scan_timeout_with_on_error_accept_deletes_inbound_spam_headers(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent_dns:
        silent_dns.bind(("127.0.0.1", 0))
        config = (
            "network: {enabled: true}\n"
            f"dns: {{nameservers: ['127.0.0.1:{silent_dns.getsockname()[1]}'], timeout: 30s}}\n"
            "rules: {scan_deadline: 60s}\n"
            "milter: {on_error: accept, scan_timeout: 1s}\n"
            "auth: {authserv_id: mx.local.test}\n"
        )
        d = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", config=config, workers=1, metrics=False)
        try:
            data = message(extra=INBOUND + FORGED_AR)
            verdict, edits = through_milter(d, data)
            assert verdict.kind == "continue", d.log()[-3000:]
            d.wait_for_log(r"milter on_error=accept \(qid=4XS1\): scan failed: TimeoutError; accepted unscanned")
            assert added(edits) == [("X-Filterd-Skipped", "scan failed: TimeoutError")]
            delivered = apply_edits(data, edits, leadspc=False)
            assert spam_headers(delivered) == []
            assert skipped(delivered) == ["scan failed: TimeoutError"]
            assert b"Authentication-Results" not in delivered  # as before: our authserv-id is ours alone
        finally:
            assert d.stop() == 0, d.log()
