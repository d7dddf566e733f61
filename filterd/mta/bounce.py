"""Delivery status notifications (RFC 3464): the bounce, and the "still trying" warning.

    raw = build_dsn(reporting_mta="mx.example.org", sender="a@example.org", queue_id=qid,
                    arrival=envelope.received_at, original=data, now=time.time(),
                    recipients=[DsnRecipient("b@example.net", "failed", "5.1.1",
                                             "smtp; 550 5.1.1 <b@example.net>: no such user",
                                             remote_mta="mx.example.net")])

The result is a complete message (CRLF lines) of type multipart/report; report-type=
delivery-status with three parts: a text/plain explanation for people, the machine-readable
message/delivery-status (per-message fields, then one block per recipient), and the returned
message's header as text/rfc822-headers (the body is not returned: it may be large, and the
header says which message it was).

It is sent from the null sender ``<>`` so that it can never cause another bounce (RFC 5321
§4.5.5); the queue manager drops, with a log line, anything that would bounce to ``<>``.
``From:`` is MAILER-DAEMON at the reporting host, and ``Auto-Submitted: auto-replied``
(RFC 3834) tells vacation responders to stay quiet.
"""

from __future__ import annotations

__all__ = ["DsnAction", "DsnRecipient", "build_dsn", "header_block", "xtext_address"]

import datetime
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DsnAction = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

_LINE = 78  # fold structured fields near the traditional line length (RFC 5322 §2.1.1)
_MAX_DIAGNOSTIC = 900


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient's block in the report."""

    recipient: str
    action: DsnAction
    status: str  # RFC 3463: "5.1.1"
    diagnostic: str = ""  # "smtp; 550 5.1.1 ..." or "x-unix; ..." (RFC 3464 §2.3.6)
    remote_mta: str = ""  # host name of the server that said it
    last_attempt: float | None = None
    will_retry_until: float | None = None  # for "delayed"
    text: str = ""  # a line for people, in the text/plain part; the diagnostic if empty


def _date(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def header_block(message: bytes) -> bytes:
    """The header section of a message, up to (not including) the empty line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end >= 0:
            return message[: end + len(sep) // 2]
    return message if message.endswith(b"\n") else message + b"\r\n"


def xtext_address(address: str) -> str:
    """An address as a DSN address field value: ``rfc822; a@b`` or RFC 6533's ``utf-8; ...``
    with each non-ASCII character (and the characters that would confuse a parser) as \\x{HEX}."""
    if address.isascii() and address.isprintable():
        return f"rfc822; {address}"
    escaped = "".join(c if c.isascii() and c.isprintable() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


def _to_field(sender: str) -> str:
    """The DSN's To: the sender's address, when it can stand in a header (printable, valid
    Unicode: a milter may have set anything); else the group syntax naming no one (the envelope
    recipient is what delivers it)."""
    if sender.isprintable() and not any("\ud800" <= c <= "\udfff" for c in sender) and "<" not in sender:
        return f"<{sender}>"
    return "undisclosed-recipients:;"


def _clean(text: str, limit: int = _MAX_DIAGNOSTIC) -> str:
    """One line of printable ASCII: diagnostics quote remote servers and command output."""
    text = " ".join(text.split())
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fold(name: str, value: str) -> list[str]:
    """``Name: value`` folded at spaces into lines of about `_LINE` characters."""
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > _LINE and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}"
    lines.append(line)
    return lines


def _human(
    reporting_mta: str, recipients: Sequence[DsnRecipient], delayed: bool, arrival: float, now: float
) -> list[str]:
    if delayed:
        hours = max(0.0, now - arrival) / 3600
        until = max((r.will_retry_until or 0.0) for r in recipients)
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for {hours:.1f} hours.",
            f"It will be retried until {_date(until)}." if until else "It will be retried.",
        ]
    else:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    lines = [*intro, ""]
    for r in recipients:
        why = _clean(r.text or r.diagnostic.partition(";")[2] or r.status)
        lines += _fold(f"<{_clean(r.recipient, 400)}>", why)
    return lines


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    original: bytes,
    recipients: Sequence[DsnRecipient],
    now: float,
) -> bytes:
    """The DSN for ``recipients`` of the message ``original`` from ``sender`` (who receives it)."""
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    delayed = all(r.action == "delayed" for r in recipients)
    # RFC 2046: at most 70 characters; the host name only makes it easier to read.
    boundary = f"{queue_id}.{int(now)}.{secrets.token_hex(4)}/{reporting_mta}"[:70]
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    headers = header_block(original)
    # An 8-bit header block can only travel as 8bit; everything we write ourselves is ASCII but
    # for an internationalised sender's address in To (RFC 6532; the DSN then goes out SMTPUTF8).
    to = _to_field(sender)
    eight_bit = any(b > 127 for b in headers) or not to.isascii()
    cte = "8bit" if eight_bit else "7bit"
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {cte}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *_human(reporting_mta, recipients, delayed, arrival, now),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Filterd-Queue-ID: {queue_id}",
        *_fold("X-Filterd-Sender", xtext_address(sender)),
        f"Arrival-Date: {_date(arrival)}",
    ]
    for r in recipients:
        top += ["", *_fold("Final-Recipient", xtext_address(r.recipient)), f"Action: {r.action}", f"Status: {r.status}"]
        if r.remote_mta:
            top.append(f"Remote-MTA: dns; {_clean(r.remote_mta, 255)}")
        if r.diagnostic:
            kind, _, text = r.diagnostic.partition(";")
            top += _fold("Diagnostic-Code", f"{_clean(kind, 40)}; {_clean(text)}")
        if r.last_attempt is not None:
            top.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until is not None:
            top.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
    top += [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {cte}",
        "",
    ]
    body = "\r\n".join(top).encode("utf-8") + b"\r\n"
    # The returned header keeps its own bytes; only bare LFs become CRLF, as SMTP requires.
    body += re.sub(rb"(?<!\r)\n", b"\r\n", headers)
    body += f"\r\n--{boundary}--\r\n".encode("ascii")
    return body
