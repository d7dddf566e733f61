"""The sans-IO SMTP client connection: replies paired with commands, pipelining rules, caps."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols.smtp_client import CLOSED, NEED_DATA, ClientConnection, Reply, Response, dot_stuffed

EHLO_REPLY = b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 STARTTLS\r\n"


def _events(conn: ClientConnection) -> list[Response]:
    out = []
    while isinstance(event := conn.next_event(), Response):
        out.append(event)
    assert event is NEED_DATA
    return out


def _ready(pipelining: bool = True) -> ClientConnection:
    conn = ClientConnection()
    conn.receive_data(b"220 sink.test ESMTP\r\n")
    assert [e.command for e in _events(conn)] == ["greeting"]
    assert conn.send("EHLO", "relay.test") == b"EHLO relay.test\r\n"
    ehlo = EHLO_REPLY if pipelining else EHLO_REPLY.replace(b"250-PIPELINING\r\n", b"")
    conn.receive_data(ehlo)
    assert [e.command for e in _events(conn)] == ["EHLO"]
    return conn


def test_nothing_may_be_sent_before_the_greeting() -> None:
    with pytest.raises(LocalProtocolError, match="greeting"):
        ClientConnection().send("EHLO", "relay.test")


def test_ehlo_reply_gives_the_extensions() -> None:
    conn = _ready()
    assert conn.extensions == {"pipelining": "", "size": "10240000", "8bitmime": "", "starttls": ""}
    assert conn.supports("PIPELINING") and not conn.supports("smtputf8")


def test_pipelined_replies_pair_with_their_commands_however_the_bytes_are_split() -> None:
    replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 no such user\r\n550 5.1.1 really\r\n450 4.2.1 busy\r\n"
    rng = random.Random(7)
    for split in ["whole", "bytes", *["random"] * 20]:
        conn = _ready()
        out = conn.send("MAIL", "FROM:<a@x.org>", "SIZE=10")
        out += b"".join(conn.send("RCPT", f"TO:<{r}@y.net>") for r in ("ok", "no", "temp"))
        assert out.count(b"\r\n") == 4 and conn.awaiting == 4
        if split == "whole":
            pieces = [replies]
        elif split == "bytes":
            pieces = [replies[i : i + 1] for i in range(len(replies))]
        else:
            cuts = sorted(rng.sample(range(1, len(replies)), 6))
            pieces = [replies[a:b] for a, b in zip([0, *cuts], [*cuts, len(replies)], strict=True)]
        got: list[Response] = []
        for piece in pieces:
            conn.receive_data(piece)
            got += _events(conn)
        assert [(e.command, e.reply.code) for e in got] == [("MAIL", 250), ("RCPT", 250), ("RCPT", 550), ("RCPT", 450)]
        assert got[2].reply == Reply(550, "5.1.1 no such user\n5.1.1 really") and conn.awaiting == 0
        conn.send("DATA")
        conn.receive_data(b"354 go ahead\r\n")
        assert _events(conn) == [Response("DATA", Reply(354, "go ahead"))]
        assert conn.send_message(b"Subject: x\r\n\r\n.hi\r\n") == b"Subject: x\r\n\r\n..hi\r\n.\r\n"
        conn.receive_data(b"250 2.0.0 queued\r\n")
        assert _events(conn) == [Response(".", Reply(250, "2.0.0 queued"))]


def test_without_pipelining_one_command_at_a_time() -> None:
    conn = _ready(pipelining=False)
    conn.send("MAIL", "FROM:<a@x.org>")
    with pytest.raises(LocalProtocolError, match="no PIPELINING"):
        conn.send("RCPT", "TO:<b@y.net>")


def test_only_mail_rcpt_and_rset_may_be_followed_before_their_reply() -> None:
    conn = _ready()
    conn.send("MAIL", "FROM:<a@x.org>")
    conn.send("RCPT", "TO:<b@y.net>")
    conn.send("DATA")  # may end the group
    with pytest.raises(LocalProtocolError, match="must end a group"):
        conn.send("NOOP")


def test_the_message_needs_a_354_first() -> None:
    conn = _ready()
    with pytest.raises(LocalProtocolError, match="354"):
        conn.send_message(b"x\r\n")
    conn.send("DATA")
    conn.receive_data(b"554 5.5.1 no valid recipients\r\n")
    assert _events(conn)[0].reply.code == 554
    with pytest.raises(LocalProtocolError, match="354"):
        conn.send_message(b"x\r\n")


def test_commands_cannot_carry_line_breaks() -> None:
    conn = _ready()
    with pytest.raises(LocalProtocolError, match="control character"):
        conn.send("RCPT", "TO:<a@b>\r\nDATA")


def test_starttls_forgets_the_extensions_and_refuses_injected_plaintext() -> None:
    conn = _ready()
    conn.send("STARTTLS")
    conn.receive_data(b"220 2.0.0 ready\r\n")
    assert _events(conn)[0].command == "STARTTLS" and conn.extensions == {}
    conn = _ready()
    conn.send("STARTTLS")
    conn.receive_data(b"220 2.0.0 ready\r\n250 injected\r\n")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        conn.next_event()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"hello\r\n", "malformed"),
        (b"25 short\r\n", "malformed"),
        (b"650 no such class\r\n", "malformed"),
        (b"250-a\r\n251 b\r\n", "code changed"),
        (b"250 " + b"x" * 3000, "longer than"),
        (b"250-x\r\n" * 101, "lines"),
    ],
)
def test_garbled_replies_are_remote_errors(data: bytes, match: str) -> None:
    conn = _ready()
    conn.send("NOOP")
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()


def test_a_reply_nobody_asked_for_is_a_remote_error() -> None:
    conn = _ready()
    conn.receive_data(b"250 surprise\r\n")
    with pytest.raises(RemoteProtocolError, match="without a command"):
        conn.next_event()


def test_closed_after_the_last_complete_reply() -> None:
    conn = _ready()
    conn.send("MAIL", "FROM:<a@x.org>")
    conn.send("RCPT", "TO:<b@y.net>")
    conn.receive_data(b"421 4.3.2 closing\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Response("MAIL", Reply(421, "4.3.2 closing"))
    assert conn.next_event() is CLOSED and conn.awaiting == 1
    with pytest.raises(LocalProtocolError):
        conn.send("QUIT")


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuffed(b".a\r\nb\r\n..c\r\n") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuffed(b"a\nb\rc") == b"a\r\nb\r\nc\r\n.\r\n"
    assert dot_stuffed(b"") == b"\r\n.\r\n"


def test_reply_status_and_enhanced() -> None:
    assert (Reply(550, "5.1.1 no").status, Reply(550, "5.1.1 no").enhanced) == ("5.1.1", "5.1.1")
    assert (Reply(550, "no such user").status, Reply(550, "no such user").enhanced) == ("5.0.0", "")
    assert Reply(450, "5.1.1 wrong class").enhanced == ""


_LINES = st.sampled_from([b"250 2.1.0 Ok\r\n", b"250-first\r\n", b"550 5.1.1 no\r\n", b"\r\n", b"4", b"21 x\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=300), _LINES), max_size=12))
def test_arbitrary_bytes_give_replies_or_a_remote_error(chunks: list[bytes]) -> None:
    conn = _ready()
    conn.send("MAIL", "FROM:<a@x.org>")
    conn.send("RCPT", "TO:<b@y.net>")
    conn.send("RCPT", "TO:<c@y.net>")
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while isinstance(event := conn.next_event(), Response):
                assert event.command in ("MAIL", "RCPT") and 200 <= event.reply.code <= 599
            assert event is (CLOSED if chunk == b"" else NEED_DATA)
    except RemoteProtocolError:
        pass
