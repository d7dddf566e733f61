"""Postfix policy protocol: golden transcripts, unit cases, and the parser under hypothesis.

Transcripts live in tests/protocols/policy_transcripts/*.txt; postfix_five_requests.txt was
recorded from a real Postfix 3.7.11 smtpd. One tagged line each, in conversation order:

    # comment
    O: {"max_line": 64}           PolicyServerConnection options (optional)
    C: b"..."                     client bytes (a bytes expression); "C: EOF" = Postfix closed
    E: {...}                      attributes of the next request (consecutive E: lines merge);
                                  "E: ConnectionClosed" = the clean close
    P: {...}                      property values that request must show
    F: PolicyReply.dunno()        the reply we send to it
    S: b"..."                     the exact bytes of that reply
    X: "text"                     next_event() raises RemoteProtocolError containing text

Every transcript is fed whole, one byte at a time and in seeded random splits.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import filterd.protocols
from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import policy
from filterd.protocols.policy import (
    NEED_DATA,
    ConnectionClosed,
    NeedData,
    PolicyReply,
    PolicyRequest,
    PolicyServerConnection,
    PolicyState,
)

TRANSCRIPTS = Path(__file__).resolve().parent / "policy_transcripts"
TRANSCRIPT_FILES = sorted(TRANSCRIPTS.glob("*.txt"))
SPLITS = ["whole", "bytewise", *(f"random-{seed}" for seed in range(4))]


@dataclass
class Step:
    """One expected request (None: the clean close), its property checks, our reply and its bytes."""

    attributes: dict[str, str] | None
    properties: dict[str, Any] = field(default_factory=dict)
    reply: PolicyReply | None = None
    sent: bytes = b""


@dataclass
class Transcript:
    options: dict[str, int]
    client: bytes
    eof: bool
    steps: list[Step]
    error: str | None


def _bytes(expression: str) -> bytes:
    value = eval(expression, {"__builtins__": {}})  # test data of our own: literals, + and *
    assert isinstance(value, bytes)
    return value


def load_transcript(path: Path) -> Transcript:
    options: dict[str, int] = {}
    client = bytearray()
    eof = False
    steps: list[Step] = []
    error = None
    previous = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not raw or raw.startswith("#"):
            continue
        tag, sep, rest = raw.partition(": ")
        assert sep, f"{where}: expected 'TAG: value'"
        if tag == "O":
            options = ast.literal_eval(rest)
        elif tag == "C" and rest == "EOF":
            eof = True
        elif tag == "C":
            client += _bytes(rest)
        elif tag == "E" and rest == "ConnectionClosed":
            steps.append(Step(None))
        elif tag == "E":
            if previous == "E" and steps[-1].attributes is not None:
                steps[-1].attributes.update(ast.literal_eval(rest))
            else:
                steps.append(Step(ast.literal_eval(rest)))
        elif tag == "P":
            steps[-1].properties.update(ast.literal_eval(rest))
        elif tag == "F":
            steps[-1].reply = eval(rest, {"PolicyReply": PolicyReply})
        elif tag == "S":
            steps[-1].sent += _bytes(rest)
        elif tag == "X":
            error = ast.literal_eval(rest)
        else:
            raise AssertionError(f"{where}: unknown tag {tag!r}")
        previous = tag
    return Transcript(options, bytes(client), eof, steps, error)


def split(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data] if data else []
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, 30)
        pieces.append(data[start : start + size])
        start += size
    return pieces


def play(transcript: Transcript, pieces: list[bytes]) -> RemoteProtocolError | None:
    conn = PolicyServerConnection(**transcript.options)
    todo = list(transcript.steps)
    for piece in [*pieces, b""] if transcript.eof else pieces:
        conn.receive_data(piece)
        while True:
            refused: RemoteProtocolError | None = None
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                refused = exc
            if refused is not None:
                assert not todo, f"refused ({refused}) while still expecting {todo[0]}"
                assert conn.state is PolicyState.ERROR
                return refused
            if isinstance(event, NeedData):
                break
            step = todo.pop(0)
            if step.attributes is None:
                assert event == ConnectionClosed() and conn.state is PolicyState.CLOSED
                continue
            assert isinstance(event, PolicyRequest)
            assert event.attributes == step.attributes
            for name, value in step.properties.items():
                assert getattr(event, name) == value, name
            assert step.reply is not None
            assert conn.send(step.reply) == step.sent
    assert not todo, f"never came: {todo}"
    return None


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("path", TRANSCRIPT_FILES, ids=lambda p: p.stem)
def test_transcript(path: Path, how: str) -> None:
    transcript = load_transcript(path)
    error = play(transcript, split(transcript.client, how))
    if transcript.error is None:
        assert error is None
    else:
        assert error is not None and transcript.error in str(error)
        assert error.reply is None  # a policy server closes without answering


def test_transcripts_cover_the_cases_that_matter() -> None:
    names = {p.stem for p in TRANSCRIPT_FILES}
    assert {"postfix_five_requests", "reference_greylist_example", "hand_typed_requests"} <= names
    assert sum(n.startswith("error_") for n in names) >= 7
    real = load_transcript(TRANSCRIPTS / "postfix_five_requests.txt")
    assert len([s for s in real.steps if s.attributes is not None]) == 5


# -- unit cases --------------------------------------------------------------------------


def request(data: bytes, **options: int) -> PolicyRequest:
    conn = PolicyServerConnection(**options)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, PolicyRequest), event
    return event


def refusal(data: bytes, *, eof: bool = False, **options: int) -> str:
    conn = PolicyServerConnection(**options)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.reply is None
    return str(caught.value)


def test_properties() -> None:
    event = request(
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.1\n"
        b"client_name=unknown\nreverse_client_name=mail.example\nclient_port=4242\nhelo_name=mail.example\n"
        b"sender=a@example.org\nrecipient=b@example.org\nrecipient_count=0\nqueue_id=ABC\ninstance=1.2.3\n"
        b"size=100\nsasl_method=PLAIN\nsasl_username=alice\nsasl_sender=\nserver_address=192.0.2.25\n"
        b"server_port=25\n\n"
    )
    assert (event.request, event.protocol_state, event.protocol_name) == ("smtpd_access_policy", "RCPT", "ESMTP")
    assert (event.client_address, event.client_name, event.reverse_client_name) == (
        "192.0.2.1",
        "unknown",
        "mail.example",
    )
    assert (event.client_port, event.helo_name, event.sender, event.recipient) == (
        4242,
        "mail.example",
        "a@example.org",
        "b@example.org",
    )
    assert (event.recipient_count, event.queue_id, event.instance, event.size) == (0, "ABC", "1.2.3", 100)
    assert (event.sasl_method, event.sasl_username, event.sasl_sender) == ("PLAIN", "alice", "")
    assert (event.server_address, event.server_port) == ("192.0.2.25", 25)
    assert event.get("stress") is None and event.get("size") == "100"
    empty = request(b"\n")
    assert empty.attributes == {} and empty.request is None and empty.size is None
    assert request(b"size=\xd9\xa1\n\n").size is None  # Arabic-Indic digit: not a number for us


def test_caps_are_exact() -> None:
    assert request(b"a=" + b"x" * 62 + b"\n\n", max_line=64).get("a") == "x" * 62
    assert "longer than 64" in refusal(b"a=" + b"x" * 63 + b"\n\n", max_line=64)
    assert "longer than 64" in refusal(b"a=" + b"x" * 63, max_line=64)  # before the LF arrives
    assert request(b"a=1\nb=2\n\n", max_attributes=2).attributes == {"a": "1", "b": "2"}
    assert "more than 2" in refusal(b"a=1\nb=2\nc=3\n\n", max_attributes=2)
    assert request(b"a=12345\n\n", max_request_size=9).get("a") == "12345"
    assert "larger than 8" in refusal(b"a=12345\n\n", max_request_size=8)
    assert "larger than 8" in refusal(b"a=1234567", max_request_size=8)  # before it is complete
    with pytest.raises(ValueError, match="positive"):
        PolicyServerConnection(max_line=0)


def test_requests_one_after_another_and_replies_in_step() -> None:
    conn = PolicyServerConnection()
    conn.receive_data(b"n=1\n\nn=2\n\nn=")
    first = conn.next_event()
    assert isinstance(first, PolicyRequest) and first.get("n") == "1" and conn.state is PolicyState.REPLYING
    with pytest.raises(LocalProtocolError, match="still needs its reply"):
        conn.next_event()
    assert conn.send(PolicyReply.dunno()) == b"action=DUNNO\n\n"
    with pytest.raises(LocalProtocolError, match="no request is waiting"):
        conn.send(PolicyReply.dunno())
    second = conn.next_event()
    assert isinstance(second, PolicyRequest) and second.get("n") == "2"
    conn.send(PolicyReply.ok())
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"3\n\n")
    third = conn.next_event()
    assert isinstance(third, PolicyRequest) and third.get("n") == "3"
    conn.send(PolicyReply.ok())
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() is NEED_DATA and conn.state.name == "CLOSED"
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        conn.receive_data(b"x")


def test_errors_are_sticky() -> None:
    conn = PolicyServerConnection()
    conn.receive_data(b"oops\n")
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    conn.receive_data(b"a=1\n\n")  # ignored
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is first.value and conn.state is PolicyState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(PolicyReply.dunno())


def test_illegal_transition_is_a_local_error() -> None:
    conn = PolicyServerConnection()
    with pytest.raises(LocalProtocolError, match="not legal"):
        conn._move(policy._Step.REPLY)
    assert set(policy._TRANSITIONS) == set(PolicyState)


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        (PolicyReply.dunno(), "DUNNO"),
        (PolicyReply.ok(), "OK"),
        (PolicyReply.reject(), "REJECT"),
        (PolicyReply.reject("Spam source"), "REJECT Spam source"),
        (PolicyReply.defer(), "DEFER"),
        (PolicyReply.defer("later"), "DEFER later"),
        (PolicyReply.defer_if_permit("Greylisted"), "DEFER_IF_PERMIT Greylisted"),
        (PolicyReply.defer_if_reject("maybe"), "DEFER_IF_REJECT maybe"),
        (PolicyReply.hold("look at it"), "HOLD look at it"),
        (PolicyReply.discard(), "DISCARD"),
        (PolicyReply.smtp(451, "Try again later", "4.7.1"), "451 4.7.1 Try again later"),
        (PolicyReply.smtp(554, "No"), "554 No"),
        (PolicyReply.prepend("X-Greylist", "delayed 300 seconds"), "PREPEND X-Greylist: delayed 300 seconds"),
        (PolicyReply.redirect("abuse@example.org"), "REDIRECT abuse@example.org"),
        (PolicyReply.filter("scan:127.0.0.1:10025"), "FILTER scan:127.0.0.1:10025"),
        (PolicyReply.warn("odd client"), "WARN odd client"),
        (PolicyReply("check_client_access hash:/etc/postfix/access"), "check_client_access hash:/etc/postfix/access"),
    ],
)
def test_reply_actions(reply: PolicyReply, action: str) -> None:
    assert reply.action == action
    assert reply.render() == b"action=" + action.encode() + b"\n\n"


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolicyReply(""),
        lambda: PolicyReply("  "),
        lambda: PolicyReply("REJECT a\nb"),
        lambda: PolicyReply("REJECT a\rb"),
        lambda: PolicyReply("REJECT \0"),
        lambda: PolicyReply.smtp(250, "ok"),
        lambda: PolicyReply.smtp(True, "x"),
        lambda: PolicyReply.smtp(550, "x", "4.7.1"),
        lambda: PolicyReply.smtp(550, "x", "5.7"),
        lambda: PolicyReply.smtp(550, " "),
        lambda: PolicyReply.prepend("Bad Name", "v"),
        lambda: PolicyReply.prepend("X-A", "two\nlines"),
        lambda: PolicyReply.reject("two\nlines"),
    ],
)
def test_reply_validation(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_reply_keeps_8bit_text_from_requests() -> None:
    helo = request(b"helo_name=caf\xe9\n\n").helo_name
    assert helo is not None
    assert PolicyReply.reject(f"bad HELO {helo}").render() == b"action=REJECT bad HELO caf\xe9\n\n"


def test_public_names() -> None:
    defined = {
        n for n, obj in vars(policy).items() if n[0] != "_" and getattr(obj, "__module__", None) == policy.__name__
    }
    assert set(policy.__all__) == defined | {"NEED_DATA", "NeedData", "ConnectionClosed"}
    assert policy.ConnectionClosed is filterd.protocols.ConnectionClosed


# -- hypothesis --------------------------------------------------------------------------


def drive(conn: PolicyServerConnection, pieces: list[bytes]) -> tuple[list[object], str | None]:
    out: list[object] = []
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        for _ in range(100_000):  # bounded: a stuck machine fails instead of hanging
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                return out, f"{exc} {exc.reply!r}"
            if event is NEED_DATA:
                break
            out.append(event)
            if isinstance(event, PolicyRequest):
                conn.send(PolicyReply.dunno())
        else:
            raise AssertionError("next_event() never asked for data")
    return out, None


def pieces_from(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


LINES = st.sampled_from(
    [
        b"request=smtpd_access_policy\n",
        b"protocol_state=RCPT\n",
        b"sender=\n",
        b"size=123\n",
        b"x=a=b\r\n",
        b"\n",
        b"\r\n",
        b"no equals\n",
        b"=empty\n",
        b"nul=\x00\n",
        b"long=" + b"y" * 70 + b"\n",
        b"bad=\xff\xfe\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=200), st.lists(LINES, max_size=15).map(b"".join)),
    cuts=st.lists(st.integers(0, 300), max_size=20),
    small=st.booleans(),
)
def test_any_bytes_give_requests_or_a_refusal(data: bytes, cuts: list[int], small: bool) -> None:
    options = {"max_line": 48, "max_attributes": 4, "max_request_size": 120} if small else {}
    whole = drive(PolicyServerConnection(**options), [data])
    assert drive(PolicyServerConnection(**options), pieces_from(data, cuts)) == whole
    events, error = whole
    assert all(isinstance(e, PolicyRequest) for e in events[:-1])
    if error is None:
        assert events[-1:] == [ConnectionClosed()]


NAMES = st.text(st.characters(blacklist_characters="=\n\r\x00", codec="utf-8"), min_size=1, max_size=12)
VALUES = st.text(st.characters(blacklist_characters="\n\r\x00", codec="utf-8"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.dictionaries(NAMES, VALUES, max_size=8), min_size=1, max_size=4),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_encoded_requests_parse_back(requests: list[dict[str, str]], crlf: bool, cuts: list[int]) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = b"".join(b"".join(f"{k}={v}".encode() + end for k, v in r.items()) + end for r in requests)
    events, error = drive(PolicyServerConnection(), pieces_from(data, cuts))
    assert error is None
    assert events == [*(PolicyRequest(r) for r in requests), ConnectionClosed()]
