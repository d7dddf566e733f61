"""The sans-IO SMTP server: conversations fed whole, a byte at a time and in random splits."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.errors import LocalProtocolError
from filterd.protocols import NEED_DATA, ConnectionClosed, NeedData
from filterd.protocols.smtp_server import (
    MAX_ERRORS,
    AuthCredentials,
    DataCommand,
    Event,
    Helo,
    MailFrom,
    Message,
    MessageRefused,
    Quit,
    RcptTo,
    Reply,
    Reset,
    SmtpServerConnection,
    SmtpState,
    StartTls,
    parse_path,
)

Handler = Callable[[SmtpServerConnection, Event], None]


def accept_all(conn: SmtpServerConnection, event: Event) -> None:
    if isinstance(event, DataCommand):
        conn.send(Reply(354, "End data with <CR><LF>.<CR><LF>"))
    elif isinstance(event, StartTls):
        conn.send(Reply(220, "Ready to start TLS", "2.0.0"))
    elif isinstance(event, AuthCredentials):
        ok = event.password == "secret"
        conn.send(Reply(235, "Authentication successful", "2.7.0") if ok else Reply(535, "Bad", "5.7.8"))
    elif isinstance(event, Helo):
        conn.send(Reply(250, "mx.test"))
    elif isinstance(event, Message):
        conn.send(Reply(250, "Ok: queued as X", "2.0.0"))
    elif conn.pending is not None:
        conn.send(Reply(250, "Ok", "2.0.0"))


def run(
    chunks: list[bytes], handler: Handler = accept_all, **kwargs: object
) -> tuple[bytes, list[Event], SmtpServerConnection]:
    conn = SmtpServerConnection("mx.test", max_message_size=kwargs.pop("max_message_size", 1000), **kwargs)  # type: ignore[arg-type]
    out = [conn.data_to_send()]
    events: list[Event] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while not isinstance(event := conn.next_event(), NeedData):
            events.append(event)
            handler(conn, event)
            if isinstance(event, StartTls) and conn.state is SmtpState.TLS:
                conn.tls_started()
        out.append(conn.data_to_send())
    return b"".join(out), events, conn


def splits(data: bytes) -> list[list[bytes]]:
    rng = random.Random(len(data))
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        ways.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)])
    return ways


def converse(data: bytes, handler: Handler = accept_all, **kwargs: object) -> tuple[bytes, list[Event]]:
    """Run every split of ``data``; they must all give the same bytes and events."""
    results = [run(chunks, handler, **kwargs)[:2] for chunks in splits(data)]
    for other in results[1:]:
        assert other == results[0]
    return results[0]


SESSION = (
    b"EHLO client.example\r\nMAIL FROM:<a@example.org> SIZE=20 BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\n"
    b"RCPT TO:<postmaster>\r\nDATA\r\n"
)


def test_pipelined_session_replies_in_order() -> None:
    out, events = converse(SESSION + b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert out == (
        b"220 mx.test ESMTP filterd\r\n"
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as X\r\n221 2.0.0 Bye\r\n"
    )
    assert events == [
        Helo("client.example", True),
        MailFrom("a@example.org", {"SIZE": "20", "BODY": "8BITMIME"}),
        RcptTo("b@example.net"),
        RcptTo("postmaster"),
        DataCommand(),
        Message(b"Subject: x\r\n\r\n.dot\r\n"),
        Quit("QUIT"),
        ConnectionClosed(),
    ]


def test_cr_before_a_real_end_of_data_refuses_the_message() -> None:
    # CRLF . CRLF is there, so the data ends; the stray CR makes it refused (Postfix once merged CR CR LF)
    out, events = converse(SESSION + b"hello\r\r\n.\r\nQUIT\r\n")
    assert b"550 5.5.2" in out and isinstance(events[-3], MessageRefused)


@pytest.mark.parametrize(
    "attack",
    [
        b"\n.\r\n",  # LF . CRLF
        b"\n.\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
    ],
)
def test_smuggled_end_of_data_is_data_and_the_message_is_refused(attack: bytes) -> None:
    smuggled = b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"
    out, events = converse(SESSION + b"Subject: x\r\n\r\nhello" + attack + smuggled + b".\r\nQUIT\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n550 5.5.2 Error: bare CR or LF in message data"
                        b" (only CRLF ends a line)\r\n221 2.0.0 Bye\r\n")  # fmt: skip
    assert [type(e) for e in events][-3:] == [MessageRefused, Quit, ConnectionClosed]
    assert not any(isinstance(e, MailFrom) and e.address == "ceo@example.org" for e in events)


def test_bare_lf_in_headers_is_refused_too() -> None:
    out, events = converse(SESSION + b"Subject: x\n\nbody\r\n.\r\n")
    assert b"550 5.5.2" in out and isinstance(events[-2], MessageRefused)


def test_message_over_the_limit_is_read_to_its_end_then_refused() -> None:
    body = b"".join(b"line %04d of a long message\r\n" % i for i in range(100))
    out, events = converse(SESSION + body + b".\r\nNOOP\r\n")
    assert out.endswith(b"552 5.3.4 Error: message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n")
    assert isinstance(events[-2], MessageRefused) and events[-2].reason == "size"  # then ConnectionClosed


def test_endless_line_counts_against_the_size_limit() -> None:
    out, events = run([SESSION, b"x" * 200000, b"\r\n.\r\n"])[:2]
    assert out.endswith(b"552 5.3.4 Error: message size exceeds fixed limit\r\n")
    out, events = run([SESSION, b"x" * 70000, b"\r", b"\n.\r\n"], max_message_size=100000)[:2]
    assert isinstance(events[-2], Message) and events[-2].data == b"x" * 70000 + b"\r\n"


def test_size_parameter_over_the_limit() -> None:
    out, _ = converse(b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=1001\r\n")
    assert out.endswith(b"552 5.3.4 Error: message size exceeds fixed limit\r\n")


def test_dot_unstuffing_and_empty_message() -> None:
    _, events = converse(SESSION + b".\r\n")
    assert events[-2] == Message(b"")
    _, events = converse(SESSION + b"..\r\n...x\r\n.\r\n")
    assert events[-2] == Message(b".\r\n..x\r\n")


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        (b"MAIL FROM:<a@example.org>\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"EHLO c\r\nRCPT TO:<b@example.net>\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n", b"503 5.5.1 Error: need RCPT command\r\n"),
        (b"EHLO c\r\nMAIL FROM:a@example.org\r\n", b"501 5.1.7 Error: address must be in angle brackets\r\n"),
        (b"EHLO c\r\nMAIL FROM:<a@example.org> FOO=1\r\n", b"555 5.5.4 Error: unsupported parameter FOO\r\n"),
        (b"EHLO c\r\nMAIL FROM:<\xc3\xa9@example.org>\r\n", b"553 5.6.7 Error: non-ASCII address"),
        (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\n", b"501 5.1.3 Error: the null address is only for the sender\r\n"),
        (b"EHLO c\r\nXYZZY\r\n", b"500 5.5.2 Error: command not recognized\r\n"),
        (b"EHLO c\r\nNOOP\n", b"500 5.5.2 Error: bare CR or LF, or NUL, in command line\r\n"),
        (b"EHLO c\r\nEXPN staff\r\n", b"502 5.5.1 Error: command not implemented\r\n"),
        (b"EHLO c\r\nSTARTTLS\r\n", b"502 5.5.1 Error: command not implemented\r\n"),
        (b"EHLO c\r\nAUTH PLAIN\r\n", b"503 5.5.1 Error: authentication not enabled\r\n"),
        (b"HELO\r\n", b"501 5.5.4 Syntax: HELO hostname\r\n"),
        (
            b"EHLO c\r\n" + b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n",
            b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n",
        ),
    ],
)
def test_errors_answered_by_the_machine(commands: bytes, reply: bytes) -> None:
    out, _ = converse(commands)
    assert reply in out.split(b"250 ENHANCEDSTATUSCODES\r\n")[-1]


def test_rset_ends_the_transaction() -> None:
    out, events = converse(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRSET\r\nRCPT TO:<b@example.net>\r\n")
    assert Reset() in events and out.endswith(b"250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n")


def test_too_many_errors_close_the_connection() -> None:
    out, events = converse(b"BAD\r\n" * (MAX_ERRORS + 5))
    assert out.count(b"500 5.5.2") == MAX_ERRORS and out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n")
    assert events == [Quit("too many errors"), ConnectionClosed()]


def test_starttls_drops_pipelined_plaintext_and_forgets_helo() -> None:
    out, events, conn = run([b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@example.org>\r\n"], tls_available=True)
    assert b"250 STARTTLS\r\n" in out and out.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert events == [Helo("c", True), StartTls(), ConnectionClosed()]
    assert conn.tls_active
    out, events, conn = run([b"EHLO c\r\nSTARTTLS\r\n", b"MAIL FROM:<a@example.org>\r\nEHLO c\r\n"], tls_available=True)
    assert b"503 5.5.1 Error: send HELO/EHLO first\r\n" in out
    assert b"STARTTLS" not in out.rsplit(b"503", 1)[1]


PLAIN = base64.b64encode(b"\0user\0secret")


def test_auth_needs_tls_when_required() -> None:
    out, events = converse(b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n", auth_mechanisms=("PLAIN", "LOGIN"))
    assert b"AUTH" not in out.split(b"\r\n250 ENHANCEDSTATUSCODES")[0]
    assert out.endswith(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
    assert not any(isinstance(e, AuthCredentials) for e in events)


@pytest.mark.parametrize(
    "exchange",
    [
        b"AUTH PLAIN " + PLAIN + b"\r\n",
        b"AUTH PLAIN\r\n" + PLAIN + b"\r\n",
        b"AUTH LOGIN\r\n" + base64.b64encode(b"user") + b"\r\n" + base64.b64encode(b"secret") + b"\r\n",
        b"AUTH LOGIN " + base64.b64encode(b"user") + b"\r\n" + base64.b64encode(b"secret") + b"\r\n",
    ],
)
def test_auth_over_tls(exchange: bytes) -> None:
    out, events = converse(
        b"EHLO c\r\n" + exchange + b"EHLO c\r\n", auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True
    )
    creds = [e for e in events if isinstance(e, AuthCredentials)]
    assert len(creds) == 1 and (creds[0].username, creds[0].password) == ("user", "secret")
    assert b"235 2.7.0 Authentication successful\r\n" in out
    assert out.count(b"AUTH PLAIN LOGIN") == 1  # not offered again once authenticated


def test_auth_failures() -> None:
    out, _ = converse(
        b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN "
        + base64.b64encode(b"\0user\0wrong")
        + b"\r\nNOOP\r\n",
        auth_mechanisms=("PLAIN",),
        tls_active=True,
    )
    tail = out.split(b"250 AUTH PLAIN\r\n")[1]
    assert tail == (
        b"334 \r\n501 5.7.0 Error: authentication cancelled\r\n501 5.5.2 Error: malformed base64 in authentication\r\n"
        b"504 5.5.4 Error: unsupported authentication mechanism\r\n535 5.7.8 Bad\r\n250 2.0.0 Ok\r\n"
    )


def test_failed_auth_counts_as_an_error_and_too_many_close_the_connection() -> None:
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong") + b"\r\n"
    out, events = converse(
        b"EHLO c\r\n" + wrong * (MAX_ERRORS + 2) + b"NOOP\r\n", auth_mechanisms=("PLAIN",), tls_active=True
    )
    tail = out.split(b"250 AUTH PLAIN\r\n")[1]
    assert tail == b"535 5.7.8 Bad\r\n" * MAX_ERRORS + b"421 4.7.0 mx.test Error: too many errors\r\n"
    assert sum(isinstance(e, AuthCredentials) for e in events) == MAX_ERRORS
    assert events[-2:] == [Quit("too many errors"), ConnectionClosed()]
    _, _, conn = run([b"EHLO c\r\n" + wrong * MAX_ERRORS], auth_mechanisms=("PLAIN",), tls_active=True)
    assert conn.state is SmtpState.CLOSED and conn.errors == MAX_ERRORS and not conn.authenticated


def test_successful_auth_is_not_an_error() -> None:
    good = b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
    _, _, conn = run([b"EHLO c\r\n" + good], auth_mechanisms=("PLAIN",), tls_active=True)
    assert conn.errors == 0 and conn.authenticated


def test_rejected_recipients_and_refused_message_keep_the_state_right() -> None:
    def handler(conn: SmtpServerConnection, event: Event) -> None:
        if isinstance(event, RcptTo) and event.address.startswith("no"):
            conn.send(Reply(550, "Relay access denied", "5.7.1"))
        elif isinstance(event, Message):
            conn.send(Reply(550, "Spam", "5.7.1"))
        else:
            accept_all(conn, event)

    out, events = converse(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<no@example.net>\r\nDATA\r\n"
        b"RCPT TO:<yes@example.net>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<a@example.org>\r\n",
        handler=handler,
    )
    assert out.split(b"ENHANCEDSTATUSCODES\r\n")[1] == (
        b"250 2.0.0 Ok\r\n550 5.7.1 Relay access denied\r\n503 5.5.1 Error: need RCPT command\r\n250 2.0.0 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n550 5.7.1 Spam\r\n250 2.0.0 Ok\r\n"
    )


def test_replies_must_match_what_is_pending() -> None:
    conn = SmtpServerConnection("mx.test", max_message_size=1000)
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(250, "Ok"))
    conn.receive_data(b"EHLO c\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), Helo)
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(354, "go"))
    conn.send(Reply(250, "mx.test"))
    assert conn.next_event() is NEED_DATA


def test_parse_path() -> None:
    assert parse_path("FROM:<@relay.example:a@example.org>", "FROM") == ("a@example.org", {})
    assert parse_path('TO: <"john doe"@example.net>', "TO") == ('"john doe"@example.net', {})
    assert parse_path("to:<a@[192.0.2.1]>", "TO") == ("a@[192.0.2.1]", {})
    for bad in ("TO:<a b@example.net>", "TO:<a@>", "TO:<a@example.net>x", "FROM:<a@example.org>"):
        with pytest.raises(ValueError, match="address|angle|space"):
            parse_path(bad, "TO")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_arbitrary_bytes_never_crash(chunks: list[bytes]) -> None:
    # a session that gets as far as DATA, then anything at all
    out, events, _ = run([SESSION, *chunks])
    assert out.startswith(b"220 ")
