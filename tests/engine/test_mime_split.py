"""`filterd.engine.mime.split_header_block` on `filterd.headerblock.split_header_fields`: the
same fields, body and problems as the line loop it replaced (kept below as the reference), on
generated header blocks with folds, CRLF/LF mixes, missing empty lines, leading continuation
lines, colons in odd places and more fields than the cap."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd.engine.mime import HeaderBlock, RawField, _raw_field, split_header_block
from filterd.headerblock import header_block_bounds

# ----------------------------------------------------------------------- the reference

_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_MAX_HEADERS = 2000


def reference_split_header_block(data: bytes) -> HeaderBlock:
    """The engine's splitter before it moved onto split_header_fields (verbatim but names)."""
    problems: list[str] = []
    end, start = header_block_bounds(data)
    block, body = data[:end], data[start:]
    if data[:1] in (b"\n",) or data[:2] == b"\r\n":  # empty header block
        return HeaderBlock([], data[1:] if data[:1] == b"\n" else data[2:], problems)
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    fields: list[RawField] = []
    current: list[bytes] = []
    for i, line in enumerate(lines):
        first = line[:1]
        if first in (b" ", b"\t"):
            if not current:
                problems.append("header-starts-with-continuation")
            current.append(line)
        elif _HEADER_NAME.match(line) and len(fields) < _MAX_HEADERS:
            if current:
                fields.append(_reference_raw_field(current))
            current = [line]
        else:
            problems.append("too-many-headers" if len(fields) >= _MAX_HEADERS else "no-header-body-separator")
            rest = b"\n".join(lines[i:])
            body = rest + (b"\n" + data[end:] if end < len(data) else b"")
            break
    if current:
        fields.append(_reference_raw_field(current))
    return HeaderBlock(fields, body, problems)


def _reference_raw_field(lines: list[bytes]) -> RawField:
    # The splitting is what is compared; one field's bytes become a RawField as the parser does it.
    return _raw_field(b"\n".join(lines) + b"\n")


# ----------------------------------------------------------------------- generated blocks

_LINES = st.sampled_from(
    [
        b"Subject: hello",
        b"From : a@example.org",
        b"X-Odd:: two colons",
        b"Received: from a (b [192.0.2.1]); Mon, 5 Jan 2026 10:00:00 +0000",
        b"Na:me: colon in the value",
        b"X:",
        b"X\t:tab before the colon",
        b":no name",
        b"Sub ject: a blank in the name",
        b"No colon here",
        b" folded",
        b"\tfolded: with a colon",
        b" ",
        b"\t",
        b"",
        b"\r",
        b"From someone",
        b"\xffbad: 8-bit name",
        b"X-8bit: caf\xc3\xa9 \xff",
        b"--boundary",
    ]
)
_ENDS = st.sampled_from([b"\n", b"\r\n", b"\n", b"\r\n", b"", b"\r", b"\n\r\n"])


@st.composite
def header_blocks(draw: st.DrawFn, *, near_the_cap: bool = False) -> bytes:
    lines = draw(st.lists(st.tuples(st.one_of(_LINES, st.binary(max_size=12)), _ENDS), max_size=30))
    data = b"".join(line + end for line, end in lines)
    if near_the_cap:
        count = draw(st.integers(_MAX_HEADERS - 3, _MAX_HEADERS + 3))
        data = draw(st.sampled_from([b"A: b\n", b"A: b\r\n", b"A:\n\tfold\n"])) * count + data
    if draw(st.booleans()):
        data = draw(st.sampled_from([b" ", b"\t", b"\n", b"\r\n", b" x:\n"])) + data
    if draw(st.booleans()):
        data += draw(st.sampled_from([b"\n", b"\r\n"])) + draw(st.binary(max_size=40))
    return data


def same(data: bytes) -> None:
    new, old = split_header_block(data), reference_split_header_block(data)
    assert new.fields == old.fields
    assert new.body == old.body
    assert new.problems == old.problems


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_blocks())
def test_split_header_block_is_the_line_loop_it_replaced(data: bytes) -> None:
    same(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_blocks(near_the_cap=True))
def test_split_header_block_is_the_line_loop_it_replaced_near_the_cap(data: bytes) -> None:
    same(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_split_header_block_is_the_line_loop_it_replaced_on_any_bytes(data: bytes) -> None:
    same(data)


def test_split_header_block_edges() -> None:
    for data in (
        b"",
        b"\n",
        b"\r\n",
        b"\nSubject: body\n",
        b"Subject: only",
        b"Subject: only\r",
        b"Subject: x\ngarbage\n",  # no empty line: the body lost its last newline, as it did
        b"Subject: x\ngarbage\n\nbody\n",
        b" stray\n more: x\nSubject: x\n\nbody\n",
        b"A: b\n" * (_MAX_HEADERS + 1) + b"B: c\n\nbody\n",
        b"A: b\n" * (_MAX_HEADERS + 1) + b"\nbody\n",
        b"A: b\n" * _MAX_HEADERS + b"no field\n\nbody\n",
        b"A: b\n" * (_MAX_HEADERS + 1) + b"no field\n\nbody\n",
    ):
        same(data)
    capped = split_header_block(b"A: b\n" * (_MAX_HEADERS + 5) + b"\nbody\n")
    assert len(capped.fields) == _MAX_HEADERS + 1 and capped.problems == ["too-many-headers"]
    assert capped.body == b"A: b\n" * 4 + b"\nbody\n"
