"""Reading the authserv-id of an Authentication-Results field (RFC 8601 §2.2), and dropping the
fields that claim ours from a header block."""

from __future__ import annotations

import socket

import pytest

from filterd.config import AuthConfig
from filterd.engine.checks.auth.authserv import (
    authserv_id_of,
    claims_authserv_id,
    effective_authserv_id,
    message_without_claims,
    without_claims,
)

OURS = "mx.local.test"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.local.test; dkim=pass header.d=bank.example", "mx.local.test"),
        ("mx.local.test;spf=pass", "mx.local.test"),
        ("MX.Local.TEST; none", "mx.local.test"),  # case does not matter
        ("mx.local.test.; none", "mx.local.test"),  # nor the root dot
        ("mx.local.test 1; spf=pass", "mx.local.test"),  # a version follows the id
        ("mx.local.test 1 (version); spf=pass", "mx.local.test"),
        ("   \t mx.local.test ; none", "mx.local.test"),
        ("\n\tmx.local.test\n\t1;\n\tdmarc=pass", "mx.local.test"),  # folded, as a milter gets it
        ("\r\n mx.local.test; none", "mx.local.test"),  # folded with CRLF
        ("(forged) mx.local.test; dmarc=pass", "mx.local.test"),  # comments are CFWS
        ("(a (nested \\) comment) here)mx.local.test(b); none", "mx.local.test"),
        ('"mx.local.test"; dkim=pass', "mx.local.test"),  # authserv-id is a value: quoted-string too
        ('"mx.lo\\cal.test" 1; none', "mx.local.test"),
        ("mx.local.test(c); none", "mx.local.test"),  # a comment right after the id ends it
        ("mx.local.test.evil.example; none", "mx.local.test.evil.example"),
        ("evil-mx.local.test; none", "evil-mx.local.test"),
        ("other.example; spf=pass", "other.example"),
        ("", None),
        ("   ", None),
        ("; spf=pass", None),
        ("(mx.local.test; dkim=pass", None),  # a comment that never ends: no id at all
        ('"mx.local.test; dkim=pass', None),  # nor a quoted-string
        ("(only a comment)", None),
    ],
)
def test_authserv_id_of(value: str, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


def test_claims_compare_whole_ids_and_decode_encoded_words() -> None:
    assert claims_authserv_id("mx.local.test; dkim=pass", OURS)
    assert claims_authserv_id("Mx.Local.Test 1; none", "MX.LOCAL.TEST.")
    assert not claims_authserv_id("mx.local.test.evil; dkim=pass", OURS)
    assert not claims_authserv_id("mx; dkim=pass", OURS)
    assert not claims_authserv_id("other.example; spf=pass", OURS)
    # Sieve and MUAs decode encoded-words before they look: that form claims our id as well.
    assert claims_authserv_id("=?utf-8?q?mx.local.test?=; dmarc=pass", OURS)
    assert claims_authserv_id("=?us-ascii?b?bXgubG9jYWwudGVzdA==?= 1; dmarc=pass", OURS)
    assert not claims_authserv_id("=?utf-8?q?other.example?=; dmarc=pass", OURS)
    assert not claims_authserv_id("=?bogus?x?mx.local.test?=; dmarc=pass", OURS)


def test_without_claims_keeps_every_other_field_byte_for_byte() -> None:
    block = (
        "Received: from a by b;\r\n\tMon, 05 Jan 2026 10:00:00 +0000\r\n"
        "Authentication-Results: mx.local.test; dkim=pass\r\n\theader.d=bank.example; dmarc=pass\r\n"
        "Authentication-Results: other.example; spf=pass\r\n"
        "authentication-results : (x) MX.LOCAL.TEST 1; none\r\n"
        "Subject: Authentication-Results: mx.local.test; dkim=pass\r\n"
        "X-Authentication-Results: mx.local.test; dkim=pass\r\n"
    )
    assert without_claims(block, OURS) == (
        "Received: from a by b;\r\n\tMon, 05 Jan 2026 10:00:00 +0000\r\n"
        "Authentication-Results: other.example; spf=pass\r\n"
        "Subject: Authentication-Results: mx.local.test; dkim=pass\r\n"
        "X-Authentication-Results: mx.local.test; dkim=pass\r\n"
    )
    lf = "From: a@example.com\nAuthentication-Results: mx.local.test;\n none\nTo: b@example.com\n"
    assert without_claims(lf, OURS) == "From: a@example.com\nTo: b@example.com\n"
    assert without_claims(lf, "other.example") == lf


def test_message_without_claims_edits_the_header_block_only() -> None:
    body = b"\r\nAuthentication-Results: mx.local.test; dkim=pass\r\n\xff\xfe 8-bit body\r\n"
    head = b"From: a@example.com\r\nSubject: caf\xc3\xa9\r\n"
    forged = b"Authentication-Results: MX.local.test; dkim=pass\r\n\theader.d=bank.example\r\n"
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    assert message_without_claims(head + forged + other + body, OURS) == head + other + body
    mbox = b"From a@example.com Mon Jan  5 10:00:00 2026\n"
    lf = b"Authentication-Results: mx.local.test; none\nTo: b@example.com\n"
    assert message_without_claims(mbox + lf + b"\nbody\n", OURS) == mbox + b"To: b@example.com\n\nbody\n"
    assert message_without_claims(lf, OURS) == b"To: b@example.com\n"  # no body at all
    last = b"To: b@example.com\nAuthentication-Results: mx.local.test; none"  # no line end at all
    assert message_without_claims(last, OURS) == b"To: b@example.com\n"
    # Nothing to drop, or no header block: the same bytes back.
    untouched = head + other + body
    assert message_without_claims(untouched, OURS) is untouched
    assert message_without_claims(b"\r\n" + forged, OURS) == b"\r\n" + forged
    # No empty line: the header block ends where the parser ends it, at the first line that is
    # no field; a body line that reads like a claim is body, and stays.
    unseparated = b"To: b@example.com\nplain text\nAuthentication-Results: mx.local.test; none\n"
    assert message_without_claims(unseparated, OURS) is unseparated


def test_effective_authserv_id_is_the_setting_else_this_host() -> None:
    assert effective_authserv_id(AuthConfig(authserv_id="mx.example.org")) == "mx.example.org"
    assert effective_authserv_id(AuthConfig()) == (socket.getfqdn() or "localhost")
