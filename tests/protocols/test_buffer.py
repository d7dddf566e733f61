"""The shared receive buffer: lines and byte counts out of arbitrary pieces, caps before the end."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols._buffer import ReceiveBuffer, strip_line_ending


def test_take_line_waits_for_lf_and_keeps_the_ending() -> None:
    buf = ReceiveBuffer()
    buf.append(b"PING SPAMC/1.5\r")
    assert buf.take_line(100) is None
    buf.append(b"\nUser: a\nrest")
    assert buf.take_line(100) == b"PING SPAMC/1.5\r\n"
    assert buf.take_line(100) == b"User: a\n"
    assert buf.take_line(100) is None
    assert buf.take_all() == b"rest"
    assert not buf and len(buf) == 0


def test_bare_cr_is_content_not_an_ending() -> None:
    buf = ReceiveBuffer()
    buf.append(b"a\rb\r\n")
    assert buf.take_line(100) == b"a\rb\r\n"
    assert strip_line_ending(b"a\rb\r\n") == b"a\rb"


@pytest.mark.parametrize(
    ("line", "stripped"),
    [(b"x\r\n", b"x"), (b"x\n", b"x"), (b"x", b"x"), (b"\r\n", b""), (b"x\r", b"x\r"), (b"x\n\n", b"x\n")],
)
def test_strip_line_ending_drops_one_crlf_or_lf(line: bytes, stripped: bytes) -> None:
    assert strip_line_ending(line) == stripped


def test_line_cap_counts_content_not_the_ending() -> None:
    buf = ReceiveBuffer()
    buf.append(b"abcd\r\n")
    assert buf.take_line(4) == b"abcd\r\n"
    buf.append(b"abcde\n")
    with pytest.raises(RemoteProtocolError, match="longer than 4"):
        buf.take_line(4)


def test_line_cap_is_enforced_while_the_line_is_incomplete() -> None:
    buf = ReceiveBuffer()
    buf.append(b"abcd")
    assert buf.take_line(4) is None
    buf.append(b"\r")  # might still be "abcd\r\n": not over the cap yet
    assert buf.take_line(4) is None
    buf.append(b"x")  # now it cannot be
    with pytest.raises(RemoteProtocolError):
        buf.take_line(4)


def test_lf_search_resumes_and_restarts_after_a_take() -> None:
    buf = ReceiveBuffer()
    for byte in b"one\ntwo":
        buf.append(bytes([byte]))
        buf.find_line(100)
    assert buf.take_line(100) == b"one\n"
    assert buf.take_line(100) is None
    buf.append(b"\nthree")
    assert buf.take_line(100) == b"two\n"


def test_take_counts() -> None:
    buf = ReceiveBuffer()
    buf.append(b"hello world")
    assert buf.take(20) is None
    assert len(buf) == 11
    assert buf.take(5) == b"hello"
    assert buf.take_at_most(3) == b" wo"
    assert buf.take_at_most(100) == b"rld"
    assert buf.take(0) == b""
    with pytest.raises(ValueError, match="count"):
        buf.take(-1)
    with pytest.raises(ValueError, match="count"):
        buf.take_at_most(-1)
    buf.append(b"junk")
    buf.clear()
    assert not buf
    assert "0 bytes" in repr(buf)


def test_receive_marks_the_close_and_refuses_data_after_it() -> None:
    buf = ReceiveBuffer()
    buf.receive(b"a\n")
    buf.receive(b"dropped", keep=False)
    assert not buf.closed and buf.take_all() == b"a\n"
    buf.receive(b"")
    assert buf.closed
    with pytest.raises(LocalProtocolError, match="after the peer closed"):
        buf.receive(b"x")
    with pytest.raises(LocalProtocolError):
        buf.receive(b"x", keep=False)
    buf.clear()
    assert buf.closed and not buf


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20))
def test_lines_do_not_depend_on_how_bytes_arrive(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    buf = ReceiveBuffer()
    lines: list[bytes] = []
    for piece in pieces:
        buf.append(piece)
        while (line := buf.take_line(1000)) is not None:
            lines.append(line)
    assert b"".join(lines) + buf.take_all() == data
    assert lines == [part + b"\n" for part in data.split(b"\n")[:-1]]
