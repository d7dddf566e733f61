"""`filterd.mda.headers.split_fields`, and the delivery agent's readers of header fields on top
of it (recipe facts, the lines the MTA prepended, loop detection): folded fields, CRLF, and a
message missing the empty line after its header block."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.headerblock import without_fields
from filterd.mda.headers import Field, split_fields
from filterd.mda.main import _lead, _ours_in_front
from filterd.mda.recipes import facts_from_message
from tests.mda.helpers import Deliver, maildir_files

FOLDED = (
    b"Return-Path: <s@example.org>\n"
    b"Delivered-To: alice\n"
    b"Subject: =?utf-8?q?Caf=C3=A9_invoice?= for\n"
    b"  March,\n"
    b"\tand April\n"
    b"From : Alice <alice@example.com>\n"
    b"\n"
    b"Delivered-To: alice\n"
    b"Subject: body text\n"
)


def names(fields: list[Field]) -> list[bytes]:
    return [f.name for f in fields]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_fields_keep_their_folds_and_end_at_the_empty_line(newline: bytes) -> None:
    data = FOLDED.replace(b"\n", newline)
    fields, end = split_fields(data)
    assert names(fields) == [b"Return-Path", b"Delivered-To", b"Subject", b"From"]
    assert b"".join(f.raw for f in fields) == data[:end]  # byte for byte, line ends and folds
    assert data[end:] == newline + b"Delivered-To: alice" + newline + b"Subject: body text" + newline
    assert fields[2].value == b"=?utf-8?q?Caf=C3=A9_invoice?= for March, and April"
    assert fields[3].key == b"from" and fields[3].value == b"Alice <alice@example.com>"


def test_a_missing_empty_line_ends_the_fields_at_the_first_line_that_is_none() -> None:
    data = b"Subject: hi\n\tthere\nFrom: a@example.org\nDear Bob,\nDelivered-To: alice\nSee: you\n"
    fields, end = split_fields(data)
    assert names(fields) == [b"Subject", b"From"] and data[end:].startswith(b"Dear Bob,\n")
    # no line end at all, a lone field
    assert names(split_fields(b"Subject: only")[0]) == [b"Subject"]
    # not a field name: a space before the colon is allowed, inside the name it is not
    fields, end = split_fields(b"Sub ject: x\nFrom: y\n\nbody\n")
    assert fields == [] and end == 0


def test_no_header_block_and_stray_continuation_lines() -> None:
    assert split_fields(b"\nSubject: body\n") == ([], 0)
    assert split_fields(b"\r\nSubject: body\r\n") == ([], 0)
    assert split_fields(b"") == ([], 0)
    fields, end = split_fields(b" stray\nSubject: x\n\nbody\n")
    assert [(f.name, f.raw) for f in fields] == [(b"", b" stray\n"), (b"Subject", b"Subject: x\n")] and end == 18


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_recipe_facts(newline: bytes) -> None:
    f = facts_from_message(FOLDED.replace(b"\n", newline), score=None, verdict="unfiltered", size=1, sender=None)
    assert f.header_values("subject") == ["Café invoice for March, and April"]  # not the body's
    assert f.header_values("delivered-to") == ["alice"]
    assert f.senders == ("alice@example.com",)
    # a body line that looks like a field is not one when the empty line is missing
    f = facts_from_message(b"Subject: hi\nDear Bob,\nX-Spam-Flag: YES\n", score=None, verdict="unfiltered",
                           size=1, sender=None)  # fmt: skip
    assert f.headers == (("subject", "hi"),)


def test_the_lines_the_mta_prepended_and_loops() -> None:
    lead, loop = _lead(FOLDED, "alice")
    assert lead == {b"return-path": ["<s@example.org>"], b"delivered-to": ["alice"]} and not loop
    lead, loop = _lead(b"Received: x\nDelivered-To:\n Alice\n\nbody\n", "alice")  # folded
    assert lead == {} and loop
    # the Delivered-To below a missing empty line is body text: no loop
    assert _lead(b"Received: x\nSubject: hi\nnot a header\nDelivered-To: alice\n", "alice") == ({}, False)


def test_without_field_keeps_the_rest_byte_for_byte() -> None:
    data = b"A: 1\r\nX-Filterd-Skipped: x\r\n\ty\r\nB: 2\r\n\r\nX-Filterd-Skipped: body\r\n"
    assert without_fields(data, b"x-filterd-skipped") == b"A: 1\r\nB: 2\r\n\r\nX-Filterd-Skipped: body\r\n"
    assert without_fields(data, b"c") is data


def test_ours_in_front_takes_whole_fields_from_the_header_block_only() -> None:
    ours = b"Return-Path: <s@example.org>\nDelivered-To: alice\n"
    answered = b"X-Spam-Flag: YES\nReturn-Path: <s@example.org>\nDelivered-To: alice\nSubject: x\n\nbody\n"
    assert _ours_in_front(answered, ours) == ours + b"X-Spam-Flag: YES\nSubject: x\n\nbody\n"
    # each once; a folded field of the same first line is not ours
    answered = b"Delivered-To: alice\n more\nDelivered-To: alice\nDelivered-To: alice\n\n"
    assert _ours_in_front(answered, b"Delivered-To: alice\n") == (
        b"Delivered-To: alice\nDelivered-To: alice\n more\nDelivered-To: alice\n\n"
    )
    # a CRLF empty line ends the header block too: the body is never read
    answered = b"X-Spam-Flag: YES\r\n\r\nDelivered-To: alice\n"
    assert _ours_in_front(answered, b"Delivered-To: alice\n") == b"Delivered-To: alice\n" + answered
    # as does a line that is no field, when the empty line is missing
    answered = b"X-Spam-Flag: YES\nquoted:\n> x\nDelivered-To: alice\n"
    assert _ours_in_front(answered, b"Delivered-To: alice\n") == b"Delivered-To: alice\n" + answered
    assert _ours_in_front(answered, b"") == answered


def test_delivered_without_an_empty_line(tmp_path: Path, deliver: Deliver) -> None:
    # A recipe on a header does not match body text that only looks like one.
    path = tmp_path / "recipes.yaml"
    path.write_text("- {header: {X-Spam-Flag: '/YES/'}, folder: Junk}\n- {header: {Subject: '/^hi$/'}, folder: Hi}\n")
    data = b"Subject: hi\nFrom: a@example.org\nquoted reply:\nX-Spam-Flag: YES\n"
    proc = deliver("--user", "alice", "--maildir", str(tmp_path / "Maildir"), "--no-filter", "--recipes", str(path),
                   data=data)  # fmt: skip
    assert proc.returncode == 0, proc
    (stored,) = maildir_files(tmp_path / "Maildir", ".Hi")
    assert stored.read_bytes() == b"Delivered-To: alice\n" + data
