"""What PROCESS hands back keeps the sender's bytes, as SpamAssassin's rewrite_mail does.

report_safe 1 and 2 attach `get_pristine()`: the input byte for byte but its mbox ``From``
line, X-Spam-* fields included. report_safe 0 and ham change only header fields: the empty line
between header and body (or its absence) and the body stay as they came, and X-Spam-Prev-*
fields stay where they were. A configured text that goes into a header stays a valid header.
"""

from __future__ import annotations

import dataclasses
import email
import subprocess
from email.header import decode_header, make_header
from email.policy import compat32
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from filterd.engine.engine import Engine
from filterd.engine.markup import MarkupOptions, original_message, process_message
from filterd.headerblock import split_header_fields
from tests.conftest import offline_config
from tests.daemon_fixture import need_binary, start_daemon

ALWAYS = "ALWAYS: {header: X-No-Such-Field-Here, exists: false, describe: always, score: 10}\n"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
MBOX_FROM = b"From sender@example.com Mon Jan  1 00:00:00 2024"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    """One engine that calls everything spam, one that calls everything ham."""
    out = {}
    for kind, rules in (("spam", ALWAYS), ("ham", "NOTHING: {body: '/\\A\\Z(?!)/', describe: never, score: 1}\n")):
        rules_dir = tmp_path_factory.mktemp(kind)
        (rules_dir / "10_test.yaml").write_text(rules)
        cfg = offline_config()
        out[kind] = Engine.load(
            dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, dirs=(str(rules_dir),))), checks=[]
        )
    return out


# ----------------------------------------------------------------------- shaped inputs

_EOL = st.sampled_from([b"\n", b"\r\n"])
_FIELDS = st.sampled_from(
    [
        b"Subject: hello",
        b"From: a@b.example",
        b"Return-Path: <x@example.net>",
        b"Content-Type: text/plain",
        b"X-Spam-Flag: YES",
        b"X-Spam-Status: No, score=-100 (forged)",
        b"X-Spam-Prev-Subject: the subject before",
        b"X-Spam-Prev-Content-Type: text/html",
        b"Received: from a (b [192.0.2.1])",
        b"X-8bit: caf\xc3\xa9 \xff\x00",
    ]
)
_FOLD = st.sampled_from([b"", b" folded", b"\tfolded \xff"])
# Lines that cannot be read as a field or a fold: a body may start with them when no empty line
# comes first.
_BODY_FIRST = st.sampled_from([b"hello there", GTUBE, b"ab", b"\xff\x00 eight bit", b"--not a field"])
_BODY_LINE = st.sampled_from([b"hello there", b"", b"Subject: in the body", b" indented", b"\x00\xfe", b"From x"])


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, bytes]:
    """(mbox From line or b"", header block, separator, body): joined, one input."""
    mixed = draw(st.booleans())
    first_eol = draw(_EOL)

    def eol() -> bytes:
        return draw(_EOL) if mixed else first_eol

    head = b""
    for name in draw(st.lists(_FIELDS, max_size=6)):
        head += name + eol()
        fold = draw(_FOLD)
        if fold:
            head += fold + eol()
    separator = draw(st.sampled_from([b"", eol()]))
    body = b""
    if draw(st.booleans()):
        body = draw(_BODY_FIRST) + eol()
        for line in draw(st.lists(_BODY_LINE, max_size=4)):
            body += line + eol()
        if draw(st.booleans()):
            body = body.rstrip(b"\r\n")  # no final newline
    if not separator and not body and head and draw(st.booleans()):
        head = head.rstrip(b"\r\n")  # only headers, the last without its newline
    mbox = draw(st.sampled_from([b"", MBOX_FROM + first_eol]))
    return mbox, head, separator, body


REVIEWED = [  # the reviewer's inputs: (mbox, head, separator, body)
    (b"", b"", b"", b"ab\r\n\r\n"),
    (b"", b"Subject: x\r\n", b"", GTUBE + b"\r\n"),
    (b"", b"Subject: x\r\nFrom: a@b\n", b"\n", b"body"),
    (b"", b"Subject: hi\nFrom: a@b.example\n", b"", b"hello there\n"),
    (b"", b"X-Spam-Flag: YES\r\nX-Spam-Prev-Subject: old\r\nSubject: [SPAM] old\r\n", b"\r\n", GTUBE + b"\r\n"),
    (b"", b"", b"", b""),
    (b"", b"X-Spam-Flag: YES\r\nSubject: only headers, the last without its newline", b"", b""),
    (MBOX_FROM + b"\n", b"X-Spam-Prev-Subject: hi\r\nSubject: [SPAM] hi\r\n", b"\r\n", b"body\r\n"),
]


def _check(engines: dict[str, Engine], mbox: bytes, head: bytes, separator: bytes, body: bytes) -> None:
    data = mbox + head + separator + body
    pristine = head + separator + body
    for safe in (1, 2):
        result = engines["spam"].scan_sync(data)
        assert result.is_spam
        out = process_message(engines["spam"], result, MarkupOptions(report_safe=safe, hostname="mx.test"))
        assert out.startswith(mbox)
        assert _original_part(out[len(mbox) :]) == pristine, safe
        assert original_message(out) == pristine, safe
    for kind in ("spam", "ham"):
        result = engines[kind].scan_sync(data)
        assert result.is_spam == (kind == "spam")
        out = process_message(engines[kind], result, MarkupOptions(report_safe=0, hostname="mx.test"))
        assert out.startswith(mbox), kind
        rest = out[len(mbox) :]
        split = split_header_fields(rest)
        assert rest[split.body :] == body, kind
        assert rest[split.end : split.body] == separator, kind
        # The input's fields but X-Spam-* (X-Spam-Prev-* stays), in order, after the ones we add.
        given = [raw.rstrip(b"\r\n") for name, raw in split_header_fields(head).fields if _kept(name)]
        assert [raw.rstrip(b"\r\n") for name, raw in split.fields if _kept(name)] == given, kind
        assert b"(forged)" not in rest[: split.end], kind


def _kept(name: bytes) -> bool:
    return not name.lower().startswith(b"x-spam-") or name.lower().startswith(b"x-spam-prev-")


def _original_part(out: bytes) -> bytes:
    """The bytes between the original part's header and the closing delimiter."""
    nl = b"\r\n" if out.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    boundary = email.message_from_bytes(out, policy=compat32).get_boundary()
    assert boundary is not None
    start = out.index(nl + nl, out.index(b"x-spam-type=original")) + 2 * len(nl)
    trailer = nl + b"--" + boundary.encode() + b"--" + nl + nl
    assert out.endswith(trailer)
    return out[start : len(out) - len(trailer)]


@pytest.mark.parametrize("shape", REVIEWED, ids=range(len(REVIEWED)))
def test_reviewed_inputs_keep_their_bytes(engines: dict[str, Engine], shape: tuple[bytes, bytes, bytes, bytes]) -> None:
    _check(engines, *shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages())
@example((b"", b"Subject: x\r\n", b"", GTUBE + b"\r\n"))
def test_original_part_is_the_input_and_markup_keeps_separator_and_body(
    engines: dict[str, Engine], shape: tuple[bytes, bytes, bytes, bytes]
) -> None:
    _check(engines, *shape)


# ----------------------------------------------------------------------- configured header text


@pytest.mark.parametrize("safe", [0, 1, 2])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_non_ascii_rewrite_subject_and_hostname_make_valid_headers(
    engines: dict[str, Engine], safe: int, newline: bytes
) -> None:
    data = b"From: a@b.example\nSubject: caf\xc3\xa9 =?utf-8?q?d=C3=A9j=C3=A0?= \xff\n\nbody\n".replace(b"\n", newline)
    options = MarkupOptions(report_safe=safe, rewrite_subject="[Indésirable]", hostname="mx.exämple.test")
    out = process_message(engines["spam"], engines["spam"].scan_sync(data), options)
    head = out.split(newline + newline, 1)[0]
    assert all(b < 0x80 for b in head.replace(b"caf\xc3\xa9", b"").replace(b"\xff", b"")), head
    subject = next(line for line in head.split(newline) if line.startswith(b"Subject: "))
    # The tag encoded, the rest of the original Subject as it was.
    assert subject.endswith(b" caf\xc3\xa9 =?utf-8?q?d=C3=A9j=C3=A0?= \xff"), subject
    tag = subject[len(b"Subject: ") : -len(b" caf\xc3\xa9 =?utf-8?q?d=C3=A9j=C3=A0?= \xff")]
    assert str(make_header(decode_header(tag.decode("ascii")))) == "[Indésirable]"
    if safe == 0:
        assert newline + b"X-Spam-Prev-Subject: caf\xc3\xa9 =?utf-8?q?d=C3=A9j=C3=A0?= \xff" + newline in out
        assert out.endswith(newline + newline + b"body" + newline)
        # Scanned again: tagged once.
        again = process_message(engines["spam"], engines["spam"].scan_sync(out), options)
        assert again.count(b"Subject: " + tag) == 1
    else:
        assert b"Received: from localhost by mx.xn--exmple-cua.test" + newline in out


# ----------------------------------------------------------------------- real spamc, real daemon


def test_spamc_gets_the_sender_bytes_back(tmp_path: Path) -> None:
    spamc = need_binary("spamc")
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    for safe in (0, 1, 2):
        (prefs / f"safe{safe}.yaml").write_text(f"report_safe: {safe}\n")
    config = f"daemon: {{user_prefs_dir: '{prefs}'}}\nscoring: {{rewrite_subject: '[Indésirable]'}}\n"
    daemon = start_daemon(tmp_path, config=config, workers=1, metrics=False)
    try:

        def run(data: bytes, user: str) -> bytes:
            proc = subprocess.run(
                [spamc, "-U", str(daemon.unix_path), "-u", user], input=data, capture_output=True, timeout=60
            )
            assert proc.returncode == 0, proc
            return proc.stdout

        ham = b"Subject: hi\r\nFrom: a@b.example\r\nhello there\r\n"
        out = run(ham, "safe0")
        assert b"X-Spam-Status: No" in out and out.endswith(b"\r\nFrom: a@b.example\r\nhello there\r\n"), out
        spam = b"X-Spam-Flag: NO\r\nX-Spam-Prev-Subject: before\r\nSubject: x\r\n" + GTUBE + b"\r\n"
        for user in ("safe1", "safe2"):
            out = run(spam, user)
            assert b"X-Spam-Flag: YES" in out and original_message(out) == spam, out
            assert _original_part(out) == spam
        out = run(spam, "safe0")
        head = out[: -len(GTUBE + b"\r\n")]
        assert out.endswith(b"\r\n" + GTUBE + b"\r\n") and b"\r\n\r\n" not in out, out  # no empty line added
        assert b"\r\nX-Spam-Prev-Subject: before\r\n" in head and b"X-Spam-Flag: NO" not in head
        assert b"\r\nSubject: =?utf-8?" in head  # the tag RFC 2047-encoded
    finally:
        assert daemon.stop() == 0, daemon.log()
