"""spamd protocol: golden transcripts (byte for byte), edge cases, and parsers under hypothesis.

Transcripts live in tests/transcripts/spamd/*.txt, one tagged line each:

    # comment                   why this transcript exists
    O: {"max_line": 32}         SpamdServerConnection options (optional)
    C: b"..."                   client bytes, concatenated;  "C: EOF" = the client half-closes
    E: {...}                    the SpamdRequest expected (fields left out take their defaults);
                                no E: line means the request must be refused
    V: {...}                    the verdict handed to the renderer (render_tell's arguments for TELL)
    S: b"..."                   server bytes, concatenated: the response, or the refusal's reply

Every transcript is fed whole, one byte at a time and in seeded random splits; the request or
refusal must come out the same every time, and before EOF unless the transcript has "C: EOF".
"""

from __future__ import annotations

import ast
import copy
import pickle
import random
import re
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import filterd.protocols
from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import spamd
from filterd.protocols.spamd import (
    EX_DATAERR,
    EX_PROTOCOL,
    EX_TIMEOUT,
    EX_UNAVAILABLE,
    METHODS,
    NEED_DATA,
    SpamdRequest,
    SpamdServerConnection,
    SpamdState,
    render_error,
    render_pong,
    render_response,
    render_tell,
    spam_header_value,
)

TRANSCRIPTS = Path(__file__).resolve().parents[1] / "transcripts" / "spamd"
PACKAGE = Path(filterd.protocols.__file__).resolve().parent
ERROR_REPLY = re.compile(rb"SPAMD/1\.0 [0-9]+ [^\r\n]+\r\n")
DEFAULTS: dict[str, Any] = {
    "headers": {},
    "body": b"",
    "user": None,
    "compressed": False,
    "message_class": None,
    "set_targets": frozenset(),
    "remove_targets": frozenset(),
    "content_length": None,
}


# -- transcripts -------------------------------------------------------------------------


@dataclass
class Transcript:
    name: str
    options: dict[str, int]
    client: bytes
    eof: bool
    expected: SpamdRequest | None
    verdict: dict[str, Any] | None
    server: bytes


def load_transcript(path: Path) -> Transcript:
    options: dict[str, int] = {}
    client, server = bytearray(), bytearray()
    eof = False
    expected: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw or raw.startswith("#"):
            continue
        tag, sep, rest = raw.partition(": ")
        assert sep, f"{path.name}:{number}: expected 'TAG: value'"
        if tag == "C" and rest == "EOF":
            eof = True
        elif tag == "C":
            assert not eof, f"{path.name}:{number}: client bytes after EOF"
            client += ast.literal_eval(rest)
        elif tag == "S":
            server += ast.literal_eval(rest)
        elif tag == "O":
            options = ast.literal_eval(rest)
        elif tag == "E":
            expected = ast.literal_eval(rest)
        elif tag == "V":
            verdict = ast.literal_eval(rest)
        else:
            raise AssertionError(f"{path.name}:{number}: unknown tag {tag!r}")
    request = None
    if expected is not None:
        merged = {**DEFAULTS, **expected}
        merged["set_targets"] = frozenset(merged["set_targets"])
        merged["remove_targets"] = frozenset(merged["remove_targets"])
        request = SpamdRequest(**merged)
        assert verdict is not None, f"{path.name}: a request transcript needs a V: line"
    return Transcript(path.stem, options, bytes(client), eof, request, verdict, bytes(server))


TRANSCRIPT_FILES = sorted(TRANSCRIPTS.glob("*.txt"))
SPLITS = ["whole", "bytewise", *(f"random-{seed}" for seed in range(5))]


def split(data: bytes, how: str) -> list[bytes]:
    """Non-empty pieces of ``data`` (an empty piece would mean EOF)."""
    if how == "whole":
        return [data] if data else []
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(how)
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, 17)
        pieces.append(data[start : start + size])
        start += size
    return pieces


def run(conn: SpamdServerConnection, pieces: list[bytes], eof: bool) -> SpamdRequest | RemoteProtocolError:
    """Feed pieces (then EOF) until the connection answers; the rest must change nothing."""
    feed = [*pieces, b""] if eof else list(pieces)
    outcome: SpamdRequest | RemoteProtocolError | None = None
    for index, piece in enumerate(feed):
        conn.receive_data(piece)
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            outcome = exc
        else:
            if event is not NEED_DATA:
                assert isinstance(event, SpamdRequest)
                outcome = event
        if outcome is not None:
            for rest in feed[index + 1 :]:
                conn.receive_data(rest)
                if isinstance(outcome, SpamdRequest):
                    assert conn.next_event() is NEED_DATA
                else:
                    with pytest.raises(RemoteProtocolError) as again:
                        conn.next_event()
                    assert again.value is outcome
            return outcome
    raise AssertionError(f"no request and no refusal after all input (state {conn.state})")


def render(request: SpamdRequest, verdict: dict[str, Any]) -> bytes:
    if request.method == "TELL":
        return render_tell(**verdict)
    if request.method == "PING":
        return render_pong()
    if request.method == "SKIP":
        return b""
    return render_response(request, **verdict)


def test_transcripts_cover_every_method_and_outcome() -> None:
    transcripts = [load_transcript(p) for p in TRANSCRIPT_FILES]
    methods = {t.expected.method for t in transcripts if t.expected}
    assert methods == METHODS
    assert sum(t.expected is None for t in transcripts) >= 15


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("path", TRANSCRIPT_FILES, ids=lambda p: p.stem)
def test_transcript(path: Path, how: str) -> None:
    transcript = load_transcript(path)
    conn = SpamdServerConnection(**transcript.options)
    outcome = run(conn, split(transcript.client, how), transcript.eof)
    if transcript.expected is None:
        assert isinstance(outcome, RemoteProtocolError), f"expected a refusal, got {outcome!r}"
        assert outcome.reply == transcript.server
        assert str(outcome) in transcript.server.decode("utf-8", "surrogateescape")
        assert conn.state is SpamdState.ERROR
        return
    assert isinstance(outcome, SpamdRequest), f"expected a request, got {outcome!r} ({outcome.reply!r})"
    assert conn.state is SpamdState.DONE
    for name in (f.name for f in fields(SpamdRequest)):
        assert getattr(outcome, name) == getattr(transcript.expected, name), name
    assert transcript.verdict is not None
    assert render(outcome, transcript.verdict) == transcript.server


def _aiospamc_transcripts() -> list[Path]:
    """Transcripts with a 1.5 answer: SKIP has none, and aiospamc only speaks 1.5."""
    chosen = []
    for path in TRANSCRIPT_FILES:
        transcript = load_transcript(path)
        if transcript.server and (transcript.expected is None or transcript.expected.version == "1.5"):
            chosen.append(path)
    return chosen


@pytest.mark.parametrize("path", _aiospamc_transcripts(), ids=lambda p: p.stem)
def test_transcript_response_is_accepted_by_aiospamc(path: Path) -> None:
    """aiospamc's own response parser reads every answer we send (spamc is the daemon's e2e test)."""
    import aiospamc.incremental_parser as parser_module
    import aiospamc.responses as responses

    transcript = load_transcript(path)
    response = responses.Response(**parser_module.ResponseParser().parse(transcript.server))
    if transcript.expected is None:
        assert int(response.status_code) == int(transcript.server.split(b" ")[1])
        with pytest.raises(responses.ResponseException):
            response.raise_for_status()
        return
    response.raise_for_status()
    method = transcript.expected.method
    if method in ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS"):
        assert transcript.verdict is not None
        assert response.headers.spam.value == transcript.verdict["is_spam"]
        assert response.body == transcript.server.partition(b"\r\n\r\n")[2]


# -- framing -----------------------------------------------------------------------------


def feed(data: bytes, *, eof: bool = False, **options: int) -> SpamdRequest:
    conn = SpamdServerConnection(**options)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, SpamdRequest), event
    return event


def refusal(data: bytes, *, eof: bool = True, **options: int) -> bytes:
    conn = SpamdServerConnection(**options)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.reply is not None
    return caught.value.reply


def test_request_is_ready_the_moment_content_length_bytes_arrived() -> None:
    data = b"CHECK SPAMC/1.5\r\nContent-length: 5\r\n\r\nhello"
    conn = SpamdServerConnection()
    for byte in data[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    assert conn.state.name == "BODY"
    conn.receive_data(data[-1:])
    event = conn.next_event()
    assert isinstance(event, SpamdRequest) and event.body == b"hello"
    assert conn.state is SpamdState.DONE
    assert conn.next_event() is NEED_DATA  # and stays so


def test_zlib_body_is_read_to_eof() -> None:
    packed = zlib.compress(b"Subject: x\r\n\r\nhi\r\n")
    conn = SpamdServerConnection()
    conn.receive_data(b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(packed) + packed)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, SpamdRequest)
    assert event.body == b"Subject: x\r\n\r\nhi\r\n" and event.compressed and event.content_length == len(packed)


def test_zlib_bytes_past_content_length_are_cut_off_like_spamd() -> None:
    packed = zlib.compress(b"message")
    head = b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(packed)
    assert feed(head + packed + b"trailing junk", eof=True).body == b"message"


def test_zlib_stream_must_be_complete_and_alone() -> None:
    packed = zlib.compress(b"message")
    for body, complaint in [
        (packed[:-1], b"not a complete zlib stream"),
        (packed + b"x", b"data after the end of the zlib stream"),
        (zlib.compress(b"a") + zlib.compress(b"b"), b"data after the end of the zlib stream"),
        (b"", b"not a complete zlib stream"),
    ]:
        head = b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(body)
        assert complaint in refusal(head + body)


def test_zlib_inflated_size_is_capped_while_inflating() -> None:
    bomb = zlib.compress(b"\0" * 10_000_000, 9)
    head = b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(bomb)
    assert len(bomb) < 65536
    reply = refusal(head + bomb[: len(bomb) // 2], eof=False, max_body_size=65536)
    assert reply == b"SPAMD/1.0 65 Data error: decompressed message larger than 65536 bytes\r\n"
    exact = zlib.compress(b"a" * 4096)
    head = b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: %d\r\n\r\n" % len(exact)
    assert feed(head + exact, eof=True, max_body_size=4096).body == b"a" * 4096


def test_compress_value_is_matched_as_spamd_does() -> None:
    packed = zlib.compress(b"m")
    for value in (b"ZLIB", b"x-zlib"):
        head = b"CHECK SPAMC/1.5\r\nCompress: %b\r\nContent-length: %d\r\n\r\n" % (value, len(packed))
        assert feed(head + packed, eof=True).compressed


def test_body_cap_boundary() -> None:
    assert feed(b"CHECK SPAMC/1.5\r\nContent-length: 16\r\n\r\n" + b"x" * 16, max_body_size=16).body == b"x" * 16
    assert feed(b"CHECK SPAMC/1.5\r\n\r\n" + b"x" * 16, eof=True, max_body_size=16).body == b"x" * 16
    huge = b"CHECK SPAMC/1.5\r\nContent-length: " + b"9" * 5000 + b"\r\n\r\n"
    assert refusal(huge, eof=False, max_line=8192) == b"SPAMD/1.0 65 Data error: message larger than 67108864 bytes\r\n"


def test_content_length_as_spamd_reads_it() -> None:
    assert feed(b"CHECK SPAMC/1.5\r\nContent-length: 005\r\n\r\nhello").content_length == 5
    empty = feed(b"CHECK SPAMC/1.5\r\nContent-length:\r\n\r\nignored")  # spamd: empty value is 0
    assert empty.content_length == 0 and empty.body == b""
    assert b"Expected 010 bytes, got 3 bytes" in refusal(b"CHECK SPAMC/1.5\r\nContent-length: 010\r\n\r\nabc")
    for bad in (b" 5 ", b"-1", b"0x5", b"5\t", b"\xd9\xa5"):
        assert b"non-numeric" in refusal(b"CHECK SPAMC/1.5\r\nContent-length: " + bad + b"\r\n\r\n", eof=False)
    # Names are case-sensitive: this one is an unknown header, so the body runs to EOF.
    lower = feed(b"CHECK SPAMC/1.5\r\ncontent-length: 2\r\n\r\nhello", eof=True)
    assert lower.content_length is None and lower.body == b"hello"


def test_headers_as_spamd_splits_them() -> None:
    event = feed(b"CHECK SPAMC/1.5\r\nUser:\t  alice smith \r\nX-Odd: a: b\r\nUser : bob\r\n\r\n", eof=True)
    assert event.user == "alice smith "
    assert event.headers == {"User": "alice smith ", "X-Odd": "a: b", "User ": "bob"}
    assert feed(b"CHECK SPAMC/1.5\r\nUser: a\r\nUser: b\r\n\r\n", eof=True).user == "b"  # last wins


def test_user_keeps_any_byte_above_control_range() -> None:
    event = feed(b"CHECK SPAMC/1.5\r\nUser: j\xc3\xbcrgen\xff\x7f\r\n\r\n", eof=True)
    assert event.user == "j\u00fcrgen\udcff\x7f"
    assert b"control chars" in refusal(b"CHECK SPAMC/1.5\r\nUser: a\x00b\r\n\r\n")


def test_header_line_cap_counts_lines_after_parsing() -> None:
    head = b"CHECK SPAMC/1.5\r\n" + b"X: y\r\n" * 3
    assert feed(head + b"\r\n", eof=True, max_header_lines=3).headers == {"X": "y"}
    assert refusal(head + b"X: y\r\n", eof=False, max_header_lines=3).endswith(b"(too many headers)\r\n")
    assert b"Name: value" in refusal(head + b"no colon\r\n", eof=False, max_header_lines=3)


def test_ping_and_skip_headers_depend_on_version() -> None:
    assert feed(b"PING SPAMC/1.2\r\nthis is ignored").headers == {}
    assert feed(b"PING SPAMC/1.0\n").version == "1.0"
    assert feed(b"SKIP SPAMC/1.4\r\n").method == "SKIP"
    ping = feed(b"PING SPAMC/1.5\r\nContent-length: 0\r\nUser: a\r\n\r\n")
    assert ping.content_length == 0 and ping.user == "a" and ping.body == b""
    conn = SpamdServerConnection()
    conn.receive_data(b"PING SPAMC/1.5\r\n")
    assert conn.next_event() is NEED_DATA  # 1.5 sends a blank line after its headers
    assert conn.state is SpamdState.HEADERS


def test_unterminated_last_line_counts_at_eof_like_perl_getline() -> None:
    assert feed(b"PING SPAMC/1.2", eof=True).method == "PING"
    assert refusal(b"PING SPAMC/1.5\r\nUser: a") == b"SPAMD/1.0 76 Bad header line: (EOF during headers)\r\n"


def test_request_line_must_be_exact() -> None:
    for line in (b"check SPAMC/1.5", b"XCHECK SPAMC/1.5", b"CHECK  SPAMC/1.5", b"CHECK SPAMC/1.5 ", b"CHECK SPAMD/1.5"):
        assert refusal(line + b"\r\n", eof=False) == b"SPAMD/1.0 76 Bad header line: " + line + b"\r\n"


def test_refusal_echoes_request_line_bytes_exactly_but_never_a_line_break() -> None:
    raw = b"\xff\xfe\x00 SPAMC/1.5"
    assert refusal(raw + b"\n", eof=False) == b"SPAMD/1.0 76 Bad header line: " + raw + b"\r\n"
    assert refusal(b"A\rB\r\n", eof=False) == b"SPAMD/1.0 76 Bad header line: A B\r\n"


def test_tell_headers() -> None:
    def tell(*headers: bytes) -> SpamdRequest:
        return feed(b"TELL SPAMC/1.5\r\n" + b"".join(h + b"\r\n" for h in headers) + b"Content-length: 1\r\n\r\nm")

    event = tell(b"Message-class: SPAM", b"Set: LOCAL,Remote")
    assert event.message_class == "spam" and event.set_targets == {"local", "remote"} and not event.remove_targets
    assert event.headers["Message-class"] == "SPAM"  # as sent
    assert tell(b"Set: nothing").set_targets == frozenset()
    assert tell(b"Set: local", b"Set: remote").set_targets == {"remote"}  # the last Set header wins
    assert tell(b"Set: local").message_class is None  # spamd would learn ham; the daemon decides
    assert tell(b"Set: local", b"Remove: remote").remove_targets == {"remote"}
    conflict = b"TELL SPAMC/1.5\r\nSet: remote\r\nRemove: remote\r\n\r\n"
    assert refusal(conflict, eof=False).endswith(b"Unable to set remote and remove remote in the same operation.\r\n")


def test_tell_only_headers_mean_nothing_to_other_methods() -> None:
    event = feed(b"CHECK SPAMC/1.5\r\nMessage-class: eggs\r\nSet: local\r\nRemove: local\r\nContent-length: 0\r\n\r\n")
    assert event.message_class is None and event.set_targets == frozenset() == event.remove_targets
    assert event.headers["Message-class"] == "eggs"


def test_errors_are_sticky_and_data_after_eof_is_our_bug() -> None:
    conn = SpamdServerConnection()
    conn.receive_data(b"NOPE\r\n")
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    conn.receive_data(b"more")  # ignored
    with pytest.raises(RemoteProtocolError) as second:
        conn.next_event()
    assert second.value is first.value and conn.state is SpamdState.ERROR
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        conn.receive_data(b"x")


def test_caps_must_make_sense() -> None:
    with pytest.raises(ValueError, match="caps"):
        SpamdServerConnection(max_line=0)


def test_transition_table_reaches_every_state_once_in_one_place() -> None:
    table = spamd._TRANSITIONS
    assert set(table) == set(SpamdState)
    reached = {SpamdState.REQUEST_LINE} | {target for moves in table.values() for target in moves.values()}
    assert reached == set(SpamdState)
    assert not table[SpamdState.DONE] and not table[SpamdState.ERROR]
    for state in (SpamdState.REQUEST_LINE, SpamdState.HEADERS, SpamdState.BODY):
        assert table[state][spamd._Step.PROTOCOL_ERROR] is SpamdState.ERROR


def test_illegal_transition_is_a_local_error() -> None:
    conn = SpamdServerConnection()
    with pytest.raises(LocalProtocolError, match="not legal"):
        conn._move(spamd._Step.BODY_COMPLETE)


def test_need_data_is_one_object() -> None:
    assert copy.deepcopy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert spamd.NEED_DATA is filterd.protocols.NEED_DATA


def test_protocols_stay_sans_io() -> None:
    """No sockets, no event loop, no threads in filterd/protocols (STYLE.md §2)."""
    forbidden = {"asyncio", "socket", "selectors", "ssl", "threading", "trio", "anyio"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_public_names() -> None:
    """__all__ is exactly what the module defines for others, so nothing turns public by accident."""
    defined = {
        n for n, obj in vars(spamd).items() if n[0] != "_" and getattr(obj, "__module__", None) == spamd.__name__
    }
    constants = {n for n in vars(spamd) if n.startswith("EX_")}
    assert set(spamd.__all__) == defined | constants | {"METHODS", "NEED_DATA", "NeedData"}


# -- responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("is_spam", "score", "threshold", "yes_no", "value"),
    [
        (False, 1.3, 5.0, False, "False ; 1.3 / 5.0"),
        (True, 1000.0, 5.0, False, "True ; 1000.0 / 5.0"),
        (True, 5.0, 5.0, True, "Yes ; 5.0 / 5.0"),
        (False, 0.2, 5.0, True, "No ; 0.2 / 5.0"),
        (False, 4.96, 5.0, False, "False ; 4.9 / 5.0"),  # ham never shows >= threshold
        (False, 4.94, 5.0, False, "False ; 4.9 / 5.0"),
        (False, 4.9496, 5.0, False, "False ; 4.9 / 5.0"),  # 4.950 after the 3-decimal rounding
        (False, 9.97, 10.0, False, "False ; 9.9 / 10.0"),
        (False, 5.06, 5.1, False, "False ; 5 / 5.1"),  # Perl prints the capped number unformatted
        (False, 0.0, 0.0, False, "False ; -0.1 / 0.0"),
        (True, 0.04999, 0.0, False, "True ; 0.1 / 0.0"),  # 0.050 after rounding to 3 decimals
        (False, -0.04, 5.0, False, "False ; -0.0 / 5.0"),  # printf's negative zero, as Perl's
        (False, -12.345, 5.0, False, "False ; -12.3 / 5.0"),
        (True, 12.25, 4.5, False, "True ; 12.2 / 4.5"),
    ],
)
def test_spam_header_value(is_spam: bool, score: float, threshold: float, yes_no: bool, value: str) -> None:
    assert spam_header_value(is_spam, score, threshold, yes_no=yes_no) == value


def test_spam_header_value_refuses_nan() -> None:
    with pytest.raises(LocalProtocolError, match="finite"):
        spam_header_value(False, float("nan"), 5.0)


def request(method: str, version: str = "1.5") -> SpamdRequest:
    return SpamdRequest(method, version, {}, b"", None, False, None, frozenset(), frozenset(), None)


def test_headers_cut_after_the_first_empty_line_as_spamd_regex() -> None:
    def cut(message: bytes) -> bytes:
        response = render_response(request("HEADERS"), is_spam=False, score=0, threshold=5, body=message)
        return response.partition(b"\r\n\r\n")[2]

    assert cut(b"A: 1\nB: 2\n\nbody\n\nmore") == b"A: 1\nB: 2\n\n"
    assert cut(b"A: 1\r\n\nbody") == b"A: 1\r\n\n"
    assert cut(b"A: 1\r\nB: 2\r\n") == b"A: 1\r\nB: 2\r\n"  # no empty line: all of it
    response = render_response(request("HEADERS"), is_spam=False, score=0, threshold=5, body=b"A: 1\n\nxyz")
    assert b"Content-length: 6\r\n" in response


def test_render_response_by_method() -> None:
    assert render_response(request("PING"), is_spam=False, score=0, threshold=5) == b"SPAMD/1.5 0 PONG\r\n"
    assert render_response(request("SKIP"), is_spam=False, score=0, threshold=5) == b""
    check = render_response(request("CHECK", "1.2"), is_spam=True, score=6, threshold=5, body=b"ignored")
    assert check == b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 6.0 / 5.0\r\n\r\n"
    report = render_response(request("REPORT_IFSPAM", "1.2"), is_spam=True, score=6, threshold=5, body=b"r\n\n")
    assert report == b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 6.0 / 5.0\r\n\r\nr\n\n"
    with pytest.raises(LocalProtocolError, match="render_tell"):
        render_response(request("TELL"), is_spam=False, score=0, threshold=5)
    with pytest.raises(LocalProtocolError, match="version"):
        render_response(request("CHECK", "x"), is_spam=False, score=0, threshold=5)


def test_render_tell() -> None:
    assert render_tell([], []) == b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n"
    assert render_tell({"remote", "local"}, ["local", "local"]) == (
        b"SPAMD/1.1 0 EX_OK\r\nDidSet: local,remote\r\nDidRemove: local\r\n\r\n\r\n"
    )
    with pytest.raises(LocalProtocolError, match="local/remote"):
        render_tell(["Local"], [])


def test_render_error() -> None:
    tell_off = "Service Unavailable: TELL commands are not enabled, set the --allow-tell switch."
    assert render_error(EX_UNAVAILABLE, tell_off) == b"SPAMD/1.0 69 " + tell_off.encode() + b"\r\n"
    assert render_error(EX_TIMEOUT, "Timeout: (30 second timeout while trying to CHECK)\r\n") == (
        b"SPAMD/1.0 79 Timeout: (30 second timeout while trying to CHECK)  \r\n"
    )
    assert render_error(EX_DATAERR, "") == b"SPAMD/1.0 65 EX_DATAERR\r\n"
    assert render_error(200, "") == b"SPAMD/1.0 200 EX_ERROR\r\n"
    assert render_error(EX_PROTOCOL, "caf\u00e9") == b"SPAMD/1.0 76 caf\xc3\xa9\r\n"
    for code in (0, 256, True):
        with pytest.raises(LocalProtocolError):
            render_error(code, "x")


def test_exit_codes_are_sysexits() -> None:
    names = "USAGE DATAERR NOINPUT NOUSER NOHOST UNAVAILABLE SOFTWARE OSERR OSFILE CANTCREAT IOERR TEMPFAIL"
    names += " PROTOCOL NOPERM CONFIG TIMEOUT"
    assert [getattr(spamd, f"EX_{name}") for name in names.split()] == list(range(64, 80))
    assert spamd.EX_OK == 0


# -- aiospamc's request builder ----------------------------------------------------------


def test_requests_built_by_aiospamc_parse() -> None:
    import aiospamc.header_values as hv
    import aiospamc.requests as requests

    message = b"Subject: hi\r\n\r\nbody\r\n"
    for verb in sorted(METHODS - {"PING", "SKIP", "TELL"}):
        for compress in (False, True):
            headers: dict[str, Any] = {"User": hv.UserValue("carol")}
            if compress:
                headers["Compress"] = hv.CompressValue()
            event = feed(bytes(requests.Request(verb, headers=headers, body=message)), eof=True)
            assert (event.method, event.body, event.user, event.compressed) == (verb, message, "carol", compress)
    for verb in ("PING", "SKIP"):
        assert feed(bytes(requests.Request(verb))).method == verb
    action = hv.ActionOption(local=True, remote=True)
    tell = requests.Request(
        "TELL",
        headers={
            "Message-class": hv.MessageClassValue(hv.MessageClassOption.spam),
            "Set": hv.SetOrRemoveValue(action),
        },
        body=message,
    )
    event = feed(bytes(tell))
    assert (event.message_class, event.set_targets, event.body) == ("spam", frozenset({"local", "remote"}), message)


# -- hypothesis --------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"CHECK SPAMC/1.5\r\n",
    b"PROCESS SPAMC/1.5\n",
    b"SYMBOLS SPAMC/1.0\r\n",
    b"PING SPAMC/1.5\r\n",
    b"PING SPAMC/1.2\r\n",
    b"SKIP SPAMC/1.5\r\n",
    b"TELL SPAMC/1.5\r\n",
    b"HEADERS SPAMC/1.5\r\nContent-length: 7\r\n\r\n",
    b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: 40\r\n\r\n",
]
HEADER_LINES = [
    b"Content-length: 5\r\n",
    b"Content-length: 0\r\n",
    b"Content-length: x\r\n",
    b"Content-length: 99999999999999999999999\r\n",
    b"User: a\r\n",
    b"User: \x01\r\n",
    b"Compress: zlib\r\n",
    b"Compress: gzip\r\n",
    b"Message-class: spam\r\n",
    b"Message-class: bad\r\n",
    b"Set: local\r\n",
    b"Remove: local, remote\r\n",
    b"\r\n",
    b"\n",
    b"no colon\r\n",
    b"X: " + b"y" * 60 + b"\r\n",
]
ANY_INPUT = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda prefix, lines, tail: prefix + b"".join(lines) + tail,
        st.sampled_from(PREFIXES),
        st.lists(st.sampled_from(HEADER_LINES), max_size=7),
        st.one_of(st.binary(max_size=200), st.binary(max_size=2000).map(zlib.compress)),
    ),
)
SMALL_CAPS = {"max_body_size": 128, "max_header_lines": 4, "max_line": 48}


def pieces_from(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


def outcome_key(outcome: SpamdRequest | RemoteProtocolError) -> object:
    return outcome.reply if isinstance(outcome, RemoteProtocolError) else outcome


@settings(max_examples=400, deadline=None)
@given(data=ANY_INPUT, cuts=st.lists(st.integers(0, 2300), max_size=30), small=st.booleans())
def test_any_bytes_give_a_request_or_a_well_formed_refusal(data: bytes, cuts: list[int], small: bool) -> None:
    options = SMALL_CAPS if small else {}
    outcome = run(SpamdServerConnection(**options), pieces_from(data, cuts), eof=True)
    if isinstance(outcome, RemoteProtocolError):
        assert outcome.reply is not None and ERROR_REPLY.fullmatch(outcome.reply), outcome.reply
    else:
        assert outcome.method in METHODS
    # How the bytes were cut never changes the answer.
    assert outcome_key(run(SpamdServerConnection(**options), pieces_from(data, []), eof=True)) == outcome_key(outcome)


HEADER_NAMES = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(lambda s: s + "v")
TARGETS = st.frozensets(st.sampled_from(["local", "remote"]))


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, bool, dict[str, Any]]:
    """A request any client could send, its EOF need, and the fields it must parse to."""
    method = draw(st.sampled_from(sorted(METHODS)))
    bodyless = method in ("PING", "SKIP")
    version = draw(st.sampled_from(["1.2", "1.5"] if bodyless else ["1.1", "1.2", "1.3", "1.4", "1.5"]))
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    headers: dict[str, str] = dict(draw(st.dictionaries(HEADER_NAMES, HEADER_TEXT, max_size=4)))
    if draw(st.booleans()):
        headers["User"] = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=16))
    expected: dict[str, Any] = {"method": method, "version": version}
    if method == "TELL":
        message_class = draw(st.sampled_from([None, "spam", "ham", "Spam", "HAM"]))
        set_targets = draw(TARGETS)
        remove_targets = draw(TARGETS) - set_targets
        if message_class:
            headers["Message-class"] = message_class
        for name, targets in (("Set", set_targets), ("Remove", remove_targets)):
            if targets:
                sep = draw(st.sampled_from([",", ", "]))
                headers[name] = sep.join(t.upper() if draw(st.booleans()) else t for t in sorted(targets))
        expected |= {
            "message_class": message_class.lower() if message_class else None,
            "set_targets": set_targets,
            "remove_targets": remove_targets,
        }
    body = b"" if bodyless else draw(st.binary(max_size=3000))
    sent, eof = body, False
    if not bodyless:
        if draw(st.booleans()):
            headers["Compress"] = "zlib"
            sent, eof = zlib.compress(body, draw(st.integers(0, 9))), True
        if "Compress" in headers or draw(st.booleans()):
            headers["Content-length"] = str(len(sent))
            expected["content_length"] = len(sent)
        else:
            eof = True
        expected |= {"body": body, "compressed": "Compress" in headers}
    if bodyless and version < "1.5":
        headers = {}
    head = f"{method} SPAMC/{version}".encode() + nl
    if not (bodyless and version < "1.5"):
        head += b"".join(f"{k}: {v}".encode() + nl for k, v in headers.items()) + nl
    expected |= {"headers": headers, "user": headers.get("User")}
    return head + sent, eof, expected


@settings(max_examples=300, deadline=None)
@given(case=valid_requests(), cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_encoded_requests_parse_back(case: tuple[bytes, bool, dict[str, Any]], cuts: list[int]) -> None:
    data, eof, expected = case
    outcome = run(SpamdServerConnection(), pieces_from(data, cuts), eof)
    assert isinstance(outcome, SpamdRequest), outcome.reply
    want = {**DEFAULTS, **expected}
    for name in want:
        assert getattr(outcome, name) == want[name], name
