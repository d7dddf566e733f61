"""Postfix policy delegation (SMTPD_POLICY_README), server side, sans-IO.

Postfix's smtpd keeps a connection open and sends one request at a time: ``name=value`` lines
ended by LF, then an empty line. The server answers each with ``action=<value>`` and an empty
line, then waits for the next request. Reference: shared/reference/protocols.md §3.4.

Usage (the socket loop belongs to the daemon)::

    conn = PolicyServerConnection()
    while not closed:
        conn.receive_data(await reader.read(4096))          # b"" once Postfix closed
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, ConnectionClosed):
                closed = True
            elif event.protocol_state == "RCPT" and greylisted(event):
                writer.write(conn.send(PolicyReply.defer_if_permit("Greylisted, retry in 300s")))
            else:
                writer.write(conn.send(PolicyReply.dunno()))

Reading, and what is refused (RemoteProtocolError, sticky, with ``reply=None``: on trouble a
policy server closes without answering, and Postfix retries, then applies its default action):

* Lines end at LF; a CR just before it is dropped too, so a request typed into telnet reads the
  same. A line without ``=`` or with an empty name, and any NUL byte, are refused.
* Bytes that are not UTF-8 are kept as surrogate escapes (``value.encode("utf-8",
  "surrogateescape")`` gives them back): Postfix passes through whatever 8-bit HELO names or
  addresses a client sent, and refusing the request would make the client's mail fail on
  Postfix's default action instead of on our policy.
* Caps, checked while a request is still arriving: ``max_line`` bytes per line, ``max_attributes``
  lines per request, ``max_request_size`` bytes per request.
* Repeated names: the last value wins in ``attributes`` (as in postgrey's Perl hash).

``next_event()`` refuses (LocalProtocolError) while a request still waits for its reply, and
``send()`` refuses when none does, so replies cannot get out of step with requests.
"""

from __future__ import annotations

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "NeedData",
    "PolicyReply",
    "PolicyRequest",
    "PolicyServerConnection",
    "PolicyState",
]

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import NEED_DATA, ConnectionClosed, NeedData
from filterd.protocols._buffer import ReceiveBuffer, strip_line_ending


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isascii() and value.isdecimal() else None


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One request. ``attributes`` holds every attribute sent; the properties read common ones.

    String properties are None when the attribute is absent and "" when sent empty (``sender=``
    is the null sender). Numeric properties are None when absent, empty or not a number.
    """

    attributes: dict[str, str]

    def get(self, name: str) -> str | None:
        """Any attribute by name, None if it was not sent."""
        return self.attributes.get(name)

    @property
    def request(self) -> str | None:
        """``smtpd_access_policy`` from Postfix's smtpd."""
        return self.attributes.get("request")

    @property
    def protocol_state(self) -> str | None:
        """CONNECT, EHLO, HELO, MAIL, RCPT, DATA, END-OF-MESSAGE, VRFY or ETRN."""
        return self.attributes.get("protocol_state")

    @property
    def protocol_name(self) -> str | None:
        """SMTP or ESMTP."""
        return self.attributes.get("protocol_name")

    @property
    def client_address(self) -> str | None:
        return self.attributes.get("client_address")

    @property
    def client_name(self) -> str | None:
        """The verified client name, ``unknown`` when there is none."""
        return self.attributes.get("client_name")

    @property
    def reverse_client_name(self) -> str | None:
        return self.attributes.get("reverse_client_name")

    @property
    def client_port(self) -> int | None:
        return _number(self.attributes.get("client_port"))

    @property
    def helo_name(self) -> str | None:
        return self.attributes.get("helo_name")

    @property
    def sender(self) -> str | None:
        """The envelope sender without angle brackets; "" for the null sender."""
        return self.attributes.get("sender")

    @property
    def recipient(self) -> str | None:
        """The recipient at RCPT (at DATA/END-OF-MESSAGE only when there is exactly one)."""
        return self.attributes.get("recipient")

    @property
    def recipient_count(self) -> int | None:
        """Non-zero only at DATA and END-OF-MESSAGE."""
        return _number(self.attributes.get("recipient_count"))

    @property
    def queue_id(self) -> str | None:
        return self.attributes.get("queue_id")

    @property
    def instance(self) -> str | None:
        """The same value for every request about one message."""
        return self.attributes.get("instance")

    @property
    def size(self) -> int | None:
        """The message size the client announced (MAIL SIZE=), or the real one at END-OF-MESSAGE."""
        return _number(self.attributes.get("size"))

    @property
    def sasl_method(self) -> str | None:
        return self.attributes.get("sasl_method")

    @property
    def sasl_username(self) -> str | None:
        return self.attributes.get("sasl_username")

    @property
    def sasl_sender(self) -> str | None:
        return self.attributes.get("sasl_sender")

    @property
    def server_address(self) -> str | None:
        return self.attributes.get("server_address")

    @property
    def server_port(self) -> int | None:
        return _number(self.attributes.get("server_port"))


_STATUS: Final = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _optional_text(verb: str, text: str | None) -> str:
    return verb if not text else f"{verb} {text}"


@dataclass(frozen=True, slots=True)
class PolicyReply:
    """The ``action=`` value of a reply. Any access(5) action is allowed; the constructors below
    build the common ones. One line: no CR, LF or NUL, and not empty."""

    action: str

    def __post_init__(self) -> None:
        if not self.action.strip() or any(c in self.action for c in "\r\n\0"):
            raise LocalProtocolError(f"a policy action is one non-empty line, got {self.action!r}")

    @classmethod
    def dunno(cls) -> PolicyReply:
        """No opinion: Postfix goes on with its next restriction."""
        return cls("DUNNO")

    @classmethod
    def ok(cls) -> PolicyReply:
        """Accept (for this restriction list)."""
        return cls("OK")

    @classmethod
    def reject(cls, text: str | None = None) -> PolicyReply:
        """Reject with Postfix's access_map_reject_code (554), optionally with our text."""
        return cls(_optional_text("REJECT", text))

    @classmethod
    def defer(cls, text: str | None = None) -> PolicyReply:
        """Temporary failure (450 by default)."""
        return cls(_optional_text("DEFER", text))

    @classmethod
    def defer_if_permit(cls, text: str | None = None) -> PolicyReply:
        """Defer, unless a later restriction rejects outright (greylisting's answer)."""
        return cls(_optional_text("DEFER_IF_PERMIT", text))

    @classmethod
    def defer_if_reject(cls, text: str | None = None) -> PolicyReply:
        """Defer if a later restriction would reject."""
        return cls(_optional_text("DEFER_IF_REJECT", text))

    @classmethod
    def hold(cls, text: str | None = None) -> PolicyReply:
        """Accept and put the message on hold."""
        return cls(_optional_text("HOLD", text))

    @classmethod
    def discard(cls, text: str | None = None) -> PolicyReply:
        """Accept and silently drop the message."""
        return cls(_optional_text("DISCARD", text))

    @classmethod
    def smtp(cls, code: int, text: str, status: str | None = None) -> PolicyReply:
        """An exact SMTP reply such as ``451 4.7.1 Try again later``; 4xx or 5xx, and the
        enhanced status (optional) must be of the same class."""
        if isinstance(code, bool) or not 400 <= code <= 599:
            raise LocalProtocolError(f"policy reply code must be 4xx or 5xx, got {code!r}")
        if status is not None:
            match = _STATUS.fullmatch(status)
            if match is None or match[1] != str(code)[0]:
                raise LocalProtocolError(f"enhanced status must look like {str(code)[0]}.x.y, got {status!r}")
        if not text.strip():
            raise LocalProtocolError("an SMTP reply needs text")
        return cls(f"{code} {status} {text}" if status else f"{code} {text}")

    @classmethod
    def prepend(cls, name: str, value: str) -> PolicyReply:
        """Accept for now and prepend the header ``name: value``."""
        if not _HEADER_NAME.fullmatch(name):
            raise LocalProtocolError(f"header name must be printable ASCII without ':' or spaces, got {name!r}")
        return cls(f"PREPEND {name}: {value}")

    @classmethod
    def redirect(cls, address: str) -> PolicyReply:
        """Send the message to ``address`` instead of its recipients."""
        return cls(f"REDIRECT {address}")

    @classmethod
    def filter(cls, destination: str) -> PolicyReply:
        """Send the message through ``transport:destination`` after queueing."""
        return cls(f"FILTER {destination}")

    @classmethod
    def warn(cls, text: str) -> PolicyReply:
        """Log a warning, then go on as DUNNO."""
        return cls(f"WARN {text}")

    def render(self) -> bytes:
        """The reply on the wire: ``action=...`` then the empty line."""
        return b"action=" + self.action.encode("utf-8", "surrogateescape") + b"\n\n"


class PolicyState(enum.Enum):
    """Where the connection is."""

    READING = "reading a request"
    REPLYING = "waiting for our reply"
    CLOSED = "closed"
    ERROR = "error"


class _Step(enum.Enum):
    REQUEST = "a whole request arrived"
    REPLY = "we replied"
    CLOSE = "the client closed between requests"
    PROTOCOL_ERROR = "protocol error"


# Every legal move. Anything else is a bug in this module (LocalProtocolError).
_TRANSITIONS: Final[Mapping[PolicyState, Mapping[_Step, PolicyState]]] = {
    PolicyState.READING: {
        _Step.REQUEST: PolicyState.REPLYING,
        _Step.CLOSE: PolicyState.CLOSED,
        _Step.PROTOCOL_ERROR: PolicyState.ERROR,
    },
    PolicyState.REPLYING: {_Step.REPLY: PolicyState.READING},
    PolicyState.CLOSED: {},
    PolicyState.ERROR: {},
}


class PolicyServerConnection:
    """One Postfix policy client connection; see the module docstring."""

    def __init__(self, *, max_line: int = 4096, max_attributes: int = 128, max_request_size: int = 65536) -> None:
        if max_line < 1 or max_attributes < 0 or max_request_size < 1:
            raise ValueError("max_line and max_request_size must be positive, max_attributes not negative")
        self._max_line = max_line
        self._max_attributes = max_attributes
        self._max_request_size = max_request_size
        self._state = PolicyState.READING
        self._buffer = ReceiveBuffer()
        self._error: RemoteProtocolError | None = None
        self._attributes: dict[str, str] = {}
        self._lines = 0
        self._size = 0  # bytes of the current request consumed so far

    @property
    def state(self) -> PolicyState:
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from Postfix; ``b""`` means it closed its side."""
        self._buffer.receive(data, keep=self._state not in (PolicyState.CLOSED, PolicyState.ERROR))

    def next_event(self) -> PolicyRequest | ConnectionClosed | NeedData:
        """The next whole request, ConnectionClosed once at a clean EOF, else NEED_DATA."""
        if self._error is not None:
            raise self._error
        if self._state is PolicyState.REPLYING:
            raise LocalProtocolError("the last request still needs its reply")
        if self._state is PolicyState.CLOSED:
            return NEED_DATA
        try:
            return self._read()
        except RemoteProtocolError as exc:
            self._error = exc
            self._move(_Step.PROTOCOL_ERROR)
            self._buffer.clear()
            raise

    def send(self, reply: PolicyReply) -> bytes:
        """The bytes answering the request just returned."""
        if self._state is not PolicyState.REPLYING:
            raise LocalProtocolError(f"no request is waiting for a reply ({self._state.value})")
        self._move(_Step.REPLY)
        return reply.render()

    def _move(self, step: _Step) -> None:
        try:
            self._state = _TRANSITIONS[self._state][step]
        except KeyError:
            raise LocalProtocolError(f"policy: {step.value!r} is not legal while {self._state.value}") from None

    def _read(self) -> PolicyRequest | ConnectionClosed | NeedData:
        while True:
            # The request cap works as a tighter line cap on the line being read (keeping a byte
            # for its LF), so both caps refuse at the same byte however the input was split.
            budget = self._max_request_size - self._size - 1
            if budget < 0:
                raise self._too_big()
            try:
                line = self._buffer.take_line(min(self._max_line, budget))
            except RemoteProtocolError:
                if budget < self._max_line:
                    raise self._too_big() from None
                raise RemoteProtocolError(f"policy request line longer than {self._max_line} bytes") from None
            if line is None:
                if not self._buffer.closed:
                    return NEED_DATA
                if self._buffer or self._size:
                    raise RemoteProtocolError("connection closed in the middle of a policy request")
                self._move(_Step.CLOSE)
                return ConnectionClosed()
            self._size += len(line)
            if self._size > self._max_request_size:  # a CRLF ending can pass the budget by one
                raise self._too_big()
            content = strip_line_ending(line)
            if not content:
                request = PolicyRequest(self._attributes)
                self._attributes, self._lines, self._size = {}, 0, 0
                self._move(_Step.REQUEST)
                return request
            self._attribute(content)

    def _attribute(self, line: bytes) -> None:
        self._lines += 1
        if self._lines > self._max_attributes:
            raise RemoteProtocolError(f"policy request with more than {self._max_attributes} attributes")
        if b"\0" in line:
            raise RemoteProtocolError("policy request line contains a NUL byte")
        name, equals, value = line.partition(b"=")
        if not equals:
            raise RemoteProtocolError("policy request line without '=': expected name=value")
        if not name:
            raise RemoteProtocolError("policy request line with an empty attribute name")
        self._attributes[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")

    def _too_big(self) -> RemoteProtocolError:
        return RemoteProtocolError(f"policy request larger than {self._max_request_size} bytes")
