"""SpamAssassin-compatible markup: headers, folding, report_safe, and no header injection."""

from __future__ import annotations

import email
import re
from email.message import Message
from email.policy import compat32
from typing import cast

import pytest

from filterd.engine.markup import MarkupOptions, build_report, format_score, process_message
from tests.conftest import MakeEngine

RULES = r"""
LONG_RULE_NAME_NUMBER_ONE: {body: '/offer/i', describe: first, score: 2.5}
LONG_RULE_NAME_NUMBER_TWO: {body: '/offer/i', describe: second, score: 2.5}
LONG_RULE_NAME_NUMBER_THREE: {body: '/offer/i', describe: third, score: 0.4}
HAM_HINT: {body: '/regards/i', describe: polite, score: -0.5, tflags: [nice]}
"""
SPAM = (
    b"Return-Path: <x@example.net>\n"
    b"X-Spam-Status: No, score=-100 (forged by the sender)\n"
    b"X-Spam-Flag: NO\n"
    b"From: x@example.net\n"
    b"Subject: An offer\n"
    b"Content-Type: text/plain\n"
    b"\n"
    b"An offer you cannot refuse.\n"
)
OPTIONS = MarkupOptions(report_safe=0, hostname="mx.test", contact="postmaster@test")


def header_lines(out: bytes) -> list[str]:
    head = out.split(b"\n\n", 1)[0].decode()
    return head.split("\n")


def test_format_score_never_shows_ham_at_threshold() -> None:
    assert format_score(4.96, 5.0, False) == "4.9"
    assert format_score(5.0, 5.0, True) == "5.0"
    assert format_score(12.34, 5.0, True) == "12.3"
    assert format_score(-0.04, 5.0, False) == "-0.0"


def test_report_safe_0_headers_on_top_after_return_path_old_ones_gone(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    result = engine.scan_sync(SPAM)
    assert result.is_spam and result.score == 5.4
    out = process_message(engine, result, OPTIONS)
    lines = header_lines(out)
    assert lines[0] == "Return-Path: <x@example.net>"
    assert lines[1].startswith("X-Spam-Checker-Version: filterd ")
    assert "X-Spam-Flag: YES" in lines and "X-Spam-Flag: NO" not in lines
    assert "X-Spam-Level: *****" in lines
    assert b"forged by the sender" not in out
    for line in lines:
        assert len(line.expandtabs(8)) <= 79 or " " not in line.strip(), line
    msg = email.message_from_bytes(out, policy=compat32)
    # Folding breaks after commas; unfolding leaves the continuation tab, as with SpamAssassin.
    status = re.sub(r",\s+", ",", " ".join(msg["X-Spam-Status"].split()))
    assert status.startswith("Yes,score=5.4 required=5.0 tests=LONG_RULE_NAME_NUMBER_ONE,")
    assert re.search(r"tests=\S*LONG_RULE_NAME_NUMBER_TWO", status)
    report = msg["X-Spam-Report"]
    assert "*  2.5 LONG_RULE_NAME_NUMBER_ONE BODY: first" in report  # %4.1f, as SpamAssassin
    assert out.endswith(b"\n\nAn offer you cannot refuse.\n")


def test_ham_gets_headers_only_and_no_flag(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    ham = b"Subject: hello\n\nKind regards\n"
    result = engine.scan_sync(ham)
    out = process_message(engine, result, MarkupOptions(report_safe=1, hostname="mx.test"))
    lines = header_lines(out)
    assert "X-Spam-Flag: YES" not in lines
    assert "X-Spam-Level: " in lines  # empty value keeps its trailing space
    assert any(line.startswith("X-Spam-Status: No, score=-0.5 required=5.0 tests=HAM_HINT") for line in lines)
    assert out.endswith(b"\n\nKind regards\n")


def test_report_safe_1_wraps_original_as_rfc822(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    result = engine.scan_sync(SPAM)
    out = process_message(engine, result, MarkupOptions(report_safe=1, hostname="mx.test"))
    msg = email.message_from_bytes(out, policy=compat32)
    assert msg.get_content_type() == "multipart/mixed"
    report, original = cast(list[Message], msg.get_payload())
    assert report.get_content_type() == "text/plain"
    assert "Content analysis details:   (5.4 points, 5.0 required)" in report.get_payload()
    assert original.get_content_type() == "message/rfc822"
    assert original.get_param("x-spam-type") == "original"
    inner = cast(list[Message], original.get_payload())[0]
    assert inner["Subject"] == "An offer"
    assert msg["Subject"] == "An offer" and msg["X-Spam-Flag"] == "YES"


def test_report_safe_2_wraps_original_as_text(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    result = engine.scan_sync(SPAM)
    out = process_message(engine, result, MarkupOptions(report_safe=2, hostname="mx.test"))
    msg = email.message_from_bytes(out, policy=compat32)
    assert cast(list[Message], msg.get_payload())[1].get_content_type() == "text/plain"
    assert b"Content-Type: text/plain\n\nAn offer you cannot refuse." in out


def test_crlf_messages_stay_crlf(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    data = SPAM.replace(b"\n", b"\r\n")
    for safe in (0, 1):
        out = process_message(engine, engine.scan_sync(data), MarkupOptions(report_safe=safe, hostname="mx.test"))
        assert b"\n" not in out.replace(b"\r\n", b""), safe


def test_nothing_from_the_message_can_inject_a_header(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES + "URI_ANY: {uri: '/./', describe: any uri, score: 0.1}\n")
    nasty = (
        b"Subject: offer\n"
        b"From: a@example.net\n"
        b"\n"
        b"offer http://example.net/a%0d%0aX-Injected:%20yes\r\nX-Injected2: yes\n"
    )
    result = engine.scan_sync(nasty)
    options = MarkupOptions(report_safe=0, hostname="mx.test\r\nX-Injected3: yes", rewrite_subject="[SPAM]\nX-Inj4: 1")
    out = process_message(engine, result, options)
    head = out.split(b"\n\n", 1)[0]
    for line in head.split(b"\n"):
        assert not line.startswith(b"X-Inj"), line
    assert b"\r" not in head


def test_rewrite_subject_keeps_the_old_one(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    result = engine.scan_sync(SPAM)
    out = process_message(engine, result, MarkupOptions(report_safe=0, rewrite_subject="*****SPAM*****"))
    msg = email.message_from_bytes(out, policy=compat32)
    assert msg["Subject"] == "*****SPAM***** An offer"
    assert msg["X-Spam-Prev-Subject"] == "An offer"


def test_report_text_ends_with_two_newlines(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    text = build_report(engine, engine.scan_sync(SPAM), OPTIONS)
    assert text.endswith("\n\n") and not text.endswith("\n\n\n")
    assert " pts rule name              description" in text


MBOX_FROM = b"From sender@example.com Mon Jan  1 00:00:00 2024\n"
HAM = b"Return-Path: <y@example.org>\nSubject: hello\n\nKind regards\nFrom a line that only looks like one\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("safe", [0, 1, 2])
@pytest.mark.parametrize("data", [SPAM, HAM], ids=["spam", "ham"])
def test_mbox_from_line_goes_back_in_front(make_engine: MakeEngine, data: bytes, safe: int, newline: bytes) -> None:
    """As SpamAssassin's rewrite_mail: the separator, byte for byte, then the rewritten message."""
    engine = make_engine(RULES)
    separator, data = MBOX_FROM.replace(b"\n", newline), data.replace(b"\n", newline)
    options = MarkupOptions(report_safe=safe, hostname="mx.test")
    plain, marked = engine.scan_sync(data), engine.scan_sync(separator + data)
    assert (marked.score, [h.rule for h in marked.hits]) == (plain.score, [h.rule for h in plain.hits])
    out = process_message(engine, marked, options)
    assert out.startswith(separator) and out.count(b"From sender@") == 1
    rest = out[len(separator) :]
    if safe == 0 or not marked.is_spam:
        assert rest == process_message(engine, plain, options)
        return
    assert rest.startswith(b"Received: from localhost by mx.test" + newline)
    msg = email.message_from_bytes(rest, policy=compat32)
    assert msg["X-Spam-Flag"] == "YES" and msg.get_content_type() == "multipart/mixed"
    original = rest.split(b"x-spam-type=original", 1)[1].split(newline + newline, 1)[1]
    assert original.startswith(b"Return-Path: <x@example.net>" + newline)  # spamd attaches it without


def test_mbox_from_line_keeps_its_own_line_end_and_others_stay_put(make_engine: MakeEngine) -> None:
    engine = make_engine(RULES)
    data = b"From sender@example.com  Mon Jan  1 00:00:00 2024\n" + HAM.replace(b"\n", b"\r\n")
    out = process_message(engine, engine.scan_sync(data), MarkupOptions(report_safe=0))
    assert out.startswith(b"From sender@example.com  Mon Jan  1 00:00:00 2024\nReturn-Path: <y@example.org>\r\n")
    out = process_message(engine, engine.scan_sync(HAM), MarkupOptions(report_safe=0))
    assert out.startswith(b"Return-Path: ")
    assert out.endswith(b"\n\nKind regards\nFrom a line that only looks like one\n")
    out = process_message(engine, engine.scan_sync(b"From x@example.com"), MarkupOptions(report_safe=0))
    assert out.startswith(b"From x@example.com\nX-Spam-Checker-Version: ")  # no header joins the line
