"""A client that pipes an mbox file sends its `From ` separator line first: it becomes an
X-Mailbox-Line header (as Postfix keeps it), so the headers stay headers for the filter."""

from __future__ import annotations

from filterd.mta.smtpd import _mailbox_line_to_header


def test_mbox_separator_becomes_a_header() -> None:
    data = b"From alice@example.net Mon Jan  5 10:00:00 2026\r\nSubject: hi\r\n\r\nbody\r\n"
    assert _mailbox_line_to_header(data) == (
        b"X-Mailbox-Line: From alice@example.net Mon Jan  5 10:00:00 2026\r\nSubject: hi\r\n\r\nbody\r\n"
    )


def test_ordinary_messages_are_untouched() -> None:
    for data in (b"From: alice@example.net\r\n\r\nx\r\n", b"Subject: From here\r\n\r\nFrom there\r\n", b""):
        assert _mailbox_line_to_header(data) == data
