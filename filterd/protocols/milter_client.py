"""Milter protocol version 6, MTA (client) side, sans-IO: what Postfix's milter8.c does.

The commands are the filter side's events (`filterd.protocols.milter`: Connect, Helo, MailFrom,
RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage, Abort, Quit), sent with their
``macros``; the replies come back as that module's reply classes (Continue, Accept, Reject,
Tempfail, Discard, ReplyCode, Shutdown, Progress, Skip and the end-of-message edits), and the
negotiation answer as `Negotiated`::

    conn = MilterClientConnection()
    writer.write(conn.negotiate())
    ...read until conn.next_event() gives Negotiated...
    writer.write(conn.send(Connect("[192.0.2.1]", AddressFamily.INET, 25, "192.0.2.1",
                                   macros={"j": "mx.example.org", "client_addr": "192.0.2.1"})))
    while conn.awaiting is not None:                  # False when the step was negotiated away
        conn.receive_data(await reader.read(65536))   # or NR_*: nothing to wait for
        while (reply := conn.next_event()) is not NEED_DATA:
            ...                                       # edits first, then one final reply

Rules enforced here, so that a confused filter cannot make the MTA misbehave (each raises
RemoteProtocolError, sticky; the caller then applies its default action):

* a reply while nothing is awaited; an edit anywhere but at end of message, or one the
  negotiation did not grant; Skip other than for a body chunk or without the SKIP flag;
* a negotiation asking for actions or protocol flags we did not offer, or a version below 2;
* a packet over ``max_packet_size``, an unknown reply byte, malformed data.

``send()`` returns ``b""`` for a step the filter negotiated away (NO* flags) and leaves
``awaiting`` None for one it will not answer (NR_* flags). Macros are sent as a MACRO packet
ahead of their command; when the filter asked for a list for that stage (SETSYMLIST), only
those are sent, as Postfix does. Header values lose one leading space unless HDR_LEADSPC was
negotiated. Body chunks are at most ``BODY_CHUNK`` (65535) bytes: split them before sending.
"""

from __future__ import annotations

__all__ = [
    "BODY_CHUNK",
    "OFFERED_ACTIONS",
    "OFFERED_PROTOCOL",
    "Command",
    "MilterClientConnection",
    "Negotiated",
    "ReplyEvent",
    "parse_reply_code",
]

import re
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import NEED_DATA, ConnectionClosed, NeedData
from filterd.protocols._milter_wire import (
    CHUNK,
    OPTIONS,
    U32,
    PacketReader,
    cstring,
    exactly,
    packet,
    split_strings,
    text,
)
from filterd.protocols.milter import (
    _EDITS,
    _FINAL,
    _SIMPLE_REPLIES,
    _STEP_FLAGS,
    ALL_ACTIONS,
    MILTER_VERSION,
    Abort,
    Action,
    AddHeader,
    AddRecipient,
    AddressFamily,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Data,
    DeleteRecipient,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    ProtocolFlag,
    Quarantine,
    Quit,
    QuitNewConnection,
    RcptTo,
    ReplaceBody,
    ReplyCode,
    Skip,
    _needed_action,
    _SessionCommand,
    _StepReply,
)
from filterd.protocols.milter import Command as _Code

# The largest BodyChunk send() takes (Postfix's size): split bodies into pieces of this size.
BODY_CHUNK: Final = CHUNK
# Everything this MTA can apply (filterd.mta.milter_client), as Postfix offers it.
OFFERED_ACTIONS: Final = ALL_ACTIONS
# All steps may be skipped or left unanswered; we never report rejected recipients (RCPT_REJ).
OFFERED_PROTOCOL: Final = ProtocolFlag(0x1FFFFF & ~ProtocolFlag.RCPT_REJ)

Command: TypeAlias = _SessionCommand


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The filter's answer to our offer: what is in force for this connection."""

    version: int
    actions: Action
    protocol: ProtocolFlag
    macros: dict[MacroStage, tuple[str, ...]] = field(default_factory=dict)


ReplyEvent: TypeAlias = Negotiated | _StepReply | ConnectionClosed

# command -> (its command byte, the stage its macro list is asked for); the macros go out with the
# command byte as their stage. Which NO*/NR_* flags apply to it: the filter side's _STEP_FLAGS.
_STEPS: Final[Mapping[type, tuple[_Code, MacroStage | None]]] = {
    Connect: (_Code.CONNECT, MacroStage.CONNECT),
    Helo: (_Code.HELO, MacroStage.HELO),
    MailFrom: (_Code.MAIL, MacroStage.MAIL),
    RcptTo: (_Code.RCPT, MacroStage.RCPT),
    Data: (_Code.DATA, MacroStage.DATA),
    Header: (_Code.HEADER, None),
    EndOfHeaders: (_Code.EOH, MacroStage.EOH),
    BodyChunk: (_Code.BODY, None),
    EndOfMessage: (_Code.BODYEOB, MacroStage.EOM),
}
_ALWAYS: Final = (ProtocolFlag(0), ProtocolFlag(0))  # sent and answered whatever was negotiated
_STATUS: Final = re.compile(r"([245]\.\d{1,3}\.\d{1,3}) ?")


def _command(code: _Code, data: bytes = b"") -> bytes:
    return packet(code.value.encode("ascii"), data)


def _z(value: str) -> bytes:
    return cstring(value, f"milter string {value!r}")


def _remote(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"milter: {message}")


def _strings(data: bytes, count: int, what: str) -> list[str]:
    return [text(s) for s in exactly(data, count, what, _remote)]


def parse_reply_code(text: str) -> ReplyCode:
    """A 'y' reply ("550 5.7.1 Spam", multi-line with CRLF, % doubled) as a ReplyCode."""
    lines = text.split("\r\n")
    code_text = lines[0][:3]
    if not code_text.isdigit() or code_text[0] not in "45" or any(line[:3] != code_text for line in lines):
        raise _remote(f"reply code must be 4xx or 5xx on every line, got {text!r}")
    status: str | None = None
    body = []
    for line in lines:
        rest = line[4:]
        match = _STATUS.match(rest)
        if match and match[1][0] == code_text[0]:
            status = match[1]
            rest = rest[match.end() :]
        body.append(rest.replace("%%", "%"))
    try:
        return ReplyCode(int(code_text), "\n".join(body), status)
    except LocalProtocolError as exc:
        raise _remote(str(exc)) from None


class MilterClientConnection:
    """One connection to a filter, MTA side; see the module docstring."""

    def __init__(
        self,
        *,
        actions: Action = OFFERED_ACTIONS,
        protocol: ProtocolFlag = OFFERED_PROTOCOL,
        max_packet_size: int = 1024 * 1024,
    ) -> None:
        self.offered_actions = actions
        self.offered_protocol = protocol
        self._packets = PacketReader(max_packet_size, _remote)
        self._events: deque[ReplyEvent] = deque()
        self._awaiting: Command | None = None
        self._negotiating = False
        self._negotiated: Negotiated | None = None
        self._eof = False
        self._closed_reported = False
        self._error: RemoteProtocolError | None = None

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def awaiting(self) -> Command | None:
        """The command whose final reply has not come yet (None: free to send the next)."""
        return self._awaiting

    @property
    def negotiating(self) -> bool:
        return self._negotiating

    # -- sending ----------------------------------------------------------------------------

    def negotiate(self) -> bytes:
        if self._negotiating or self._negotiated is not None:
            raise LocalProtocolError("negotiation happens once per connection")
        self._negotiating = True
        return _command(_Code.OPTNEG, OPTIONS.pack(MILTER_VERSION, self.offered_actions, self.offered_protocol))

    def send(self, command: Command) -> bytes:
        """The bytes for ``command`` (and its macros); ``b""`` if the filter does not want it."""
        if self._error is not None:
            raise LocalProtocolError("the milter connection failed; close it")
        negotiated = self._negotiated
        if negotiated is None:
            raise LocalProtocolError("negotiate first")
        if self._awaiting is not None:
            raise LocalProtocolError(f"{type(self._awaiting).__name__} still awaits its reply")
        if isinstance(command, Abort):
            return _command(_Code.ABORT)
        if isinstance(command, Quit):
            return _command(_Code.QUIT)
        if isinstance(command, QuitNewConnection):
            return _command(_Code.QUIT_NC)
        code, stage = _STEPS[type(command)]
        disabled, no_reply = _STEP_FLAGS.get(type(command), _ALWAYS)
        if negotiated.protocol & disabled:
            return b""
        out = self._macros(code, stage, command.macros)
        if isinstance(command, Connect):
            data = _z(command.hostname) + command.family.value.encode()
            if command.family is not AddressFamily.UNKNOWN:
                data += struct.pack(">H", command.port or 0) + _z(command.address or "")
        elif isinstance(command, Helo):
            data = _z(command.name)
        elif isinstance(command, MailFrom):
            data = _z(command.sender) + b"".join(_z(a) for a in command.args)
        elif isinstance(command, RcptTo):
            data = _z(command.recipient) + b"".join(_z(a) for a in command.args)
        elif isinstance(command, Header):
            value = command.value
            if not negotiated.protocol & ProtocolFlag.HDR_LEADSPC and value.startswith(" "):
                value = value[1:]
            data = _z(command.name) + _z(value)
        elif isinstance(command, BodyChunk):
            if len(command.data) > BODY_CHUNK:
                raise LocalProtocolError(f"body chunks are at most {BODY_CHUNK} bytes")
            data = command.data
        else:
            data = b""
        if not negotiated.protocol & no_reply:
            self._awaiting = command
        return out + _command(code, data)

    def _macros(self, code: _Code, stage: MacroStage | None, macros: dict[str, str]) -> bytes:
        if not macros:
            return b""
        assert self._negotiated is not None
        wanted = self._negotiated.macros.get(stage) if stage is not None else None
        names = {n.strip("{}") for n in wanted} if wanted is not None else None
        data = code.value.encode("ascii")
        for name, value in macros.items():
            if names is None or name in names:
                data += _z(name if len(name) == 1 else f"{{{name}}}") + _z(value)
        return _command(_Code.MACRO, data) if len(data) > 1 else b""

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._packets.buffer.append(data)

    def next_event(self) -> ReplyEvent | NeedData:
        if self._error is not None:
            raise self._error
        try:
            while not self._events:
                if not self._read_packet():
                    if self._eof and not self._closed_reported:
                        if self._packets.mid_packet:
                            raise _remote("connection closed in the middle of a packet")
                        self._closed_reported = True
                        return ConnectionClosed()
                    return NEED_DATA
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return self._events.popleft()

    def _read_packet(self) -> bool:
        received = self._packets.next_packet()
        if received is None:
            return False
        self._events.append(self._parse(*received))
        return True

    def _parse(self, code: bytes, data: bytes) -> ReplyEvent:
        if self._negotiating:
            if code != b"O":
                raise _remote(f"expected the negotiation reply, got {code!r}")
            return self._negotiation(data)
        command = self._awaiting
        if command is None:
            raise _remote(f"reply {code!r} while no command awaits one")
        reply = self._reply(code, data)
        negotiated = self._negotiated
        assert negotiated is not None
        if isinstance(reply, Skip) and not (
            isinstance(command, BodyChunk) and self.offered_protocol & ProtocolFlag.SKIP
        ):
            raise _remote("Skip is allowed for body chunks only, and only when SKIP was offered")
        if isinstance(reply, _EDITS):
            if not isinstance(command, EndOfMessage):
                raise _remote(f"{type(reply).__name__} is allowed only at end of message")
            needed = _needed_action(reply)
            if not negotiated.actions & needed:
                raise _remote(f"{type(reply).__name__} was not negotiated ({needed!r})")
        if isinstance(reply, _FINAL):
            self._awaiting = None
        return reply

    def _negotiation(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            raise _remote("short negotiation reply")
        version, actions, protocol = OPTIONS.unpack(data[:12])
        if version < 2:
            raise _remote(f"filter speaks milter version {version}")
        if actions & ~int(self.offered_actions) or protocol & ~int(self.offered_protocol):
            raise _remote(f"filter wants actions 0x{actions:x} / protocol 0x{protocol:x} beyond our offer")
        macros: dict[MacroStage, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5 or b"\0" not in rest[4:]:
                raise _remote("malformed macro list in the negotiation reply")
            (stage_number,) = U32.unpack(rest[:4])
            end = rest.index(b"\0", 4)
            try:
                stage = MacroStage(stage_number)
            except ValueError:
                raise _remote(f"macro list for unknown stage {stage_number}") from None
            macros[stage] = tuple(rest[4:end].decode("ascii", "replace").replace(",", " ").split())
            rest = rest[end + 1 :]
        self._negotiating = False
        self._negotiated = Negotiated(min(version, MILTER_VERSION), Action(actions), ProtocolFlag(protocol), macros)
        return self._negotiated

    def _reply(self, code: bytes, data: bytes) -> ReplyEvent:
        try:
            if code in _SIMPLE_REPLIES:
                return _SIMPLE_REPLIES[code]()
            if code == b"y":
                return parse_reply_code(_strings(data, 1, "reply code")[0])
            if code == b"h":
                name, value = _strings(data, 2, "add header")
                return AddHeader(name, value)
            if code in (b"i", b"m"):
                if len(data) < 4:
                    raise _remote("header edit without its index")
                (index,) = U32.unpack(data[:4])
                name, value = _strings(data[4:], 2, "header edit")
                return InsertHeader(index, name, value) if code == b"i" else ChangeHeader(index, name, value)
            if code == b"q":
                return Quarantine(_strings(data, 1, "quarantine")[0])
            if code == b"+":
                return AddRecipient(_strings(data, 1, "add recipient")[0])
            if code == b"2":
                rcpt, args = _strings(data, 2, "add recipient")
                return AddRecipient(rcpt, args)
            if code == b"-":
                return DeleteRecipient(_strings(data, 1, "delete recipient")[0])
            if code == b"e":
                parts = split_strings(data, "change-from", _remote)
                if len(parts) not in (1, 2):
                    raise _remote("malformed change-from")
                return ChangeFrom(text(parts[0]), text(parts[1]) if len(parts) == 2 else None)
            if code == b"b":
                return ReplaceBody(data)
        except LocalProtocolError as exc:  # the reply classes validate what they hold
            raise _remote(str(exc)) from None
        raise _remote(f"unknown reply {code!r}")
