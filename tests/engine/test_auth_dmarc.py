"""DMARC: policy discovery in a real DNS server, alignment, policies and sampling."""

from __future__ import annotations

import pytest

from filterd.dkimsign import DkimKey
from filterd.engine.checks.auth.dmarc import DmarcRecord, PolicyLookup, aligned, evaluate, in_sample, parse_record
from filterd.engine.plugin import ScanContext
from filterd.engine.uris import UriParser
from tests.dns_fixture import DnsServer
from tests.engine.auth_helpers import BAD_IP, GOOD_IP, Outcome, auth_config, make_message, run_auth, sign

pytest_plugins = ["tests.dns_fixture", "tests.engine.auth_helpers"]

Keys = dict[str, DkimKey]


def dmarc(server: DnsServer, raw: bytes, uri_parser: UriParser, *, ip: str, mail_from: str) -> Outcome:
    ctx = ScanContext(client_ip=ip, helo="mail.example.com", mail_from=mail_from)
    return run_auth(auth_config(server.spec), raw, ctx, uri_parser=uri_parser)


def test_dmarc_pass_through_dkim_alone(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    raw = sign(make_message("alice@example.com"), dkim_keys["example.com"])
    out = dmarc(auth_dns, raw, uri_parser, ip=BAD_IP, mail_from="bounce@example.com")
    assert out.family("SPF_") == {"SPF_FAIL"}
    assert out.family("DMARC_") == {"DMARC_PASS"}
    assert out.facts["dmarc"] == "pass" and out.facts["dmarc_disposition"] == "none"
    assert "dmarc=pass (p=reject) header.from=example.com" in out.auth_results


def test_dmarc_pass_through_spf_alone(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    """Unsigned; SPF passes for mail.example.com, which is aligned with example.com (relaxed)."""
    out = dmarc(auth_dns, make_message("alice@example.com"), uri_parser, ip=GOOD_IP, mail_from="b@mail.example.com")
    assert out.family("DKIM_") == set() and out.family("DMARC_") == {"DMARC_PASS"}


def test_dmarc_relaxed_dkim_alignment_with_a_subdomain_signer(
    auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser
) -> None:
    raw = sign(make_message("alice@example.com"), dkim_keys["example.com"], domain="mail.example.com")
    out = dmarc(auth_dns, raw, uri_parser, ip=BAD_IP, mail_from="b@example.com")
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID"}  # not the author domain itself
    assert out.family("DMARC_") == {"DMARC_PASS"}


def test_dmarc_strict_alignment(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    """strict.example.org: p=reject, aspf=s, adkim=s."""
    author = "alice@strict.example.org"
    out = dmarc(auth_dns, make_message(author), uri_parser, ip=GOOD_IP, mail_from="b@bounce.strict.example.org")
    assert out.family("SPF_") == {"SPF_PASS"}
    assert out.family("DMARC_") == {"DMARC_REJECT"}  # SPF passed, but not for strict.example.org itself
    out = dmarc(auth_dns, make_message(author), uri_parser, ip=GOOD_IP, mail_from="b@strict.example.org")
    assert out.family("DMARC_") == {"DMARC_PASS"}
    raw = sign(make_message(author), dkim_keys["example.org"])  # d=example.org: relaxed would do
    out = dmarc(auth_dns, raw, uri_parser, ip=BAD_IP, mail_from="b@strict.example.org")
    assert out.family("DKIM_") == {"DKIM_SIGNED", "DKIM_VALID"}
    assert out.family("DMARC_") == {"DMARC_REJECT"}


def test_dmarc_reject_policy(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("alice@example.com"), uri_parser, ip=BAD_IP, mail_from="b@example.com")
    assert out.family("DMARC_") == {"DMARC_REJECT"}
    assert out.facts["dmarc"] == "fail"
    assert out.facts["dmarc_policy"] == "reject" and out.facts["dmarc_disposition"] == "reject"
    assert "dmarc=fail (p=reject) header.from=example.com" in out.auth_results


def test_dmarc_fails_when_spf_passes_for_another_domain(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("alice@example.com"), uri_parser, ip=GOOD_IP, mail_from="b@example.net")
    assert out.family("SPF_") == {"SPF_PASS"} and out.family("DMARC_") == {"DMARC_REJECT"}


def test_dmarc_quarantine_policy(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("bob@example.net"), uri_parser, ip=BAD_IP, mail_from="b@example.net")
    assert out.family("DMARC_") == {"DMARC_QUARANTINE"}
    assert out.facts["dmarc_disposition"] == "quarantine"


def test_dmarc_none_policy(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("carol@example.org"), uri_parser, ip=BAD_IP, mail_from="b@example.org")
    assert out.family("DMARC_") == {"DMARC_NONE"}
    assert out.facts["dmarc_policy"] == "none"


def test_dmarc_subdomain_policy_from_the_organisational_domain(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    """sub.example.org has no record: example.org's applies, with its sp=reject (its p is none)."""
    out = dmarc(auth_dns, make_message("dave@sub.example.org"), uri_parser, ip=BAD_IP, mail_from="b@sub.example.org")
    assert out.family("DMARC_") == {"DMARC_REJECT"}
    assert out.facts["dmarc_domain"] == "sub.example.org" and out.facts["dmarc_policy"] == "reject"
    # example.com has no sp=: its p applies to its subdomains.
    out = dmarc(auth_dns, make_message("e@nospf.example.com"), uri_parser, ip=BAD_IP, mail_from="b@nospf.example.com")
    assert out.family("DMARC_") == {"DMARC_REJECT"}


def test_dmarc_pct_zero_treats_failures_one_step_gentler(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("f@pct0.example.com"), uri_parser, ip=BAD_IP, mail_from="b@pct0.example.com")
    assert out.family("DMARC_") == {"DMARC_QUARANTINE"}
    assert out.facts["dmarc_policy"] == "reject" and out.facts["dmarc_disposition"] == "quarantine"
    assert "dmarc=fail (p=reject dis=quarantine) header.from=pct0.example.com" in out.auth_results


def test_dmarc_missing_record(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    out = dmarc(auth_dns, make_message("g@example.info"), uri_parser, ip=BAD_IP, mail_from="b@example.info")
    assert out.family("DMARC_") == {"DMARC_MISSING"}
    assert out.facts["dmarc"] == "none" and "dmarc_policy" not in out.facts
    assert "dmarc=none header.from=example.info" in out.auth_results


@pytest.mark.parametrize("author", ["a@example.com, b@example.net", "undisclosed-recipients:;", "not an address"])
def test_dmarc_needs_exactly_one_author_domain(auth_dns: DnsServer, uri_parser: UriParser, author: str) -> None:
    out = dmarc(auth_dns, make_message(author), uri_parser, ip=GOOD_IP, mail_from="b@example.com")
    assert out.family("DMARC_") == {"DMARC_NONE"}
    assert out.facts["dmarc"] == "permerror" and "dmarc=permerror (" in out.auth_results


def test_dmarc_two_from_fields(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    raw = make_message(headers=["From: mallory@example.net"])
    out = dmarc(auth_dns, raw, uri_parser, ip=GOOD_IP, mail_from="b@example.com")
    assert out.family("DMARC_") == {"DMARC_NONE"} and "2 From fields" in out.hits["DMARC_NONE"].detail


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", DmarcRecord("reject", "reject")),
        ("v=DMARC1;p=quarantine;sp=none;pct=20;adkim=s;aspf=s", DmarcRecord("quarantine", "none", 20, "s", "s")),
        ("v = DMARC1 ; p = none ; pct=250; adkim=x", DmarcRecord("none", "none")),  # bad values: defaults
        ("v=DMARC1; p=bogus; rua=mailto:d@example.com", DmarcRecord("none", "none")),  # RFC 7489 §6.6.3
        ("v=DMARC1; p=bogus", None),
        ("p=reject; v=DMARC1", None),  # v= must come first
        ("v=DMARC10; p=reject", None),
        ("v=spf1 -all", None),
    ],
)
def test_dmarc_record_parsing(text: str, expected: DmarcRecord | None) -> None:
    assert parse_record(text) == expected


def test_dmarc_alignment_and_sampling(uri_parser: UriParser) -> None:
    org = uri_parser.registered_domain
    assert aligned("mail.example.co.uk", "news.example.co.uk", "r", org)
    assert not aligned("example.co.uk", "other.co.uk", "r", org)
    assert not aligned("mail.example.com", "example.com", "s", org)
    assert aligned("Example.COM.", "example.com", "s", org)
    ids = [f"<{n}@example.com>" for n in range(1000)]
    sampled = sum(in_sample(i, 30) for i in ids)
    assert 230 < sampled < 370  # about 30 %
    assert [in_sample(i, 30) for i in ids] == [in_sample(i, 30) for i in ids]  # the same every time
    assert all(in_sample(i, 100) for i in ids) and not any(in_sample(i, 0) for i in ids)


def test_dmarc_temporary_errors_are_not_failures(uri_parser: UriParser) -> None:
    org = uri_parser.registered_domain
    found = PolicyLookup("found", DmarcRecord("reject", "reject"), "example.com")
    assert evaluate("example.com", PolicyLookup("temperror"), org_of=org, spf_result="fail", spf_domain="example.com",
                    dkim_pass=[]).result == "temperror"  # fmt: skip
    assert evaluate("example.com", found, org_of=org, spf_result="temperror", spf_domain="example.com",
                    dkim_pass=[]).result == "temperror"  # fmt: skip
    assert evaluate("example.com", found, org_of=org, spf_result="fail", spf_domain="example.com",
                    dkim_pass=[], dkim_temperror=["example.com"]).result == "temperror"  # fmt: skip
    assert evaluate("example.com", found, org_of=org, spf_result="fail", spf_domain="example.com",
                    dkim_pass=[], dkim_temperror=["example.net"]).result == "fail"  # fmt: skip


def test_dmarc_spf_identity_is_the_envelope_sender_not_helo(auth_dns: DnsServer, uri_parser: UriParser) -> None:
    """Sender unknown (no MAIL FROM, no Return-Path): a passing HELO check does not align."""
    ctx = ScanContext(client_ip=GOOD_IP, helo="mail.example.com")
    out = run_auth(auth_config(auth_dns.spec), make_message("alice@example.com"), ctx, uri_parser=uri_parser)
    assert out.family("SPF_HELO_") == {"SPF_HELO_PASS"} and "spf" not in out.facts
    assert out.family("DMARC_") == {"DMARC_REJECT"}
    assert "spf=pass smtp.helo=mail.example.com" in out.auth_results
