"""Two `filterd mta` instances relaying to each other on loopback: host A (mx.a.example,
127.0.0.2) and host B (mx.b.example, 127.0.0.3) on the same port, a real DNS server (knotd)
giving the MX records, local delivery into Maildirs by `filterd deliver`, and swaks as the
client that submits mail to A.

- relayed: A looks up b.example's MX, relays (DKIM-signed for a.example), B delivers;
- retried: B is down at first, A defers and tries again (min_backoff 1 s) once B is up;
- bounced: B refuses a recipient (554 5.7.1 relay access denied for c.example, whose MX is
  B), A bounces, and the DSN lands in the sender's Maildir on A.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest

from filterd.dkimsign import DkimKey, generate_key, write_key
from tests.daemon_fixture import need_binary
from tests.dns_fixture import DnsServer, MakeDnsServer
from tests.mta.mta_fixture import Mta
from tests.mta.qmgr_helpers import delivery_status
from tests.mta.smtp_sink import free_port

pytest_plugins = ["tests.dns_fixture"]

A, B = "127.0.0.2", "127.0.0.3"


def _wait(what: str, done: Callable[[], bool], mtas: list[Mta], limit: float = 40.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            logs = "\n\n".join(f"--- {m.state_dir}:\n{m.log()}" for m in mtas)
            raise AssertionError(f"{what}: not within {limit}s\n{logs}")
        time.sleep(0.1)


class Hosts:
    """Starts and stops the two MTAs of one test."""

    def __init__(self, tmp_path: Path, dns_server: DnsServer, port: int, key: DkimKey, key_path: Path) -> None:
        self.tmp_path, self.dns, self.port = tmp_path, dns_server, port
        self.key, self.key_path = key, key_path
        self.running: dict[str, Mta] = {}

    def config(self, name: str, address: str) -> str:
        deliver = [sys.executable, "-m", "filterd", "deliver", "--no-filter", "--user", "{user}"]
        deliver += ["--recipient", "{recipient}", "--maildir", "{mailbox}"]
        lines = [
            "network: {enabled: false}",
            f"dns: {{nameservers: ['{self.dns.spec}'], timeout: 2s}}",
            "mta:",
            f"  hostname: mx.{name}.example",
            f"  local_domains: [{name}.example]",
            "  mynetworks: [127.0.0.1/32]",  # the submitting client; the other host may relay nothing
            f"  smtp_port: {self.port}",
            f"  smtp_bind_address: {address}",
            "  smtp_connect_timeout: 2s",
            "  min_backoff: 1s",
            "  max_backoff: 2s",
            f"  local_delivery_command: [{', '.join(repr(a) for a in deliver)}]",
            "  mailbox: '{state_dir}/mail/{user}/Maildir'",
        ]
        if name == "a":
            lines.append(f"auth: {{dkim_keys: {{a.example: 's1:{self.key_path}'}}}}")
        return "\n".join(lines) + "\n"

    def start(self, name: str) -> Mta:
        address = A if name == "a" else B
        run = self.tmp_path / name
        run.mkdir(exist_ok=True)
        cfg = run / "filterd.yaml"
        cfg.write_text(self.config(name, address))
        log_path = run / f"mta{len(list(run.glob('mta*.log')))}.log"
        cmd = [
            sys.executable, "-m", "filterd", "mta", "--config", str(cfg), "--state-dir", str(run / "state"),
            "--listen", f"{address}:{self.port}", "--hostname", f"mx.{name}.example",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        mta = Mta(proc, log_path, run / "state", address, self.port)
        mta.wait_for_log(r"filterd mta: ready")
        self.running[name] = mta
        return mta

    def maildir(self, name: str, user: str) -> list[bytes]:
        new = self.tmp_path / name / "state" / "mail" / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def stop_all(self) -> None:
        for mta in self.running.values():
            mta.stop()


@pytest.fixture
def hosts(tmp_path: Path, make_dns_server: MakeDnsServer) -> Iterator[Hosts]:
    key = generate_key("a.example", "s1", bits=1024)
    key_path = write_key(key, tmp_path)
    server = make_dns_server(
        {
            "a.example": ["@ MX 10 mx", f"mx A {A}", key.zone_line()],
            "b.example": ["@ MX 10 mx", f"mx A {B}"],
            "c.example": ["@ MX 10 mx.b.example."],  # B takes no mail for it
        }
    )
    h = Hosts(tmp_path, server, free_port(A, B), key, key_path)
    yield h
    h.stop_all()


def _swaks(port: int, sender: str, rcpt: str, subject: str) -> None:
    result = subprocess.run(
        [need_binary("swaks"), "--server", f"{A}:{port}", "--local-interface", "127.0.0.1", "--ehlo", "client.test",
         "--from", sender, "--to", rcpt, "--header", f"Subject: {subject}", "--header", "From: Alice <alice@a.example>",
         "--body", f"This is {subject}.", "--timeout", "20"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout


def _empty(mta: Mta) -> bool:
    return not any(mta.queue.ids(state) for state in ("incoming", "active", "deferred"))


def _parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_relay_retry_and_bounce_between_two_hosts(hosts: Hosts) -> None:
    a = hosts.start("a")
    mtas = [a]

    # B is down: A takes the message, fails to connect, and keeps it deferred.
    _swaks(hosts.port, "alice@a.example", "bob@b.example", "first")
    _wait("A defers while B is down", lambda: bool(a.queue.ids("deferred")), mtas)
    [qid] = a.queue.ids("deferred")
    envelope, _ = a.queue.load(qid)
    assert envelope.rcpts[0].status == "pending" and envelope.rcpts[0].attempts >= 1
    assert "4.4.1" in envelope.rcpts[0].last_error and f"{B}]" in envelope.rcpts[0].last_error
    listing = subprocess.run(
        [sys.executable, "-m", "filterd", "mta", "queue", "list", "--state-dir", str(a.state_dir)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert qid in listing and "bob@b.example" in listing and "4.4.1" in listing

    # B comes up: the next retry (1-2 s later) relays it; B delivers into bob's Maildir.
    b = hosts.start("b")
    mtas.append(b)
    _wait("bob's message on B", lambda: len(hosts.maildir("b", "bob")) == 1, mtas)
    _wait("A's queue empties", lambda: _empty(a), mtas)
    [raw] = hosts.maildir("b", "bob")
    msg = _parse(raw)
    assert msg["Subject"] == "first"
    assert msg["Return-Path"] == "<alice@a.example>" and msg["Delivered-To"] == "bob@b.example"
    received = msg.get_all("Received") or []
    assert len(received) == 2 and "mx.b.example" in received[0] and "mx.a.example" in received[1]
    # A signed it for a.example; the signature still verifies after B's hop (key from knotd).
    resolver = hosts.dns.resolver()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert b"DKIM-Signature:" in raw and b"d=a.example" in raw
    assert dkim.verify(raw.replace(b"\n", b"\r\n"), dnsfunc=dnsfunc)

    # Both up: the next message goes through at once.
    _swaks(hosts.port, "alice@a.example", "bob@b.example", "second")
    _wait("second message on B", lambda: len(hosts.maildir("b", "bob")) == 2, mtas)

    # B refuses c.example (554 5.7.1): A bounces to alice, whose Maildir on A gets the DSN.
    _swaks(hosts.port, "alice@a.example", "carol@c.example", "third")
    _wait("the DSN in alice's Maildir on A", lambda: len(hosts.maildir("a", "alice")) == 1, mtas)
    dsn = _parse(hosts.maildir("a", "alice")[0])
    assert dsn["Return-Path"] == "<>" and dsn.get_content_type() == "multipart/report"
    per_message, rcpt = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; mx.a.example"
    assert rcpt["Final-Recipient"] == "rfc822; carol@c.example"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.7.1"
    assert rcpt["Remote-MTA"] == "dns; mx.b.example"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 554 5.7.1") and "Relay access denied" in rcpt["Diagnostic-Code"]
    returned = [p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert returned and "Subject: third" in returned[0].get_content()
    assert not any(b"third" in m for m in hosts.maildir("b", "bob"))

    _wait("both queues empty", lambda: _empty(a) and _empty(b), mtas)
    assert a.stop() == 0 and b.stop() == 0
