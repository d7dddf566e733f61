"""SMTP (RFC 5321), server side, sans-IO: bytes in, events out, replies back.

Usage (the socket loop belongs to filterd.mta.smtpd)::

    conn = SmtpServerConnection("mx.example.org", max_message_size=10 << 20, tls_available=True)
    writer.write(conn.data_to_send())                       # the 220 greeting
    while not conn.closed:
        conn.receive_data(await reader.read(65536))         # b"" once the client closed
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, MailFrom):
                conn.send(Reply(250, "Ok", "2.1.0"))
            elif isinstance(event, Message):
                conn.send(Reply(250, f"Ok: queued as {qid}", "2.0.0"))
            elif conn.pending is not None:
                conn.send(Reply(250, "Ok", "2.0.0"))
            ...
        writer.write(conn.data_to_send())

Why our own machine rather than aiosmtpd: aiosmtpd is an asyncio server whose protocol tests
need a loop and a transport (STYLE.md §2), and its DATA reader has already needed a security
fix for what ends DATA (CVE-2024-27305, aiosmtpd < 1.4.5). Here the rules are in one place and
tested byte by byte, split anyhow:

* Only CRLF "." CRLF ends DATA. A bare LF or bare CR anywhere in the data is never a line end:
  the message is read to the real end, then refused with ``550 5.5.2`` (SMTP smuggling: the
  bytes after a ``LF . CRLF`` never become commands). Dot-unstuffing happens here.
* Command lines must end with CRLF too (``500 5.5.2`` otherwise) and are capped at
  `MAX_COMMAND_LINE` bytes (AUTH responses at `MAX_AUTH_LINE`); DATA is capped at
  ``max_message_size`` while it arrives: past it the rest is read and dropped, then
  ``552 5.3.4``.
* Commands that need no decision (NOOP, RSET, HELP, VRFY, QUIT, syntax and sequence errors,
  SIZE over the limit, AUTH decoding) are answered here, in order with the others, so
  PIPELINING keeps replies in step. After `MAX_ERRORS` error replies (failed AUTH answers
  sent with ``send()`` included) the connection gets ``421 4.7.0`` and is closed.
* ``next_event()`` refuses (LocalProtocolError) while ``pending`` waits for its reply; ``send()``
  refuses when nothing waits. Events needing a reply: Helo, StartTls, AuthCredentials,
  MailFrom, RcptTo, DataCommand, Message. Reset, MessageRefused and Quit need none.
* STARTTLS: a 220 reply drops every byte buffered after the command (RFC 3207 §4.2: no
  plaintext may be carried into the TLS session) and stops reading until `tls_started()`,
  which forgets the HELO as the RFC asks.

The EHLO reply's extension lines (PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, STARTTLS
while not under TLS, AUTH when allowed) are added here to the 250 the caller sends for Helo.
"""

from __future__ import annotations

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_ERRORS",
    "NEED_DATA",
    "AuthCredentials",
    "ConnectionClosed",
    "DataCommand",
    "Event",
    "Helo",
    "MailFrom",
    "Message",
    "MessageRefused",
    "NeedData",
    "Quit",
    "RcptTo",
    "Reply",
    "Reset",
    "SmtpServerConnection",
    "SmtpState",
    "StartTls",
    "parse_path",
]

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from filterd.errors import LocalProtocolError
from filterd.protocols import NEED_DATA, ConnectionClosed, NeedData

MAX_COMMAND_LINE: Final = 2048  # RFC 5321 says 512; extensions make lines longer (Postfix: 2048)
MAX_AUTH_LINE: Final = 12288  # RFC 4954 §4
MAX_ERRORS: Final = 20  # Postfix smtpd_hard_error_limit


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``Reply(550, "Relay access denied", "5.7.1")``; LF in ``text`` = more lines."""

    code: int
    text: str
    status: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not 200 <= self.code <= 599:
            raise LocalProtocolError(f"reply code must be 2xx-5xx, got {self.code!r}")
        if any(c in self.text for c in "\r\0"):
            raise LocalProtocolError("reply text must not contain CR or NUL")
        if self.status is not None and not re.fullmatch(rf"{str(self.code)[0]}\.\d{{1,3}}\.\d{{1,3}}", self.status):
            raise LocalProtocolError(f"enhanced status {self.status!r} does not fit code {self.code}")

    def render(self, extra_lines: tuple[str, ...] = ()) -> bytes:
        """The reply's bytes; ``extra_lines`` (EHLO keywords) follow without a status code (RFC 2034 §3)."""
        text_lines = self.text.split("\n")
        lines = [*text_lines, *extra_lines]
        out = []
        for number, line in enumerate(lines):
            sep = "-" if number < len(lines) - 1 else " "
            status = self.status if number < len(text_lines) else None
            out.append(f"{self.code}{sep}{' '.join(p for p in (status, line) if p)}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    @property
    def positive(self) -> bool:
        return self.code < 400


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO (``extended`` False) or EHLO. A 2xx reply starts a fresh session state."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS: reply 220 then upgrade the transport and call `tls_started()`; or 454."""


@dataclass(frozen=True, slots=True)
class AuthCredentials:
    """AUTH PLAIN/LOGIN decoded: reply 235 2.7.0 or 535 5.7.8."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM: ``address`` without brackets ("" = null sender); ``params`` upper-cased keys."""

    address: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO: ``address`` without brackets."""

    address: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DataCommand:
    """DATA with at least one accepted recipient: reply 354 to receive the message, or refuse."""


@dataclass(frozen=True, slots=True)
class Message:
    """The message after the final dot: CRLF line ends, dot-unstuffed. Reply to end the transaction."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageRefused:
    """The data ended but was refused here (``reply`` already sent): too big, or bare CR/LF."""

    reason: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET, or a HELO/EHLO, ended the transaction in progress (already answered)."""


@dataclass(frozen=True, slots=True)
class Quit:
    """The session ends (QUIT answered with 221, or 421 after too many errors): close."""

    reason: str = "QUIT"


Event: TypeAlias = (
    Helo
    | StartTls
    | AuthCredentials
    | MailFrom
    | RcptTo
    | DataCommand
    | Message
    | MessageRefused
    | Reset
    | Quit
    | ConnectionClosed
)
_NEEDS_REPLY: Final = (Helo, StartTls, AuthCredentials, MailFrom, RcptTo, DataCommand, Message)


class SmtpState(enum.Enum):
    GREETED = "greeted"  # before HELO/EHLO
    READY = "ready"  # HELO given, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading the message
    AUTH = "auth"  # in the middle of an AUTH exchange
    TLS = "tls"  # 220 to STARTTLS given; waiting for tls_started()
    CLOSED = "closed"


_S = SmtpState
# Which commands each state takes; anything else gets the sequence error named in _OUT_OF_ORDER.
_ALLOWED: Final[dict[SmtpState, frozenset[str]]] = {
    _S.GREETED: frozenset({"HELO", "EHLO", "STARTTLS", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
    _S.READY: frozenset({"HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
    _S.MAIL: frozenset({"HELO", "EHLO", "RCPT", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
    _S.RCPT: frozenset({"HELO", "EHLO", "RCPT", "DATA", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
}
_KNOWN: Final = frozenset({"HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "NOOP", "RSET", "QUIT"}) | {
    "HELP",
    "VRFY",
    "EXPN",
    "BDAT",
    "TURN",
    "ETRN",
}
_OUT_OF_ORDER: Final = {
    "MAIL": Reply(503, "Error: send HELO/EHLO first", "5.5.1"),
    "RCPT": Reply(503, "Error: need MAIL command", "5.5.1"),
    "DATA": Reply(503, "Error: need RCPT command", "5.5.1"),
    "AUTH": Reply(503, "Error: send EHLO first", "5.5.1"),
    "STARTTLS": Reply(503, "Error: MAIL transaction in progress", "5.5.1"),
}

_DOT_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_QUOTED: Final = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN: Final = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
_MAILBOX: Final = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})@{_DOMAIN}")
_ROUTE: Final = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_HELO_NAME: Final = re.compile(r"[\x21-\x7e]+")


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str]]:
    """``FROM:<a@b> SIZE=10`` -> ("a@b", {"SIZE": "10"}); ValueError saying what is wrong.

    ``keyword`` is FROM or TO. Source routes are dropped (RFC 5321 §4.1.1.3); the null path
    is only valid for FROM; ``<postmaster>`` without a domain only for TO.
    """
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise ValueError(f"expected {keyword}:<address>")
    rest = rest.lstrip(" ")
    if not rest.startswith("<") or ">" not in rest:
        raise ValueError("address must be in angle brackets")
    end = _closing_bracket(rest)
    path, tail = rest[1:end], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise ValueError("expected a space after the address")
    if route := _ROUTE.match(path):
        path = path[route.end() :]
    if path == "":
        if keyword != "FROM":
            raise ValueError("the null address is only for the sender")
    elif not (_MAILBOX.fullmatch(path) or (keyword == "TO" and path.lower() == "postmaster")):
        raise ValueError(f"bad address syntax: <{path}>")
    params: dict[str, str] = {}
    for word in tail.split():
        match = _PARAM.fullmatch(word)
        if match is None:
            raise ValueError(f"bad parameter {word!r}")
        params[match[1].upper()] = match[2] or ""
    return path, params


def _closing_bracket(text: str) -> int:
    """Index of the '>' that closes the path, skipping quoted local parts."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    raise ValueError("address must be in angle brackets")


def _b64(line: str) -> bytes:
    if line == "=":
        return b""
    return base64.b64decode(line, validate=True)


# -- the machine -----------------------------------------------------------------------------


class SmtpServerConnection:
    """One client connection, server side; see the module docstring for the loop and the rules."""

    def __init__(
        self,
        hostname: str,
        *,
        max_message_size: int,
        tls_available: bool = False,
        tls_active: bool = False,
        auth_mechanisms: tuple[str, ...] = (),
        auth_requires_tls: bool = True,
        greeting: str = "ESMTP filterd",
    ) -> None:
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.auth_requires_tls = auth_requires_tls
        self.authenticated = False
        self.errors = 0
        self._state = SmtpState.GREETED
        self._buf = bytearray()
        self._scanned = 0  # bytes at the front of _buf known to hold no LF
        self._skipping_line = False  # dropping the rest of an over-long command line
        self._eof = False
        self._closed_reported = False
        self._pending: Event | None = None
        self._out: list[bytes] = []
        self._events: list[Event] = []
        # DATA
        self._data_parts: list[bytes] = []
        self._data_size = 0
        self._data_line_start = True  # the next byte starts a line that followed a CRLF
        self._data_problem = ""
        # AUTH exchange
        self._auth_mechanism = ""
        self._auth_username = ""
        self._return_state = SmtpState.READY
        self._reply(Reply(220, f"{hostname} {greeting}"))

    # -- properties -----------------------------------------------------------------------

    @property
    def state(self) -> SmtpState:
        return self._state

    @property
    def pending(self) -> Event | None:
        """The event waiting for ``send()``, if any."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._state is SmtpState.CLOSED

    @property
    def auth_offered(self) -> bool:
        """AUTH is in the EHLO reply now (mechanisms configured, TLS if required, not yet done)."""
        return bool(self.auth_mechanisms) and not self.authenticated and (self.tls_active or not self.auth_requires_tls)

    def extensions(self) -> tuple[str, ...]:
        ext = ["PIPELINING", f"SIZE {self.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.tls_available and not self.tls_active:
            ext.append("STARTTLS")
        if self.auth_offered:
            ext.append("AUTH " + " ".join(self.auth_mechanisms))
        return tuple(ext)

    # -- I/O --------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means it closed its side."""
        if not data:
            self._eof = True
        elif self._state is not SmtpState.CLOSED:
            self._buf += data

    def data_to_send(self) -> bytes:
        """Replies produced so far, to write to the client now."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The transport now speaks TLS: start over as a fresh session (RFC 3207 §4.2)."""
        if self._state is not SmtpState.TLS:
            raise LocalProtocolError("tls_started() without a 220 to STARTTLS")
        self.tls_active = True
        self._state = SmtpState.GREETED

    def send(self, reply: Reply) -> None:
        """Answer the pending event."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("no SMTP command is waiting for a reply")
        if (reply.code == 354) != (isinstance(event, DataCommand) and reply.positive):
            raise LocalProtocolError(f"{reply.code} does not answer {type(event).__name__}")
        if isinstance(event, StartTls) and reply.positive and reply.code != 220:
            raise LocalProtocolError("STARTTLS is answered 220 (go ahead) or 4xx/5xx")
        self._pending = None
        positive = reply.positive
        if isinstance(event, AuthCredentials):
            self.authenticated = reply.code == 235
            self._state = self._return_state
            if positive:
                self._reply(reply)
            else:  # a failed password counts like any other error: no unlimited guessing
                self._error(reply)
            return
        self._reply(reply, self.extensions() if isinstance(event, Helo) and event.extended and positive else ())
        if isinstance(event, Message):
            self._state = SmtpState.READY  # whatever the verdict, the transaction is over
        elif not positive:
            return
        elif isinstance(event, Helo):
            self._state = SmtpState.READY
        elif isinstance(event, StartTls):
            self._buf.clear()  # plaintext pipelined after STARTTLS must not reach the TLS session
            self._scanned = 0
            self._state = SmtpState.TLS
        elif isinstance(event, MailFrom):
            self._state = SmtpState.MAIL
        elif isinstance(event, RcptTo):
            self._state = SmtpState.RCPT
        elif isinstance(event, DataCommand):
            self._start_data()

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA."""
        if self._pending is not None:
            raise LocalProtocolError(f"{type(self._pending).__name__} still needs its reply")
        while not self._events:
            if self._state in (SmtpState.CLOSED, SmtpState.TLS):
                return self._at_end() if self._state is SmtpState.CLOSED else NEED_DATA
            progressed = self._read_data() if self._state is SmtpState.DATA else self._read_line()
            if not progressed:
                return self._at_end()
        event = self._events.pop(0)
        if isinstance(event, _NEEDS_REPLY):
            self._pending = event
        return event

    def _at_end(self) -> ConnectionClosed | NeedData:
        if not self._eof or self._closed_reported:
            return NEED_DATA
        self._closed_reported = True
        self._state = SmtpState.CLOSED
        return ConnectionClosed()

    def _reply(self, reply: Reply, extra: tuple[str, ...] = ()) -> None:
        self._out.append(reply.render(extra))

    def _error(self, reply: Reply) -> None:
        self._reply(reply)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self._reply(Reply(421, f"{self.hostname} Error: too many errors", "4.7.0"))
            self._close("too many errors")

    def _close(self, reason: str) -> None:
        self._state = SmtpState.CLOSED
        self._buf.clear()
        self._events.append(Quit(reason))

    # -- command lines ----------------------------------------------------------------------

    def _take_line(self, cap: int) -> bytes | None:
        """One line with its LF, None if incomplete; over-long lines are answered and skipped."""
        index = self._buf.find(b"\n", self._scanned)
        if index < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > cap:
                if not self._skipping_line:
                    self._error(Reply(500, "Error: line too long", "5.5.2"))
                self._skipping_line = True
                self._buf.clear()
                self._scanned = 0
            return None
        line = bytes(self._buf[: index + 1])
        del self._buf[: index + 1]
        self._scanned = 0
        if self._skipping_line:
            self._skipping_line = False
            return b""  # the tail of the line already refused
        if len(line) > cap + 2:
            self._error(Reply(500, "Error: line too long", "5.5.2"))
            return b""
        return line

    def _read_line(self) -> bool:
        auth = self._state is SmtpState.AUTH
        line = self._take_line(MAX_AUTH_LINE if auth else MAX_COMMAND_LINE)
        if line is None:
            return False
        if not line:
            return True
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\0" in line:
            self._error(Reply(500, "Error: bare CR or LF, or NUL, in command line", "5.5.2"))
            if auth:
                self._state = self._return_state
            return True
        text = line[:-2].decode("utf-8", "surrogateescape")
        if auth:
            self._auth_line(text)
        else:
            self._command(text)
        return True

    def _command(self, text: str) -> None:
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb not in _KNOWN:
            self._error(Reply(500, "Error: command not recognized", "5.5.2"))
            return
        if verb == "QUIT":
            self._reply(Reply(221, "Bye", "2.0.0"))
            self._close("QUIT")
            return
        if verb not in _ALLOWED[self._state]:
            if verb in ("EXPN", "BDAT", "TURN", "ETRN"):
                self._error(Reply(502, "Error: command not implemented", "5.5.1"))
            elif verb in ("STARTTLS", "AUTH") and self._state in (SmtpState.MAIL, SmtpState.RCPT):
                self._error(_OUT_OF_ORDER["STARTTLS"])
            else:
                self._error(_OUT_OF_ORDER.get(verb, Reply(503, "Error: bad sequence of commands", "5.5.1")))
            return
        getattr(self, f"_cmd_{verb.lower()}")(arg.strip(" "))

    def _cmd_noop(self, arg: str) -> None:
        self._reply(Reply(250, "Ok", "2.0.0"))

    def _cmd_help(self, arg: str) -> None:
        self._reply(Reply(214, "See RFC 5321", "2.0.0"))

    def _cmd_vrfy(self, arg: str) -> None:
        self._reply(Reply(252, "Send some mail, I'll try my best", "2.5.2"))

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            self._error(Reply(501, "Syntax: RSET", "5.5.4"))
            return
        self._end_transaction()
        self._reply(Reply(250, "Ok", "2.0.0"))

    def _end_transaction(self) -> None:
        if self._state in (SmtpState.MAIL, SmtpState.RCPT):
            self._events.append(Reset())
            self._state = SmtpState.READY

    def _cmd_helo(self, arg: str) -> None:
        self._helo(arg, extended=False)

    def _cmd_ehlo(self, arg: str) -> None:
        self._helo(arg, extended=True)

    def _helo(self, name: str, *, extended: bool) -> None:
        if not _HELO_NAME.fullmatch(name):
            self._error(Reply(501, f"Syntax: {'EHLO' if extended else 'HELO'} hostname", "5.5.4"))
            return
        self._end_transaction()
        self._events.append(Helo(name, extended))

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            self._error(Reply(501, "Syntax: STARTTLS", "5.5.4"))
        elif not self.tls_available or self.tls_active:
            self._error(Reply(502, "Error: command not implemented", "5.5.1"))
        else:
            self._events.append(StartTls())

    def _cmd_mail(self, arg: str) -> None:
        if not arg.isascii():
            self._error(Reply(553, "Error: non-ASCII address (SMTPUTF8 is not supported)", "5.6.7"))
            return
        try:
            address, params = parse_path(arg, "FROM")
        except ValueError as exc:
            self._error(Reply(501, f"Error: {exc}", "5.1.7"))
            return
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    self._error(Reply(501, "Error: bad SIZE parameter", "5.5.4"))
                    return
                if int(value) > self.max_message_size:
                    self._error(Reply(552, "Error: message size exceeds fixed limit", "5.3.4"))
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(Reply(501, "Error: BODY is 7BIT or 8BITMIME", "5.5.4"))
                    return
            elif key != "AUTH":  # RFC 4954 AUTH= is accepted and ignored
                self._error(Reply(555, f"Error: unsupported parameter {key}", "5.5.4"))
                return
        self._events.append(MailFrom(address, params))

    def _cmd_rcpt(self, arg: str) -> None:
        if not arg.isascii():
            self._error(Reply(553, "Error: non-ASCII address (SMTPUTF8 is not supported)", "5.6.7"))
            return
        try:
            address, params = parse_path(arg, "TO")
        except ValueError as exc:
            self._error(Reply(501, f"Error: {exc}", "5.1.3"))
            return
        if params:
            self._error(Reply(555, f"Error: unsupported parameter {next(iter(params))}", "5.5.4"))
            return
        self._events.append(RcptTo(address, params))

    def _cmd_data(self, arg: str) -> None:
        if arg:
            self._error(Reply(501, "Syntax: DATA", "5.5.4"))
            return
        self._events.append(DataCommand())

    # -- AUTH -------------------------------------------------------------------------------

    def _cmd_auth(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if self.authenticated:
            self._error(Reply(503, "Error: already authenticated", "5.5.1"))
        elif not self.auth_mechanisms:
            self._error(Reply(503, "Error: authentication not enabled", "5.5.1"))
        elif not self.auth_offered:
            self._error(Reply(530, "Must issue a STARTTLS command first", "5.7.0"))
        elif mechanism not in self.auth_mechanisms:
            self._error(Reply(504, "Error: unsupported authentication mechanism", "5.5.4"))
        else:
            self._auth_mechanism = mechanism
            self._return_state = self._state
            self._state = SmtpState.AUTH
            if mechanism == "PLAIN" and initial:
                self._auth_line(initial.strip())
            elif mechanism == "PLAIN":
                self._reply(Reply(334, ""))
            elif initial:  # LOGIN with the user name already given (RFC 4954 initial response)
                self._auth_username = "\0"
                self._auth_line(initial.strip())
            else:
                self._auth_username = "\0"
                self._reply(Reply(334, "VXNlcm5hbWU6"))  # "Username:"

    def _auth_line(self, line: str) -> None:
        if line == "*":
            self._state = self._return_state
            self._error(Reply(501, "Error: authentication cancelled", "5.7.0"))
            return
        try:
            decoded = _b64(line).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            self._state = self._return_state
            self._error(Reply(501, "Error: malformed base64 in authentication", "5.5.2"))
            return
        if self._auth_mechanism == "PLAIN":
            parts = decoded.split("\0")
            if len(parts) != 3:
                self._state = self._return_state
                self._error(Reply(501, "Error: malformed PLAIN response", "5.5.2"))
                return
            self._events.append(AuthCredentials("PLAIN", parts[0], parts[1], parts[2]))
        elif self._auth_username == "\0":
            self._auth_username = decoded
            self._reply(Reply(334, "UGFzc3dvcmQ6"))  # "Password:"
        else:
            self._events.append(AuthCredentials("LOGIN", "", self._auth_username, decoded))
            self._auth_username = ""

    # -- DATA -------------------------------------------------------------------------------

    def _start_data(self) -> None:
        self._state = SmtpState.DATA
        self._data_parts = []
        self._data_size = 0
        self._data_line_start = True
        self._data_problem = ""

    def _read_data(self) -> bool:
        """Consume whole lines of DATA; True once anything was consumed."""
        last_lf = self._buf.rfind(b"\n")
        if last_lf < 0:
            if len(self._buf) > 65536:
                # one endless line: count it, keep only a possible CR of a coming CRLF
                self._account(bytes(self._buf[:-1]), at_line_start=self._data_line_start)
                del self._buf[:-1]
                self._data_line_start = False
                return True
            return False
        region = bytes(self._buf[: last_lf + 1])
        start = self._data_line_start
        end = -1
        if start and region.startswith(b".\r\n"):
            end = 0
        else:
            found = region.find(b"\r\n.\r\n")
            if found >= 0:
                end = found + 2
        if end < 0:
            del self._buf[: last_lf + 1]
            self._account(region, at_line_start=start)
            self._data_line_start = region.endswith(b"\r\n")
            return True
        del self._buf[: end + 3]
        self._account(region[:end], at_line_start=start)
        self._finish_data()
        return True

    def _account(self, chunk: bytes, *, at_line_start: bool) -> None:
        """Add whole lines (or a piece of an endless one) of DATA, checking line ends and size."""
        if not self._data_problem:
            crlf = chunk.count(b"\r\n")
            if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
                self._data_problem = "bare"
                self._data_parts = []
        self._data_size += len(chunk)
        if not self._data_problem and self._data_size > self.max_message_size:
            self._data_problem = "size"
            self._data_parts = []
        if self._data_problem:
            return
        if at_line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        self._data_parts.append(chunk.replace(b"\r\n.", b"\r\n"))

    def _finish_data(self) -> None:
        problem, self._data_problem = self._data_problem, ""
        data, self._data_parts = b"".join(self._data_parts), []
        self._state = SmtpState.READY
        if problem == "bare":
            reply = Reply(550, "Error: bare CR or LF in message data (only CRLF ends a line)", "5.5.2")
        elif problem == "size":
            reply = Reply(552, "Error: message size exceeds fixed limit", "5.3.4")
        else:
            self._state = SmtpState.RCPT  # until the reply to Message ends the transaction
            self._events.append(Message(data))
            return
        self._reply(reply)
        self._events.append(MessageRefused(problem, reply))
