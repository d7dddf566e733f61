"""The message model: any bytes give a model; what it says about real shapes of mail."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterd.engine.message import ParsedMessage, normalize_for_rules, parse_message
from filterd.engine.uris import UriParser

ROOT = Path(__file__).resolve().parents[2]
URIS = UriParser()


def parse(data: bytes) -> ParsedMessage:
    return parse_message(data, uri_parser=URIS)


def test_parse_headers_decoded_in_order_with_duplicates() -> None:
    msg = parse(
        b"Received: from a.example (a.example [192.0.2.1]) by mx.example.org with ESMTP id 1;"
        b" Mon, 5 Jan 2026 10:00:00 +0000\n"
        b"Received: from b.example ([198.51.100.2]) by a.example; Mon, 5 Jan 2026 09:59:00 +0000\n"
        b"Subject: =?UTF-8?B?SGVsbG8gd8O2cmxk?= and\n =?iso-8859-1?Q?caf=E9?=\n"
        b'From: "Alice" <alice@example.com>\n'
        b"\n"
        b"body\n"
    )
    assert msg.subject == "Hello w\u00f6rld and caf\u00e9"
    assert msg.count("received") == 2
    assert [r.ip for r in msg.relays] == ["192.0.2.1", "198.51.100.2"]
    assert msg.relays[0].rdns == "a.example" and msg.relays[0].helo == "a.example"
    assert msg.relays[0].date is not None and msg.relays[0].date.year == 2026
    assert msg.from_addr == "alice@example.com" and msg.from_name == "Alice"
    assert msg.get_raw_all("subject")[0].startswith("=?UTF-8?B?")


def test_parse_crlf_and_mbox_from_line() -> None:
    msg = parse(b"From bob@example.com Mon Jan  5 10:00:00 2026\r\nSubject: hi\r\nX-Spam-Flag: YES\r\n\r\nline one\r\n")
    assert msg.mbox_from.startswith("From bob@example.com")
    assert msg.newline == "\r\n"
    assert msg.subject == "hi"
    assert not msg.has("x-spam-flag")  # never trusted, never scored
    assert b"X-Spam-Flag" not in msg.raw
    assert msg.raw.startswith(b"Subject: hi\r\n")
    assert msg.body_text == "hi\nline one"


def test_parse_multipart_alternative_and_attachment() -> None:
    pdf = base64.encodebytes(b"%PDF-1.4 fake").decode()
    data = (
        'Subject: report\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="XX"\n\n'
        "preamble\n--XX\nContent-Type: multipart/alternative; boundary=YY\n\n"
        "--YY\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
        "Caf=C3=A9 at noon\n--YY\nContent-Type: text/html; charset=utf-8\n\n"
        "<html><body><p>Caf&eacute; at <b>noon</b></p><a href='http://shop.example.net/x'>here</a></body></html>\n"
        '--YY--\n--XX\nContent-Type: application/pdf; name="r.pdf"\nContent-Disposition: attachment;'
        f' filename="r.pdf"\nContent-Transfer-Encoding: base64\n\n{pdf}--XX--\n'
    ).encode()
    msg = parse(data)
    assert [p.content_type for p in msg.parts] == ["text/plain", "text/html", "application/pdf"]
    assert [p.path for p in msg.parts] == ["1.1", "1.2", "2"]
    assert msg.parts[0].text == "Caf\u00e9 at noon"  # the line break before a delimiter is the delimiter's
    assert msg.parts[2].payload == b"%PDF-1.4 fake" and msg.parts[2].filename == "r.pdf"
    assert msg.attachments == [msg.parts[2]]
    assert "Caf\u00e9 at noon" in msg.body_text
    assert msg.html is not None and msg.html.links[0].text == "here"
    assert [u.domain for u in msg.uris] == ["example.net"]
    assert msg.problems == ()


def test_parse_missing_boundary_is_a_problem_not_an_error() -> None:
    msg = parse(b"Subject: x\nContent-Type: multipart/mixed; boundary=nothere\n\nhello\n--other\n")
    assert "missing-boundary" in msg.problems
    assert "hello" in msg.body_text


def test_parse_missing_close_boundary() -> None:
    msg = parse(b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n")
    assert "missing-close-boundary" in msg.problems
    assert msg.parts[0].text == "hi\n"


def test_parse_wrong_and_missing_charsets_fall_back() -> None:
    latin = "Gr\u00fc\u00dfe aus M\u00fcnchen".encode("iso-8859-1")
    msg = parse(b"Content-Type: text/plain; charset=us-ascii\n\n" + latin)
    assert msg.parts[0].text == "Gr\u00fc\u00dfe aus M\u00fcnchen"
    assert "charset-bad-bytes" in msg.problems
    msg = parse(b"Content-Type: text/plain; charset=x-martian\n\nplain")
    assert "charset-unknown-charset" in msg.problems
    msg = parse(
        b"Content-Type: text/plain; charset=koi8-r\n\n" + "\u041f\u0440\u0438\u0432\u0435\u0442".encode("koi8-r")
    )
    assert msg.parts[0].text == "\u041f\u0440\u0438\u0432\u0435\u0442"


def test_parse_header_without_blank_line_before_body() -> None:
    msg = parse(b"Subject: hi\nthis is body text\nmore\n")
    assert "no-header-body-separator" in msg.problems
    assert msg.subject == "hi"
    assert "this is body text" in msg.body_text


def test_html_rendering_hides_invisible_text_and_counts_it() -> None:
    msg = parse(
        b"Content-Type: text/html\n\n<html><body><p>Visible words</p>"
        b"<div style='display:none'>secret stuffing</div><font color=#ffffff>white on white</font>"
        b"<p style='font-size:1px'>tiny</p><a href='http://203.0.113.9/login'>https://bank.example.com</a>"
        b"<form action='http://evil.example/p'><input type=password></form>v<!-- -->iagra</body></html>"
    )
    h = msg.html
    assert h is not None
    assert "secret" not in msg.body_text and "white on white" not in msg.body_text
    assert "Visible words" in msg.body_text
    assert h.hidden_chars == len("secret stuffing") + len("white on white")
    assert h.tiny_chars == 4 and h.password_inputs == 1 and h.forms == 1 and h.comments_in_words == 1
    assert h.links[0].text == "https://bank.example.com"
    assert any(u.ip_literal and u.host == "203.0.113.9" for u in msg.uris)


@pytest.mark.parametrize(
    ("text", "host", "flags"),
    [
        ("hxxp://evil[.]example/path", "evil.example", {"obfuscated"}),
        ("http://bank.example.com@198.51.100.4/x", "198.51.100.4", {"userinfo", "ip_literal"}),
        ("http://3405803783/", "203.0.113.7", {"obfuscated", "ip_literal"}),
        ("http://0xCB.0x0.0x71.0x7/", "203.0.113.7", {"obfuscated", "ip_literal"}),
        ("http://%65vil.example/", "evil.example", {"obfuscated"}),
        ("www.shop.example.co.uk/deal", "www.shop.example.co.uk", set()),
    ],
)
def test_uri_canonicalisation_and_tricks(text: str, host: str, flags: set[str]) -> None:
    msg = parse(f"Subject: x\n\nclick {text} now\n".encode())
    assert len(msg.uris) == 1
    uri = msg.uris[0]
    assert uri.host == host
    assert {f for f in ("obfuscated", "userinfo", "ip_literal") if getattr(uri, f)} == flags


def test_registered_domain_uses_public_suffix_list() -> None:
    msg = parse(b"Subject: x\n\nsee http://a.b.example.co.uk/ and http://x.y.github.io/\n")
    assert [u.domain for u in msg.uris] == ["example.co.uk", "y.github.io"]


def test_normalize_for_rules_undoes_obfuscation() -> None:
    text = "Buy v i a g r a, vi\u200bagra or v\u0456\u0430gr\u0430; \u043f\u0440\u0438\u0432\u0435\u0442 stays"
    out = normalize_for_rules(text)
    assert out.count("viagra") == 3
    assert "\u043f\u0440\u0438\u0432\u0435\u0442" in out  # a Russian word is not "fixed"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_give_a_model(data: bytes) -> None:
    msg = parse(data)
    assert isinstance(msg.body_text, str)
    assert msg.size == len(data)


_MIME_ATOMS = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=",
        b"--",
        b"\n",
        b"\r\n",
        b"Content-Transfer-Encoding: base64\n",
        b"Content-Type: text/html; charset=",
        b"<a href=",
        b"=?utf-8?q?",
        b"?=",
        b"http://",
        b"[",
        b"]",
        b"<div style=",
        b"display:none>",
        b"Received: from ",
        b"(",
        b")",
        b";",
        b"\x00",
        b"\xff",
        b"=\n",
        b"begin 644 x\n",
        b"\t",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_MIME_ATOMS, st.binary(max_size=20)), max_size=80))
def test_mime_shaped_junk_gives_a_model(chunks: list[bytes]) -> None:
    parse(b"".join(chunks))


def _sample_messages() -> list[Path]:
    return sorted(p for p in (ROOT / "corpora").rglob("*.eml"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_corpus_messages_give_a_model(data: st.DataObject) -> None:
    samples = _sample_messages()
    assert samples, "corpora/ has no sample messages"
    original = data.draw(st.sampled_from(samples)).read_bytes()
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    mutated = bytearray(original)
    for _ in range(rng.randint(1, 12)):
        op = rng.choice(("flip", "cut", "dup", "delete-line", "truncate"))
        if not mutated:
            break
        i = rng.randrange(len(mutated))
        if op == "flip":
            mutated[i] = rng.randrange(256)
        elif op == "cut":
            del mutated[i : i + rng.randint(1, 200)]
        elif op == "dup":
            mutated[i:i] = mutated[i : i + rng.randint(1, 400)]
        elif op == "delete-line":
            end = mutated.find(b"\n", i)
            del mutated[i : end if end > 0 else len(mutated)]
        else:
            del mutated[i:]
    parse(bytes(mutated))


def test_huge_message_parses_with_caps() -> None:
    body = (b"word " * 200_000) + b"\n"
    msg = parse_message(b"Subject: big\n\n" + body, uri_parser=URIS, body_scan_size=10_000)
    assert len(msg.body_text) <= 10_100
    assert "body-truncated-for-rules" in msg.problems
