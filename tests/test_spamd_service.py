"""The spamd service on its own: request bytes in, the reply bytes a worker would write back.

A real engine over small rule files and real per-user settings files; no sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.service import SpamdService
from tests.conftest import MakeEngine
from tests.spamd_helpers import spamd_request

RULES = r"""
OFFER: {body: '/offer/i', describe: an offer, score: 6.0}
HAM_HINT: {body: '/regards/i', describe: polite, score: -0.5, tflags: [nice]}
"""
SPAM = b"Return-Path: <x@example.net>\nFrom: x@example.net\nSubject: An offer\n\nAn offer you cannot refuse.\n"
HAM = b"From: y@example.org\nSubject: hello\n\nKind regards\n"
MBOX_FROM = b"From sender@example.com Mon Jan  1 00:00:00 2024\n"


@pytest.fixture
def service(make_engine: MakeEngine, tmp_path: Path) -> SpamdService:
    engine = make_engine(RULES)
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    for safe in (0, 1, 2):
        (prefs / f"safe{safe}.yaml").write_text(f"report_safe: {safe}\n")
    daemon = dataclasses.replace(engine.config.daemon, user_prefs_dir=str(prefs))
    return SpamdService(engine, dataclasses.replace(engine.config, daemon=daemon), WorkerMetrics())


def body_of(reply: bytes) -> bytes:
    """The reply's body, after checking it is exactly as long as its Content-length says."""
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"SPAMD/1.1 0 EX_OK\r\n"), reply[:200]
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert lengths == [b"Content-length: %d" % len(body)], head
    return body


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_process_and_headers_keep_a_leading_mbox_from_line(service: SpamdService, newline: bytes) -> None:
    separator = MBOX_FROM.replace(b"\n", newline)

    async def exchange(method: str, user: str, message: bytes) -> tuple[bytes, bytes]:
        message = message.replace(b"\n", newline)
        with_line = await service.handle(spamd_request(method, separator + message, user))
        return with_line, await service.handle(spamd_request(method, message, user))

    async def check() -> None:
        for user, message in ((u, m) for u in ("safe0", "safe1", "safe2") for m in (SPAM, HAM)):
            wrapped = message is SPAM and user != "safe0"
            for method in ("PROCESS", "HEADERS"):
                with_line, without = await exchange(method, user, message)
                got, plain = body_of(with_line), body_of(without)
                assert got.startswith(separator) and got.count(b"From sender@") == 1, (user, method)
                if wrapped:  # a new boundary and date each time: compare the start only
                    assert got[len(separator) :].startswith(b"Received: from localhost by "), (user, method)
                    assert b"X-Spam-Flag: YES" + newline in got
                else:
                    assert got == separator + plain, (user, method)
                if method == "HEADERS":
                    assert got.endswith(newline + newline) and got.count(newline + newline) == 1
        for method in ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM"):
            for message in (SPAM, HAM):
                with_line, without = await exchange(method, "safe0", message)
                assert with_line == without, method

    asyncio.run(check())


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_rewritten_message_carries_no_inbound_x_filterd_skipped(service: SpamdService, newline: bytes) -> None:
    # The message was scanned: an X-Filterd-Skipped it came with (forged, or left by a hop that
    # let it through unscanned) must not tell a rule or `filterd deliver` otherwise.
    forged = b"X-Filterd-Skipped: daemon down,\n\tnot scanned\nx-filterd-skipped : again\n"

    async def check() -> None:
        for user, message in ((u, m) for u in ("safe0", "safe1", "safe2") for m in (SPAM, HAM)):
            data = (message.replace(b"\n\n", b"\n" + forged + b"X-Other: kept\n\n", 1)).replace(b"\n", newline)
            for method in ("PROCESS", "HEADERS"):
                out = body_of(await service.handle(spamd_request(method, data, user)))
                top = out.partition(newline + newline)[0].lower()
                assert b"x-filterd-skipped" not in top and b"not scanned" not in top, (user, method, out)
                if message is HAM or user == "safe0":  # not wrapped: the rest of the header block stays
                    assert b"\nx-other: kept" + newline in top + newline and b"subject:" in top, (user, method)

    asyncio.run(check())


OURS = "mx.local.test"
FORGED = (
    b"Authentication-Results: mx.local.test; dkim=pass header.d=bank.example; dmarc=pass\r\n"
    b"Authentication-Results: other.example; spf=pass smtp.mailfrom=alice@sender.test\r\n"
    b"authentication-results: (looks harmless) MX.Local.Test 1;\r\n\tdmarc=pass header.from=bank.example\r\n"
)


@pytest.mark.parametrize("method", ["PROCESS", "HEADERS"])
def test_too_big_to_scan_is_handed_back_without_forged_auth_results(
    make_engine: MakeEngine, tmp_path: Path, method: str
) -> None:
    # Past rules.max_scan_size nothing is scanned and the message goes back as it came, except
    # for the Authentication-Results fields claiming our authserv-id: downstream trusts those
    # whether or not we scanned, so only we may write them (as for a scanned message).
    engine = make_engine(RULES, max_scan_size=1024)
    config = dataclasses.replace(engine.config, auth=dataclasses.replace(engine.config.auth, authserv_id=OURS))
    service = SpamdService(engine, config, WorkerMetrics())
    # (An X-Filterd-Skipped goes back as well: nothing was scanned, and spamc expects its bytes.)
    head = (
        b"From: Alice <alice@sender.test>\r\nTo: bob@local.test\r\nSubject: an offer\r\nX-Spam-Flag: NO\r\n"
        b"X-Filterd-Skipped: an earlier hop's\r\n"
    )
    body = b"\r\n" + b"An offer you cannot refuse.\r\n" * 100
    message = head + FORGED + b"Message-ID: <1@sender.test>\r\n" + body
    assert len(message) > 1024
    reply = asyncio.run(service.handle(spamd_request(method, message, "")))
    assert reply.partition(b"\r\n\r\n")[0].endswith(b"\r\nSpam: False ; 0.0 / 5.0"), reply[:200]
    returned = body_of(reply)
    kept = head + b"Authentication-Results: other.example; spf=pass smtp.mailfrom=alice@sender.test\r\n"
    kept += b"Message-ID: <1@sender.test>\r\n"
    assert returned == (kept + body if method == "PROCESS" else kept + b"\r\n")
    assert service.metrics.errors["too_big"] == 1
