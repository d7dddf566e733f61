"""Shared pieces of the auth tests (SPF, DKIM, ARC, DMARC): signing keys made at test time, one
knotd serving the test domains for the whole session, and a runner for the check alone.

Use from a test module with ``pytest_plugins = ["tests.dns_fixture", "tests.engine.auth_helpers"]``.
The zones are shared: tests must not change them (start their own server for that). Test
modules import names from here too, so pytest does not rewrite its asserts (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dkim
import pytest

from filterd.config import Config, Duration, default_config
from filterd.dkimsign import DkimKey, generate_key
from filterd.engine.checks.auth import AuthCheck
from filterd.engine.message import parse_message
from filterd.engine.plugin import CheckSetup, Hit, Scan, ScanContext
from filterd.engine.uris import UriParser
from filterd.net.dns import Resolver
from tests.dns_fixture import DnsServer, MakeDnsServer, Records

GOOD_IP = "192.0.2.10"  # allowed by every SPF record below; mail.example.com's address
BAD_IP = "198.51.100.66"  # allowed by none
AUTHSERV_ID = "mx.test"


def auth_zones(keys: Mapping[str, DkimKey]) -> dict[str, Records]:
    """The test domains. Keys: "example.com", "example.net", "example.org" (selector "sel")."""
    com, net, org = keys["example.com"].record, keys["example.net"].record, keys["example.org"].record
    many = " ".join(f"a:h{n}.example.com" for n in range(1, 12))
    hosts = [f"h{n} A 203.0.113.{n}" for n in range(1, 12)]
    return {
        "example.com": [
            *textwrap.dedent(f"""
            @               TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            _dmarc          TXT  v=DMARC1; p=reject; rua=mailto:dmarc@example.com
            sel._domainkey  TXT  "{com}"
            mail            A    192.0.2.10
            mail            TXT  "v=spf1 a -all"
            sel._domainkey.mail TXT "{com}"
            soft            TXT  "v=spf1 ~all"
            neutral         TXT  "v=spf1 ?all"
            nospf           A    192.0.2.1
            bad             TXT  "v=spf1 ip4:192.0.2.0/24 frobnicate -all"
            inc             TXT  "v=spf1 include:_spf.example.net -all"
            redir           TXT  "v=spf1 redirect=_spf.example.net"
            macro           TXT  "v=spf1 exists:%{{i}}._ip.example.com -all"
            192.0.2.10._ip  A    127.0.0.2
            mx              TXT  "v=spf1 mx -all"
            mx              MX   10 mail.example.com.
            void            TXT  "v=spf1 a:n1.example.com a:n2.example.com a:n3.example.com ip4:192.0.2.0/24 -all"
            many            TXT  "v=spf1 {many} ip4:192.0.2.0/24 -all"
            _dmarc.pct0     TXT  v=DMARC1; p=reject; pct=0
            pct0            TXT  "v=spf1 ip4:192.0.2.0/24 -all"
        """).splitlines(),
            *hosts,
        ],
        "example.net": f"""
            @               TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            _spf            TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            _dmarc          TXT  v=DMARC1; p=quarantine
            sel._domainkey  TXT  "{net}"
        """,
        "example.org": f"""
            @               TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            _dmarc          TXT  v=DMARC1; p=none; sp=reject
            sel._domainkey  TXT  "{org}"
            sub             A    192.0.2.1
            strict          TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            _dmarc.strict   TXT  v=DMARC1; p=reject; adkim=s; aspf=s
            bounce.strict   TXT  "v=spf1 ip4:192.0.2.0/24 -all"
        """,
        "example.info": """
            @               TXT  "v=spf1 ip4:192.0.2.0/24 -all"
        """,
    }


@pytest.fixture(scope="session")
def dkim_keys() -> dict[str, DkimKey]:
    """One 1024-bit RSA key per signing domain, made with `filterd.dkimsign` (openssl) now."""
    return {d: generate_key(d, "sel", 1024) for d in ("example.com", "example.net", "example.org")}


@pytest.fixture(scope="session")
def auth_dns(make_session_dns_server: MakeDnsServer, dkim_keys: dict[str, DkimKey]) -> DnsServer:
    return make_session_dns_server(auth_zones(dkim_keys))


@pytest.fixture(scope="session")
def uri_parser() -> UriParser:
    return UriParser()


def auth_config(nameserver: str, *, timeout: float = 1.0, **auth: Any) -> Config:
    """The default configuration with network checks on, asking only ``nameserver``."""
    cfg = default_config()
    return dataclasses.replace(
        cfg,
        network=dataclasses.replace(cfg.network, enabled=True),
        dns=dataclasses.replace(cfg.dns, nameservers=(nameserver,), timeout=Duration(timeout)),
        auth=dataclasses.replace(cfg.auth, **{"authserv_id": AUTHSERV_ID, **auth}),
    )


def make_message(
    author: str = "Alice <alice@example.com>",
    *,
    body: str = "Hello,\r\n\r\nthe report is attached.\r\n",
    headers: Iterable[str] = (),
    message_id: str = "<1234@example.com>",
    newline: str = "\r\n",
) -> bytes:
    lines = [f"From: {author}", "To: bob@example.net", "Subject: the report", f"Message-ID: {message_id}",
             "Date: Mon, 02 Jun 2025 10:00:00 +0000", "MIME-Version: 1.0", *headers]  # fmt: skip
    text = "\r\n".join(lines) + "\r\n\r\n" + body
    return text.replace("\r\n", newline).encode()


def sign(raw: bytes, key: DkimKey, *, domain: str = "", selector: str = "") -> bytes:
    """``raw`` with a DKIM-Signature made by dkimpy with ``key`` (its domain unless told)."""
    header = dkim.sign(
        raw,
        (selector or key.selector).encode(),
        (domain or key.domain).encode(),
        key.private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(header) + raw


@dataclass
class Outcome:
    hits: dict[str, Hit]
    facts: dict[str, str]
    headers: list[tuple[str, str]]
    elapsed: float
    problems: list[str] = field(default_factory=list)

    @property
    def rules(self) -> set[str]:
        return set(self.hits)

    def family(self, prefix: str) -> set[str]:
        """The rules fired that start with ``prefix`` (SPF_HELO_ excluded from SPF_)."""
        found = {r for r in self.hits if r.startswith(prefix)}
        return {r for r in found if not r.startswith("SPF_HELO_")} if prefix == "SPF_" else found

    @property
    def auth_results(self) -> str:
        values = [v for n, v in self.headers if n == "Authentication-Results"]
        assert len(values) == 1, self.headers
        return values[0]


def run_auth(
    config: Config,
    raw: bytes,
    ctx: ScanContext | None = None,
    *,
    uri_parser: UriParser,
    resolver: Resolver | None = None,
    budget: float = 5.0,
) -> Outcome:
    """Run `AuthCheck` alone on one message (a fresh resolver unless given: no shared cache)."""
    resolver = resolver or Resolver(config.dns)
    check = AuthCheck(CheckSetup(config=config, uri_parser=uri_parser, resolver=resolver))
    scan = Scan(ctx=ctx or ScanContext(), uri_parser=uri_parser, msg=parse_message(raw, uri_parser=uri_parser))
    scan.deadline = time.monotonic() + budget
    started = time.perf_counter()
    hits = asyncio.run(check.run(scan))
    elapsed = time.perf_counter() - started
    return Outcome({h.rule: h for h in hits}, dict(scan.facts), list(scan.add_headers), elapsed, scan.problems)
