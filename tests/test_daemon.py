"""The daemon against clients no one here wrote: Debian's spamc and PyPI's aiospamc, plus raw bytes.

Every test talks to a real `filterd daemon` process on a Unix socket or loopback TCP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiospamc
import pytest

from tests.daemon_fixture import Daemon, need_binary, start_daemon

ROOT = Path(__file__).resolve().parent.parent
GTUBE_MSG = (
    b"From: tester@example.org\nTo: admin@example.org\nSubject: spam path test\nMessage-ID: <gtube@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
HAM_MSG = (ROOT / "corpora" / "ham" / "17-one-line-lunch.eml").read_bytes()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("daemon")
    prefs = tmp / "prefs"
    prefs.mkdir()
    (prefs / "alice.yaml").write_text("required_score: -50\nreport_safe: 0\n")
    (prefs / "bob.yaml").write_text("blocklist_from: ['*@example.com']\n")
    d = start_daemon(tmp, "--user-prefs", str(prefs))
    yield d
    assert d.stop() == 0, d.log()


def spamc(daemon: Daemon, *args: str, data: bytes, tcp: bool = False) -> subprocess.CompletedProcess[bytes]:
    binary = need_binary("spamc")
    where = ["-d", daemon.host, "-p", str(daemon.port)] if tcp else ["-U", str(daemon.unix_path)]
    return subprocess.run([binary, *where, *args], input=data, capture_output=True, timeout=60)


# -- Debian's spamc ------------------------------------------------------------------------------


def test_spamc_check_exit_codes_unix_and_tcp(daemon: Daemon) -> None:
    proc = spamc(daemon, "-c", data=GTUBE_MSG)
    assert proc.returncode == 1 and proc.stdout.startswith(b"100") and proc.stdout.endswith(b"/5.0\n")
    proc = spamc(daemon, "-c", data=HAM_MSG, tcp=True)
    assert proc.returncode == 0, proc
    score, threshold = proc.stdout.decode().strip().split("/")
    assert float(score) < 5.0 and threshold == "5.0"


def test_spamc_process_default_and_exit_on_spam(daemon: Daemon) -> None:
    proc = spamc(daemon, data=GTUBE_MSG)
    assert proc.returncode == 0
    assert b"X-Spam-Flag: YES" in proc.stdout and b"x-spam-type=original" in proc.stdout
    assert GTUBE_MSG.split(b"\n\n", 1)[1] in proc.stdout  # the original is inside
    proc = spamc(daemon, "-E", data=GTUBE_MSG)
    assert proc.returncode == 1 and b"X-Spam-Flag: YES" in proc.stdout
    proc = spamc(daemon, "-E", data=HAM_MSG)
    assert proc.returncode == 0 and b"X-Spam-Status: No" in proc.stdout
    assert proc.stdout.endswith(HAM_MSG.split(b"\n\n", 1)[1])


def test_spamc_symbols_and_reports(daemon: Daemon) -> None:
    proc = spamc(daemon, "-y", data=GTUBE_MSG)
    assert b"GTUBE" in proc.stdout.split(b",") or proc.stdout.startswith(b"GTUBE")
    proc = spamc(daemon, "-R", data=GTUBE_MSG)
    first, _, rest = proc.stdout.partition(b"\n")
    assert first.endswith(b"/5.0") and b"Content analysis details:" in rest and b"GTUBE" in rest
    proc = spamc(daemon, "-r", data=GTUBE_MSG)
    assert b"Content analysis details:" in proc.stdout
    proc = spamc(daemon, "-r", data=HAM_MSG)
    assert b"Content analysis details:" not in proc.stdout


def test_spamc_headers_mode_keeps_the_original_body(daemon: Daemon) -> None:
    proc = spamc(daemon, "--headers", data=HAM_MSG)
    assert proc.returncode == 0
    head, _, body = proc.stdout.partition(b"\n\n")
    assert b"X-Spam-Status: No" in head
    assert body == HAM_MSG.split(b"\n\n", 1)[1]


MBOX_FROM = b"From a@b.example Mon Jan  1 00:00:00 2024\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_spamc_keeps_a_leading_mbox_from_line(daemon: Daemon, newline: bytes) -> None:
    """procmail's `:0fw | spamc` hands the mbox From_ line through and must get it back, first,
    as spamd gives it: in every report_safe mode (alice has 0, the default is 1) and in HEADERS."""
    separator = MBOX_FROM.replace(b"\n", newline)
    for data in (HAM_MSG, GTUBE_MSG):
        message = separator + data.replace(b"\n", newline)
        for args in ((), ("-u", "alice"), ("--headers",)):
            proc = spamc(daemon, *args, data=message)
            assert proc.returncode == 0, (args, proc.stderr)
            first, end, rest = proc.stdout.partition(newline)
            assert first + end == separator, (args, proc.stdout[:200])
            head = rest.partition(newline + newline)[0]
            assert b"X-Spam-Status: " in head, args
            assert proc.stdout.count(b"From a@b.example") == 1, args
    proc = spamc(daemon, "-c", data=separator + GTUBE_MSG.replace(b"\n", newline))
    assert proc.returncode == 1 and proc.stdout.startswith(b"100")  # the scan does not see the line


def test_spamc_user_preferences_and_names_that_cannot_name_a_file(daemon: Daemon) -> None:
    proc = spamc(daemon, "-c", "-u", "alice", data=HAM_MSG)
    assert proc.returncode == 1 and proc.stdout.endswith(b"/-50.0\n")  # alice's own threshold
    proc = spamc(daemon, "-u", "alice", data=GTUBE_MSG)
    assert b"X-Spam-Report:" in proc.stdout and b"x-spam-type=original" not in proc.stdout  # report_safe 0
    blocked = HAM_MSG.replace(b"From: ", b"From: someone@example.com\nX-Old-From: ", 1)
    proc = spamc(daemon, "-y", "-u", "bob", data=blocked)
    assert b"USER_IN_BLOCKLIST" in proc.stdout
    # As spamd with an unknown user: scanned with the global settings (no file is read for it).
    reply = daemon.request(b"CHECK SPAMC/1.5\r\nUser: ../../etc/passwd\r\nContent-length: 5\r\n\r\nhello")
    assert reply.startswith(b"SPAMD/1.1 0 EX_OK\r\n") and b"/ 5.0" in reply


def test_spamc_size_limit_passes_big_mail_unchanged(daemon: Daemon) -> None:
    big = HAM_MSG + b"x" * 5000 + b"\n"
    proc = spamc(daemon, "-s", "1000", data=big)
    assert proc.returncode == 0 and proc.stdout == big


def test_spamc_learn_is_refused_without_allow_tell(daemon: Daemon) -> None:
    proc = spamc(daemon, "-L", "spam", data=GTUBE_MSG)
    assert proc.returncode != 0
    reply = daemon.request(b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 2\r\n\r\nhi")
    assert reply.startswith(b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled")


def test_spamc_falls_back_when_the_daemon_is_down(tmp_path: Path) -> None:
    binary = need_binary("spamc")
    proc = subprocess.run([binary, "-U", str(tmp_path / "nobody.sock")], input=HAM_MSG, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == HAM_MSG


# -- PyPI's aiospamc -------------------------------------------------------------------------------


def test_aiospamc_every_verb(daemon: Daemon) -> None:
    async def run() -> None:
        kw = {"host": daemon.host, "port": daemon.port}
        pong = await aiospamc.ping(**kw)
        assert pong.status_code == 0
        for compress in (False, True):
            r = await aiospamc.check(GTUBE_MSG, compress=compress, **kw)
            assert r.headers.spam.value is True and r.headers.spam.score >= 1000
            r = await aiospamc.symbols(GTUBE_MSG, compress=compress, **kw)
            assert "GTUBE" in r.body.decode().split(",")
            r = await aiospamc.report(GTUBE_MSG, compress=compress, **kw)
            assert b"Content analysis details" in r.body
            r = await aiospamc.report_if_spam(HAM_MSG, compress=compress, **kw)
            assert r.body == b""
            r = await aiospamc.process(GTUBE_MSG, compress=compress, **kw)
            assert b"X-Spam-Flag: YES" in r.body
            r = await aiospamc.frontend.headers(HAM_MSG, compress=compress, **kw)
            assert b"X-Spam-Status: No" in r.body and r.body.endswith(b"\n\n")
        with pytest.raises(aiospamc.responses.UnavailableException):
            await aiospamc.tell(GTUBE_MSG, "spam", set_action="local", **kw)
        r = await aiospamc.check(HAM_MSG, socket_path=daemon.unix_path, user="carol")
        assert r.headers.spam.value is False

    asyncio.run(run())


# -- protocol errors, limits, metrics ------------------------------------------------------------------


def test_bad_requests_get_protocol_errors(daemon: Daemon) -> None:
    assert daemon.request(b"FROB SPAMC/1.5\r\n\r\n").startswith(b"SPAMD/1.0 76 Bad header line: FROB SPAMC/1.5")
    assert daemon.request(b"CHECK SPAMC/1.5\r\nContent-length: x\r\n\r\n").startswith(b"SPAMD/1.0 76 ")
    assert daemon.request(b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n\r\nshort").startswith(b"SPAMD/1.0 76 ")
    assert daemon.request(b"").startswith(b"SPAMD/1.0 76 Bad header line: (closed before headers)")


def test_idle_client_times_out_and_others_are_served(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, config="daemon:\n  idle_timeout: 500ms\n  read_timeout: 2s\n", workers=1, metrics=False)
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(d.unix_path))
        slow.sendall(b"CHECK SPAMC/1.5\r\n")  # and then nothing
        assert d.request(b"PING SPAMC/1.5\r\n\r\n").startswith(b"SPAMD/1.5 0 PONG")  # not blocked by it
        slow.settimeout(10)
        assert slow.recv(200).startswith(b"SPAMD/1.0 79 Timeout")
        slow.close()
    finally:
        assert d.stop() == 0


def test_tcp_clients_outside_allowed_ips_are_refused(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, config="daemon:\n  allowed_ips: [127.0.0.1/32]\n", workers=1, metrics=False)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(10)
        sock.connect((d.host, d.port))
        sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with our request unread: also a refusal
            answer = b""
        assert answer == b""
        sock.close()
        d.wait_for_log(r"refused connection from 127\.0\.0\.2")
        assert d.request(b"PING SPAMC/1.5\r\n\r\n", unix=False).startswith(b"SPAMD/1.5 0 PONG")
    finally:
        assert d.stop() == 0


def test_metrics_and_healthz(daemon: Daemon) -> None:
    daemon.request(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(GTUBE_MSG) + GTUBE_MSG)
    time.sleep(1.5)  # workers report about once a second
    base = f"http://127.0.0.1:{daemon.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"ok\n"
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'filterd_messages_total{verdict="spam"}' in text
    assert 'filterd_rule_hits_total{rule="GTUBE"}' in text
    assert 'filterd_scan_seconds_bucket{le="+Inf"}' in text and "filterd_worker_restarts_total" in text


def test_one_log_line_per_message(daemon: Daemon) -> None:
    daemon.request(b"SYMBOLS SPAMC/1.5\r\nUser: dave\r\nContent-length: %d\r\n\r\n" % len(GTUBE_MSG) + GTUBE_MSG)
    m = daemon.wait_for_log(
        r"msgid=<gtube@example\.org> user=dave score=[\d.]+/5\.0 verdict=spam hits=\S*GTUBE\S* "
        r"time=[\d.]+ms size=\d+"
    )
    assert m


# -- workers, reload, shutdown ---------------------------------------------------------------------------------


def _metric(daemon: Daemon, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def _worker_pids(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_dead_worker_is_replaced(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, workers=2)
    try:
        victim = _worker_pids(d.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        d.wait_for_log(rf"worker {victim} died \(signal 9\)")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(_worker_pids(d.proc.pid)) < 2 or victim in _worker_pids(d.proc.pid)):
            time.sleep(0.1)
        assert len(_worker_pids(d.proc.pid)) == 2
        assert _metric(d, "filterd_worker_restarts_total") == 1
        assert d.request(b"PING SPAMC/1.5\r\n\r\n").startswith(b"SPAMD/1.5 0 PONG")
    finally:
        assert d.stop() == 0


def test_sighup_reloads_rules_and_a_bad_reload_keeps_the_old_generation(tmp_path: Path) -> None:
    rules = tmp_path / "local-rules"
    rules.mkdir()
    cfg_text = f"rules:\n  extra_dirs: [{rules}]\n"
    d = start_daemon(tmp_path, config=cfg_text, workers=2)
    cfg = next(tmp_path.glob("run*/filterd.yaml"))
    probe = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(HAM_MSG) + HAM_MSG
    try:
        assert b"LOCAL_LUNCH" not in d.request(probe)
        (rules / "50_local.yaml").write_text("LOCAL_LUNCH: {body: '/lunch/i', describe: local rule, score: 0.5}\n")
        d.signal(signal.SIGHUP)
        d.wait_for_log(r"reload done: generation 2")
        deadline = time.monotonic() + 20
        while b"LOCAL_LUNCH" not in d.request(probe) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"LOCAL_LUNCH" in d.request(probe)
        (rules / "60_broken.yaml").write_text("BROKEN: {body: '/(/', describe: x}\n")
        d.signal(signal.SIGHUP)
        d.wait_for_log(r"reload failed, generation 2 keeps serving")
        assert "60_broken.yaml:1: BROKEN: bad regex" in d.log()
        assert b"LOCAL_LUNCH" in d.request(probe)
        cfg.write_text(cfg_text + "scoring:\n  required_score: banana\n")
        (rules / "60_broken.yaml").unlink()
        d.signal(signal.SIGHUP)
        d.wait_for_log(r"reload failed, generation 2 keeps serving", count=2)
        assert _metric(d, 'filterd_reloads_total{result="failed"}') == 2
    finally:
        assert d.stop() == 0


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, workers=1, metrics=False)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(d.unix_path))
    request = b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(GTUBE_MSG) + GTUBE_MSG
    sock.sendall(request[:20])  # in flight when the stop comes
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    sock.sendall(request[20:])
    sock.settimeout(20)
    reply = b""
    with sock:
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 10")
    assert d.proc.wait(30) == 0
    assert not d.unix_path.exists()


def test_load_5000_messages_64_connections_with_a_reload(tmp_path: Path) -> None:
    """Bounded load: 5,000 requests, 64 at a time, SIGHUP half-way: none fails, all well formed."""
    d = start_daemon(tmp_path, workers=2)
    samples = [p.read_bytes() for p in sorted((ROOT / "corpora").rglob("*.eml"))]
    total, concurrency = 5000, 64
    results: list[bytes] = []
    failures: list[str] = []

    async def one(i: int) -> None:
        body = samples[i % len(samples)]
        method = ("CHECK", "SYMBOLS", "PROCESS", "HEADERS", "REPORT")[i % 5]
        req = f"{method} SPAMC/1.5\r\nContent-length: {len(body)}\r\n\r\n".encode() + body
        try:
            reader, writer = (
                await asyncio.wait_for(asyncio.open_unix_connection(str(d.unix_path)), 30)
                if i % 2
                else await asyncio.wait_for(asyncio.open_connection(d.host, d.port), 30)
            )
            writer.write(req)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 60)
            writer.close()
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
            return
        head, sep, rest = reply.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        ok = lines[0] == b"SPAMD/1.1 0 EX_OK" and sep and any(x.startswith(b"Spam: ") for x in lines)
        if ok and method != "CHECK":
            length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"Content-length:")), -1)
            ok = length == len(rest)
        if not ok:
            failures.append(f"{i}: {reply[:120]!r}")
        results.append(reply)

    async def run() -> None:
        queue = iter(range(total))
        reloaded = False

        async def lane() -> None:
            nonlocal reloaded
            for i in queue:
                if i >= total // 2 and not reloaded:
                    reloaded = True
                    d.signal(signal.SIGHUP)
                await one(i)

        async with asyncio.timeout(600):
            await asyncio.gather(*(lane() for _ in range(concurrency)))

    started = time.monotonic()
    try:
        asyncio.run(run())
        elapsed = time.monotonic() - started
        d.wait_for_log(r"reload done: generation 2")
    finally:
        code = d.stop()
    assert not failures, failures[:10]
    assert len(results) == total and code == 0
    print(
        f"\n{total} requests in {elapsed:.1f}s ({total / elapsed:.0f}/s) at concurrency {concurrency}, reload mid-way"
    )


def test_limits_pid_file_socket_mode_and_unscanned_big_mail(tmp_path: Path) -> None:
    pid_file = tmp_path / "filterd.pid"
    d = start_daemon(
        tmp_path,
        "--pid-file",
        str(pid_file),
        config="rules:\n  max_scan_size: 2K\ndaemon:\n  max_connections: 1\n  socket_mode: '0600'\n",
        workers=1,
        metrics=False,
    )
    try:
        assert pid_file.read_text().strip() == str(d.proc.pid)
        assert oct(d.unix_path.stat().st_mode & 0o777) == "0o600"
        big = GTUBE_MSG + b"filler line\n" * 400
        reply = d.request(b"PROCESS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(big) + big)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Spam: False ; 0.0 / 5.0" in head and body == big  # too big to scan: back unchanged
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(str(d.unix_path))
        holder.sendall(b"CHECK SPAMC/1.5\r\n")  # holds the only connection slot
        # A second client waits (the worker accepts nothing more, as spamd leaves it in the listen
        # backlog): no answer, no refusal while the slot is held; served once it frees.
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(str(d.unix_path))
        waiting.sendall(b"PING SPAMC/1.5\r\n\r\n")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(100)
        waiting.settimeout(30)
        holder.close()
        assert waiting.recv(100).startswith(b"SPAMD/1.5 0 PONG")
        waiting.close()
    finally:
        assert d.stop() == 0
    assert not pid_file.exists()
