"""Milter protocol version 6, filter (server) side, sans-IO: packets in, events out, replies back.

The MTA (Postfix >= 2.6, sendmail 8.14+) connects to us, offers options, then reports each SMTP
step as a command packet; we answer most of them. Framing, commands, replies and negotiation
follow the protocol reference (shared/reference/protocols.md §2), which was read out of
Postfix's ``milter8.c`` and libmilter's ``engine.c``.

Usage (the socket loop belongs to the daemon)::

    wanted = Negotiate(
        actions=Action.ADDHDRS | Action.CHGHDRS | Action.QUARANTINE,
        protocol=ProtocolFlag.NOUNKNOWN | ProtocolFlag.NODATA | ProtocolFlag.NR_HDR | ProtocolFlag.NR_BODY,
        macros={MacroStage.EOM: ("i", "{auth_authen}")},
    )
    conn = MilterServerConnection(max_packet_size=1 << 20)
    while not closed:
        conn.receive_data(await reader.read(65536))         # b"" once the MTA closed
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, OptionNegotiation):
                writer.write(conn.send(wanted))
            elif isinstance(event, EndOfMessage):
                writer.write(conn.send(AddHeader("X-Spam-Flag", "YES")) + conn.send(Continue()))
            elif isinstance(event, ConnectionClosed):
                closed = True
            elif conn.pending is not None:                   # this event wants an answer
                writer.write(conn.send(Continue()))

Rules the connection enforces, so the daemon cannot desynchronise the MTA:

* ``next_event()`` refuses (LocalProtocolError) while ``conn.pending`` holds an event that still
  needs its final reply: the MTA sends nothing before it has one. Which events need one follows
  from the negotiation (``NR_*`` flags); EndOfMessage always does; Macros, Abort, Quit and
  QuitNewConnection never do.
* ``send()`` refuses a reply nobody waits for, an action the negotiation did not grant (header
  edits without ADDHDRS/CHGHDRS, SKIP without the SKIP flag, ...), message edits anywhere but at
  EndOfMessage, and malformed values. It raises before changing anything, so the caller can
  still send a proper reply. Edits and Quarantine and Progress may come in any number before the
  final reply (Continue, Accept, Reject, Tempfail, Discard, ReplyCode, Shutdown, or Skip for a
  body chunk).
* Commands must come in SMTP order (``_TRANSITIONS``); steps negotiated away with ``NO*`` flags
  are jumped over, and an MTA that sends one anyway is refused. A command out of order, a bad
  packet or a packet over ``max_packet_size`` raises RemoteProtocolError whose ``reply`` is a
  TEMPFAIL packet; the error is sticky, the connection should then be closed.

Text fields from the MTA (names, addresses, header values) are decoded as UTF-8 with surrogate
escapes, so 8-bit header bytes survive a round trip; body chunks stay bytes. Header values are
passed as they are both ways: without HDR_LEADSPC the MTA drops (and later adds) the space after
the colon. Macro names lose their braces: ``{client_addr}`` arrives as ``client_addr``, ``j``
stays ``j``. Each step event (Connect ... EndOfMessage, Unknown) carries ``macros``: everything
the MTA defined that is still in effect, connection and HELO macros for the whole connection,
message macros (MAIL, RCPT, DATA, EOH, EOM stages) until the message ends or is aborted. The
MTA's macro packets also come out as Macros events, which need no reply.

Deliberate differences from libmilter: an illegal step is an error instead of a silent restart
at HELO; Quarantine is allowed only at EndOfMessage (Postfix takes it anywhere); a ReplyCode
without an enhanced status code gets ``X.0.0``, because Postfix refuses replies without one.
"""

from __future__ import annotations

__all__ = [
    "ALL_ACTIONS",
    "ALL_PROTOCOL_FLAGS",
    "MILTER_VERSION",
    "NEED_DATA",
    "TEMPFAIL_PACKET",
    "Abort",
    "Accept",
    "Action",
    "AddHeader",
    "AddRecipient",
    "AddressFamily",
    "BodyChunk",
    "ChangeFrom",
    "ChangeHeader",
    "Command",
    "Connect",
    "ConnectionClosed",
    "Continue",
    "Data",
    "DeleteRecipient",
    "Discard",
    "EndOfHeaders",
    "EndOfMessage",
    "Event",
    "Header",
    "Helo",
    "InsertHeader",
    "MacroStage",
    "Macros",
    "MailFrom",
    "MilterServerConnection",
    "MilterState",
    "Negotiate",
    "NeedData",
    "OptionNegotiation",
    "Progress",
    "ProtocolFlag",
    "Quarantine",
    "Quit",
    "QuitNewConnection",
    "RcptTo",
    "Reject",
    "ReplaceBody",
    "Reply",
    "ReplyCode",
    "Shutdown",
    "Skip",
    "Tempfail",
    "Unknown",
]

import enum
import re
import struct
from collections import deque
from collections.abc import Iterable, Mapping
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

MILTER_VERSION: Final = 6

TEMPFAIL_PACKET: Final = packet(b"t")
"""The reply carried by every RemoteProtocolError: tempfail whatever the MTA was asking about."""


class Action(enum.IntFlag):
    """SMFIF_*: what the filter may do to a message at end of message."""

    ADDHDRS = 0x001  # AddHeader, InsertHeader
    CHGBODY = 0x002  # ReplaceBody
    ADDRCPT = 0x004  # AddRecipient without ESMTP args
    DELRCPT = 0x008  # DeleteRecipient
    CHGHDRS = 0x010  # ChangeHeader
    QUARANTINE = 0x020  # Quarantine
    CHGFROM = 0x040  # ChangeFrom
    ADDRCPT_PAR = 0x080  # AddRecipient with ESMTP args
    SETSYMLIST = 0x100  # macro lists in the negotiation reply


class ProtocolFlag(enum.IntFlag):
    """SMFIP_*: NO* = don't send me this step; NR_* = I won't reply to it (the MTA assumes continue)."""

    NOCONNECT = 0x000001
    NOHELO = 0x000002
    NOMAIL = 0x000004
    NORCPT = 0x000008
    NOBODY = 0x000010
    NOHDRS = 0x000020
    NOEOH = 0x000040
    NR_HDR = 0x000080
    NOUNKNOWN = 0x000100
    NODATA = 0x000200
    SKIP = 0x000400  # the MTA understands Skip
    RCPT_REJ = 0x000800  # also report recipients the MTA rejected
    NR_CONN = 0x001000
    NR_HELO = 0x002000
    NR_MAIL = 0x004000
    NR_RCPT = 0x008000
    NR_DATA = 0x010000
    NR_UNKN = 0x020000
    NR_EOH = 0x040000
    NR_BODY = 0x080000
    HDR_LEADSPC = 0x100000  # header values keep their leading space, both ways


ALL_ACTIONS: Final = Action(0x1FF)
ALL_PROTOCOL_FLAGS: Final = ProtocolFlag(0x1FFFFF)
# libmilter's reading of an MTA that sends 0 (milter version 1 defaults).
_V1_ACTIONS: Final = Action(0x0F)
_V1_PROTOCOL: Final = ProtocolFlag(0x7F)


class MacroStage(enum.IntEnum):
    """Stage numbers for requesting macro lists in the negotiation reply (note EOM before EOH)."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


class Command(enum.Enum):
    """SMFIC_*: the command byte of a packet from the MTA."""

    OPTNEG = "O"
    MACRO = "D"
    CONNECT = "C"
    HELO = "H"
    MAIL = "M"
    RCPT = "R"
    DATA = "T"
    HEADER = "L"
    EOH = "N"
    BODY = "B"
    BODYEOB = "E"
    ABORT = "A"
    QUIT = "Q"
    QUIT_NC = "K"
    UNKNOWN = "U"


class AddressFamily(enum.Enum):
    """The CONNECT family byte."""

    INET = "4"
    INET6 = "6"
    UNIX = "L"  # port 0, address = socket path
    UNKNOWN = "U"  # no port, no address


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionNegotiation:
    """The MTA's offer: its version, the actions it allows, the protocol flags it understands.

    Zero fields are already read as libmilter does (version 1 defaults). Answer with Negotiate.
    """

    version: int
    actions: Action
    protocol: ProtocolFlag


@dataclass(frozen=True, slots=True)
class Macros:
    """Macro definitions the MTA sends ahead of the command ``stage``; never answered."""

    stage: Command
    macros: dict[str, str]


@dataclass(frozen=True, slots=True)
class Connect:
    """SMTP client connected. ``hostname`` is ``[ip]`` when Postfix found no verified name."""

    hostname: str
    family: AddressFamily
    port: int | None
    address: str | None
    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO or EHLO (may repeat)."""

    name: str
    macros: dict[str, str] = field(default_factory=dict)


def _unbracket(address: str) -> str:
    return address[1:-1] if len(address) >= 2 and address[0] == "<" and address[-1] == ">" else address


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM: ``sender`` as sent, with angle brackets (``<>`` is the null sender)."""

    sender: str
    args: tuple[str, ...] = ()
    macros: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The sender without its angle brackets ("" for the null sender)."""
        return _unbracket(self.sender)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO: ``recipient`` as sent, with angle brackets."""

    recipient: str
    args: tuple[str, ...] = ()
    macros: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The recipient without its angle brackets."""
        return _unbracket(self.recipient)


@dataclass(frozen=True, slots=True)
class Data:
    """The DATA command was accepted; headers follow."""

    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Header:
    """One header. Folded lines are joined by LF plus their leading whitespace; no final CRLF.

    Without HDR_LEADSPC the MTA removed one space after the colon.
    """

    name: str
    value: str
    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    """All headers were sent."""

    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """A piece of the body, CRLF line ends, at most 65535 bytes from Postfix."""

    data: bytes = field(repr=False)
    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The whole message was sent: edit it, then give the final verdict (always required)."""

    macros: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Abort:
    """The current message is abandoned (RSET, failed transaction); the connection goes on."""


@dataclass(frozen=True, slots=True)
class Quit:
    """The MTA is done with this connection; close it."""


@dataclass(frozen=True, slots=True)
class QuitNewConnection:
    """The SMTP session ended, and a new CONNECT follows on this same milter connection."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """An SMTP command the MTA did not recognise, as the client sent it."""

    command: str
    macros: dict[str, str] = field(default_factory=dict)


# The commands an MTA reports a session with (what the MTA side sends: milter_client.Command).
_SessionCommand: TypeAlias = (
    Connect
    | Helo
    | MailFrom
    | RcptTo
    | Data
    | Header
    | EndOfHeaders
    | BodyChunk
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
)
Event: TypeAlias = OptionNegotiation | Macros | _SessionCommand | Unknown | ConnectionClosed

# Which step each event is, for the NO* (not sent) and NR_* (not answered) flags.
_STEP_FLAGS: Final[Mapping[type[Event], tuple[ProtocolFlag, ProtocolFlag]]] = {
    Connect: (ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN),
    Helo: (ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO),
    MailFrom: (ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL),
    RcptTo: (ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT),
    Data: (ProtocolFlag.NODATA, ProtocolFlag.NR_DATA),
    Header: (ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR),
    EndOfHeaders: (ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH),
    BodyChunk: (ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY),
    Unknown: (ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN),
}
_ALWAYS_ANSWERED: Final = frozenset({OptionNegotiation, EndOfMessage})
_DISABLING_FLAG: Final[Mapping[Command, ProtocolFlag]] = {
    Command.CONNECT: ProtocolFlag.NOCONNECT,
    Command.HELO: ProtocolFlag.NOHELO,
    Command.MAIL: ProtocolFlag.NOMAIL,
    Command.RCPT: ProtocolFlag.NORCPT,
    Command.DATA: ProtocolFlag.NODATA,
    Command.HEADER: ProtocolFlag.NOHDRS,
    Command.EOH: ProtocolFlag.NOEOH,
    Command.BODY: ProtocolFlag.NOBODY,
    Command.UNKNOWN: ProtocolFlag.NOUNKNOWN,
}


# -- replies -----------------------------------------------------------------------------

_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII but ':'
_FOLD: Final = re.compile(r"\n(?![ \t])")  # a line break must be followed by whitespace
_REPLY_LINE: Final = re.compile(r"[\x20-\x7e]*")
_STATUS: Final = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")
_MACRO_NAME: Final = re.compile(r"[^\s{}\x00]+")
_MAX_REPLY_LINES: Final = 32  # libmilter's smfi_setmlreply limit
_MAX_REPLY_LINE: Final = 510  # RFC 5321: 512 with the CRLF


def _check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise LocalProtocolError(f"header name must be printable ASCII without ':' or spaces, got {name!r}")
    if "\r" in value or "\0" in value or _FOLD.search(value):
        raise LocalProtocolError(
            f"header {name} value may break lines only as LF + whitespace (folding), without CR or NUL"
        )


def _check_address(value: str, what: str) -> None:
    if not value or any(c in value for c in "\r\n\0"):
        raise LocalProtocolError(f"{what} must be non-empty, without CR, LF or NUL, got {value!r}")


@dataclass(frozen=True, slots=True)
class Negotiate:
    """Our answer to OptionNegotiation: what we want. The result is the intersection with the offer.

    ``macros`` asks for macro lists per stage (names with or without braces); they are sent only
    when the MTA offered SETSYMLIST, which is then added to the actions. PyPI ``miltertest``
    refuses negotiation replies longer than 12 bytes, so leave it empty for that peer.
    """

    actions: Action = Action(0)
    protocol: ProtocolFlag = ProtocolFlag(0)
    macros: Mapping[MacroStage, Iterable[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.actions) & ~int(ALL_ACTIONS) or int(self.protocol) & ~int(ALL_PROTOCOL_FLAGS):
            raise LocalProtocolError("unknown action or protocol bits in Negotiate")
        for stage, names in self.macros.items():
            if not isinstance(stage, MacroStage):
                raise LocalProtocolError(f"macro stage must be a MacroStage, got {stage!r}")
            for name in names:
                if not _MACRO_NAME.fullmatch(name.strip("{}")):
                    raise LocalProtocolError(f"not a macro name: {name!r}")


@dataclass(frozen=True, slots=True)
class Continue:
    """Go on with this step (and send the next)."""


@dataclass(frozen=True, slots=True)
class Accept:
    """At CONNECT/HELO: accept the connection, no more events; later: accept the message."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject the connection, the message, or at RCPT this recipient only (``550 5.7.1``)."""


@dataclass(frozen=True, slots=True)
class Tempfail:
    """As Reject, with ``451 4.7.1 Service unavailable - try again later``."""


@dataclass(frozen=True, slots=True)
class Discard:
    """Accept the message and silently drop it (not at CONNECT, HELO or an unknown command)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Postfix only: answer 421 and close the SMTP session."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Still working: resets the MTA's timeout. A final reply must still follow."""


@dataclass(frozen=True, slots=True)
class Skip:
    """Send no more body chunks; go to end of message (needs the SKIP flag)."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """Reject or tempfail with our own SMTP reply: ``ReplyCode(550, "Spam", "5.7.1")``.

    ``code`` is 4xx or 5xx; ``status`` the enhanced status code with the same class, ``X.0.0``
    when left out (Postfix refuses replies without one). ``text`` is printable ASCII; LF
    separates the lines of a multi-line reply. ``%`` is sent as ``%%``, since libmilter-era MTAs
    read the reply as a format string.
    """

    code: int
    text: str
    status: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, int) or not 400 <= self.code <= 599:
            raise LocalProtocolError(f"reply code must be 4xx or 5xx, got {self.code!r}")
        if self.status is not None:
            match = _STATUS.fullmatch(self.status)
            if match is None or match[1] != str(self.code)[0]:
                raise LocalProtocolError(
                    f"enhanced status must look like {str(self.code)[0]}.x.y for {self.code}, got {self.status!r}"
                )
        lines = self.text.split("\n")
        if len(lines) > _MAX_REPLY_LINES:
            raise LocalProtocolError(f"a reply has at most {_MAX_REPLY_LINES} lines, got {len(lines)}")
        for line in lines:
            if not _REPLY_LINE.fullmatch(line):
                raise LocalProtocolError(f"reply text must be printable ASCII, got {line!r}")
            if len(self._prefix(False)) + 1 + len(line) > _MAX_REPLY_LINE:
                raise LocalProtocolError(f"reply line longer than {_MAX_REPLY_LINE} characters")

    def _prefix(self, more: bool) -> str:
        status = self.status or f"{str(self.code)[0]}.0.0"
        return f"{self.code}{'-' if more else ' '}{status}"

    def render(self) -> str:
        """The reply as the MTA reads it: lines joined by CRLF, last line without one, % doubled."""
        lines = self.text.split("\n")
        out = []
        for number, line in enumerate(lines, 1):
            prefix = self._prefix(number < len(lines))
            out.append(f"{prefix} {line.replace('%', '%%')}" if line else prefix)
        return "\r\n".join(out)


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Append a header (ADDHDRS). With HDR_LEADSPC the value's leading space is ours to give."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert a header at ``index`` (0 = the very top) (ADDHDRS)."""

    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 0xFFFFFFFF:
            raise LocalProtocolError(f"header index must fit in u32, got {self.index}")
        _check_header(self.name, self.value)


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) header called ``name``; an empty value deletes it (CHGHDRS)."""

    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        if not 1 <= self.index <= 0xFFFFFFFF:
            raise LocalProtocolError(f"header occurrence index is 1-based, got {self.index}")
        _check_header(self.name, self.value)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Hold the message in the MTA's quarantine with this reason (QUARANTINE)."""

    reason: str

    def __post_init__(self) -> None:
        _check_address(self.reason, "quarantine reason")


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """Add a recipient (ADDRCPT), with ESMTP ``args`` such as ``NOTIFY=NEVER`` (ADDRCPT_PAR)."""

    recipient: str
    args: str | None = None

    def __post_init__(self) -> None:
        _check_address(self.recipient, "recipient")
        if self.args is not None:
            _check_address(self.args, "recipient ESMTP args")


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """Remove a recipient, spelled exactly as the MTA reported it (DELRCPT)."""

    recipient: str

    def __post_init__(self) -> None:
        _check_address(self.recipient, "recipient")


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    """Replace the envelope sender, optionally with ESMTP ``args`` (CHGFROM)."""

    sender: str
    args: str | None = None

    def __post_init__(self) -> None:
        _check_address(self.sender, "sender")
        if self.args is not None:
            _check_address(self.args, "sender ESMTP args")


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace the body (CHGBODY); CRLF line ends. Several in a row append to each other."""

    data: bytes = field(repr=False)


_SimpleReply: TypeAlias = Continue | Accept | Reject | Tempfail | Discard | Shutdown | Progress | Skip
_Edit: TypeAlias = (
    AddHeader | InsertHeader | ChangeHeader | Quarantine | AddRecipient | DeleteRecipient | ChangeFrom | ReplaceBody
)
# What answers a step (what the MTA side receives: milter_client.ReplyEvent).
_StepReply: TypeAlias = _SimpleReply | ReplyCode | _Edit
Reply: TypeAlias = Negotiate | _StepReply

_FINAL: Final = (Continue, Accept, Reject, Tempfail, Discard, Shutdown, ReplyCode, Skip)
# The replies without data, by their command byte (the MTA side decodes with this table too).
_SIMPLE_REPLIES: Final[Mapping[bytes, type[_SimpleReply]]] = {
    b"c": Continue,
    b"a": Accept,
    b"r": Reject,
    b"t": Tempfail,
    b"d": Discard,
    b"4": Shutdown,
    b"p": Progress,
    b"s": Skip,
}
_SIMPLE_CODES: Final[Mapping[type, bytes]] = {kind: code for code, kind in _SIMPLE_REPLIES.items()}
_EDITS: Final = (
    AddHeader,
    InsertHeader,
    ChangeHeader,
    Quarantine,
    AddRecipient,
    DeleteRecipient,
    ChangeFrom,
    ReplaceBody,
)
# Verdicts that end the message when they answer a message step (RCPT: see _ends_message).
_MESSAGE_ENDING: Final = (Accept, Reject, Tempfail, Discard, Shutdown, ReplyCode)


def _needed_action(reply: _Edit) -> Action:
    if isinstance(reply, AddHeader | InsertHeader):
        return Action.ADDHDRS
    if isinstance(reply, ChangeHeader):
        return Action.CHGHDRS
    if isinstance(reply, Quarantine):
        return Action.QUARANTINE
    if isinstance(reply, AddRecipient):
        return Action.ADDRCPT_PAR if reply.args is not None else Action.ADDRCPT
    if isinstance(reply, DeleteRecipient):
        return Action.DELRCPT
    if isinstance(reply, ChangeFrom):
        return Action.CHGFROM
    return Action.CHGBODY


def _encode(reply: Reply) -> bytes:
    """The packet(s) for a reply that passed every check."""
    code = _SIMPLE_CODES.get(type(reply))
    if code is not None:
        return packet(code)
    if isinstance(reply, ReplyCode):
        return packet(b"y", cstring(reply.render(), "reply"))
    if isinstance(reply, AddHeader):
        return packet(b"h", cstring(reply.name, "header name") + cstring(reply.value, "header value"))
    if isinstance(reply, InsertHeader | ChangeHeader):
        command = b"i" if isinstance(reply, InsertHeader) else b"m"
        data = U32.pack(reply.index) + cstring(reply.name, "header name") + cstring(reply.value, "header value")
        return packet(command, data)
    if isinstance(reply, Quarantine):
        return packet(b"q", cstring(reply.reason, "reason"))
    if isinstance(reply, AddRecipient):
        if reply.args is None:
            return packet(b"+", cstring(reply.recipient, "recipient"))
        return packet(b"2", cstring(reply.recipient, "recipient") + cstring(reply.args, "args"))
    if isinstance(reply, DeleteRecipient):
        return packet(b"-", cstring(reply.recipient, "recipient"))
    if isinstance(reply, ChangeFrom):
        args = b"" if reply.args is None else cstring(reply.args, "args")
        return packet(b"e", cstring(reply.sender, "sender") + args)
    assert isinstance(reply, ReplaceBody)
    data = reply.data
    return b"".join(packet(b"b", data[i : i + CHUNK]) for i in range(0, max(len(data), 1), CHUNK))


# -- the state machine -------------------------------------------------------------------


class MilterState(enum.Enum):
    """The last step the MTA reported (or where a reply of ours left the conversation)."""

    NEGOTIATING = "waiting for option negotiation"
    CONNECTING = "negotiated, waiting for CONNECT"
    CONNECTED = "connected"
    HELO = "between messages (after HELO, or after a message ended or was aborted)"
    MAIL = "after MAIL"
    RCPT = "after RCPT"
    DATA = "after DATA"
    HEADERS = "in headers"
    END_OF_HEADERS = "after end of headers"
    BODY = "in body"
    END_OF_MESSAGE = "at end of message"
    CLOSED = "closed"
    ERROR = "error"


class _Step(enum.Enum):
    """Moves that are not MTA commands."""

    MESSAGE_ENDED = "our verdict ended the message"


_S = MilterState
_C = Command
_Moves: TypeAlias = dict[Command | _Step, MilterState]
_QUITS: Final[_Moves] = {_C.QUIT: _S.CLOSED}
_IN_MESSAGE: Final[_Moves] = {_C.ABORT: _S.HELO, _C.QUIT: _S.CLOSED, _Step.MESSAGE_ENDED: _S.HELO}


def _between_messages(state: MilterState) -> _Moves:
    # ABORT here is a no-op: Postfix sends it for RSET outside a transaction, and after messages.
    return {
        _C.HELO: _S.HELO,
        _C.MAIL: _S.MAIL,
        _C.UNKNOWN: state,
        _C.ABORT: state,
        _C.QUIT: _S.CLOSED,
        _C.QUIT_NC: _S.CONNECTING,
    }


# Every legal move with all steps enabled. Besides these: MACRO packets may come before any
# command (they change no state), EOF at any packet boundary moves to CLOSED, and a protocol
# error moves any state to ERROR. Steps switched off with NO* flags
# are jumped over by _skip_disabled(). Postfix reports a repeated HELO inside a transaction and
# then aborts it, hence HELO from MAIL and RCPT.
_TRANSITIONS: Final[Mapping[MilterState, Mapping[Command | _Step, MilterState]]] = {
    _S.NEGOTIATING: {_C.OPTNEG: _S.CONNECTING, **_QUITS},
    _S.CONNECTING: {_C.CONNECT: _S.CONNECTED, **_QUITS},
    _S.CONNECTED: _between_messages(_S.CONNECTED),
    _S.HELO: _between_messages(_S.HELO),
    _S.MAIL: {_C.RCPT: _S.RCPT, _C.HELO: _S.HELO, _C.UNKNOWN: _S.MAIL, **_IN_MESSAGE},
    _S.RCPT: {_C.RCPT: _S.RCPT, _C.DATA: _S.DATA, _C.HELO: _S.HELO, _C.UNKNOWN: _S.RCPT, **_IN_MESSAGE},
    _S.DATA: {_C.HEADER: _S.HEADERS, _C.EOH: _S.END_OF_HEADERS, **_IN_MESSAGE},
    _S.HEADERS: {_C.HEADER: _S.HEADERS, _C.EOH: _S.END_OF_HEADERS, **_IN_MESSAGE},
    _S.END_OF_HEADERS: {_C.BODY: _S.BODY, _C.BODYEOB: _S.END_OF_MESSAGE, **_IN_MESSAGE},
    _S.BODY: {_C.BODY: _S.BODY, _C.BODYEOB: _S.END_OF_MESSAGE, **_IN_MESSAGE},
    # Its reply is always final and always ends the message, so no command is read here.
    _S.END_OF_MESSAGE: {_Step.MESSAGE_ENDED: _S.HELO},
    _S.CLOSED: {},
    _S.ERROR: {},
}
# Each step command leads to one state: the state a disabled command would have reached.
_TARGET: Final[Mapping[Command, MilterState]] = {
    _C.CONNECT: _S.CONNECTED,
    _C.HELO: _S.HELO,
    _C.MAIL: _S.MAIL,
    _C.RCPT: _S.RCPT,
    _C.DATA: _S.DATA,
    _C.HEADER: _S.HEADERS,
    _C.EOH: _S.END_OF_HEADERS,
    _C.BODY: _S.BODY,
}
_MESSAGE_STATES: Final = frozenset(
    {_S.MAIL, _S.RCPT, _S.DATA, _S.HEADERS, _S.END_OF_HEADERS, _S.BODY, _S.END_OF_MESSAGE}
)
# Macros that belong to one message and are dropped when it ends.
_MESSAGE_MACRO_STAGES: Final = frozenset({_C.MAIL, _C.RCPT, _C.DATA, _C.HEADER, _C.EOH, _C.BODY, _C.BODYEOB})
# Stages the MTA may attach macros to, in the order later ones override earlier ones.
_MACRO_ORDER: Final = (
    _C.CONNECT,
    _C.HELO,
    _C.MAIL,
    _C.RCPT,
    _C.DATA,
    _C.HEADER,
    _C.EOH,
    _C.BODY,
    _C.BODYEOB,
    _C.UNKNOWN,
)


def _skip_disabled(
    table: Mapping[MilterState, Mapping[Command | _Step, MilterState]], disabled: Iterable[Command]
) -> dict[MilterState, dict[Command | _Step, MilterState]]:
    """The table with disabled steps jumped over: wherever a disabled command could lead, its
    target state's moves become available directly (to a fixpoint, for runs of disabled steps)."""
    result = {state: dict(moves) for state, moves in table.items()}
    skipped = {command: _TARGET[command] for command in disabled if command in _TARGET}
    changed = True
    while changed:
        changed = False
        for moves in result.values():
            for command, target in list(moves.items()):
                if command in skipped:
                    for move, destination in result[target].items():
                        if move not in moves:
                            moves[move] = destination
                            changed = True
    return result


def _remote(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reply=TEMPFAIL_PACKET)


def _no_data(data: bytes, what: str) -> None:
    if data:
        raise _remote(f"{what} carries {len(data)} unexpected data bytes")


def _macro_name(raw: bytes) -> str:
    name = text(raw)
    return name[1:-1] if len(name) > 2 and name[0] == "{" and name[-1] == "}" else name


class MilterServerConnection:
    """One MTA connection, filter side; see the module docstring for the loop and the rules.

    ``max_packet_size`` caps a packet's length field (command byte + data); it is checked as soon
    as the 4 length bytes arrive. Postfix sends body packets of 65536, so keep it at least that.
    """

    def __init__(self, *, max_packet_size: int = 1024 * 1024) -> None:
        if max_packet_size < 13:
            raise ValueError("max_packet_size must be at least 13 (the size of an option negotiation)")
        self._state = MilterState.NEGOTIATING
        self._table: Mapping[MilterState, Mapping[Command | _Step, MilterState]] = _TRANSITIONS
        self._packets = PacketReader(max_packet_size, _remote)
        self._closed_reported = False
        self._error: RemoteProtocolError | None = None
        self._events: deque[tuple[Event, bool]] = deque()
        self._pending: Event | None = None
        self._macros: dict[Command, dict[str, str]] = {}
        self._version: int | None = None
        self._actions = Action(0)
        self._protocol = ProtocolFlag(0)
        self._macro_requests: dict[MacroStage, tuple[str, ...]] = {}
        # REPLBODY packets must be consecutive (Postfix): 0 none yet, 1 sending, 2 finished.
        self._body_replacement = 0

    # -- introspection ---------------------------------------------------------------------

    @property
    def state(self) -> MilterState:
        """Where the conversation is."""
        return self._state

    @property
    def pending(self) -> Event | None:
        """The event still waiting for our final reply, or None."""
        return self._pending

    @property
    def version(self) -> int | None:
        """The negotiated protocol version (None before negotiation)."""
        return self._version

    @property
    def actions(self) -> Action:
        """The negotiated actions: what ``send()`` will allow at end of message."""
        return self._actions

    @property
    def protocol(self) -> ProtocolFlag:
        """The negotiated protocol flags."""
        return self._protocol

    @property
    def macro_requests(self) -> Mapping[MacroStage, tuple[str, ...]]:
        """The macro lists sent in the negotiation reply (empty if the MTA could not take them)."""
        return dict(self._macro_requests)

    @property
    def macros(self) -> dict[str, str]:
        """Every macro in effect now, later stages overriding earlier ones."""
        merged: dict[str, str] = {}
        for stage in _MACRO_ORDER:
            merged.update(self._macros.get(stage, {}))
        return merged

    def needs_reply(self, event_type: type[Event]) -> bool:
        """Whether an event of this type waits for a reply under the current negotiation."""
        if event_type in _ALWAYS_ANSWERED:
            return True
        flags = _STEP_FLAGS.get(event_type)
        return flags is not None and not self._protocol & flags[1]

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the MTA; ``b""`` means it closed its side."""
        # After QUIT (or an error) nothing more is read.
        self._packets.buffer.receive(data, keep=self._state not in (MilterState.CLOSED, MilterState.ERROR))

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError (sticky) on a bad packet."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            raise LocalProtocolError(f"{type(self._pending).__name__} still needs its reply")
        try:
            while not self._events:
                if not self._read_packet():
                    return self._at_end()
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = MilterState.ERROR
            self._packets.clear()
            self._events.clear()
            raise
        event, answered = self._events.popleft()
        if answered:
            self._pending = event
        return event

    def _at_end(self) -> ConnectionClosed | NeedData:
        """No whole packet buffered: NEED_DATA, or at EOF a clean close or a truncated packet."""
        if not self._packets.buffer.closed:
            return NEED_DATA
        if self._packets.mid_packet:
            raise _remote("connection closed in the middle of a packet")
        if self._closed_reported:
            return NEED_DATA
        self._closed_reported = True
        self._state = MilterState.CLOSED
        return ConnectionClosed()

    def _read_packet(self) -> bool:
        """Decode one packet into events; False when no whole packet is buffered."""
        if self._state is MilterState.CLOSED:
            self._packets.clear()
            return False
        received = self._packets.next_packet()
        if received is None:
            return False
        code, data = received
        self._dispatch(code[0], data)
        return True

    def _dispatch(self, code: int, data: bytes) -> None:
        try:
            command = Command(chr(code))
        except ValueError:
            raise _remote(f"unknown command byte 0x{code:02x}") from None
        if command is Command.MACRO:
            self._macro(data)
            return
        flag = _DISABLING_FLAG.get(command)
        if flag is not None and self._protocol & flag:
            raise _remote(f"{command.name} sent although the filter negotiated it away ({flag.name})")
        target = self._table[self._state].get(command)
        if target is None:
            raise _remote(f"{command.name} is out of order: {self._state.value}")
        event = self._parse(command, data)  # may refuse the packet before anything moves
        self._state = target
        if isinstance(event, Abort | QuitNewConnection | Quit):
            self._forget_message()
            if not isinstance(event, Abort):
                self._macros.clear()
        if isinstance(event, Helo):
            self._forget_message()  # a HELO inside a transaction ends it (Postfix aborts next)
        if command is Command.BODYEOB and data:
            # libmilter's reading: data on end-of-body is the last body chunk, not answered.
            self._events.append((BodyChunk(data, self.macros), False))
        event = _with_macros(event, self.macros)
        self._events.append((event, self.needs_reply(type(event))))

    def _macro(self, data: bytes) -> None:
        if self._state in (MilterState.NEGOTIATING, MilterState.CLOSED):
            raise _remote(f"macros are out of order: {self._state.value}")
        if not data:
            raise _remote("MACRO packet without a stage")
        try:
            stage = Command(chr(data[0]))
        except ValueError:
            stage = None
        if stage not in _MACRO_ORDER:
            raise _remote(f"MACRO packet for unknown stage 0x{data[0]:02x}")
        assert stage is not None
        macros: dict[str, str] = {}
        if len(data) > 1:
            strings = split_strings(data[1:], "MACRO", _remote)
            if len(strings) % 2:
                raise _remote(f"MACRO: {len(strings)} strings do not make name/value pairs")
            for name, value in zip(strings[::2], strings[1::2], strict=True):
                macros[_macro_name(name)] = text(value)
        self._macros[stage] = macros
        self._events.append((Macros(stage, dict(macros)), False))

    def _parse(self, command: Command, data: bytes) -> Event:
        """The event for one command packet (macros are attached later)."""
        name = command.name
        if command is Command.OPTNEG:
            return self._offer(data)
        if command is Command.CONNECT:
            return _connect(data)
        if command is Command.HELO:
            return Helo(text(exactly(data, 1, name, _remote)[0]))
        if command in (Command.MAIL, Command.RCPT):
            if not data:
                raise _remote(f"{name} without an address")
            first, *args = (text(s) for s in split_strings(data, name, _remote))
            return MailFrom(first, tuple(args)) if command is Command.MAIL else RcptTo(first, tuple(args))
        if command is Command.HEADER:
            header, value = exactly(data, 2, name, _remote)
            if not header:
                raise _remote("HEADER with an empty name")
            return Header(text(header), text(value))
        if command is Command.BODY:
            return BodyChunk(data)
        if command is Command.UNKNOWN:
            return Unknown(text(exactly(data, 1, name, _remote)[0]))
        if command is Command.BODYEOB:
            return EndOfMessage()
        _no_data(data, name)
        simple: dict[Command, Event] = {
            Command.DATA: Data(),
            Command.EOH: EndOfHeaders(),
            Command.ABORT: Abort(),
            Command.QUIT: Quit(),
            Command.QUIT_NC: QuitNewConnection(),
        }
        return simple[command]

    def _offer(self, data: bytes) -> OptionNegotiation:
        if len(data) < 12:
            raise _remote(f"OPTNEG needs 12 data bytes, got {len(data)}")
        # libmilter ignores anything past the three numbers; so do we.
        version, actions, protocol = OPTIONS.unpack(data[:12])
        if version < 2:
            raise _remote(f"MTA speaks milter version {version}; at least 2 is needed")
        return OptionNegotiation(
            version,
            Action(actions) if actions else _V1_ACTIONS,
            ProtocolFlag(protocol) if protocol else _V1_PROTOCOL,
        )

    def _forget_message(self) -> None:
        for stage in _MESSAGE_MACRO_STAGES:
            self._macros.pop(stage, None)
        self._body_replacement = 0

    # -- replying --------------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """The bytes for ``reply`` to the pending event; LocalProtocolError if it is not allowed."""
        if self._state is MilterState.ERROR:
            raise LocalProtocolError("the connection failed; close it")
        event = self._pending
        if isinstance(reply, Negotiate):
            if not isinstance(event, OptionNegotiation):
                raise LocalProtocolError("Negotiate answers OptionNegotiation only")
            return self._negotiate(event, reply)
        if event is None:
            raise LocalProtocolError(f"{type(reply).__name__}: no event is waiting for a reply")
        if isinstance(event, OptionNegotiation):
            raise LocalProtocolError("answer OptionNegotiation with Negotiate")
        self._check(event, reply)
        packet = _encode(reply)
        if isinstance(reply, ReplaceBody):
            self._body_replacement = 1
        elif self._body_replacement == 1:
            self._body_replacement = 2
        if isinstance(reply, _FINAL):
            self._pending = None
            if self._ends_message(event, reply):
                self._state = self._table[self._state][_Step.MESSAGE_ENDED]
                self._forget_message()
        return packet

    def _check(self, event: Event, reply: Reply) -> None:
        what = type(reply).__name__
        answering = type(event).__name__
        if isinstance(reply, Discard) and isinstance(event, Connect | Helo | Unknown):
            raise LocalProtocolError(f"Discard cannot answer {answering}: it applies to messages")
        if isinstance(reply, Skip):
            if not isinstance(event, BodyChunk):
                raise LocalProtocolError(f"Skip answers body chunks only, not {answering}")
            if not self._protocol & ProtocolFlag.SKIP:
                raise LocalProtocolError("Skip was not negotiated (protocol flag SKIP)")
        if isinstance(reply, _EDITS):
            if not isinstance(event, EndOfMessage):
                raise LocalProtocolError(f"{what} is allowed only at end of message, not at {answering}")
            needed = _needed_action(reply)
            if not self._actions & needed:
                raise LocalProtocolError(f"{what} was not negotiated (action {needed.name})")
            if isinstance(reply, ReplaceBody) and self._body_replacement == 2:
                raise LocalProtocolError("ReplaceBody packets must be consecutive (Postfix cannot mix them)")

    def _ends_message(self, event: Event, reply: Reply) -> bool:
        if isinstance(event, EndOfMessage):
            return True
        if self._state not in _MESSAGE_STATES or not isinstance(reply, _MESSAGE_ENDING):
            return False
        if isinstance(event, RcptTo):
            # Reject, tempfail or a reply code refuse this recipient only.
            return isinstance(reply, Accept | Discard | Shutdown)
        return not isinstance(event, Unknown)

    def _negotiate(self, offer: OptionNegotiation, wanted: Negotiate) -> bytes:
        version = min(MILTER_VERSION, offer.version)
        actions = Action(wanted.actions & offer.actions & ALL_ACTIONS)
        protocol = ProtocolFlag(wanted.protocol & offer.protocol & ALL_PROTOCOL_FLAGS)
        requests: dict[MacroStage, tuple[str, ...]] = {}
        if wanted.macros and offer.actions & Action.SETSYMLIST:
            actions |= Action.SETSYMLIST
            for stage in sorted(wanted.macros):
                names = tuple(_braced(name) for name in wanted.macros[stage])
                if names:
                    requests[stage] = names
        data = OPTIONS.pack(version, actions, protocol)
        for stage, names in requests.items():
            data += U32.pack(stage) + " ".join(names).encode("ascii", "surrogateescape") + b"\0"
        self._version, self._actions, self._protocol = version, actions, protocol
        self._macro_requests = requests
        disabled = {command for command, flag in _DISABLING_FLAG.items() if protocol & flag}
        if version < MILTER_VERSION:
            disabled.add(Command.DATA)  # older MTAs may not report DATA at all
        self._table = _skip_disabled(_TRANSITIONS, disabled)
        self._pending = None
        return packet(b"O", data)


def _braced(name: str) -> str:
    """Macro names as MTAs list them: one letter bare, longer ones in braces."""
    bare = name.strip("{}")
    return bare if len(bare) == 1 else f"{{{bare}}}"


def _with_macros(event: Event, macros: dict[str, str]) -> Event:
    if isinstance(event, Connect):
        return Connect(event.hostname, event.family, event.port, event.address, macros)
    if isinstance(event, Helo):
        return Helo(event.name, macros)
    if isinstance(event, MailFrom):
        return MailFrom(event.sender, event.args, macros)
    if isinstance(event, RcptTo):
        return RcptTo(event.recipient, event.args, macros)
    if isinstance(event, Data):
        return Data(macros)
    if isinstance(event, Header):
        return Header(event.name, event.value, macros)
    if isinstance(event, EndOfHeaders):
        return EndOfHeaders(macros)
    if isinstance(event, BodyChunk):
        return BodyChunk(event.data, macros)
    if isinstance(event, EndOfMessage):
        return EndOfMessage(macros)
    if isinstance(event, Unknown):
        return Unknown(event.command, macros)
    return event


def _connect(data: bytes) -> Connect:
    """hostname NUL, family byte, then (unless family U) u16 port and address NUL."""
    end = data.find(b"\0")
    if end < 0:
        raise _remote("CONNECT: hostname without its terminating NUL")
    hostname, rest = text(data[:end]), data[end + 1 :]
    if not rest:
        raise _remote("CONNECT without an address family")
    try:
        family = AddressFamily(chr(rest[0]))
    except ValueError:
        raise _remote(f"CONNECT with unknown address family 0x{rest[0]:02x}") from None
    if family is AddressFamily.UNKNOWN:
        _no_data(rest[1:], "CONNECT of unknown family")
        return Connect(hostname, family, None, None)
    if len(rest) < 3:
        raise _remote("CONNECT without a port")
    (port,) = struct.unpack(">H", rest[1:3])
    (address,) = exactly(rest[3:], 1, "CONNECT address", _remote)
    return Connect(hostname, family, port, text(address))
