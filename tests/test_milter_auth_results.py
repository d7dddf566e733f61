"""Authentication-Results fields that arrive claiming our authserv-id (RFC 8601 §5): a real
`filterd daemon` with the auth check on (DNS from the local knotd fixture), driven by the
project's own MTA-side milter client and by a spamd PROCESS request.

What the sender wrote under our id goes; fields of other authserv-ids stay; ours is added.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.utils import formatdate

import pytest

from filterd.mta.milter_client import MessageEdits, Verdict, apply_edits, split_headers
from filterd.protocols.milter import AddHeader, ChangeHeader
from tests.daemon_fixture import Daemon, start_daemon
from tests.daemon_fixture import through_milter as milter_transaction
from tests.dns_fixture import MakeDnsServer

pytest_plugins = ["tests.dns_fixture"]

OURS = "mx.local.test"
CLIENT = "11.22.33.44"  # routable: documentation ranges are never looked up
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
FORGED = (
    b"Authentication-Results: mx.local.test; dkim=pass header.d=bank.example; dmarc=pass\r\n"
    b"Authentication-Results: other.example; spf=pass smtp.mailfrom=alice@sender.test\r\n"
    b"authentication-results: (looks harmless) MX.Local.Test 1;\r\n\tdmarc=pass header.from=bank.example\r\n"
)


def message(body: bytes = b"Lunch at noon?\r\n", extra: bytes = FORGED) -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\nTo: bob@local.test\r\nSubject: lunch\r\n" + extra
        + b"Message-ID: <1@sender.test>\r\nDate: " + formatdate().encode() + b"\r\n\r\n" + body
    )  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, make_session_dns_server: MakeDnsServer) -> Iterator[Daemon]:
    server = make_session_dns_server({".": [], "sender.test": [f"@ TXT v=spf1 ip4:{CLIENT} -all"]})
    config = (
        "network: {enabled: true}\n"
        f"dns: {{nameservers: ['{server.spec}']}}\n"
        "dnsbl: {enabled: false}\n"
        f"auth: {{authserv_id: {OURS}}}\n"
    )
    d = start_daemon(tmp_path_factory.mktemp("ar"), "--milter-listen", "127.0.0.1:0", config=config, workers=1,
                     metrics=False)  # fmt: skip
    yield d
    assert d.stop() == 0, d.log()


def through_milter(daemon: Daemon, data: bytes) -> tuple[Verdict, MessageEdits]:
    return milter_transaction(daemon, data, client=CLIENT, queue_id="4AR1")


def auth_results(data: bytes) -> list[str]:
    headers, _, _ = split_headers(data)
    return [unfold(value) for name, value, _ in headers if name.lower() == "authentication-results"]


def unfold(value: str) -> str:
    return " ".join(value.split())


def test_milter_deletes_what_claims_our_id_and_adds_ours(daemon: Daemon) -> None:
    verdict, edits = through_milter(daemon, message())
    assert verdict.kind == "continue", daemon.log()[-3000:]
    deleted = [e for e in edits.headers if isinstance(e, ChangeHeader) and e.name.lower() == "authentication-results"]
    # Occurrences 1 and 3 of the name claim our id; the last goes first so that 1 stays 1.
    assert deleted == [ChangeHeader(3, "Authentication-Results", ""), ChangeHeader(1, "Authentication-Results", "")]
    added = [unfold(e.value) for e in edits.headers if isinstance(e, AddHeader) and e.name == "Authentication-Results"]
    assert len(added) == 1 and added[0].startswith(f"{OURS}; spf=pass smtp.mailfrom=alice@sender.test"), added
    # The message as the MTA queues it: the other authserv-id's field, then ours.
    delivered = auth_results(apply_edits(message(), edits, leadspc=False))
    assert delivered == ["other.example; spf=pass smtp.mailfrom=alice@sender.test", added[0]]


def test_milter_sends_no_edits_with_a_refusal(daemon: Daemon) -> None:
    verdict, edits = through_milter(daemon, message(GTUBE + b"\r\n"))
    assert verdict.kind == "reject" and edits.headers == []


def test_spamd_process_drops_them_from_the_rewritten_message(daemon: Daemon) -> None:
    data = message()
    request = (
        b"PROCESS SPAMC/1.5\r\nContent-length: %d\r\nIP: %s\r\nHelo: mail.sender.test\r\n"
        b"From: <alice@sender.test>\r\n\r\n" % (len(data), CLIENT.encode())
    ) + data
    reply = daemon.request(request)
    assert reply.startswith(b"SPAMD/1.1 0 EX_OK\r\n"), reply
    out = reply.partition(b"\r\n\r\n")[2]
    found = auth_results(out)
    assert len(found) == 2, found
    assert found[0].startswith(f"{OURS}; spf=pass smtp.mailfrom=alice@sender.test"), found
    assert found[1] == "other.example; spf=pass smtp.mailfrom=alice@sender.test"
    assert b"bank.example" not in out.partition(b"\r\n\r\n")[0]
    # The scan itself read the message as it came: the rest of the header block is intact.
    assert re.search(rb"\r\nMessage-ID: <1@sender\.test>\r\n", out)


def test_unscanned_oversize_message_loses_them_too(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Auth checks off (no network), the message past max_size and accepted unscanned, the forged
    # fields after the point where the milter stopped collecting headers: they go all the same.
    config = f"milter: {{max_size: 1024, oversize: accept}}\nauth: {{authserv_id: {OURS}}}\n"
    d = start_daemon(tmp_path_factory.mktemp("oversize"), "--milter-listen", "127.0.0.1:0", config=config,
                     workers=1, metrics=False)  # fmt: skip
    try:
        data = message(extra=b"X-Pad: " + b"x" * 2000 + b"\r\n" + FORGED)
        verdict, edits = through_milter(d, data)
        assert verdict.kind == "continue", d.log()[-3000:]
        assert AddHeader("X-Filterd-Skipped", "message larger than 1024 bytes, not scanned") in edits.headers
        assert auth_results(apply_edits(data, edits, leadspc=False)) == [
            "other.example; spf=pass smtp.mailfrom=alice@sender.test"
        ]
    finally:
        assert d.stop() == 0, d.log()
