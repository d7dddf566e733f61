"""Pre-queue filtering: the SMTP server's side of a milter, as Postfix's smtpd_milters.

`MilterSession` is one milter connection for one SMTP session, driven step by step by
`filterd.mta.smtpd` (connect, helo, mail, rcpt, data, then the message at the final dot).
Each step returns a `Verdict`; the SMTP server decides what it means at that step. Any
failure (cannot connect, timeout, a confused filter) closes the connection and returns a
``failed`` verdict: the server then applies ``mta.milter_default_action`` for the rest of
the session, as Postfix does.

`apply_edits` turns the end-of-message edits into the message and envelope to queue.

The filter is not shown the MTA's own Received header (``own_headers``), as Postfix (milter8.c)
and Sendmail do not show theirs: it reads the message as the client sent it, the same behind
either MTA. Its header edits are placed as Postfix's cleanup places them (see `apply_edits`).
"""

from __future__ import annotations

__all__ = ["HeaderSplit", "MessageEdits", "MilterSession", "Verdict", "apply_edits", "field_on_top", "split_headers"]

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from filterd.config.schema import clamd_address
from filterd.errors import ProtocolError
from filterd.protocols import NeedData
from filterd.protocols.milter import (
    Abort,
    Accept,
    AddHeader,
    AddRecipient,
    AddressFamily,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Connect,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    MailFrom,
    Progress,
    ProtocolFlag,
    Quarantine,
    Quit,
    RcptTo,
    Reject,
    ReplaceBody,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
)
from filterd.protocols.milter_client import BODY_CHUNK, Command, MilterClientConnection, ReplyEvent

log = logging.getLogger(__name__)

VerdictKind = Literal["continue", "accept", "reject", "tempfail", "discard", "shutdown", "failed"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the filter said to one step; ``reply`` is its own SMTP reply for reject/tempfail."""

    kind: VerdictKind
    reply: ReplyCode | None = None
    reason: str = ""  # for "failed": what went wrong


@dataclass(slots=True)
class MessageEdits:
    """The end-of-message edits, in the order the filter sent them."""

    headers: list[AddHeader | InsertHeader | ChangeHeader] = field(default_factory=list)
    add_rcpts: list[str] = field(default_factory=list)
    del_rcpts: list[str] = field(default_factory=list)
    new_sender: str | None = None
    body: bytes | None = None
    quarantine: str | None = None
    hidden: int = 0  # header fields at the top the filter was not shown (our Received)


_CONTINUE = Verdict("continue")


def _verdict(reply: ReplyEvent) -> Verdict:
    if isinstance(reply, Continue | Skip):
        return _CONTINUE
    if isinstance(reply, Accept):
        return Verdict("accept")
    if isinstance(reply, Reject):
        return Verdict("reject")
    if isinstance(reply, Tempfail):
        return Verdict("tempfail")
    if isinstance(reply, Discard):
        return Verdict("discard")
    if isinstance(reply, Shutdown):
        return Verdict("shutdown")
    assert isinstance(reply, ReplyCode)
    return Verdict("reject" if reply.code >= 500 else "tempfail", reply)


class MilterSession:
    """One filter connection for one SMTP session (see the module docstring)."""

    def __init__(self, address: str, *, connect_timeout: float, timeout: float, log_prefix: str = "") -> None:
        self._address = address
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._prefix = log_prefix
        self._conn = MilterClientConnection()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.failed = False

    @property
    def protocol(self) -> ProtocolFlag:
        negotiated = self._conn.negotiated
        return negotiated.protocol if negotiated else ProtocolFlag(0)

    async def _open(self) -> None:
        target = clamd_address(self._address)
        async with asyncio.timeout(self._connect_timeout):
            if isinstance(target, str):
                self._reader, self._writer = await asyncio.open_unix_connection(target)
            else:
                self._reader, self._writer = await asyncio.open_connection(*target)
            self._writer.write(self._conn.negotiate())
            while self._conn.negotiating:
                await self._receive()

    async def _receive(self) -> list[ReplyEvent]:
        """Read until at least one reply is decoded."""
        assert self._reader is not None
        events: list[ReplyEvent] = []
        while not events:
            while not isinstance(event := self._conn.next_event(), NeedData):
                events.append(event)
            if events:
                break
            chunk = await self._reader.read(65536)
            self._conn.receive_data(chunk)
            if not chunk:
                while not isinstance(event := self._conn.next_event(), NeedData):
                    events.append(event)
                if not events:
                    raise ConnectionError("milter closed the connection")
        return events

    async def _step(self, command: Command, edits: MessageEdits | None = None) -> Verdict:
        """Send one command and wait for its final reply; edits (at end of message) go to ``edits``."""
        if self.failed:
            return Verdict("failed", reason="milter connection already failed")
        try:
            if self._writer is None:
                await self._open()
            assert self._writer is not None
            data = self._conn.send(command)
            if not data:
                return _CONTINUE
            self._writer.write(data)
            if self._conn.awaiting is None:
                return _CONTINUE  # NR_*: the filter does not answer this step
            while True:
                async with asyncio.timeout(self._timeout):  # Progress restarts the clock
                    replies = await self._receive()
                for reply in replies:
                    if isinstance(reply, Progress):
                        continue
                    if edits is not None and self._edit(reply, edits):
                        continue
                    if self._conn.awaiting is None:
                        return _verdict(reply)
                    raise ProtocolError(f"unexpected {type(reply).__name__}")
        except (OSError, TimeoutError, ProtocolError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("%smilter %s failed at %s: %s", self._prefix, self._address, type(command).__name__, reason)
            self.failed = True
            await self.close()
            return Verdict("failed", reason=reason)

    @staticmethod
    def _edit(reply: ReplyEvent, edits: MessageEdits) -> bool:
        if isinstance(reply, AddHeader | InsertHeader | ChangeHeader):
            edits.headers.append(reply)
        elif isinstance(reply, AddRecipient):
            edits.add_rcpts.append(reply.recipient)
        elif isinstance(reply, DeleteRecipient):
            edits.del_rcpts.append(reply.recipient)
        elif isinstance(reply, ChangeFrom):
            edits.new_sender = reply.sender
        elif isinstance(reply, ReplaceBody):
            edits.body = (edits.body or b"") + reply.data
        elif isinstance(reply, Quarantine):
            edits.quarantine = reply.reason
        else:
            return False
        return True

    # -- the SMTP steps ---------------------------------------------------------------------

    async def connect(self, client_ip: str, client_port: int, client_name: str, macros: dict[str, str]) -> Verdict:
        family = AddressFamily.INET6 if ":" in client_ip else AddressFamily.INET
        hostname = client_name if client_name and client_name != "unknown" else f"[{client_ip}]"
        return await self._step(Connect(hostname, family, client_port, client_ip, macros))

    async def helo(self, name: str, macros: dict[str, str]) -> Verdict:
        return await self._step(Helo(name, macros))

    async def mail(self, sender: str, args: list[str], macros: dict[str, str]) -> Verdict:
        return await self._step(MailFrom(f"<{sender}>", tuple(args), macros))

    async def rcpt(self, recipient: str, args: list[str], macros: dict[str, str]) -> Verdict:
        return await self._step(RcptTo(f"<{recipient}>", tuple(args), macros))

    async def data(self, macros: dict[str, str]) -> Verdict:
        return await self._step(Data(macros))

    async def message(
        self, data: bytes, macros: dict[str, str], *, own_headers: int = 0, split: HeaderSplit | None = None
    ) -> tuple[Verdict, MessageEdits]:
        """Headers, end of headers, body chunks, end of message; the verdict and the edits.

        The first ``own_headers`` header fields are the ones this MTA added (its Received): they
        are not sent, and the edits say so for `apply_edits`. ``split``: `split_headers` of
        ``data``, when the caller has it already."""
        edits = MessageEdits(hidden=own_headers)
        headers, body_start, _ = split if split is not None else split_headers(data)
        for name, value, _raw in headers[own_headers:]:
            # folded lines go to the filter joined by LF, as Postfix sends them
            verdict = await self._step(Header(name, value.replace("\r\n", "\n")))
            if verdict.kind != "continue":
                return verdict, edits
        verdict = await self._step(EndOfHeaders())
        if verdict.kind != "continue":
            return verdict, edits
        body = data[body_start:]
        for i in range(0, len(body), BODY_CHUNK):
            verdict = await self._step(BodyChunk(body[i : i + BODY_CHUNK]))
            if verdict.kind != "continue":
                return verdict, edits
        verdict = await self._step(EndOfMessage(macros), edits)
        return verdict, edits

    async def abort(self) -> None:
        """The SMTP transaction ended without a message (RSET, refused): tell the filter."""
        if self._writer is None or self.failed or self._conn.negotiated is None:
            return
        with contextlib.suppress(OSError, ProtocolError):
            self._writer.write(self._conn.send(Abort()))

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        with contextlib.suppress(OSError, ProtocolError):
            if not self.failed and self._conn.negotiated is not None and self._conn.awaiting is None:
                writer.write(self._conn.send(Quit()))
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()


# -- the message ---------------------------------------------------------------------------

_HEADER_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")

# `split_headers`: ([(name, value, raw bytes), ...], where the body starts, empty line between)
HeaderSplit = tuple[list[tuple[str, str, bytes]], int, bool]


def split_headers(data: bytes) -> HeaderSplit:
    """The header fields as (name, value as sent with its leading space and CRLF folds, raw
    bytes), where the body starts, and whether an empty line separated them (the body may
    also start at the first line that is not a header field)."""
    headers: list[tuple[str, str, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        end = len(data) if end < 0 else end + 2
        line = data[pos:end]
        if line == b"\r\n":
            return headers, end, True
        if line[:1] in (b" ", b"\t") and headers:
            name, value, raw = headers[-1]
            text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            headers[-1] = (name, value + "\r\n" + text, raw + line)
        else:
            match = _HEADER_START.match(line)
            if match is None:
                return headers, pos, False
            value = line[match.end() :].rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            headers.append((match[1].decode("ascii"), value, line))
        pos = end
    return headers, pos, False


def field_on_top(field: bytes, split: HeaderSplit) -> HeaderSplit:
    """`split_headers` of ``field + data`` from that of ``data``: ``field`` (one whole header
    field with CRLF, our Received) above the fields of ``data``, without splitting ``data``
    again. Unlike a new split, a first line of ``data`` that starts with white space stays
    where it is (not a header field) instead of becoming a fold of ``field``."""
    own, end, _ = split_headers(field)
    if len(own) != 1 or end != len(field):
        raise ValueError(f"not one whole header field: {field[:80]!r}")
    headers, body_start, blank = split
    return [*own, *headers], len(field) + body_start, blank


def _render_header(name: str, value: str, leadspc: bool) -> bytes:
    if not leadspc:
        value = " " + value
    text = f"{name}:{value}".replace("\r\n", "\n").replace("\n", "\r\n")
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


def apply_edits(data: bytes, edits: MessageEdits, *, leadspc: bool, split: HeaderSplit | None = None) -> bytes:
    """The message with the filter's header edits and body replacement applied (CRLF ends).

    AddHeader appends to the header block; InsertHeader(i) puts a header before the i-th
    (0 = top, above our own Received); ChangeHeader(i) changes the i-th occurrence of that name
    (1-based) among the fields the filter was shown (``edits.hidden`` ones are skipped), deletes
    it when the value is empty, and appends it when there is no such occurrence. These are
    Postfix's rules (cleanup_milter.c), kept for Sendmail compatibility. ``leadspc``: the
    filter negotiated HDR_LEADSPC, so its values carry their own leading space. Headers the
    filter did not touch keep their bytes. ``split``: `split_headers` of ``data``, if known.
    """
    headers, body_start, blank = split if split is not None else split_headers(data)
    fields: list[bytes | None] = [raw for _, _, raw in headers]
    # The fields the filter was not shown have no name to match (their places still count).
    names = ["" if i < edits.hidden else name.lower() for i, (name, _, _) in enumerate(headers)]
    for edit in edits.headers:
        rendered = _render_header(edit.name, edit.value, leadspc)
        if isinstance(edit, AddHeader):
            fields.append(rendered)
            names.append(edit.name.lower())
        elif isinstance(edit, InsertHeader):
            index = min(edit.index, len(fields))
            fields.insert(index, rendered)
            names.insert(index, edit.name.lower())
        else:
            seen = 0
            for i, name in enumerate(names):
                if name == edit.name.lower() and fields[i] is not None:
                    seen += 1
                    if seen == edit.index:
                        fields[i] = rendered if edit.value.strip() else None
                        break
            else:
                if edit.value.strip():
                    fields.append(rendered)
                    names.append(edit.name.lower())
    head = b"".join(f for f in fields if f is not None)
    body = data[body_start:] if edits.body is None else edits.body
    return head + (b"\r\n" if blank or edits.body is not None else b"") + body
