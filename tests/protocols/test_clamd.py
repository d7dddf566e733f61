"""clamd INSTREAM framing and replies, as bytes (the live exchange is in tests/engine/test_antivirus.py)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filterd.errors import RemoteProtocolError
from filterd.protocols.clamd import INSTREAM_COMMAND, ScanReply, instream_frames, parse_reply


def test_instream_bytes_are_chunks_with_big_endian_lengths_then_zero() -> None:
    wire = INSTREAM_COMMAND + b"".join(instream_frames(b"abcdefg", chunk_size=3))
    assert wire == b"zINSTREAM\0" + b"\0\0\0\x03abc" + b"\0\0\0\x03def" + b"\0\0\0\x01g" + b"\0\0\0\0"


def test_empty_stream_is_only_the_end_marker() -> None:
    assert b"".join(instream_frames(b"")) == b"\0\0\0\0"


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_frames_carry_the_data_exactly(data: bytes, chunk_size: int) -> None:
    wire = b"".join(instream_frames(data, chunk_size=chunk_size))
    out, pos = b"", 0
    while True:
        size = int.from_bytes(wire[pos : pos + 4], "big")
        pos += 4
        if size == 0:
            break
        assert size <= chunk_size
        out += wire[pos : pos + size]
        pos += size
    assert pos == len(wire) and out == data


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK\0", ScanReply()),
        (b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0", ScanReply(found=("Eicar-Test-Signature.UNOFFICIAL",))),
        (b"stream: Win.Test(44d88612fea8a8f36de82e1278abb02f:68) FOUND\0",
         ScanReply(found=("Win.Test(44d88612fea8a8f36de82e1278abb02f:68)",))),
        (b"stream: A FOUND\0stream: B FOUND\0stream: A FOUND\0", ScanReply(found=("A", "B"))),  # AllMatch
        (b"INSTREAM size limit exceeded. ERROR\0", ScanReply(error="INSTREAM size limit exceeded.")),
        (b"stream: Can't allocate memory ERROR\0", ScanReply(error="Can't allocate memory")),
        (b"stream: OK", ScanReply()),  # closed before the NUL: still an answer
    ],
)  # fmt: skip
def test_replies(reply: bytes, expected: ScanReply) -> None:
    assert parse_reply(reply) == expected


@pytest.mark.parametrize("reply", [b"", b"\0", b"UNKNOWN COMMAND\0", b"PONG\0", b"HTTP/1.0 400 Bad Request\r\n"])
def test_anything_else_is_the_peers_fault(reply: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_reply(reply)


def test_an_endless_reply_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than"):
        parse_reply(b"stream: OK\0" * 10000)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_reply_or_a_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_reply(data)
