"""Milter protocol: golden transcripts (byte for byte), unit cases, and the decoder under hypothesis.

Transcripts live in tests/protocols/milter_transcripts/*.txt. The ones without ``error_`` were
recorded from a real Postfix 3.7.11 (smtpd_milters pointing at this module behind a socket,
driven by smtplib), and Postfix accepted every reply in them; the error ones are hand-made.
One tagged line each, in conversation order:

    # comment
    O: {"max_packet_size": 65536}   MilterServerConnection options (optional)
    C: b"..."                       MTA bytes (a bytes expression: literals, + and *);
                                    "C: EOF" = the MTA closed
    E: Connect(...)                 the next event; ``macros`` is compared only where written
    F: Continue()                   the filter sends this reply to the last event
    S: b"..."                       the exact bytes that F must produce (concatenated)
    X: "text"                       next_event() raises RemoteProtocolError containing text

Every transcript is fed whole, one byte at a time and in seeded random splits; the events and
the reply bytes must be the same every time.
"""

from __future__ import annotations

import ast
import random
import re
import struct
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import filterd.protocols
from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import milter
from filterd.protocols.milter import (
    NEED_DATA,
    TEMPFAIL_PACKET,
    Abort,
    Accept,
    Action,
    AddHeader,
    AddRecipient,
    AddressFamily,
    BodyChunk,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    ConnectionClosed,
    Continue,
    Data,
    DeleteRecipient,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Event,
    Header,
    Helo,
    InsertHeader,
    Macros,
    MacroStage,
    MailFrom,
    MilterServerConnection,
    MilterState,
    NeedData,
    Negotiate,
    OptionNegotiation,
    Progress,
    ProtocolFlag,
    Quarantine,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reject,
    ReplaceBody,
    Reply,
    ReplyCode,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
)

TRANSCRIPTS = Path(__file__).resolve().parent / "milter_transcripts"
TRANSCRIPT_FILES = sorted(TRANSCRIPTS.glob("*.txt"))
SPLITS = ["whole", "bytewise", *(f"random-{seed}" for seed in range(4))]
NAMESPACE = {name: getattr(milter, name) for name in milter.__all__}
P = ProtocolFlag


# -- transcripts -------------------------------------------------------------------------


@dataclass
class Expected:
    """One expected event, whether its macros count, and the replies sent to it."""

    event: Event
    check_macros: bool
    replies: list[tuple[Reply, bytes]] = field(default_factory=list)


@dataclass
class Transcript:
    options: dict[str, int]
    client: bytes
    eof: bool
    expected: list[Expected]
    error: str | None


def _bytes(expression: str) -> bytes:
    value = eval(expression, {"__builtins__": {}})  # test data of our own: literals, + and *
    assert isinstance(value, bytes)
    return value


def load_transcript(path: Path) -> Transcript:
    options: dict[str, int] = {}
    client = bytearray()
    eof = False
    expected: list[Expected] = []
    error = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not raw or raw.startswith("#"):
            continue
        tag, sep, rest = raw.partition(": ")
        assert sep, f"{where}: expected 'TAG: value'"
        assert error is None, f"{where}: nothing may follow X:"
        if tag == "O":
            options = ast.literal_eval(rest)
        elif tag == "C" and rest == "EOF":
            eof = True
        elif tag == "C":
            assert not eof, f"{where}: MTA bytes after EOF"
            client += _bytes(rest)
        elif tag == "E":
            event = eval(rest, dict(NAMESPACE))
            expected.append(Expected(event, "macros=" in rest))
        elif tag == "F":
            assert expected, f"{where}: a reply needs an event before it"
            expected[-1].replies.append((eval(rest, dict(NAMESPACE)), b""))
        elif tag == "S":
            assert expected and expected[-1].replies, f"{where}: S: needs an F: before it"
            reply, sent = expected[-1].replies[-1]
            expected[-1].replies[-1] = (reply, sent + _bytes(rest))
        elif tag == "X":
            error = ast.literal_eval(rest)
        else:
            raise AssertionError(f"{where}: unknown tag {tag!r}")
    return Transcript(options, bytes(client), eof, expected, error)


def split(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data] if data else []
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, 40)
        pieces.append(data[start : start + size])
        start += size
    return pieces


def comparable(event: Event, check_macros: bool) -> Event:
    if not check_macros and "macros" in {f.name for f in fields(event)} and not isinstance(event, Macros):
        return replace(event, macros={})  # type: ignore[arg-type]
    return event


def play(transcript: Transcript, pieces: list[bytes]) -> RemoteProtocolError | None:
    """Feed the pieces, check each event and reply; the refusal, if the MTA was refused."""
    conn = MilterServerConnection(**transcript.options)
    todo = list(transcript.expected)
    feed = [*pieces, b""] if transcript.eof else pieces
    for piece in feed:
        conn.receive_data(piece)
        while True:
            refused: RemoteProtocolError | None = None
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                refused = exc
            if refused is not None:
                assert not todo, f"refused ({refused}) while still expecting {todo[0].event}"
                with pytest.raises(RemoteProtocolError) as again:
                    conn.next_event()
                assert again.value is refused and conn.state is MilterState.ERROR
                return refused
            if isinstance(event, NeedData):
                break
            assert todo, f"unexpected extra event {event}"
            step = todo.pop(0)
            assert comparable(event, step.check_macros) == step.event
            for reply, sent in step.replies:
                assert conn.send(reply) == sent, reply
            assert conn.pending is None, f"{event} was left without its final reply"
    assert not todo, f"events never came: {[s.event for s in todo]}"
    return None


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("path", TRANSCRIPT_FILES, ids=lambda p: p.stem)
def test_transcript(path: Path, how: str) -> None:
    transcript = load_transcript(path)
    error = play(transcript, split(transcript.client, how))
    if transcript.error is None:
        assert error is None
        return
    assert error is not None, f"expected a refusal: {transcript.error}"
    assert transcript.error in str(error)
    assert error.reply == TEMPFAIL_PACKET == b"\x00\x00\x00\x01t"


def test_transcripts_cover_the_conversations_that_matter() -> None:
    names = {path.stem for path in TRANSCRIPT_FILES}
    assert {
        "clean_accept",
        "reject_replycode",
        "edit_headers",
        "edit_envelope_and_body",
        "abort_then_second_message",
        "no_reply_steps",
        "skip_body",
        "multiline_reply",
    } <= names
    assert sum(name.startswith("error_") for name in names) >= 10
    replies = {type(r) for p in TRANSCRIPT_FILES for e in load_transcript(p).expected for r, _ in e.replies}
    assert {Negotiate, Continue, Accept, ReplyCode, Skip, Progress, Quarantine} <= replies
    assert {AddHeader, InsertHeader, ChangeHeader, AddRecipient, DeleteRecipient, ChangeFrom, ReplaceBody} <= replies


# -- helpers for the unit cases ----------------------------------------------------------


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", 1 + len(data)) + command + data


def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0x1FFFFF) -> bytes:
    return packet(b"O", struct.pack(">III", version, actions, protocol))


CONNECT = packet(b"C", b"mx.example.net\x004\xd4\x31192.0.2.10\x00")
HELO = packet(b"H", b"client.example\x00")
MAIL = packet(b"M", b"<alice@example.org>\x00SIZE=10\x00")
RCPT = packet(b"R", b"<bob@example.org>\x00")


def events(conn: MilterServerConnection, data: bytes = b"", reply: Reply | None = None) -> list[Event]:
    """Feed ``data``, collect events, answering each that waits with ``reply`` (default Continue)."""
    conn.receive_data(data)
    out: list[Event] = []
    while not isinstance(event := conn.next_event(), NeedData):
        out.append(event)
        if conn.pending is not None:
            conn.send(reply if reply is not None else Continue())
    return out


NOTHING = Action(0)
NO_FLAGS = ProtocolFlag(0)


def negotiated(actions: Action = NOTHING, protocol: ProtocolFlag = NO_FLAGS) -> MilterServerConnection:
    conn = MilterServerConnection()
    conn.receive_data(optneg())
    assert isinstance(conn.next_event(), OptionNegotiation)
    conn.send(Negotiate(actions=actions, protocol=protocol))
    return conn


def at_end_of_message(actions: Action = NOTHING, protocol: ProtocolFlag = NO_FLAGS) -> MilterServerConnection:
    conn = negotiated(actions, protocol)
    events(conn, CONNECT + HELO + MAIL + RCPT + packet(b"T") + packet(b"N"))
    conn.receive_data(packet(b"E"))
    assert isinstance(conn.next_event(), EndOfMessage)
    return conn


def drain(conn: MilterServerConnection) -> None:
    while conn.next_event() is not NEED_DATA:
        if conn.pending is not None:
            conn.send(Negotiate() if isinstance(conn.pending, OptionNegotiation) else Continue())


def refusal(data: bytes, conn: MilterServerConnection | None = None) -> str:
    conn = conn or MilterServerConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        drain(conn)
    assert caught.value.reply == TEMPFAIL_PACKET
    return str(caught.value)


# -- negotiation -------------------------------------------------------------------------


def test_negotiation_is_the_intersection_with_the_offer() -> None:
    conn = MilterServerConnection()
    conn.receive_data(optneg(6, 0x0F, 0x1003FF))
    offer = conn.next_event()
    assert offer == OptionNegotiation(6, Action(0x0F), ProtocolFlag(0x1003FF))
    wanted = Negotiate(actions=Action.ADDHDRS | Action.CHGHDRS, protocol=P.NOHELO | P.NR_HDR | P.NR_CONN)
    reply = conn.send(wanted)
    assert reply == packet(b"O", struct.pack(">III", 6, 0x01, 0x82))
    assert conn.actions == Action.ADDHDRS and conn.protocol == P.NOHELO | P.NR_HDR and conn.version == 6
    assert conn.needs_reply(Connect) and not conn.needs_reply(Header)  # NR_CONN was not on offer
    assert conn.state is MilterState.CONNECTING


def test_negotiation_takes_the_lower_version_and_libmilter_defaults_for_zero() -> None:
    conn = MilterServerConnection()
    conn.receive_data(packet(b"O", struct.pack(">III", 2, 0, 0) + b"ignored extra bytes"))
    offer = conn.next_event()
    assert offer == OptionNegotiation(2, Action(0x0F), ProtocolFlag(0x7F))
    assert conn.send(Negotiate(actions=Action.CHGHDRS | Action.ADDHDRS)) == packet(b"O", struct.pack(">III", 2, 1, 0))
    # A version 2 MTA knows no DATA step: RCPT may go straight to the headers.
    assert [type(e) for e in events(conn, CONNECT + MAIL + RCPT + packet(b"L", b"A\x00b\x00"))] == [
        Connect,
        MailFrom,
        RcptTo,
        Header,
    ]
    assert "version 1" in refusal(optneg(1))


def test_negotiation_macro_lists() -> None:
    conn = MilterServerConnection()
    conn.receive_data(optneg())
    conn.next_event()
    wanted = Negotiate(macros={MacroStage.EOM: ["i", "{auth_authen}"], MacroStage.CONNECT: ["client_addr"]})
    reply = conn.send(wanted)
    assert reply == packet(
        b"O",
        struct.pack(">III", 6, 0x100, 0)
        + struct.pack(">I", 0)
        + b"{client_addr}\x00"
        + struct.pack(">I", 5)
        + b"i {auth_authen}\x00",
    )
    assert conn.macro_requests == {MacroStage.CONNECT: ("{client_addr}",), MacroStage.EOM: ("i", "{auth_authen}")}
    # An MTA that cannot take lists gets none (and no SETSYMLIST).
    conn = MilterServerConnection()
    conn.receive_data(optneg(6, 0xFF))
    conn.next_event()
    assert conn.send(wanted) == packet(b"O", struct.pack(">III", 6, 0, 0))
    assert conn.macro_requests == {}
    for bad in ("", "{}", "a b", "x\x00"):
        with pytest.raises(LocalProtocolError, match="macro name"):
            Negotiate(macros={MacroStage.MAIL: [bad]})
    with pytest.raises(LocalProtocolError, match="MacroStage"):
        Negotiate(macros={5: ["i"]})  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError, match="unknown"):
        Negotiate(actions=Action(0x200))


def test_negotiate_only_answers_the_offer() -> None:
    conn = negotiated()
    with pytest.raises(LocalProtocolError, match="OptionNegotiation only"):
        conn.send(Negotiate())
    conn = MilterServerConnection()
    conn.receive_data(optneg())
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="with Negotiate"):
        conn.send(Continue())


# -- events ------------------------------------------------------------------------------


def test_connect_families() -> None:
    cases = [
        (b"[192.0.2.1]\x004\x00\x19192.0.2.1\x00", Connect("[192.0.2.1]", AddressFamily.INET, 25, "192.0.2.1")),
        (b"v6.example\x006\x01\xbb2001:db8::1\x00", Connect("v6.example", AddressFamily.INET6, 443, "2001:db8::1")),
        (b"localhost\x00L\x00\x00/run/smtpd.sock\x00", Connect("localhost", AddressFamily.UNIX, 0, "/run/smtpd.sock")),
        (b"unknown\x00U", Connect("unknown", AddressFamily.UNKNOWN, None, None)),
    ]
    for data, expected in cases:
        assert events(negotiated(), packet(b"C", data)) == [expected]
    for data, complaint in [
        (b"host", "hostname without"),
        (b"host\x00", "without an address family"),
        (b"host\x004\x00", "without a port"),
        (b"host\x004\x00\x19addr", "without its terminating NUL"),
        (b"host\x004\x00\x19a\x00b\x00", "expected 1"),
        (b"host\x00Ux", "unexpected data"),
    ]:
        assert complaint in refusal(packet(b"C", data), negotiated())


def test_mail_and_rcpt_arguments() -> None:
    conn = negotiated()
    got = events(conn, CONNECT + packet(b"M", b"<>\x00BODY=8BITMIME\x00") + packet(b"R", b"<b@x.example>\x00N=1\x00"))
    mail, rcpt = got[1], got[2]
    assert isinstance(mail, MailFrom) and isinstance(rcpt, RcptTo)
    assert (mail.sender, mail.address, mail.args) == ("<>", "", ("BODY=8BITMIME",))
    assert (rcpt.recipient, rcpt.address, rcpt.args) == ("<b@x.example>", "b@x.example", ("N=1",))
    assert RcptTo("odd").address == "odd"
    assert "without an address" in refusal(CONNECT + packet(b"M"), negotiated())


def test_text_is_decoded_losslessly() -> None:
    conn = negotiated()
    got = events(conn, CONNECT + MAIL + RCPT + packet(b"T") + packet(b"L", b"Subject\x00caf\xc3\xa9 \xff\x00"))
    header = got[-1]
    assert isinstance(header, Header)
    assert header.value == "caf\u00e9 \udcff"
    assert header.value.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


def test_macros_normalised_and_scoped() -> None:
    conn = negotiated()
    got = events(conn, packet(b"D", b"Cj\x00mx.local\x00{daemon_name}\x00mx\x00{}\x00empty braces kept\x00") + CONNECT)
    assert got[0] == Macros(Command.CONNECT, {"j": "mx.local", "daemon_name": "mx", "{}": "empty braces kept"})
    assert isinstance(got[1], Connect) and got[1].macros == got[0].macros
    events(conn, packet(b"D", b"M{auth_authen}\x00alice\x00") + MAIL)
    events(conn, packet(b"D", b"Ri\x00Q1\x00") + RCPT)
    assert conn.macros == {
        "j": "mx.local",
        "daemon_name": "mx",
        "{}": "empty braces kept",
        "auth_authen": "alice",
        "i": "Q1",
    }
    events(conn, packet(b"D", b"Ri\x00Q2\x00") + RCPT)  # each D replaces its stage's macros
    assert conn.macros["i"] == "Q2"
    events(conn, packet(b"A"))  # abort: message macros go, connection macros stay
    assert conn.macros == {"j": "mx.local", "daemon_name": "mx", "{}": "empty braces kept"}
    got = events(conn, packet(b"D", b"T") + MAIL)
    assert got[0] == Macros(Command.DATA, {})
    assert "unknown stage 0x5a" in refusal(packet(b"D", b"Zx\x00y\x00"), negotiated())
    assert "without a stage" in refusal(packet(b"D"), negotiated())
    assert "out of order" in refusal(packet(b"D", b"Cj\x00x\x00"))


def test_message_macros_end_with_the_message() -> None:
    conn = negotiated()
    events(conn, packet(b"D", b"Cj\x00mx\x00") + CONNECT + packet(b"D", b"Mi\x00Q\x00") + MAIL)
    assert conn.macros == {"j": "mx", "i": "Q"}
    events(conn, RCPT, reply=Accept())  # accept at RCPT: the message is decided
    assert conn.state is MilterState.HELO and conn.macros == {"j": "mx"}
    message = MAIL + RCPT + packet(b"T") + packet(b"N") + packet(b"D", b"Ex\x00y\x00") + packet(b"E")
    conn.receive_data(packet(b"D", b"Mi\x00R\x00") + message)
    while not isinstance(conn.next_event(), EndOfMessage):
        if conn.pending is not None:
            conn.send(Continue())
    assert conn.macros["x"] == "y"
    conn.send(Continue())
    assert conn.macros == {"j": "mx"}


def test_end_of_body_with_data_is_a_last_chunk_without_reply() -> None:
    conn = negotiated()
    events(conn, CONNECT + MAIL + RCPT + packet(b"T") + packet(b"N"))
    conn.receive_data(packet(b"E", b"tail\r\n"))
    chunk = conn.next_event()
    assert chunk == BodyChunk(b"tail\r\n") and conn.pending is None
    assert isinstance(conn.next_event(), EndOfMessage) and isinstance(conn.pending, EndOfMessage)


def test_unknown_quit_and_new_connection() -> None:
    conn = negotiated()
    got = events(conn, CONNECT + packet(b"U", b"XYZZY magic\x00") + MAIL + packet(b"U", b"NOOP x\x00") + RCPT)
    assert [type(e) for e in got] == [Connect, Unknown, MailFrom, Unknown, RcptTo]
    assert got[1] == Unknown("XYZZY magic", got[1].macros)  # type: ignore[union-attr]
    events(conn, packet(b"A"))
    assert events(conn, packet(b"K")) == [QuitNewConnection()]
    assert conn.state is MilterState.CONNECTING and conn.macros == {}
    assert [type(e) for e in events(conn, CONNECT + packet(b"Q") + b"ignored after quit")] == [Connect, Quit]
    assert conn.state.name == "CLOSED"
    conn.receive_data(b"more")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        conn.receive_data(b"x")


def test_eof_mid_message_is_a_clean_close_for_the_owner_to_judge() -> None:
    conn = negotiated()
    events(conn, CONNECT + MAIL)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is MilterState.CLOSED


def test_helo_and_abort_where_postfix_sends_them() -> None:
    conn = negotiated()
    # RSET before any MAIL, HELO inside a transaction (Postfix aborts right after), repeated HELO.
    got = events(conn, CONNECT + packet(b"A") + HELO + MAIL + RCPT + HELO + packet(b"A") + HELO + MAIL)
    assert [type(e) for e in got] == [Connect, Abort, Helo, MailFrom, RcptTo, Helo, Abort, Helo, MailFrom]


def test_out_of_order_commands() -> None:
    for data, complaint in [
        (CONNECT, "CONNECT is out of order: waiting for option negotiation"),
        (optneg() + optneg(), "OPTNEG is out of order"),
        (optneg() + CONNECT + packet(b"T"), "DATA is out of order"),
        (optneg() + CONNECT + MAIL + packet(b"L", b"a\x00b\x00"), "HEADER is out of order"),
        (optneg() + CONNECT + MAIL + RCPT + packet(b"T") + packet(b"B", b"x"), "BODY is out of order"),
        (optneg() + CONNECT + MAIL + RCPT + packet(b"T") + packet(b"U", b"x\x00"), "UNKNOWN is out of order"),
        (optneg() + CONNECT + MAIL + packet(b"K"), "QUIT_NC is out of order"),
        (optneg() + CONNECT + MAIL + MAIL, "MAIL is out of order"),
    ]:
        assert complaint in refusal(data)


def test_steps_negotiated_away_are_jumped_over() -> None:
    everything_off = P.NOCONNECT | P.NOHELO | P.NOMAIL | P.NORCPT | P.NODATA | P.NOHDRS | P.NOEOH | P.NOBODY
    conn = negotiated(protocol=everything_off | P.NOUNKNOWN)
    assert [type(e) for e in events(conn, packet(b"D", b"Ci\x00x\x00") + packet(b"E"))] == [Macros, EndOfMessage]
    assert [type(e) for e in events(conn, packet(b"E"))] == [EndOfMessage]  # the next message
    conn = negotiated(protocol=P.NORCPT | P.NOHDRS)
    assert [type(e) for e in events(conn, CONNECT + MAIL + packet(b"T") + packet(b"N") + packet(b"E"))] == [
        Connect,
        MailFrom,
        Data,
        EndOfHeaders,
        EndOfMessage,
    ]
    assert "negotiated it away (NORCPT)" in refusal(CONNECT + MAIL + RCPT, negotiated(protocol=P.NORCPT))


def test_no_reply_steps_and_pending_replies() -> None:
    conn = negotiated(protocol=P.NR_CONN | P.NR_HELO | P.NR_MAIL | P.NR_RCPT | P.NR_DATA | P.NR_HDR | P.NR_EOH)
    conn.receive_data(CONNECT + HELO + MAIL + RCPT + packet(b"T") + packet(b"L", b"a\x00b\x00") + packet(b"N"))
    for expected in (Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders):
        assert isinstance(conn.next_event(), expected)
        assert conn.pending is None
        with pytest.raises(LocalProtocolError, match="no event is waiting"):
            conn.send(Continue())
    conn.receive_data(packet(b"B", b"body") + packet(b"B", b"more"))
    assert isinstance(conn.next_event(), BodyChunk) and isinstance(conn.pending, BodyChunk)
    with pytest.raises(LocalProtocolError, match="BodyChunk still needs its reply"):
        conn.next_event()
    assert conn.send(Progress()) == b"\x00\x00\x00\x01p"  # not final
    assert conn.send(Continue()) == b"\x00\x00\x00\x01c" and conn.pending is None
    assert isinstance(conn.next_event(), BodyChunk)
    assert conn.needs_reply(EndOfMessage) and conn.needs_reply(OptionNegotiation) and conn.needs_reply(Unknown)
    for never in (Macros, Abort, Quit, QuitNewConnection, ConnectionClosed):
        assert not conn.needs_reply(never)


# -- replies -----------------------------------------------------------------------------


def test_simple_replies_are_single_bytes() -> None:
    cases: list[tuple[Reply, bytes]] = [
        (Continue(), b"c"),
        (Accept(), b"a"),
        (Reject(), b"r"),
        (Tempfail(), b"t"),
        (Discard(), b"d"),
        (Shutdown(), b"4"),
    ]
    for reply, command in cases:
        conn = negotiated()
        events(conn, CONNECT + MAIL)
        conn.receive_data(RCPT)
        conn.next_event()
        assert conn.send(reply) == b"\x00\x00\x00\x01" + command


def test_verdicts_end_the_message_where_postfix_ends_it() -> None:
    verdicts: list[tuple[Reply, bool]] = [
        (Reject(), False),
        (Tempfail(), False),
        (ReplyCode(550, "no"), False),
        (Accept(), True),
    ]
    for reply, ended in verdicts:
        conn = negotiated()
        events(conn, CONNECT + MAIL)
        events(conn, RCPT, reply=reply)
        assert conn.state is (MilterState.HELO if ended else MilterState.RCPT), reply
    for reply in (Reject(), Tempfail(), Discard(), Accept(), ReplyCode(451, "later"), Shutdown()):
        conn = negotiated()
        events(conn, CONNECT)
        events(conn, MAIL, reply=reply)
        assert conn.state is MilterState.HELO
        assert [type(e) for e in events(conn, packet(b"A") + MAIL)] == [Abort, MailFrom]
    conn = negotiated()
    events(conn, CONNECT, reply=Reject())  # the connection is refused; no message state
    assert conn.state is MilterState.CONNECTED
    conn = negotiated()
    events(conn, CONNECT + MAIL)
    events(conn, packet(b"U", b"x\x00"), reply=Reject())  # only the unknown command is refused
    assert conn.state is MilterState.MAIL


def test_discard_and_skip_only_where_they_mean_something() -> None:
    conn = negotiated()
    conn.receive_data(CONNECT)
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="Discard cannot answer Connect"):
        conn.send(Discard())
    with pytest.raises(LocalProtocolError, match="Skip answers body chunks only"):
        conn.send(Skip())
    conn = negotiated()
    events(conn, CONNECT + MAIL + RCPT + packet(b"T") + packet(b"N"))
    conn.receive_data(packet(b"B", b"x"))
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="Skip was not negotiated"):
        conn.send(Skip())
    conn = negotiated(protocol=P.SKIP)
    events(conn, CONNECT + MAIL + RCPT + packet(b"T") + packet(b"N"))
    conn.receive_data(packet(b"B", b"x"))
    conn.next_event()
    assert conn.send(Skip()) == b"\x00\x00\x00\x01s"
    assert conn.state is MilterState.BODY


EDITS: list[tuple[Reply, Action, bytes]] = [
    (AddHeader("X-Spam-Flag", "YES"), Action.ADDHDRS, b"\x00\x00\x00\x11hX-Spam-Flag\x00YES\x00"),
    (InsertHeader(0, "X-Scanned", "yes"), Action.ADDHDRS, b"\x00\x00\x00\x13i\x00\x00\x00\x00X-Scanned\x00yes\x00"),
    (
        ChangeHeader(1, "X-Spam-Status", ""),
        Action.CHGHDRS,
        b"\x00\x00\x00\x14m\x00\x00\x00\x01X-Spam-Status\x00\x00",
    ),
    (Quarantine("spam"), Action.QUARANTINE, b"\x00\x00\x00\x06qspam\x00"),
    (AddRecipient("<c@x>"), Action.ADDRCPT, b"\x00\x00\x00\x07+<c@x>\x00"),
    (AddRecipient("<c@x>", "NOTIFY=NEVER"), Action.ADDRCPT_PAR, b"\x00\x00\x00\x142<c@x>\x00NOTIFY=NEVER\x00"),
    (DeleteRecipient("<b@x>"), Action.DELRCPT, b"\x00\x00\x00\x07-<b@x>\x00"),
    (ChangeFrom("<>"), Action.CHGFROM, b"\x00\x00\x00\x04e<>\x00"),
    (ChangeFrom("<a@x>", "RET=HDRS"), Action.CHGFROM, b"\x00\x00\x00\x10e<a@x>\x00RET=HDRS\x00"),
    (ReplaceBody(b"new\r\n"), Action.CHGBODY, b"\x00\x00\x00\x06bnew\r\n"),
]


@pytest.mark.parametrize(("reply", "action", "wire"), EDITS, ids=lambda x: type(x).__name__)
def test_edits_need_their_action_and_end_of_message(reply: Reply, action: Action, wire: bytes) -> None:
    assert at_end_of_message(action).send(reply) == wire  # matches the reference's byte examples
    others = Action(0x1FF) & ~action & ~(Action.ADDRCPT if action is Action.ADDRCPT_PAR else Action(0))
    with pytest.raises(LocalProtocolError, match=f"not negotiated \\(action {action.name}\\)"):
        at_end_of_message(others).send(reply)
    conn = negotiated(Action(0x1FF))
    conn.receive_data(CONNECT)
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="only at end of message"):
        conn.send(reply)


def test_end_of_message_takes_edits_then_one_final_reply() -> None:
    conn = at_end_of_message(Action.ADDHDRS | Action.CHGBODY)
    conn.send(AddHeader("X-A", "1"))
    conn.send(Progress())
    conn.send(AddHeader("X-B", "2"))
    assert conn.pending is not None
    conn.send(Continue())
    assert conn.pending is None and conn.state is MilterState.HELO
    with pytest.raises(LocalProtocolError, match="no event is waiting"):
        conn.send(AddHeader("X-C", "3"))


def test_body_replacement_is_chunked_and_consecutive() -> None:
    conn = at_end_of_message(Action.CHGBODY | Action.ADDHDRS)
    big = conn.send(ReplaceBody(b"a" * 65535 + b"bc"))
    assert big == packet(b"b", b"a" * 65535) + packet(b"b", b"bc")
    assert conn.send(ReplaceBody(b"")) == packet(b"b")
    conn.send(AddHeader("X-A", "1"))
    with pytest.raises(LocalProtocolError, match="consecutive"):
        conn.send(ReplaceBody(b"late"))
    conn.send(Continue())
    conn.receive_data(MAIL + RCPT + packet(b"T") + packet(b"N") + packet(b"E"))
    while not isinstance(conn.next_event(), EndOfMessage):
        conn.send(Continue())
    conn.send(ReplaceBody(b"next message may replace again"))


def test_reply_code_rendering() -> None:
    cases = [
        (
            ReplyCode(550, "Message scored 14.2, rejected as spam", "5.7.1"),
            "550 5.7.1 Message scored 14.2, rejected as spam",
        ),
        (ReplyCode(451, "try later"), "451 4.0.0 try later"),
        (ReplyCode(550, "100% spam"), "550 5.0.0 100%% spam"),
        (ReplyCode(550, "a\nb\nc", "5.7.1"), "550-5.7.1 a\r\n550-5.7.1 b\r\n550 5.7.1 c"),
        (ReplyCode(421, "", "4.3.2"), "421 4.3.2"),
        (ReplyCode(550, "x\n", "5.7.1"), "550-5.7.1 x\r\n550 5.7.1"),
    ]
    for reply, text in cases:
        assert reply.render() == text
        conn = negotiated()
        conn.receive_data(CONNECT)
        conn.next_event()
        assert conn.send(reply) == packet(b"y", text.encode() + b"\x00")


@pytest.mark.parametrize(
    ("code", "text", "status", "complaint"),
    [
        (250, "ok", None, "4xx or 5xx"),
        (600, "x", None, "4xx or 5xx"),
        (True, "x", None, "4xx or 5xx"),
        (550, "x", "4.7.1", "5.x.y"),
        (550, "x", "5.7", "5.x.y"),
        (450, "x", "4.1234.1", "4.x.y"),
        (550, "caf\u00e9", None, "printable ASCII"),
        (550, "a\r\nb", None, "printable ASCII"),
        (550, "tab\there", None, "printable ASCII"),
        (550, "nul\0", None, "printable ASCII"),
        (550, "\n".join(["x"] * 33), None, "at most 32 lines"),
        (550, "x" * 600, None, "longer than 510"),
    ],
)
def test_reply_code_validation(code: int, text: str, status: str | None, complaint: str) -> None:
    with pytest.raises(LocalProtocolError, match=re.escape(complaint)):
        ReplyCode(code, text, status)


@pytest.mark.parametrize(
    "make",
    [
        lambda: AddHeader("Bad Name", "v"),
        lambda: AddHeader("Bad:Name", "v"),
        lambda: AddHeader("", "v"),
        lambda: AddHeader("X-A", "line\nnot folded"),
        lambda: AddHeader("X-A", "ends with a break\n"),
        lambda: AddHeader("X-A", "cr\r\n\tfolded"),
        lambda: AddHeader("X-A", "nul\0"),
        lambda: InsertHeader(-1, "X-A", "v"),
        lambda: InsertHeader(2**32, "X-A", "v"),
        lambda: ChangeHeader(0, "X-A", "v"),
        lambda: Quarantine(""),
        lambda: AddRecipient("a\nb"),
        lambda: AddRecipient("<a>", ""),
        lambda: DeleteRecipient(""),
        lambda: ChangeFrom("<a>\0"),
        lambda: ChangeFrom("<a>", "x\r"),
    ],
)
def test_edit_values_are_validated(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_folded_and_8bit_header_values_pass() -> None:
    conn = at_end_of_message(Action.ADDHDRS)
    assert conn.send(AddHeader("X-Report", "a\n\tb\n c")) == packet(b"h", b"X-Report\x00a\n\tb\n c\x00")
    assert conn.send(AddHeader("X-Raw", "\udcff")) == packet(b"h", b"X-Raw\x00\xff\x00")


# -- framing, errors, the table ----------------------------------------------------------


def test_packet_cap_is_checked_before_the_data_arrives() -> None:
    conn = negotiated()
    conn.receive_data(b"\x00\x10\x00\x01")
    with pytest.raises(RemoteProtocolError, match="over the 1048576 byte limit"):
        conn.next_event()
    conn = MilterServerConnection(max_packet_size=65536)
    conn.receive_data(optneg())
    conn.next_event()
    conn.send(Negotiate())
    assert events(conn, CONNECT + MAIL + RCPT + packet(b"T") + packet(b"N") + packet(b"B", b"x" * 65535))[-1] == (
        BodyChunk(b"x" * 65535)
    )
    with pytest.raises(ValueError, match="at least 13"):
        MilterServerConnection(max_packet_size=12)


def test_errors_are_sticky_and_close_the_machine() -> None:
    conn = MilterServerConnection()
    conn.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    conn.receive_data(optneg())  # ignored now
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is first.value and conn.state is MilterState.ERROR
    with pytest.raises(LocalProtocolError, match="failed"):
        conn.send(Continue())


def test_local_errors_change_nothing() -> None:
    conn = at_end_of_message(Action.ADDHDRS)
    with pytest.raises(LocalProtocolError):
        conn.send(ChangeHeader(1, "X-A", ""))
    assert isinstance(conn.pending, EndOfMessage)
    assert conn.send(Continue()) == b"\x00\x00\x00\x01c"


def test_transition_table_is_complete_and_reachable() -> None:
    table = milter._TRANSITIONS
    assert set(table) == set(MilterState)
    reached = {MilterState.NEGOTIATING} | {t for moves in table.values() for t in moves.values()}
    assert reached == set(MilterState) - {MilterState.ERROR}
    assert not table[MilterState.CLOSED] and not table[MilterState.ERROR]
    for state, moves in table.items():
        if state not in (MilterState.CLOSED, MilterState.ERROR, MilterState.END_OF_MESSAGE):
            assert Command.QUIT in moves, state
    for state in milter._MESSAGE_STATES:
        assert table[state][milter._Step.MESSAGE_ENDED] is MilterState.HELO


def test_public_names() -> None:
    defined = {
        n for n, obj in vars(milter).items() if n[0] != "_" and getattr(obj, "__module__", None) == milter.__name__
    }
    constants = {"ALL_ACTIONS", "ALL_PROTOCOL_FLAGS", "MILTER_VERSION", "TEMPFAIL_PACKET", "Event", "Reply"}
    assert set(milter.__all__) == defined | constants | {"NEED_DATA", "NeedData", "ConnectionClosed"}
    assert milter.ConnectionClosed is filterd.protocols.ConnectionClosed


# -- hypothesis --------------------------------------------------------------------------


def drive(conn: MilterServerConnection, pieces: list[bytes], eof: bool = True) -> tuple[list[Any], str | None]:
    """Feed pieces, answering whatever waits; the events (with replies) and the refusal if any."""
    out: list[Any] = []
    for piece in [*pieces, b""] if eof else pieces:
        conn.receive_data(piece)
        for _ in range(100_000):  # bounded: a stuck machine fails instead of hanging
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                return out, f"{exc} {exc.reply!r}"
            if event is NEED_DATA:
                break
            out.append(event)
            if isinstance(conn.pending, OptionNegotiation):
                out.append(conn.send(Negotiate(actions=Action(0x1FF))))
            elif conn.pending is not None:
                out.append(conn.send(Continue()))
        else:
            raise AssertionError("next_event() never asked for data")
    return out, None


def pieces_from(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


TEXT = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b""))


@st.composite
def conversations(draw: st.DrawFn) -> bytes:
    """A legal MTA side: negotiation, connect, some messages (maybe aborted), quit."""
    protocol = draw(st.sampled_from([0, 0x1FFFFF, 0x1000]))
    out = [optneg(6, 0x1FF, protocol)]
    macros = draw(st.lists(st.tuples(TEXT, TEXT), max_size=3))
    out.append(packet(b"D", b"C" + b"".join(n + b"\0" + v + b"\0" for n, v in macros)))
    out.append(packet(b"C", draw(TEXT) + b"\x004\x00\x19" + draw(TEXT) + b"\0"))
    out.append(packet(b"H", draw(TEXT) + b"\0"))
    for _ in range(draw(st.integers(0, 2))):
        out.append(packet(b"M", b"<" + draw(TEXT) + b">\0"))
        out += [packet(b"R", b"<" + draw(TEXT) + b">\0") for _ in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            out.append(packet(b"A"))
            continue
        out.append(packet(b"T"))
        out += [packet(b"L", draw(TEXT) + b"h\0" + draw(TEXT) + b"\0") for _ in range(draw(st.integers(0, 3)))]
        out.append(packet(b"N"))
        out += [packet(b"B", draw(st.binary(max_size=50))) for _ in range(draw(st.integers(0, 2)))]
        out.append(packet(b"E"))
    out.append(packet(b"Q"))
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(data=conversations(), cuts=st.lists(st.integers(0, 1500), max_size=25))
def test_valid_conversations_parse_the_same_however_they_are_split(data: bytes, cuts: list[int]) -> None:
    whole, error = drive(MilterServerConnection(), [data])
    assert error is None, error
    assert isinstance(whole[-2], Quit) and whole[-1] == ConnectionClosed()
    assert drive(MilterServerConnection(), pieces_from(data, cuts)) == (whole, None)


PACKETS = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda command, data: packet(command, data),
        st.sampled_from([bytes([c]) for c in b"ODCHMRTLNBEAQKUZ"]),
        st.binary(max_size=30),
    ),
    st.just(optneg()),
    st.just(CONNECT),
    st.just(MAIL),
    st.just(RCPT),
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(PACKETS, max_size=12),
    cuts=st.lists(st.integers(0, 600), max_size=20),
    small=st.booleans(),
)
def test_any_bytes_give_events_or_a_refusal(parts: list[bytes], cuts: list[int], small: bool) -> None:
    data = b"".join(parts)
    options = {"max_packet_size": 32} if small else {}
    whole = drive(MilterServerConnection(**options), [data])
    assert drive(MilterServerConnection(**options), pieces_from(data, cuts)) == whole
