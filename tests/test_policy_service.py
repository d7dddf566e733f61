"""The policy service of `filterd daemon`, spoken to as Postfix's smtpd speaks: persistent
connections, one ``name=value`` block per request (tests/test_milter_postfix.py has it behind a
real Postfix)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_fixture import Daemon, start_daemon

DELAY = 1.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("policyd")
    config = (
        f"greylist: {{enabled: true, delay: {DELAY}s, exempt_networks: [203.0.113.128/25]}}\n"
        "lists: {welcomelist_from: ['*@friends.example']}\n"
        "milter: {policy_defer: reply}\n"
    )
    d = start_daemon(tmp, "--policy-listen", "127.0.0.1:0", config=config, workers=1)
    yield d
    assert d.stop() == 0, d.log()


def connect(daemon: Daemon) -> socket.socket:
    port = int(daemon.wait_for_log(r"listening for policy on 127\.0\.0\.1:(\d+)").group(1))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def ask(sock: socket.socket, **attributes: str) -> str:
    request = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_name": "unknown",
        "helo_name": "mx.sender.example",
        **attributes,
    }
    sock.sendall("".join(f"{k}={v}\n" for k, v in request.items()).encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {answer!r}"
        answer += chunk
    assert answer.startswith(b"action=") and answer.count(b"\n") == 2, answer
    return answer[len(b"action=") : -2].decode()


def test_first_sight_is_deferred_then_passes_with_a_header_once_per_message(daemon: Daemon) -> None:
    with connect(daemon) as sock:
        triplet = {"client_address": "203.0.113.7", "sender": "news@example.com", "recipient": "alice@example.org"}
        other = {**triplet, "recipient": "bob@example.org"}
        assert ask(sock, instance="a.1", **triplet) == "451 4.7.1 Greylisted, please try again later"
        assert ask(sock, instance="a.1", **other) == "451 4.7.1 Greylisted, please try again later"
        assert ask(sock, instance="a.2", **triplet) == "451 4.7.1 Greylisted, please try again later"
        time.sleep(DELAY + 0.1)
        action = ask(sock, instance="b.1", **triplet)
        assert action.startswith("PREPEND X-Greylist: delayed 1 seconds by filterd at "), action
        # The message's second recipient waited too, but the message has its header already.
        assert ask(sock, instance="b.1", **other) == "DUNNO"
        assert ask(sock, instance="c.1", **triplet) == "DUNNO"  # a known triplet


def test_exemptions_and_other_requests_get_dunno(daemon: Daemon) -> None:
    with connect(daemon) as sock:
        new = {"sender": "x@example.com", "recipient": "alice@example.org"}
        assert ask(sock, client_address="203.0.113.9", sasl_username="x", sasl_method="PLAIN", **new) == "DUNNO"
        assert ask(sock, client_address="203.0.113.200", **new) == "DUNNO"  # exempt network
        assert ask(sock, client_address="127.0.0.1", **new) == "DUNNO"  # loopback
        assert ask(sock, client_address="203.0.113.9", sender="dan@friends.example",
                   recipient="alice@example.org") == "DUNNO"  # fmt: skip
        assert ask(sock, client_address="203.0.113.9", protocol_state="DATA", **new) == "DUNNO"
        assert ask(sock, client_address="203.0.113.9", request="something_else", **new) == "DUNNO"
        # The same triplet without its exemption is greylisted.
        assert ask(sock, client_address="203.0.113.9", **new).startswith("451 4.7.1 ")


def test_a_broken_request_closes_the_connection(daemon: Daemon) -> None:
    with connect(daemon) as sock:
        sock.sendall(b"request=smtpd_access_policy\nno equals sign here\n\n")
        assert sock.recv(100) == b""
    daemon.wait_for_log(r"policy protocol error from 127\.0\.0\.1")


def test_stopping_closes_idle_connections_at_once(tmp_path: Path) -> None:
    d = start_daemon(
        tmp_path,
        "--policy-listen",
        "127.0.0.1:0",
        workers=1,
        metrics=False,
        config="greylist: {enabled: true}\ndaemon: {grace_period: 30s}\n",
    )
    try:
        with connect(d) as sock:
            assert ask(sock, client_address="127.0.0.1", sender="a@b.example", recipient="c@d.example") == "DUNNO"
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            assert sock.recv(100) == b""  # closed between requests; Postfix would reconnect
            assert time.monotonic() - started < 20  # not held for the 30 s grace period
    finally:
        assert d.stop() == 0, d.log()
