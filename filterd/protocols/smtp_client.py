"""The client side of SMTP, sans-IO: commands out as bytes, replies in, each paired with the
command it answers. The conversation (what to send when) is `filterd.mta.smtp_client`'s.

    conn = ClientConnection()
    conn.receive_data(chunk)                 # b"" when the server closed
    event = conn.next_event()                # Response(command="greeting", reply=Reply(220, ...))
    writer.write(conn.send("EHLO", "relay.example.org"))
    ...                                      # conn.extensions: {"pipelining": "", "size": "10240000"}
    writer.write(conn.send("MAIL", "FROM:<a@x.org>") + conn.send("RCPT", "TO:<b@y.net>"))  # pipelined
    ...
    writer.write(conn.send("DATA")); ... 354 ...; writer.write(conn.send_message(data))

Replies are paired in order with the commands awaiting one (the greeting first), which is all
RFC 2920 pipelining needs from the machine: several commands may await replies at once only
when the server advertised PIPELINING, and only MAIL, RCPT and RSET may be followed by another
command before their reply (EHLO, DATA, STARTTLS, QUIT must end a group); anything else is a
`LocalProtocolError`. After the 220 to STARTTLS nothing may be buffered (plaintext injected
before the handshake, CVE-2011-0411): `RemoteProtocolError`, as for replies that do not parse,
lines over 2000 bytes, more than 100 lines in one reply, or bytes no command asked for. This
machine sees only the bytes it was fed: plaintext that the I/O driver's stream buffered but had
not yet handed over when the handshake began is beyond it (the driver's concern).
"""

from __future__ import annotations

__all__ = ["CLOSED", "NEED_DATA", "ClientConnection", "Closed", "Reply", "Response", "dot_stuffed", "path_problem"]

import enum
import re
from collections import deque
from dataclasses import dataclass

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import NEED_DATA, NeedData
from filterd.protocols._buffer import ReceiveBuffer

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_MAX_LINE = 2000  # RFC 5321 allows 512 for a reply line; servers send longer texts
_MAX_LINES = 100
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
# Commands after which the client may write the next one before the reply (RFC 2920 section 3.1).
_GROUPABLE = frozenset({"MAIL", "RCPT", "RSET"})
# C0, DEL and C1 controls, and lone surrogates (undecodable bytes kept by surrogateescape).
_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply (or one we made up for a failure, marked ``local``)."""

    code: int
    text: str
    local: bool = False

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status the text starts with ("" if none, or of another class)."""
        m = _STATUS.match(self.text)
        if m and m[1] == str(self.code)[0]:
            return f"{m[1]}.{m[2]}.{m[3]}"
        return ""

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status in the text, or one derived from the reply code."""
        return self.enhanced or f"{str(self.code)[0]}.0.0"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"


@dataclass(frozen=True, slots=True)
class Response:
    """The server's reply to ``command`` ("greeting", "EHLO", "MAIL", ..., "." for the message)."""

    command: str
    reply: Reply


class Closed(enum.Enum):
    CLOSED = "closed"  # the server closed the connection; no more replies will come


CLOSED = Closed.CLOSED


def dot_stuffed(data: bytes) -> bytes:
    """A message as DATA sends it: CRLF line ends (lone CR or LF too), a dot doubled at the
    start of a line, the end marker after a final CRLF."""
    data = _LINE_ENDS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


def path_problem(address: str) -> str:
    """Why ``address`` cannot go between the angle brackets of MAIL FROM or RCPT TO; "" if it can.

    Anything RFC 5321 calls a Mailbox can (a dot-string or quoted-string local part, a domain
    or an address literal), in the UTF-8 of RFC 6531 too (whether the server takes that is the
    caller's concern), and so can the null path. This guards the command line rather than
    checking the whole grammar: no control character anywhere, no space or '>' outside the
    quoted string (they would end the path or add parameters), and no '<' or '"' outside it
    or an address literal's brackets (RFC 5321's dcontent allows those two)."""
    if bad := _UNSENDABLE.search(address):
        code = ord(bad[0])
        return f"invalid UTF-8 (U+{code:04X})" if code > 0x9F else f"control character U+{code:04X}"
    rest = address
    if address.startswith('"'):
        escaped = False
        for i, c in enumerate(address[1:], 1):
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                rest = address[i + 1 :]
                break
        else:
            return "unterminated quoted string"
        if rest and not rest.startswith("@"):
            return "quoted string not followed by @"
    at = rest.find("@[")
    if at >= 0 and rest.endswith("]"):
        rest, literal = rest[:at], rest[at + 2 : -1]
        for c in " >":
            if c in literal:
                return f"{_NAMES[c]} in an address literal"
    for c in ' <>"':
        if c in rest:
            return f"{_NAMES[c]} outside a quoted string"
    return ""


_NAMES = {" ": "space", "<": "'<'", ">": "'>'", '"': "'\"'"}


class ClientConnection:
    """One SMTP client connection's bytes; see the module docstring."""

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer()
        self._awaiting: deque[str] = deque(["greeting"])
        self._lines: list[bytes] = []  # the reply being read, without codes and line ends
        self._code = 0
        self._after_starttls = False
        self._message_allowed = False  # the server just said 354 to DATA
        self.extensions: dict[str, str] = {}  # from the last 250 to EHLO: keyword (lower case) -> parameters

    @property
    def awaiting(self) -> int:
        """How many commands (the greeting included) still await their reply."""
        return len(self._awaiting)

    def supports(self, keyword: str) -> bool:
        return keyword.lower() in self.extensions

    def send(self, verb: str, *args: str, encoding: str = "ascii") -> bytes:
        """The bytes of one command; its reply will come as a `Response` for ``verb``."""
        verb = verb.upper()
        self._check_may_send(verb)
        line = " ".join((verb, *args)).encode(encoding)
        if any(b < 0x20 or b == 0x7F for b in line):
            raise LocalProtocolError(f"control character in {verb} command")
        self._awaiting.append(verb)
        return line + b"\r\n"

    def send_message(self, data: bytes) -> bytes:
        """The message after a 354 to DATA (`dot_stuffed`); its reply comes as the command "."."""
        if not self._message_allowed:
            raise LocalProtocolError("message sent without a 354 reply to DATA")
        self._message_allowed = False
        self._awaiting.append(".")
        return dot_stuffed(data)

    def _check_may_send(self, verb: str) -> None:
        if self._buffer.closed:
            raise LocalProtocolError(f"{verb} after the server closed the connection")
        if self._message_allowed:
            raise LocalProtocolError(f"{verb} where the message was due")
        if not self._awaiting:
            return
        if not self.supports("pipelining"):
            raise LocalProtocolError(f"{verb} before the reply to {self._awaiting[-1]} (no PIPELINING)")
        if any(c not in _GROUPABLE for c in self._awaiting):
            raise LocalProtocolError(f"{verb} before the reply to {self._awaiting[-1]}, which must end a group")

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` when it closed the connection."""
        self._buffer.receive(data)

    def next_event(self) -> Response | NeedData | Closed:
        """The next complete reply, paired with its command; `NEED_DATA`; or `CLOSED` once the
        server closed and every complete reply was taken."""
        while True:
            line = self._buffer.take_line(_MAX_LINE)
            if line is None:
                return CLOSED if self._buffer.closed else NEED_DATA
            if not self._awaiting:
                raise RemoteProtocolError(f"reply without a command: {line[:80]!r}")
            code, more, text = _parse_line(line)
            if self._lines and code != self._code:
                raise RemoteProtocolError(f"reply code changed within a reply: {self._code} then {code}")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > _MAX_LINES:
                raise RemoteProtocolError(f"reply longer than {_MAX_LINES} lines")
            if more:
                continue
            return self._complete(code)

    def _complete(self, code: int) -> Response:
        lines, self._lines = self._lines, []
        command = self._awaiting.popleft()
        reply = Reply(code, "\n".join(t.decode("utf-8", "surrogateescape") for t in lines))
        if command == "EHLO" and code == 250:
            self.extensions = _extensions(lines[1:])
        elif command == "STARTTLS" and code == 220:
            if self._buffer:
                raise RemoteProtocolError("data after the 220 reply to STARTTLS, before the TLS handshake")
            self.extensions = {}  # RFC 3207: forget what the server said in the clear
        elif command == "DATA" and code == 354:
            self._message_allowed = True
        return Response(command, reply)


def _parse_line(line: bytes) -> tuple[int, bool, bytes]:
    """(code, more lines follow, text) of one reply line."""
    body = line.rstrip(b"\r\n")
    code = body[:3]
    sep = body[3:4]
    if len(code) != 3 or not code.isdigit() or code[0] not in b"2345" or sep not in (b"", b" ", b"-"):
        raise RemoteProtocolError(f"malformed reply line: {body[:80]!r}")
    return int(code), sep == b"-", body[4:].strip(b" \t")


def _extensions(lines: list[bytes]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.decode("ascii", "replace").strip().partition(" ")
        if keyword:
            found[keyword.lower()] = params.strip()
    return found
