"""The SMTP server looks its client's name up as Postfix does (`filterd.mta.peername`): PTR, then
forward-confirmed, asking a real DNS server (knotd) that serves 0.0.127.in-addr.arpa and
peer.test. Each client connects from its own 127.0.0.x address, so each meets its own PTR.

What the name reaches is checked where it lands: our Received header, the queued envelope,
and the milter's CONNECT (its hostname and macros, read by the sans-IO filter side that the
daemon uses) and, through `filterd mta` itself, the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import smtplib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import pytest

from filterd.config import default_config
from filterd.mta.peername import valid_hostname
from filterd.mta.queue import Envelope, Queue
from filterd.mta.smtpd import SmtpServer
from filterd.net.dns import Resolver
from filterd.protocols.milter import (
    ALL_ACTIONS,
    Connect,
    Continue,
    Event,
    Negotiate,
    ProtocolFlag,
    Reply,
)
from tests.dns_fixture import DnsServer, MakeDelayingProxy, MakeDnsServer, MakeSilentDnsServer, Nameserver
from tests.mta.milter_helpers import serve_filter
from tests.mta.mta_fixture import start_mta

pytest_plugins = ["tests.dns_fixture"]

ZONES = {
    "0.0.127.in-addr.arpa": [
        "10 PTR good.peer.test.",  # leads back to 127.0.0.10: confirmed
        "11 PTR forged.peer.test.",  # whose address is another one
        # 12: no PTR record
        "13 PTR gone.peer.test.",  # a name that does not exist
        "14 PTR 127.0.0.14.",  # numeric: never a name
        "15 PTR other.peer.test.",  # two names, the second one confirms
        "15 PTR second.peer.test.",
    ],
    "peer.test": ["good A 127.0.0.10", "forged A 127.0.0.99", "other A 127.0.0.98", "second A 127.0.0.15"],
}


@pytest.fixture(scope="module")
def dns_server(make_session_dns_server: MakeDnsServer) -> DnsServer:
    return make_session_dns_server(ZONES)


@dataclass
class Session:
    """What one SMTP session from ``source`` left behind."""

    connect: Connect  # as the filter received it
    envelope: Envelope
    message: bytes  # as queued
    greeting_after: float  # seconds from connecting to the 220


async def _recording_filter(connects: list[Connect]) -> tuple[asyncio.Server, str]:
    """A milter that records CONNECT and lets everything through."""

    def script(event: Event) -> list[Reply]:
        if isinstance(event, Connect):
            connects.append(event)
        return [Continue()]

    server, address, _ = await serve_filter(script, Negotiate(actions=ALL_ACTIONS, protocol=ProtocolFlag.NOUNKNOWN))
    return server, address


def run_session(tmp_path: Path, nameserver: Nameserver, source: str, **mta_settings: Any) -> Session:
    """One message from ``source`` through an in-process server whose DNS is ``nameserver``."""
    defaults = default_config()
    dns_config = dataclasses.replace(defaults.dns, nameservers=(nameserver.spec,))
    config = dataclasses.replace(
        defaults.mta, local_domains=("example.net",), hostname="mx.test", mailbox="{state_dir}/mail/{user}/",
        **mta_settings,
    )  # fmt: skip
    queue = Queue(tmp_path / "queue")
    connects: list[Connect] = []

    def client(port: int) -> float:
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as smtp:
            waited = time.monotonic() - started
            smtp.ehlo("client.example")
            smtp.sendmail("alice@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nhello\r\n")
        return waited

    async def main() -> float:
        milter, address = await _recording_filter(connects)
        async with milter:
            server = SmtpServer(dataclasses.replace(config, milter=address), queue, resolver=Resolver(dns_config))
            [(_, port)] = await server.start(["127.0.0.1:0"])
            try:
                return await asyncio.to_thread(client, port)
            finally:
                await server.close()

    waited = asyncio.run(main())
    [qid] = queue.ids("incoming")
    envelope, path = queue.load(qid)
    [connect] = connects
    return Session(connect, envelope, path.read_bytes(), waited)


def received_from(message: bytes) -> str:
    """The ``from`` clause of our Received header (the first line of the message)."""
    return message.split(b"\r\n", 1)[0].decode()


def test_a_confirmed_name_is_the_client_name(tmp_path: Path, dns_server: DnsServer) -> None:
    s = run_session(tmp_path, dns_server, "127.0.0.10")
    assert received_from(s.message) == "Received: from client.example (good.peer.test [127.0.0.10])"
    assert s.envelope.client_name == "good.peer.test"
    # what the daemon's milter reads: the CONNECT hostname and {client_name}
    assert s.connect.hostname == "good.peer.test" and s.connect.address == "127.0.0.10"
    macros = s.connect.macros
    assert macros["client_name"] == macros["client_ptr"] == "good.peer.test"
    assert macros["_"] == "good.peer.test [127.0.0.10]" and macros["client_resolve"] == "OK"


@pytest.mark.parametrize(("source", "ptr"), [("127.0.0.11", "forged.peer.test"), ("127.0.0.13", "gone.peer.test")])
def test_a_ptr_name_that_does_not_lead_back_is_unknown(
    tmp_path: Path, dns_server: DnsServer, source: str, ptr: str
) -> None:
    s = run_session(tmp_path, dns_server, source)
    assert received_from(s.message) == f"Received: from client.example (unknown [{source}])"
    assert s.envelope.client_name == "unknown"
    assert s.connect.hostname == f"[{source}]"
    macros = s.connect.macros
    assert macros["client_name"] == "unknown" and macros["client_ptr"] == ptr  # Postfix reverse_client_name
    assert macros["_"] == f"{ptr} [{source}] (may be forged)" and macros["client_resolve"] == "FORGED"


@pytest.mark.parametrize("source", ["127.0.0.12", "127.0.0.14"], ids=["no PTR", "numeric PTR"])
def test_no_usable_ptr_is_unknown(tmp_path: Path, dns_server: DnsServer, source: str) -> None:
    s = run_session(tmp_path, dns_server, source)
    assert received_from(s.message) == f"Received: from client.example (unknown [{source}])"
    assert s.connect.hostname == f"[{source}]"
    macros = s.connect.macros
    assert macros["client_name"] == macros["client_ptr"] == "unknown"
    assert macros["_"] == f"unknown [{source}]" and macros["client_resolve"] == "FAIL"


def test_of_several_ptr_names_the_one_that_confirms_wins(tmp_path: Path, dns_server: DnsServer) -> None:
    s = run_session(tmp_path, dns_server, "127.0.0.15")
    assert received_from(s.message) == "Received: from client.example (second.peer.test [127.0.0.15])"
    assert s.connect.macros["client_ptr"] == "second.peer.test"


@pytest.mark.parametrize("mode", ["silent", "servfail"])
def test_a_dead_dns_server_costs_at_most_the_timeout(
    tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer, mode: str
) -> None:
    server = make_silent_dns_server(mode)
    s = run_session(tmp_path, server, "127.0.0.10", peername_timeout=1.0)  # dns.timeout is 2 s
    assert ("10.0.0.127.in-addr.arpa.", "PTR") in server.queries  # it did ask
    assert s.greeting_after < 1.7, s.greeting_after
    if mode == "silent":
        assert s.greeting_after > 0.9, s.greeting_after
    assert received_from(s.message) == "Received: from client.example (unknown [127.0.0.10])"
    macros = s.connect.macros
    assert macros["client_name"] == macros["client_ptr"] == "unknown" and macros["client_resolve"] == "TEMP"


def test_a_slow_forward_lookup_keeps_the_ptr_name(
    tmp_path: Path, dns_server: DnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    def delay(query: dns.message.Message) -> float:
        return 3.0 if query.question[0].rdtype == dns.rdatatype.A else 0.0

    proxy = make_delaying_proxy(dns_server, delay=delay)
    s = run_session(tmp_path, proxy, "127.0.0.10", peername_timeout=1.0)
    assert 0.9 < s.greeting_after < 1.7, s.greeting_after
    assert received_from(s.message) == "Received: from client.example (unknown [127.0.0.10])"
    macros = s.connect.macros
    assert macros["client_ptr"] == "good.peer.test" and macros["client_resolve"] == "TEMP"
    assert macros["_"] == "good.peer.test [127.0.0.10] (may be forged)"  # Postfix says so too


def test_peername_lookup_off_asks_nothing(tmp_path: Path, make_silent_dns_server: MakeSilentDnsServer) -> None:
    server = make_silent_dns_server()
    s = run_session(tmp_path, server, "127.0.0.10", peername_lookup=False)
    assert server.queries == [] and s.greeting_after < 0.5
    assert received_from(s.message) == "Received: from client.example (unknown [127.0.0.10])"


def test_filterd_mta_looks_client_names_up_in_the_configured_dns(tmp_path: Path, dns_server: DnsServer) -> None:
    config = f"dns: {{nameservers: ['{dns_server.spec}']}}\n"
    config += "mta: {local_domains: [example.net], peername_timeout: 3s}\n"
    mta = start_mta(tmp_path, config=config)
    try:
        for source in ("127.0.0.10", "127.0.0.11"):
            with smtplib.SMTP(mta.host, mta.port, timeout=30, source_address=(source, 0)) as smtp:
                smtp.sendmail("alice@example.org", ["bob@example.net"], f"Subject: from {source}\r\n\r\nhi\r\n")
        queued = {envelope.client_ip: (envelope, data) for envelope, data in mta.queued()}
        envelope, data = queued["127.0.0.10"]
        assert envelope.client_name == "good.peer.test"
        assert re.match(rb"Received: from \S+ \(good\.peer\.test \[127\.0\.0\.10\]\)\r\n", data), data[:200]
        envelope, data = queued["127.0.0.11"]
        assert envelope.client_name == "unknown"
        assert re.match(rb"Received: from \S+ \(unknown \[127\.0\.0\.11\]\)\r\n", data), data[:200]
        log = mta.log()
        assert "connect from good.peer.test[127.0.0.10]" in log, log
        assert "hostname forged.peer.test does not resolve to address 127.0.0.11" in log, log
        assert "connect from unknown[127.0.0.11]" in log, log
    finally:
        assert mta.stop() == 0, mta.log()


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Mail.Example.ORG.", "mail.example.org"),
        ("host_1.example", "host_1.example"),  # Postfix allows the underscore
        ("xn--bcher-kva.example.", "xn--bcher-kva.example"),
        ("192.0.2.1.", ""),  # numeric: would pass for an address
        ("1.2.3", ""),
        ("evil\\032host.example.", ""),  # escaped space, as dnspython writes it
        ("a(b).example.", ""),  # would break out of the Received comment
        ("-lead.example.", ""),
        ("trail-.example.", ""),
        ("two..dots.example.", ""),
        ("x" * 64 + ".example.", ""),
        (".", ""),
    ],
)
def test_valid_hostname(text: str, name: str) -> None:
    assert valid_hostname(text) == name
