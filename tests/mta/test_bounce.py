"""DSNs (RFC 3464) built by filterd.mta.bounce, read back with the standard library's parser."""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils

import pytest

from filterd.mta.bounce import DsnRecipient, build_dsn, header_block, xtext_address
from tests.mta.qmgr_helpers import delivery_status

ORIGINAL = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: the plan\r\n\r\nsecret body text\r\n"
NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def _parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def _dsn(*recipients: DsnRecipient, original: bytes = ORIGINAL, sender: str = "a@example.org") -> bytes:
    return build_dsn(
        reporting_mta="mx.example.org",
        sender=sender,
        queue_id="18C2F3A4B5C6D7-3FA91C",
        arrival=NOW - 3600,
        original=original,
        recipients=recipients or (DsnRecipient("b@example.net", "failed", "5.1.1", "smtp; 550 5.1.1 no such user"),),
        now=NOW,
    )


def test_dsn_is_a_multipart_report_with_three_parts() -> None:
    msg = _parse(
        _dsn(
            DsnRecipient(
                "b@example.net",
                "failed",
                "5.1.1",
                "smtp; 550 5.1.1 <b@example.net>: Recipient address rejected",
                remote_mta="mx.example.net",
                last_attempt=NOW - 5,
            )
        )
    )
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
    assert msg["To"].addresses[0].addr_spec == "a@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mx.example.org>")
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert not msg.defects and all(not p.defects for p in msg.walk())

    per_message, rcpt = delivery_status(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["X-Filterd-Queue-ID"] == "18C2F3A4B5C6D7-3FA91C"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == NOW - 3600
    assert rcpt["Final-Recipient"] == "rfc822; b@example.net"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <b@example.net>: Recipient address rejected"
    assert email.utils.parsedate_to_datetime(rcpt["Last-Attempt-Date"]).timestamp() == NOW - 5

    text = msg.get_body(("plain",))
    assert text is not None
    assert "<b@example.net>: 550 5.1.1 <b@example.net>: Recipient address rejected" in text.get_content()


def test_only_the_original_header_is_returned() -> None:
    raw = _dsn()
    headers = _parse(raw).get_payload()[2]  # type: ignore[index]
    assert isinstance(headers, email.message.Message)
    assert headers.get_payload(decode=True) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"secret body text" not in raw


def test_every_line_ends_in_crlf_and_is_short() -> None:
    long_reason = "smtp; 550 5.7.1 " + "very long explanation " * 60
    raw = _dsn(DsnRecipient("b@example.net", "failed", "5.7.1", long_reason), original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 100
    rcpt = delivery_status(_parse(raw))[1]
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.7.1 very long explanation")
    assert rcpt["Diagnostic-Code"].endswith("...")  # cut, not unbounded


def test_several_recipients_get_one_block_each() -> None:
    msg = _parse(
        _dsn(
            DsnRecipient("b@example.net", "failed", "5.1.1", "smtp; 550 5.1.1 unknown"),
            DsnRecipient("c@example.net", "failed", "5.2.2", "smtp; 552 5.2.2 mailbox full"),
        )
    )
    blocks = delivery_status(msg)
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; b@example.net", "rfc822; c@example.net"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2"]


def test_delay_warning_says_so() -> None:
    raw = _dsn(
        DsnRecipient(
            "b@example.net", "delayed", "4.4.1", "x-filterd; connection refused", will_retry_until=NOW + 86400 * 4
        )
    )
    msg = _parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    rcpt = delivery_status(msg)[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(rcpt["Will-Retry-Until"]).timestamp() == NOW + 86400 * 4
    text = msg.get_body(("plain",))
    assert text is not None and "THIS IS A WARNING ONLY" in text.get_content()


def test_remote_text_is_made_printable_ascii() -> None:
    raw = _dsn(DsnRecipient("b@example.net", "failed", "5.0.0", "smtp; 550 naïve\x00\x1b[31m reply"))
    assert raw.isascii() and b"\x00" not in raw and b"\x1b" not in raw
    assert delivery_status(_parse(raw))[1]["Diagnostic-Code"] == "smtp; 550 na?ve??[31m reply"


def test_eight_bit_original_header_marks_the_dsn_8bit() -> None:
    original = "Subject: Grüße\r\nFrom: a@example.org\r\n\r\nx\r\n".encode()
    raw = _dsn(original=original)
    assert "Subject: Grüße".encode() in raw
    assert b"Content-Transfer-Encoding: 8bit" in raw


def test_non_ascii_addresses_use_utf8_address_type() -> None:
    assert xtext_address("b@example.net") == "rfc822; b@example.net"
    assert xtext_address("jörg@example.net") == "utf-8; j\\x{F6}rg@example.net"
    raw = _dsn(DsnRecipient("jörg@example.net", "failed", "5.1.1", "smtp; 550 no"))
    assert delivery_status(_parse(raw))[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.net"


def test_header_block_stops_at_the_empty_line() -> None:
    assert header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == b"A: 1\r\nB: 2\r\n"
    assert header_block(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\nB: 2\n"
    assert header_block(b"A: 1\r\nB: 2") == b"A: 1\r\nB: 2\r\n"  # no body at all


def test_a_dsn_needs_recipients() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        build_dsn(reporting_mta="h", sender="a@b", queue_id="x", arrival=0, original=b"", recipients=[], now=0)
