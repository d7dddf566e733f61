"""`filterd.headerblock`: the one header-field splitter the engine's parser and the delivery
agent share; any bytes give fields that put back together are the header block, byte for byte;
the delivery agent splits as it did before it moved onto it (its old loop kept below)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.headerblock import header_block_bounds, split_header_fields
from filterd.mda.headers import split_fields


def test_fields_names_and_raw_bytes_with_folds_and_crlf() -> None:
    data = b"Subject: a\r\n b\r\nFrom : x\n\tfold: not a field\nX:\r\n\r\nbody: not a field\n"
    split = split_header_fields(data)
    assert split.fields == [(b"Subject", b"Subject: a\r\n b\r\n"), (b"From", b"From : x\n\tfold: not a field\n"),
                            (b"X", b"X:\r\n")]  # fmt: skip
    assert (split.end, split.body, split.cut) == (data.index(b"\r\n\r\n") + 2, data.index(b"body"), False)


def test_where_the_block_ends() -> None:
    assert split_header_fields(b"") == ([], 0, 0, False)
    assert split_header_fields(b"\nSubject: body\n") == ([], 0, 1, False)  # no header block
    assert split_header_fields(b"\r\nSubject: body\n") == ([], 0, 2, False)
    assert split_header_fields(b"Subject: only") == ([(b"Subject", b"Subject: only")], 13, 13, False)
    # a line that is neither a field nor a continuation ends it before any empty line
    assert split_header_fields(b"A: 1\nDear Bob,\nB: 2\n\nbody\n") == ([(b"A", b"A: 1\n")], 5, 5, True)
    assert split_header_fields(b"Sub ject: x\n\n") == ([], 0, 0, True)  # no blank inside a name
    assert split_header_fields(b"A: 1\n\rB: 2\n") == ([(b"A", b"A: 1\n")], 5, 5, True)  # a CR alone is no empty line


def test_continuation_lines_on_top_are_one_nameless_field() -> None:
    split = split_header_fields(b" stray\n\tmore: x\nSubject: x\n\nbody\n")
    assert split.fields == [(b"", b" stray\n\tmore: x\n"), (b"Subject", b"Subject: x\n")]
    assert split.body == split.end + 1 and not split.cut


def test_max_fields_ends_the_block_as_a_line_that_is_no_field_would() -> None:
    data = b"A: 1\nB: 2\n fold\nC: 3\n\nbody\n"
    assert split_header_fields(data, 2) == ([(b"A", b"A: 1\n"), (b"B", b"B: 2\n fold\n")], 16, 16, True)
    assert split_header_fields(data, 3).cut is False  # the empty line comes next: not cut
    assert split_header_fields(b" x\nA: 1\n", 1) == ([(b"", b" x\n")], 3, 3, True)  # the nameless one counts


# ----------------------------------------------------------------------- the MDA as it was

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")


def reference_split_fields(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """`filterd.mda.headers.split_fields` before it moved onto split_header_fields."""
    end, _ = header_block_bounds(message)
    fields: list[tuple[bytes, bytes]] = []
    at = 0
    while at < end:
        nl = message.find(b"\n", at, end)
        stop = end if nl < 0 else nl + 1
        line = message[at:stop]
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            else:
                fields.append((b"", line))
        elif _FIELD_NAME.match(line):
            fields.append((line.partition(b":")[0].rstrip(b" \t"), line))
        else:
            break
        at = stop
    return fields, at


_ATOMS = st.sampled_from(
    [b"Subject: x", b"From : y", b"A:: b", b":", b"Sub ject: x", b"no colon", b" ", b"\t", b" fold: z",
     b"\n", b"\r\n", b"\r", b"\xff:", b"X-\xff: \xfe"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_ATOMS, st.binary(max_size=8)), max_size=40))
def test_any_bytes_split_as_the_delivery_agent_did_and_put_back_together(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    split = split_header_fields(data)
    assert b"".join(raw for _, raw in split.fields) == data[: split.end]
    assert split.end <= split.body <= len(data)
    assert data[split.end : split.body] in (b"", b"\n", b"\r\n")
    assert split.cut == (split.body == split.end < len(data))
    fields, end = split_fields(data)
    assert ([(f.name, f.raw) for f in fields], end) == reference_split_fields(data)
