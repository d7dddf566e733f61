"""SPF through pyspf with every lookup answered by the resolver, against a real DNS server."""

from __future__ import annotations

import threading
import time

import pytest

from filterd.engine.checks.auth.spf import check_spf
from filterd.engine.plugin import ScanContext
from filterd.engine.uris import UriParser
from filterd.net.dns import Resolver
from tests.dns_fixture import DnsServer, MakeSilentDnsServer
from tests.engine.auth_helpers import BAD_IP, GOOD_IP, auth_config, make_message, run_auth

pytest_plugins = ["tests.dns_fixture", "tests.engine.auth_helpers"]


def spf_of(server: DnsServer, uri_parser: UriParser, sender: str, ip: str, helo: str = "mail.example.com") -> str:
    """The one SPF_* rule for the envelope sender."""
    ctx = ScanContext(client_ip=ip, helo=helo, mail_from=sender)
    out = run_auth(auth_config(server.spec, dkim=False, dmarc=False), make_message(), ctx, uri_parser=uri_parser)
    (rule,) = out.family("SPF_")
    return rule


@pytest.mark.parametrize(
    ("sender", "ip", "rule"),
    [
        ("a@example.com", GOOD_IP, "SPF_PASS"),
        ("a@example.com", BAD_IP, "SPF_FAIL"),
        ("a@soft.example.com", GOOD_IP, "SPF_SOFTFAIL"),
        ("a@neutral.example.com", GOOD_IP, "SPF_NEUTRAL"),
        ("a@nospf.example.com", GOOD_IP, "SPF_NONE"),
        ("a@nowhere.example.com", GOOD_IP, "SPF_NONE"),  # NXDOMAIN
        ("a@bad.example.com", GOOD_IP, "SPF_PERMERROR"),  # unknown mechanism
        ("a@inc.example.com", GOOD_IP, "SPF_PASS"),  # include:
        ("a@inc.example.com", BAD_IP, "SPF_FAIL"),
        ("a@redir.example.com", GOOD_IP, "SPF_PASS"),  # redirect=
        ("a@redir.example.com", BAD_IP, "SPF_FAIL"),
        ("a@macro.example.com", GOOD_IP, "SPF_PASS"),  # exists:%{i}._ip...
        ("a@macro.example.com", BAD_IP, "SPF_FAIL"),
        ("a@mx.example.com", GOOD_IP, "SPF_PASS"),  # mx -> A of the exchange
        ("a@mx.example.com", BAD_IP, "SPF_FAIL"),
        ("a@void.example.com", GOOD_IP, "SPF_PERMERROR"),  # a third void lookup (RFC 7208 §4.6.4)
        ("a@many.example.com", GOOD_IP, "SPF_PERMERROR"),  # an 11th DNS-mechanism lookup
    ],
)
def test_spf_result_for_envelope_sender(
    auth_dns: DnsServer, uri_parser: UriParser, sender: str, ip: str, rule: str
) -> None:
    assert spf_of(auth_dns, uri_parser, sender, ip) == rule


def test_spf_helo_identity_checked_separately(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    cfg = auth_config(auth_dns.spec, dkim=False, dmarc=False)
    ctx = ScanContext(client_ip=GOOD_IP, helo="mail.example.com", mail_from="a@soft.example.com")
    out = run_auth(cfg, make_message(), ctx, uri_parser=uri_parser)
    assert out.family("SPF_") == {"SPF_SOFTFAIL"}
    assert out.family("SPF_HELO_") == {"SPF_HELO_PASS"}
    assert out.facts["spf"] == "softfail" and out.facts["spf_helo"] == "pass"
    ctx = ScanContext(client_ip=BAD_IP, helo="mail.example.com", mail_from="a@example.com")
    assert run_auth(cfg, make_message(), ctx, uri_parser=uri_parser).family("SPF_HELO_") == {"SPF_HELO_FAIL"}
    ctx = ScanContext(client_ip=GOOD_IP, helo="[192.0.2.10]", mail_from="a@example.com")
    assert run_auth(cfg, make_message(), ctx, uri_parser=uri_parser).family("SPF_HELO_") == {"SPF_HELO_NONE"}


def test_spf_null_sender_uses_the_helo_identity(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    cfg = auth_config(auth_dns.spec, dkim=False, dmarc=False)
    out = run_auth(cfg, make_message(), ScanContext(client_ip=BAD_IP, helo="mail.example.com", mail_from=""),
                   uri_parser=uri_parser)  # fmt: skip
    assert out.family("SPF_") == {"SPF_FAIL"} and out.family("SPF_HELO_") == {"SPF_HELO_FAIL"}
    assert out.facts["spf_domain"] == "mail.example.com"
    assert "spf=fail smtp.helo=mail.example.com" in out.auth_results


def test_spf_client_and_sender_from_headers_without_context(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    """No connection data: the last external relay of the Received chain and Return-Path."""
    received = (
        "Received: from mail.example.com (mail.example.com [192.0.2.10]) by mx.test (Postfix) with ESMTP id 1;"
        " Mon, 02 Jun 2025 10:00:01 +0000"
    )
    raw = f"Return-Path: <a@inc.example.com>\r\n{received}\r\n".encode() + make_message()
    out = run_auth(auth_config(auth_dns.spec, dkim=False, dmarc=False), raw, uri_parser=uri_parser)
    assert out.family("SPF_") == {"SPF_PASS"}
    assert out.family("SPF_HELO_") == {"SPF_HELO_PASS"}
    assert "smtp.mailfrom=a@inc.example.com" in out.auth_results


def test_spf_not_checked_for_internal_or_unknown_senders(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    cfg = auth_config(auth_dns.spec, dkim=False, dmarc=False)
    out = run_auth(cfg, make_message(), ScanContext(client_ip="127.0.0.1", helo="localhost", mail_from="a@example.com"),
                   uri_parser=uri_parser)  # fmt: skip
    assert not out.family("SPF_") and "spf=" not in out.auth_results  # nothing from outside to judge
    out = run_auth(cfg, make_message(), ScanContext(client_ip=GOOD_IP, helo="mail.example.com"), uri_parser=uri_parser)
    assert not out.family("SPF_")  # sender unknown (no MAIL FROM, no Return-Path): HELO only
    assert out.family("SPF_HELO_") == {"SPF_HELO_PASS"}


def test_spf_nothing_when_network_checks_are_off(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    import asyncio

    from filterd.engine.checks.auth import AuthCheck
    from filterd.engine.message import parse_message
    from filterd.engine.plugin import CheckSetup, Scan

    check = AuthCheck(CheckSetup(config=auth_config(auth_dns.spec), uri_parser=uri_parser, resolver=None))
    scan = Scan(ScanContext(client_ip=GOOD_IP, mail_from="a@example.com"), uri_parser,
                msg=parse_message(make_message(), uri_parser=uri_parser))  # fmt: skip
    assert asyncio.run(check.run(scan)) == () and not scan.facts and not scan.add_headers
    out = run_auth(
        auth_config(auth_dns.spec),
        make_message(),
        ScanContext(client_ip=GOOD_IP, mail_from="a@example.com", local_only=True),
        uri_parser=uri_parser,
    )
    assert not out.hits and not out.headers


def test_spf_temperror_when_dns_does_not_answer(
    make_silent_dns_server: MakeSilentDnsServer, uri_parser: UriParser
) -> None:
    silent = make_silent_dns_server()
    limit = 1.0
    cfg = auth_config(silent.spec, timeout=limit, dkim=False, dmarc=False)
    ctx = ScanContext(client_ip=GOOD_IP, helo="mail.example.com", mail_from="a@example.com")
    out = run_auth(cfg, make_message(), ctx, uri_parser=uri_parser)
    assert out.family("SPF_") == {"SPF_TEMPERROR"} and out.family("SPF_HELO_") == {"SPF_HELO_TEMPERROR"}
    # Both identities waited together, one time limit each, shown at the server rather than by
    # the elapsed time: one query each (no retry), the HELO's sent while the MAIL FROM's was
    # still waiting out its limit (in sequence it could only be sent after that limit ran out;
    # the two go out within a millisecond, the 1 s limit leaves room for a loaded machine).
    assert sorted(silent.queries) == [("example.com.", "TXT"), ("mail.example.com.", "TXT")], silent.queries
    assert max(silent.arrived) - min(silent.arrived) < limit
    assert out.elapsed < 20 * limit, out.elapsed  # no hang: the limit ends the wait
    silent.mode = "servfail"
    assert run_auth(cfg, make_message(), ctx, uri_parser=uri_parser).family("SPF_") == {"SPF_TEMPERROR"}


def test_spf_stops_at_the_scan_deadline(make_silent_dns_server: MakeSilentDnsServer, uri_parser: UriParser) -> None:
    """A lookup never outlives the scan: the check returns temperror before the deadline."""
    silent = make_silent_dns_server()
    cfg = auth_config(silent.spec, timeout=20.0, dkim=False, dmarc=False)
    ctx = ScanContext(client_ip=GOOD_IP, helo="mail.example.com", mail_from="a@example.com")
    out = run_auth(cfg, make_message(), ctx, uri_parser=uri_parser, budget=0.5)
    assert out.family("SPF_") == {"SPF_TEMPERROR"}
    # The server never answers, so only the 0.5 s budget or the 20 s DNS timeout can end the
    # lookups: finishing in half the timeout means the budget did (20x headroom for load).
    assert out.elapsed < 10.0, out.elapsed


def test_check_spf_in_a_thread_uses_only_the_resolver(auth_dns: DnsServer) -> None:
    """The blocking API on its own: lookups are handed to the loop; a cancel stops at once."""
    import asyncio

    cfg = auth_config(auth_dns.spec)
    resolver = Resolver(cfg.dns)
    asked: list[tuple[str, str]] = []

    def lookup(name: str, rdtype: str, limit: float):  # type: ignore[no-untyped-def]
        asked.append((name, rdtype))
        return resolver.query_from_thread(name, rdtype, limit=limit)

    async def main() -> tuple[str, str]:
        resolver.bind_loop()
        deadline = time.monotonic() + 5
        first = await asyncio.to_thread(
            check_spf, GOOD_IP, "a@inc.example.com", "mail.example.com", lookup=lookup, deadline=deadline, timeout=1.0
        )
        stop = threading.Event()
        stop.set()
        second = await asyncio.to_thread(
            check_spf, GOOD_IP, "a@inc.example.com", "x", lookup=lookup, deadline=deadline, timeout=1.0,
            cancelled=stop,
        )  # fmt: skip
        return first.result, second.result

    assert asyncio.run(main()) == ("pass", "temperror")
    assert asked == [("inc.example.com", "TXT"), ("_spf.example.net", "TXT")]
