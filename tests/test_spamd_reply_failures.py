"""A failure of ours while answering is an answer too: EX_SOFTWARE, logged once, counted.

Without a status line spamc passes the message on unmarked (and `spamc -x` fails with a read
error), so an exception while building the reply must never just drop the connection.

No configuration makes the renderer fail for good (the reviewer's non-ASCII rewrite_subject was
markup's bug, fixed there), so the failures are injected: in-process with monkeypatch, and in a
real daemon process through a `sitecustomize` module on PYTHONPATH that wraps the renderer, the
service and the milter and policy handlers to raise on a marker. The daemon is otherwise the
real one, driven by Debian's spamc and raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import aiospamc
import pytest

import filterd.daemon.service as service_module
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.service import SpamdService
from tests.conftest import MakeEngine
from tests.daemon_fixture import Daemon, need_binary, start_daemon
from tests.spamd_helpers import spamd_request

RULES = r"""
OFFER: {body: '/offer/i', describe: an offer, score: 6.0}
"""
SPAM = b"From: x@example.net\nSubject: An offer\n\nAn offer you cannot refuse.\n"
GTUBE = (
    b"From: tester@example.org\nTo: admin@example.org\nSubject: reply failures\nMessage-ID: <rf@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
BROKEN_REPLY = b"SPAMD/1.0 70 Internal error: building the answer failed, see the daemon log\r\n"
NEVER_RETRIEVED = "Task exception was never retrieved"


# -- in-process: the service alone ---------------------------------------------------------------


@pytest.fixture
def service(make_engine: MakeEngine) -> SpamdService:
    engine = make_engine(RULES)
    return SpamdService(engine, engine.config, WorkerMetrics())


def _broken(*args: object, **kwargs: object) -> bytes:
    raise RuntimeError("renderer broken by the test")


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("method", "renderer"),
    [("PROCESS", "process_message"), ("HEADERS", "process_message"),
     ("REPORT", "build_report"), ("REPORT_IFSPAM", "build_report")],
)  # fmt: skip
def test_a_failing_renderer_is_answered_ex_software_logged_once_and_counted(
    service: SpamdService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, method: str, renderer: str
) -> None:
    monkeypatch.setattr(service_module, renderer, _broken)
    caplog.set_level(logging.INFO, logger="filterd")
    reply = asyncio.run(service.handle(spamd_request(method, SPAM)))
    assert reply == BROKEN_REPLY  # the status line and nothing after it, as spamd after an error
    assert service.metrics.errors == {"reply_failed": 1}
    assert not service.metrics.messages  # not counted as a verdict the client never got
    (record,) = _errors_logged(caplog)
    assert record.exc_info is not None and "renderer broken by the test" in str(record.exc_info[1])
    assert "user=alice" in record.getMessage() and "verdict=spam" in record.getMessage()
    assert f"building the {method} answer failed" in record.getMessage()
    # The same service goes on answering what it can render.
    ok = asyncio.run(service.handle(spamd_request("CHECK", SPAM)))
    assert ok.startswith(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; ")


def test_failures_before_and_in_the_scan_are_answered_ex_software_by_kind(
    service: SpamdService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="filterd")

    # In the scan: its own answer and count, as before.
    async def broken_scan(*args: object, **kwargs: object) -> None:
        raise RuntimeError("scan broken by the test")

    with monkeypatch.context() as mp:
        mp.setattr(service.engine, "scan", broken_scan)
        reply = asyncio.run(service.handle(spamd_request("PROCESS", SPAM)))
    assert reply == b"SPAMD/1.0 70 Internal error: the scan failed, see the daemon log\r\n"
    assert service.metrics.errors == {"scan_failed": 1}
    (record,) = _errors_logged(caplog)
    assert record.exc_info is not None and "scan broken by the test" in str(record.exc_info[1])

    # Before the scan and outside its try: what the client says about the connection.
    def broken_context(*args: object, **kwargs: object) -> None:
        raise ValueError("context broken by the test")

    # The worker answers those for the connection (the daemon tests below), not the service.
    caplog.clear()
    monkeypatch.setattr(service_module, "_connection_context", broken_context)
    with pytest.raises(ValueError, match="context broken by the test"):
        asyncio.run(service.handle(spamd_request("SYMBOLS", SPAM)))
    assert service.metrics.errors == {"scan_failed": 1}
    assert not _errors_logged(caplog)


# -- a real daemon, faults injected through sitecustomize ----------------------------------------

SITECUSTOMIZE = '''
"""Test fault injection for tests/test_spamd_reply_failures.py (loaded through PYTHONPATH)."""
import filterd.daemon.milter_service as milter_service
import filterd.daemon.policy_service as policy_service
import filterd.daemon.service as service

_process_message = service.process_message
_connection_context = service._connection_context


def process_message(engine, result, options):
    if result.message.get("x-break").strip() == "renderer":
        raise RuntimeError("renderer broken by the test")
    return _process_message(engine, result, options)


def connection_context(headers, *, user, prefs):
    if user == "break-the-service":
        raise RuntimeError("service broken by the test")
    return _connection_context(headers, user=user, prefs=prefs)


async def serve(self, *args, **kwargs):
    raise RuntimeError(type(self).__name__ + " broken by the test")


service.process_message = process_message
service._connection_context = connection_context
milter_service.MilterService.serve = serve
policy_service.PolicyService.serve = serve
'''


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("reply_failures")
    inject = tmp / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", path)
        # One worker: what keeps serving after a failure is the worker that had it.
        d = start_daemon(tmp, "--milter-listen", "127.0.0.1:0", "--policy-listen", "127.0.0.1:0", workers=1)
    yield d
    assert d.stop() == 0, d.log()


def spamc(daemon: Daemon, *args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    binary = need_binary("spamc")
    return subprocess.run([binary, "-U", str(daemon.unix_path), *args], input=data, capture_output=True, timeout=60)


def errors_metric(daemon: Daemon, kind: str, expected: int) -> float:
    """filterd_errors_total for ``kind``, once it reaches ``expected`` (workers report each second)."""
    deadline = time.monotonic() + 15
    value = 0.0
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'filterd_errors_total{{kind="{kind}"}} '):
                    value = float(line.rsplit(" ", 1)[1])
        if value >= expected:
            break
        time.sleep(0.2)
    return value


def still_serving(daemon: Daemon) -> None:
    assert daemon.request(b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n"
    proc = spamc(daemon, "-c", data=GTUBE)
    assert proc.returncode == 1 and proc.stdout.startswith(b"100"), proc


def test_spamc_gets_an_error_not_silence_when_the_reply_cannot_be_built(daemon: Daemon) -> None:
    broken = GTUBE.replace(b"\n\n", b"\nX-Break: renderer\n\n", 1)
    raw = daemon.request(b"PROCESS SPAMC/1.5\r\nContent-length: %d\r\n\r\n%b" % (len(broken), broken))
    assert raw == BROKEN_REPLY
    # aiospamc reads the code: the exception for EX_SOFTWARE, not a broken connection.
    with pytest.raises(aiospamc.responses.InternalSoftwareException):
        asyncio.run(aiospamc.process(broken, socket_path=daemon.unix_path))
    # libspamc does not look at the code of a PROCESS answer: `spamc -x` reports the read that
    # found no headers (EX_IOERR) as for a dropped connection, and without -x it hands the
    # message back unchanged. What changed for spamc is the daemon's side: logged and counted.
    proc = spamc(daemon, "-x", data=broken)
    assert proc.returncode == 74 and proc.stdout == b"", proc
    # The rest of what the daemon does is unaffected: CHECK renders no message.
    proc = spamc(daemon, "-c", data=broken)
    assert proc.returncode == 1 and proc.stdout.startswith(b"100"), proc
    proc = spamc(daemon, data=GTUBE)  # and an unbroken PROCESS is marked up
    assert proc.returncode == 0 and b"X-Spam-Flag: YES" in proc.stdout, proc
    daemon.wait_for_log(r"building the PROCESS answer failed", count=3)
    log = daemon.log()
    assert log.count("RuntimeError: renderer broken by the test") == 3  # one traceback each, no more
    assert NEVER_RETRIEVED not in log
    assert errors_metric(daemon, "reply_failed", 3) == 3
    still_serving(daemon)


def test_an_unexpected_failure_in_the_service_is_answered_and_the_worker_goes_on(daemon: Daemon) -> None:
    reply = daemon.request(
        b"CHECK SPAMC/1.5\r\nUser: break-the-service\r\nContent-length: %d\r\n\r\n%b" % (len(GTUBE), GTUBE)
    )
    assert reply == b"SPAMD/1.0 70 Internal error: see the daemon log\r\n"
    proc = spamc(daemon, "-c", "-u", "break-the-service", data=GTUBE)
    assert proc.stdout == b"0/0\n", proc  # spamc's word for "no verdict": it read an error, not silence
    daemon.wait_for_log(r"spamd connection from unix: internal error, answering EX_SOFTWARE", count=2)
    log = daemon.log()
    assert log.count("RuntimeError: service broken by the test") == 2
    assert NEVER_RETRIEVED not in log
    assert errors_metric(daemon, "internal", 2) == 2
    still_serving(daemon)


@pytest.mark.parametrize("protocol", ["milter", "policy"])
def test_a_failing_milter_or_policy_connection_is_closed_logged_and_counted(daemon: Daemon, protocol: str) -> None:
    port = int(daemon.wait_for_log(rf"listening for {protocol} on 127\.0\.0\.1:(\d+)").group(1))
    if protocol == "milter":  # SMFIC_OPTNEG, version 6, all actions and protocol steps offered
        hello = struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF)
    else:
        hello = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=bob@local.test\n\n"
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(hello)
        with contextlib.suppress(ConnectionResetError):  # closed with our request unread
            while chunk := sock.recv(65536):
                received += chunk
    assert received == b""  # closed, and not a byte outside the protocol's framing
    service = "MilterService" if protocol == "milter" else "PolicyService"
    daemon.wait_for_log(rf"{protocol} connection from 127\.0\.0\.1: internal error, closing")
    log = daemon.log()
    assert log.count(f"RuntimeError: {service} broken by the test") == 1
    assert NEVER_RETRIEVED not in log
    assert errors_metric(daemon, f"{protocol}_internal", 1) == 1
    still_serving(daemon)
