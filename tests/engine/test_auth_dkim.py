"""DKIM and ARC verification with keys made at test time and published in a real DNS server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dkim
import pytest

from filterd.dkimsign import DkimKey, sign_message
from filterd.engine.checks.auth.dkim import INLINE_LIMIT, verify_message
from filterd.engine.checks.auth.results import pvalue
from filterd.engine.plugin import ScanContext
from filterd.engine.uris import UriParser
from filterd.net.dns import Resolver
from tests.dns_fixture import DnsServer, MakeDelayingProxy, MakeSilentDnsServer
from tests.engine.auth_helpers import GOOD_IP, Outcome, auth_config, make_message, run_auth, sign

pytest_plugins = ["tests.dns_fixture", "tests.engine.auth_helpers"]

Keys = dict[str, DkimKey]


def dkim_only(
    server: DnsServer, raw: bytes, uri_parser: UriParser, mail_from: str | None = None, **auth: Any
) -> Outcome:
    ctx = ScanContext(client_ip=GOOD_IP, helo="mail.example.com", mail_from=mail_from)
    return run_auth(auth_config(server.spec, spf=False, dmarc=False, **auth), raw, ctx, uri_parser=uri_parser)


def test_dkim_valid_from_the_author_domain(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.com"])
    out = dkim_only(auth_dns, raw, uri_parser, mail_from="bounce@example.com")
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU", "DKIM_VALID_EF"}
    assert out.facts["dkim"] == "pass" and out.facts["dkim_domains"] == "example.com"
    b = pvalue(raw.split(b" b=", 1)[1][:8].decode())  # quoted when it holds "/" or "+"
    assert out.auth_results == f"mx.test; dkim=pass header.d=example.com header.s=sel header.b={b}; arc=none"


def test_dkim_valid_third_party_signature_is_not_author(
    auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser
) -> None:
    raw = sign(make_message(), dkim_keys["example.net"])
    out = dkim_only(auth_dns, raw, uri_parser, mail_from="list-bounces@example.net")
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_EF"}
    out = dkim_only(auth_dns, raw, uri_parser, mail_from="other@example.org")
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID"}


def test_dkim_body_altered_is_invalid(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.com"]).replace(b"the report", b"the invoice")
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_INVALID"}
    assert out.facts["dkim"] == "fail" and out.facts["dkim_domains"] == ""
    assert "dkim=fail (body hash mismatch" in out.auth_results


def test_dkim_signed_header_altered_is_invalid(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.com"]).replace(b"Subject: the report", b"Subject: the invoice")
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_INVALID"}
    assert "dkim=fail (signature does not verify)" in out.auth_results


def test_dkim_missing_key_is_a_permanent_error(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.com"], selector="gone")
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_INVALID"}
    assert "dkim=permerror (no key at gone._domainkey.example.com) header.d=example.com header.s=gone" in (
        out.auth_results
    )


def test_dkim_wrong_key_published_fails(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    """Signed with example.org's private key, claiming example.com's selector."""
    raw = sign(make_message(), dkim_keys["example.org"], domain="example.com")
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_INVALID"}


def test_dkim_two_signatures_one_good_one_bad(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.net"], selector="gone")
    raw = sign(raw, dkim_keys["example.com"])
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU"}  # no DKIM_INVALID
    results = out.auth_results
    assert results.index("dkim=pass header.d=example.com") < results.index("dkim=permerror")
    assert "header.d=example.net header.s=gone" in results


def test_dkim_at_most_max_signatures(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = make_message()
    for _ in range(3):
        raw = sign(raw, dkim_keys["example.com"])
    out = dkim_only(auth_dns, raw, uri_parser, max_signatures=2)
    assert out.auth_results.count("dkim=pass") == 2


def test_dkim_key_lookup_timeout_is_not_invalid(
    make_silent_dns_server: MakeSilentDnsServer, dkim_keys: Keys, uri_parser: UriParser
) -> None:
    silent = make_silent_dns_server()
    raw = sign(make_message(), dkim_keys["example.com"])
    cfg = auth_config(silent.spec, timeout=0.3, spf=False, dmarc=False)
    out = run_auth(cfg, raw, ScanContext(client_ip=GOOD_IP), uri_parser=uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED"}
    assert out.facts["dkim"] == "temperror"
    assert "dkim=temperror" in out.auth_results


def test_dkim_unsigned_message_fires_nothing(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dkim_only(auth_dns, make_message(), uri_parser)
    assert not out.family("DKIM_") and out.facts["dkim"] == "none"
    assert out.auth_results == "mx.test; dkim=none; arc=none"


def test_dkim_malformed_signature_is_a_permanent_error(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; b=AAAA\r\n" + make_message()
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_INVALID"}
    assert "dkim=permerror" in out.auth_results


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_dkim_large_message_verified_in_a_thread(
    auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser, newline: str
) -> None:
    body = ("A line of a long newsletter, repeated to make it big.  \r\n" * 4000).replace("\r\n", newline)
    key = dkim_keys["example.com"]
    raw = sign_message(make_message(body=body, newline=newline), key.domain, key.selector, key.private_pem)
    assert len(raw) > INLINE_LIMIT
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU"}


def test_dkim_keys_are_fetched_concurrently(
    auth_dns: DnsServer, make_delaying_proxy: MakeDelayingProxy, dkim_keys: Keys
) -> None:
    proxy = make_delaying_proxy(auth_dns, delay=0.3)
    raw = make_message()
    for domain in ("example.com", "example.net", "example.org"):
        raw = sign(raw, dkim_keys[domain])
    resolver = Resolver(auth_config(proxy.spec).dns)

    async def main() -> float:
        started = time.perf_counter()
        result = await verify_message(raw, resolver, max_signatures=5, arc=False, deadline=time.monotonic() + 5)
        assert [s.result for s in result.signatures] == ["pass", "pass", "pass"]
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    assert elapsed >= 0.3, elapsed  # each key was held back one delay
    # Fetched together whatever the machine's load: the three key queries were all at the
    # server before it sent the first answer (one after another, never more than one in flight).
    assert sorted(name for name, _ in proxy.queries) == [
        "sel._domainkey.example.com.", "sel._domainkey.example.net.", "sel._domainkey.example.org."
    ]  # fmt: skip
    assert proxy.peak_in_flight == 3


def _arc_seal(raw: bytes, key: DkimKey, results: str) -> bytes:
    """What a forwarder at example.net does: record its results, then add an ARC set."""
    raw = f"Authentication-Results: mx.example.net; {results}\r\n".encode() + raw
    headers = dkim.arc_sign(raw, b"sel", b"example.net", key.private_pem, b"mx.example.net")
    return b"".join(headers) + raw


def test_arc_chain_verified(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message(), dkim_keys["example.com"])
    raw = _arc_seal(raw, dkim_keys["example.net"], "dkim=pass header.d=example.com; spf=pass")
    out = dkim_only(auth_dns, raw, uri_parser)
    assert out.family("ARC_") == {"ARC_PASS"}
    assert out.facts["arc"] == "pass"
    assert out.auth_results.endswith("; arc=pass")
    # A second hop seals again; the chain of two still verifies.
    raw = _arc_seal(raw, dkim_keys["example.net"], "arc=pass")
    assert dkim_only(auth_dns, raw, uri_parser).family("ARC_") == {"ARC_PASS"}


def test_arc_chain_broken_by_a_later_change(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = _arc_seal(make_message(), dkim_keys["example.net"], "spf=pass")
    out = dkim_only(auth_dns, raw.replace(b"the report", b"the invoice"), uri_parser)
    assert out.family("ARC_") == {"ARC_FAIL"}
    assert out.auth_results.endswith("; arc=fail")
    assert not dkim_only(auth_dns, raw, uri_parser, arc=False).family("ARC_")
