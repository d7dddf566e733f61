"""The daemon when it holds many connections, against Debian's spamc: a worker at
daemon.max_connections stops accepting, so a new client goes to another worker or waits in the
listen backlog, never refused (spamc -x turns a refusal into exit 74, which Postfix's pipe(8)
bounces); and a client that never reads its answer is dropped after daemon.read_timeout, its
slot freed."""

from __future__ import annotations

import select
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._servers import wait_until
from tests.daemon_fixture import Daemon, need_binary, start_daemon

MAX_CONNECTIONS = 3  # per worker, 2 workers
MESSAGE = (
    b"From: alice@example.org\nTo: bob@example.org\nSubject: lunch\nMessage-ID: <lunch@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\nSee you at noon.\n"
)


def metric(daemon: Daemon, series: str) -> float | None:
    """The value of one series of /metrics (e.g. 'filterd_connections_open{protocol="spamd"}')."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
    return None


def wait_for_metric(daemon: Daemon, series: str, value: float) -> None:
    wait_until(lambda: metric(daemon, series) == value, daemon.proc, name="daemon",
               waiting_for=f"report {series} {value}", log=daemon.log)  # fmt: skip


def accept_queue(port: int) -> int:
    """Connections waiting in the listen backlog of 127.0.0.1:port (for a listening socket the
    kernel reports its accept queue as rx_queue)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def hold(daemon: Daemon) -> socket.socket:
    """A spamd connection that has sent half a request: it keeps its slot."""
    sock = socket.create_connection((daemon.host, daemon.port), timeout=30)
    sock.sendall(b"PROCESS SPAMC/1.5\r\n")
    return sock


def refused(sock: socket.socket) -> bool:
    """Whether the daemon answered (refused) a held connection: it says nothing until the
    request is whole."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def spamc(daemon: Daemon) -> subprocess.Popen[bytes]:
    """``spamc -x`` (no safe fallback: a refusal is exit 74) started on MESSAGE over TCP."""
    proc = subprocess.Popen(
        [need_binary("spamc"), "-x", "-d", daemon.host, "-p", str(daemon.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(MESSAGE)  # fits in the pipe
    proc.stdin.close()
    proc.stdin = None
    return proc


def served(proc: subprocess.Popen[bytes]) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert b"X-Spam-Checker-Version: " in out and out.endswith(b"See you at noon.\n"), out


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    config = f"daemon: {{max_connections: {MAX_CONNECTIONS}, idle_timeout: 5m, read_timeout: 10m}}\n"
    d = start_daemon(tmp_path, config=config, workers=2)
    yield d
    assert d.stop() == 0, d.log()


def test_a_full_worker_leaves_new_clients_to_the_other_one(daemon: Daemon) -> None:
    held = []
    try:
        for count in range(1, 2 * MAX_CONNECTIONS):
            held.append(hold(daemon))
            wait_until(lambda: accept_queue(daemon.port) == 0, daemon.proc, name="daemon",
                       waiting_for=f"accept {count} connections", log=daemon.log)  # fmt: skip
            if count > MAX_CONNECTIONS:  # one worker may be full now; the other has room
                for _ in range(4):  # whichever worker wakes first
                    served(spamc(daemon))
        assert not any(refused(sock) for sock in held)
        wait_for_metric(daemon, 'filterd_connections_open{protocol="spamd"}', 2 * MAX_CONNECTIONS - 1)
        assert metric(daemon, "filterd_connections_refused_total") == 0
    finally:
        for sock in held:
            sock.close()


def test_with_every_slot_taken_a_client_waits_and_is_served_when_one_frees(daemon: Daemon) -> None:
    held = [hold(daemon) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        wait_until(lambda: accept_queue(daemon.port) == 0, daemon.proc, name="daemon",
                   waiting_for="accept the held connections", log=daemon.log)  # fmt: skip
        proc = spamc(daemon)

        def waiting() -> bool:
            # It used to be accepted by a full worker and refused with EX_TEMPFAIL: spamc exit 74.
            assert proc.poll() is None, (proc.returncode, proc.communicate())
            return accept_queue(daemon.port) == 1

        wait_until(waiting, daemon.proc, name="daemon", waiting_for="leave spamc waiting in the listen backlog",
                   log=daemon.log)  # fmt: skip
        wait_for_metric(daemon, 'filterd_connections_open{protocol="spamd"}', 2 * MAX_CONNECTIONS)
        assert not any(refused(sock) for sock in held)
        held.pop().close()  # a slot frees
        served(proc)
        assert accept_queue(daemon.port) == 0
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_never_reads_its_answer_is_dropped_and_its_slot_freed(tmp_path: Path) -> None:
    config = (
        "daemon: {max_connections: 1, read_timeout: 2s, max_request_size: 64M}\n"
        "rules: {max_scan_size: 2K}\n"  # the big message comes back unscanned, at once
    )
    d = start_daemon(tmp_path, config=config, workers=1)
    try:
        body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 200_000  # 16 MB
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.settimeout(60)
        with sock:
            sock.connect((d.host, d.port))
            sock.sendall(b"PROCESS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(body) + body)
            sock.shutdown(socket.SHUT_WR)
            # Never read: the answer stays queued until the daemon gives up on us.
            wait_for_metric(d, 'filterd_errors_total{kind="write_timeout"}', 1)
            wait_for_metric(d, 'filterd_connections_open{protocol="spamd"}', 0)
            served(spamc(d))  # the only slot is free again
        assert "spamd connection from 127.0.0.1 dropped: the peer took nothing for 2s" in d.log()
    finally:
        assert d.stop() == 0, d.log()
