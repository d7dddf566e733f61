"""The MTA side of the milter protocol: against the sans-IO filter side, then the async session."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.errors import RemoteProtocolError
from filterd.mta.milter_client import MessageEdits, MilterSession, apply_edits, field_on_top, split_headers
from filterd.protocols import NEED_DATA, ConnectionClosed, NeedData
from filterd.protocols.milter import (
    Accept,
    Action,
    AddHeader,
    AddressFamily,
    BodyChunk,
    ChangeHeader,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Event,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    MilterServerConnection,
    Negotiate,
    OptionNegotiation,
    ProtocolFlag,
    Quarantine,
    RcptTo,
    Reject,
    Reply,
    ReplyCode,
    Tempfail,
)
from filterd.protocols.milter_client import Command, MilterClientConnection, Negotiated, ReplyEvent, parse_reply_code
from tests.mta.milter_helpers import serve_filter

Filter = Callable[[Event], list[Reply]]


def tag_filter(event: Event) -> list[Reply]:
    if isinstance(event, EndOfMessage):
        return [AddHeader("X-Spam-Status", "No, score=0.1"), Continue()]
    return [Continue()]


WANTED = Negotiate(
    actions=Action.ADDHDRS | Action.CHGHDRS | Action.QUARANTINE,
    protocol=ProtocolFlag.NOUNKNOWN | ProtocolFlag.NR_HDR,
    macros={MacroStage.CONNECT: ("{client_addr}", "j"), MacroStage.EOM: ("i",)},
)


class Pair:
    """A client and a server connection wired together in memory."""

    def __init__(self, filter_: Filter = tag_filter, wanted: Negotiate = WANTED) -> None:
        self.client = MilterClientConnection()
        self.server = MilterServerConnection()
        self.filter, self.wanted = filter_, wanted
        self.seen: list[Event] = []
        self.negotiated = self._deliver(self.client.negotiate())[0]

    def _deliver(self, data: bytes) -> list[ReplyEvent]:
        self.server.receive_data(data)
        out = b""
        while not isinstance(event := self.server.next_event(), NeedData):
            self.seen.append(event)
            if isinstance(event, OptionNegotiation):
                out += self.server.send(self.wanted)
            elif self.server.pending is not None:
                for answer in self.filter(event):
                    out += self.server.send(answer)
        if out:  # b"" would mean the filter closed
            self.client.receive_data(out)
        replies: list[ReplyEvent] = []
        while not isinstance(reply := self.client.next_event(), NeedData):
            replies.append(reply)
        return replies

    def send(self, command: object) -> list[ReplyEvent]:
        return self._deliver(self.client.send(command))  # type: ignore[arg-type]


def test_negotiation_keeps_what_the_filter_asked_for() -> None:
    pair = Pair()
    assert pair.negotiated == Negotiated(
        6,
        WANTED.actions | Action.SETSYMLIST,
        WANTED.protocol,
        {MacroStage.CONNECT: ("{client_addr}", "j"), MacroStage.EOM: ("i",)},
    )


def test_a_whole_conversation_with_macros_and_edits() -> None:
    pair = Pair()
    macros = {"client_addr": "192.0.2.1", "j": "mx.test", "client_name": "unknown"}
    assert pair.send(Connect("[192.0.2.1]", AddressFamily.INET, 4711, "192.0.2.1", macros)) == [Continue()]
    connect = pair.seen[-1]
    assert isinstance(connect, Connect) and connect.address == "192.0.2.1" and connect.port == 4711
    # only the macros the filter listed for the stage are sent
    assert connect.macros == {"client_addr": "192.0.2.1", "j": "mx.test"}
    assert pair.send(Helo("client.example", {})) == [Continue()]
    assert pair.send(MailFrom("<a@example.org>", ("BODY=8BITMIME",), {"i": "QID"})) == [Continue()]
    mail = pair.seen[-1]
    assert isinstance(mail, MailFrom) and mail.address == "a@example.org" and mail.args == ("BODY=8BITMIME",)
    assert pair.send(RcptTo("<b@example.net>", (), {})) == [Continue()]
    assert pair.send(Data({})) == [Continue()]
    # NR_HDR: headers are not answered
    assert pair.send(Header("Subject", " hello")) == []
    assert pair.client.awaiting is None
    assert isinstance(pair.seen[-1], Header) and pair.seen[-1].value == "hello"  # no HDR_LEADSPC
    assert pair.send(EndOfHeaders()) == [Continue()]
    assert pair.send(BodyChunk(b"body\r\n")) == [Continue()]
    replies = pair.send(EndOfMessage({"i": "QID"}))
    assert replies == [AddHeader("X-Spam-Status", "No, score=0.1"), Continue()]
    last: Event = pair.seen[-1]
    assert last == EndOfMessage({"client_addr": "192.0.2.1", "j": "mx.test", "i": "QID"})


def test_steps_negotiated_away_are_not_sent() -> None:
    pair = Pair(wanted=Negotiate(protocol=ProtocolFlag.NOHELO | ProtocolFlag.NOCONNECT))
    assert pair.client.send(Connect("[192.0.2.1]", AddressFamily.INET, 1, "192.0.2.1", {})) == b""
    assert pair.client.send(Helo("x", {})) == b""
    assert pair.send(MailFrom("<>", (), {})) == [Continue()]


def test_reject_reply_code_and_tempfail() -> None:
    def strict(event: Event) -> list[Reply]:
        if isinstance(event, RcptTo) and "spam" in event.recipient:
            return [ReplyCode(550, "No such user here 100%", "5.1.1")]
        if isinstance(event, EndOfMessage):
            return [Tempfail()]
        if isinstance(event, Data):
            return [Reject()]
        return [Continue()]

    pair = Pair(strict)
    pair.send(Connect("[192.0.2.1]", AddressFamily.INET, 1, "192.0.2.1", {}))
    pair.send(MailFrom("<a@example.org>", (), {}))
    assert pair.send(RcptTo("<spam@example.net>", (), {})) == [ReplyCode(550, "No such user here 100%", "5.1.1")]
    assert pair.send(RcptTo("<b@example.net>", (), {})) == [Continue()]
    assert pair.send(Data({})) == [Reject()]


def test_parse_reply_code() -> None:
    assert parse_reply_code("550 5.7.1 Spam 50%% sure") == ReplyCode(550, "Spam 50% sure", "5.7.1")
    assert parse_reply_code("451-4.7.1 one\r\n451 4.7.1 two") == ReplyCode(451, "one\ntwo", "4.7.1")
    assert parse_reply_code("554 rejected") == ReplyCode(554, "rejected", None)
    for bad in ("250 ok", "55x oops", "550 a\r\n451 b"):
        with pytest.raises(RemoteProtocolError):
            parse_reply_code(bad)


def _negotiated_client(actions: int = 0x1FF, protocol: int = 0) -> MilterClientConnection:
    client = MilterClientConnection()
    client.negotiate()
    client.receive_data(struct.pack(">IcIII", 13, b"O", 6, actions, protocol))
    assert isinstance(client.next_event(), Negotiated)
    return client


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + code + data


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (Helo("x", {}), _packet(b"h", b"X-A\0b\0")),  # edit before end of message
        (Helo("x", {}), _packet(b"s")),  # skip outside the body
        (Helo("x", {}), _packet(b"Z")),  # unknown reply
        (Helo("x", {}), struct.pack(">I", 1 << 30)),  # packet over the cap
        (EndOfMessage({}), _packet(b"y", b"250 fine\0")),  # a reply code must be 4xx/5xx
    ],
)
def test_confused_filters_are_refused(command: object, reply: bytes) -> None:
    client = _negotiated_client()
    client.send(command)  # type: ignore[arg-type]
    client.receive_data(reply)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    with pytest.raises(RemoteProtocolError):  # sticky
        client.next_event()


def test_edits_need_their_action() -> None:
    client = _negotiated_client(actions=int(Action.ADDHDRS))
    client.send(EndOfMessage({}))
    client.receive_data(_packet(b"h", b"X-A\0b\0") + _packet(b"q", b"held\0"))
    assert client.next_event() == AddHeader("X-A", "b")
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        client.next_event()


def test_negotiation_beyond_the_offer_is_refused() -> None:
    client = MilterClientConnection(actions=Action.ADDHDRS)
    client.negotiate()
    client.receive_data(struct.pack(">IcIII", 13, b"O", 6, int(Action.CHGBODY), 0))
    with pytest.raises(RemoteProtocolError, match="beyond our offer"):
        client.next_event()


def test_reply_while_nothing_is_awaited() -> None:
    client = _negotiated_client()
    client.receive_data(_packet(b"c"))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert NEED_DATA is not None and ConnectionClosed is not None


# -- editing the message ----------------------------------------------------------------------

MESSAGE = b"Received: from a\r\n\tby b\r\nSubject: hi\r\nX-Old: 1\r\nX-Old: 2\r\n\r\nbody\r\n"


def test_split_headers_keeps_folds_and_bytes() -> None:
    headers, body, blank = split_headers(MESSAGE)
    assert headers[0] == ("Received", " from a\r\n\tby b", b"Received: from a\r\n\tby b\r\n")
    assert MESSAGE[body:] == b"body\r\n" and blank
    headers, body, blank = split_headers(b"Subject: x\r\nnot a header\r\n")
    assert len(headers) == 1 and body == 12 and not blank


@pytest.mark.parametrize(
    "data",
    [
        MESSAGE,
        b"Subject: x\r\nnot a header\r\n",  # no empty line: the body starts at the first non-field
        b"\r\nbody only\r\n",  # an empty header block
        b"no header at all\r\n",
        b"Subject: no body",
        b"",
    ],
)
def test_field_on_top_is_the_split_of_the_joined_message(data: bytes) -> None:
    ours = b"Received: from c\r\n\tby mx.test\r\n"
    assert field_on_top(ours, split_headers(data)) == split_headers(ours + data)
    edits = MessageEdits(headers=[InsertHeader(1, "X-Two", "2")], hidden=1)
    joined = ours + data
    assert apply_edits(joined, edits, leadspc=False, split=field_on_top(ours, split_headers(data))) == apply_edits(
        joined, edits, leadspc=False
    )


def test_field_on_top_never_folds_a_first_line_into_our_field() -> None:
    ours = b"Received: from c\r\n\tby mx.test\r\n"
    data = b" starts with a space\r\nSubject: x\r\n\r\nbody\r\n"
    headers, body_start, blank = field_on_top(ours, split_headers(data))
    assert [raw for _, _, raw in headers] == [ours] and body_start == len(ours) and not blank
    with pytest.raises(ValueError, match="one whole header field"):
        field_on_top(ours + b"X-More: 1\r\n", split_headers(data))


def test_apply_edits() -> None:
    edits = MessageEdits(
        headers=[
            AddHeader("X-Spam-Status", "Yes, score=9\n\ttests=A"),
            InsertHeader(0, "X-Top", "first"),
            ChangeHeader(2, "X-Old", ""),
            ChangeHeader(1, "Subject", "[SPAM] hi"),
            ChangeHeader(1, "X-Missing", "added"),
        ]
    )
    assert apply_edits(MESSAGE, edits, leadspc=False) == (
        b"X-Top: first\r\nReceived: from a\r\n\tby b\r\nSubject: [SPAM] hi\r\nX-Old: 1\r\n"
        b"X-Spam-Status: Yes, score=9\r\n\ttests=A\r\nX-Missing: added\r\n\r\nbody\r\n"
    )
    assert apply_edits(MESSAGE, MessageEdits(body=b"new\r\n"), leadspc=False).endswith(b"X-Old: 2\r\n\r\nnew\r\n")
    assert apply_edits(MESSAGE, MessageEdits(), leadspc=False) == MESSAGE


def test_apply_edits_counts_changes_past_the_header_the_filter_was_not_shown() -> None:
    # As Postfix's cleanup: ChangeHeader(1, "Received") is the first Received the filter saw,
    # below ours; InsertHeader(0) still goes on top, InsertHeader(1) right below ours.
    ours = b"Received: from c\r\n\tby mx.test\r\n"
    edits = MessageEdits(
        headers=[ChangeHeader(1, "Received", ""), InsertHeader(0, "X-Top", "0"), InsertHeader(2, "X-Two", "2")],
        hidden=1,
    )
    assert apply_edits(ours + MESSAGE, edits, leadspc=False) == (
        b"X-Top: 0\r\n" + ours + b"X-Two: 2\r\nSubject: hi\r\nX-Old: 1\r\nX-Old: 2\r\n\r\nbody\r\n"
    )


# -- the async session against a small filter served from MilterServerConnection ---------------


async def _serve(filter_: Filter, wanted: Negotiate = WANTED) -> tuple[asyncio.Server, str, list[Event]]:
    return await serve_filter(filter_, wanted)


def test_session_runs_a_message_and_collects_edits() -> None:
    def quarantining(event: Event) -> list[Reply]:
        if isinstance(event, EndOfMessage):
            return [AddHeader("X-Spam-Flag", "YES"), Quarantine("spam"), Accept()]
        return [Continue()]

    async def main() -> None:
        server, address, seen = await _serve(quarantining)
        async with server:
            session = MilterSession(address, connect_timeout=5, timeout=5)
            assert (await session.connect("192.0.2.1", 4711, "unknown", {"j": "mx.test"})).kind == "continue"
            assert (await session.helo("c.example", {})).kind == "continue"
            assert (await session.mail("a@example.org", [], {"i": "Q1"})).kind == "continue"
            assert (await session.rcpt("b@example.net", [], {})).kind == "continue"
            assert (await session.data({})).kind == "continue"
            body = b"x" * 200000 + b"\r\n"
            verdict, edits = await session.message(b"Subject: hi\r\n\r\n" + body, {"i": "Q1"})
            assert verdict.kind == "accept" and edits.quarantine == "spam"
            assert edits.headers == [AddHeader("X-Spam-Flag", "YES")]
            chunks = [e for e in seen if isinstance(e, BodyChunk)]
            assert b"".join(c.data for c in chunks) == body and len(chunks) == 4
            await session.close()

    asyncio.run(main())


def test_session_failures_give_a_failed_verdict() -> None:
    def silent(event: Event) -> list[Reply]:
        return [] if isinstance(event, MailFrom) else [Continue()]

    async def main() -> None:
        # nobody listening
        session = MilterSession("127.0.0.1:1", connect_timeout=2, timeout=2)
        verdict = await session.connect("192.0.2.1", 1, "unknown", {})
        assert verdict.kind == "failed" and session.failed
        assert (await session.helo("x", {})).kind == "failed"
        # a filter that never answers MAIL
        server, address, _ = await _serve(silent)
        async with server:
            session = MilterSession(address, connect_timeout=2, timeout=0.3)
            assert (await session.connect("192.0.2.1", 1, "unknown", {})).kind == "continue"
            verdict = await session.mail("a@example.org", [], {})
            assert verdict.kind == "failed" and "Timeout" in verdict.reason

    asyncio.run(main())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.sampled_from(["negotiating", "helo", "eom", "body"]))
def test_arbitrary_filter_bytes_give_replies_or_remote_errors(chunks: list[bytes], stage: str) -> None:
    if stage == "negotiating":
        client = MilterClientConnection()
        client.negotiate()
    else:
        client = _negotiated_client(protocol=int(ProtocolFlag.SKIP))
        commands: dict[str, Command] = {"helo": Helo("x", {}), "eom": EndOfMessage({}), "body": BodyChunk(b"x")}
        command = commands[stage]
        client.send(command)
    try:
        for chunk in [*chunks, b""]:
            client.receive_data(chunk)
            while not isinstance(client.next_event(), NeedData):
                pass
    except RemoteProtocolError:
        pass
