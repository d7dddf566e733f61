"""The DNS test fixtures themselves: knotd answers what the zones say, the proxy delays answers
without serialising them, the silent server fails the ways it is told to."""

from __future__ import annotations

import asyncio
import time

import dns.asyncresolver
import dns.exception
import dns.rcode
import dns.resolver
import dns.reversename
import pytest

from tests.dns_fixture import (
    DnsServer,
    MakeDelayingProxy,
    MakeDnsServer,
    MakeSilentDnsServer,
    Nameserver,
    prepare_record,
    split_character_string,
    zone_file_text,
)

pytest_plugins = ["tests.dns_fixture"]

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 12  # 546 bytes

ZONES = {
    "example.com": f"""
        @            MX   10 mx1
        @            MX   20 mx2.example.net.
        @            TXT  "v=spf1 ip4:192.0.2.0/24 -all"
        _dmarc       TXT  v=DMARC1; p=reject; rua=mailto:d@example.com
        sel._domainkey TXT "{DKIM_KEY}"
        mx1          A    192.0.2.25
        mx1          AAAA 2001:db8::25
        www          CNAME mx1
    """,
    "2.0.192.in-addr.arpa": ["25 PTR mx1.example.com."],
    "dnsbl.test": "2.0.0.127 A 127.0.0.2\n2.0.0.127 TXT listed",
}


@pytest.fixture(scope="module")
def server(make_session_dns_server: MakeDnsServer) -> DnsServer:
    return make_session_dns_server(ZONES)


def texts(answer: dns.resolver.Answer) -> list[str]:
    return sorted(b"".join(rr.strings).decode() for rr in answer)


def test_records_come_back(server: DnsServer) -> None:
    resolver = server.resolver()
    assert sorted(rr.to_text() for rr in resolver.resolve("example.com", "MX")) == [
        "10 mx1.example.com.",
        "20 mx2.example.net.",
    ]
    assert [rr.address for rr in resolver.resolve("mx1.example.com", "A")] == ["192.0.2.25"]
    assert [rr.address for rr in resolver.resolve("mx1.example.com", "AAAA")] == ["2001:db8::25"]
    www = resolver.resolve("www.example.com", "A")
    assert www.canonical_name.to_text() == "mx1.example.com." and [rr.address for rr in www] == ["192.0.2.25"]
    assert texts(resolver.resolve("example.com", "TXT")) == ["v=spf1 ip4:192.0.2.0/24 -all"]
    assert texts(resolver.resolve("_dmarc.example.com", "TXT")) == ["v=DMARC1; p=reject; rua=mailto:d@example.com"]
    ptr = resolver.resolve(dns.reversename.from_address("192.0.2.25"), "PTR")
    assert [rr.target.to_text() for rr in ptr] == ["mx1.example.com."]
    assert [rr.address for rr in resolver.resolve("2.0.0.127.dnsbl.test", "A")] == ["127.0.0.2"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("3.0.0.127.dnsbl.test", "A")


def test_long_txt_is_split_into_strings(server: DnsServer) -> None:
    (record,) = server.resolver().resolve("sel._domainkey.example.com", "TXT")
    assert len(record.strings) == 3 and all(len(s) <= 255 for s in record.strings)
    assert b"".join(record.strings).decode() == DKIM_KEY
    over_tcp = server.query("sel._domainkey.example.com", "TXT", tcp=True)
    assert over_tcp.rcode() == dns.rcode.NOERROR and over_tcp.answer


def test_async_resolver(server: DnsServer) -> None:
    answer = asyncio.run(server.async_resolver().resolve("mx1.example.com", "A"))
    assert [rr.address for rr in answer] == ["192.0.2.25"]


def test_split_keeps_escapes_whole() -> None:
    content = "a" * 254 + '\\"' + "b" * 10 + "\\065"
    assert split_character_string(content) == f'"{"a" * 254}\\"" "{"b" * 10}\\065"'
    assert prepare_record('x TXT "short"') == 'x TXT "short"'
    assert prepare_record("  300 IN TXT a b") == '  300 IN TXT "a b"'
    assert "SOA ns.invalid. hostmaster.invalid. 7 " in zone_file_text("example.org.", [], serial=7)


def test_bad_records_fail_naming_the_zone(make_dns_server: MakeDnsServer) -> None:
    with pytest.raises(ValueError, match=r"zone example\.org\."):
        make_dns_server({"example.org": "www A not-an-address"})


def test_zone_update_and_new_zone(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.org": "www A 192.0.2.1"}, address="127.0.53.1")
    assert server.address == "127.0.53.1" and server.spec == f"127.0.53.1:{server.port}"
    resolver = server.resolver()
    server.set_zone("example.org", "www A 192.0.2.2\nnew A 192.0.2.3")
    assert [rr.address for rr in resolver.resolve("www.example.org")] == ["192.0.2.2"]
    assert [rr.address for rr in resolver.resolve("new.example.org")] == ["192.0.2.3"]
    server.set_zone("example.net.", ["@ A 198.51.100.1"])
    assert [rr.address for rr in resolver.resolve("example.net")] == ["198.51.100.1"]
    server.remove_zone("example.net")
    assert server.query("example.net").rcode() == dns.rcode.REFUSED


def test_stop_and_start_on_the_same_port(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.org": "www A 192.0.2.1"})
    port = server.port
    server.stop()
    with pytest.raises((dns.exception.Timeout, OSError)):
        server.query("www.example.org", timeout=0.2)
    server.set_zone("example.org", "www A 192.0.2.9")  # while down: served once it is back
    server.start()
    assert server.port == port
    assert [rr.address for rr in server.resolver().resolve("www.example.org")] == ["192.0.2.9"]


async def timed_lookups(ns: Nameserver, names: list[str], *, tcp: bool = False) -> float:
    resolver = ns.async_resolver(lifetime=5)
    start = time.monotonic()
    answers = await asyncio.gather(*(resolver.resolve(name, "A", tcp=tcp) for name in names))
    elapsed = time.monotonic() - start
    assert [rr.address for answer in answers for rr in answer] == ["127.0.0.2"] * len(names)
    return elapsed


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_proxy_delays_each_answer_concurrently(
    server: DnsServer, make_delaying_proxy: MakeDelayingProxy, tcp: bool
) -> None:
    proxy = make_delaying_proxy(server, delay=0.2)
    assert asyncio.run(timed_lookups(proxy, ["2.0.0.127.dnsbl.test"], tcp=tcp)) >= 0.19
    assert proxy.peak_in_flight == 1 and proxy.in_flight == 0
    names = ["2.0.0.127.dnsbl.test"] * 10
    asyncio.run(timed_lookups(proxy, names, tcp=tcp))
    # Held back together, not one after the other: all ten were held at once (no answer left
    # before the last query arrived), and each answer left a delay after its own query came.
    assert proxy.peak_in_flight == 10 and proxy.in_flight == 0
    assert max(proxy.arrived) < min(proxy.answered[1:])
    assert all(sent - came >= 0.19 for came, sent in zip(sorted(proxy.arrived), sorted(proxy.answered), strict=True))
    assert proxy.queries.count(("2.0.0.127.dnsbl.test.", "A")) == 11


def test_proxy_counts_queries_in_flight(server: DnsServer, make_delaying_proxy: MakeDelayingProxy) -> None:
    proxy = make_delaying_proxy(server, delay=0.05)
    resolver = proxy.resolver()
    for _ in range(3):
        resolver.resolve("2.0.0.127.dnsbl.test", "A")
    assert proxy.peak_in_flight == 1 and proxy.in_flight == 0  # one after the other
    assert len(proxy.arrived) == len(proxy.answered) == 3
    proxy.delay = lambda q: 5.0  # held past the client's lifetime: dropped when the proxy closes
    with pytest.raises(dns.resolver.LifetimeTimeout):
        proxy.resolver(lifetime=0.2).resolve("2.0.0.127.dnsbl.test", "A")
    assert proxy.in_flight == 1 and len(proxy.answered) == 3


def test_proxy_delay_can_depend_on_the_query(server: DnsServer, make_delaying_proxy: MakeDelayingProxy) -> None:
    proxy = make_delaying_proxy(server, delay=lambda q: 5.0 if "dnsbl" in q.question[0].name.to_text() else 0.0)
    assert [rr.address for rr in proxy.resolver().resolve("mx1.example.com")] == ["192.0.2.25"]
    with pytest.raises(dns.resolver.LifetimeTimeout):
        proxy.resolver(lifetime=0.3).resolve("2.0.0.127.dnsbl.test")


def test_silent_server_times_out(make_silent_dns_server: MakeSilentDnsServer) -> None:
    silent = make_silent_dns_server()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        silent.resolver(lifetime=0.3).resolve("example.com")
    assert ("example.com.", "A") in silent.queries


def test_silent_server_rcodes(make_silent_dns_server: MakeSilentDnsServer) -> None:
    server = make_silent_dns_server("servfail")
    assert server.query("example.com", "TXT").rcode() == dns.rcode.SERVFAIL
    with pytest.raises(dns.resolver.NoNameservers):
        server.resolver().resolve("example.com")
    server.mode = "refused"
    assert server.query("example.com").rcode() == dns.rcode.REFUSED
