"""Start a real `filterd daemon` in a subprocess on loopback / a Unix socket, for tests."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from filterd.mta.milter_client import MessageEdits, MilterSession, Verdict
from tests._servers import spawn, stop_process, wait_for_log, wait_until


def need_binary(name: str) -> str:
    """The path of a program the test needs. A missing one fails the test, never skips it:
    scripts/run-tests installs every peer, so its absence is a broken set-up to see."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/run-tests installs it with apt-get")
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    unix_path: Path
    host: str = ""
    port: int = 0
    metrics_port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout)

    def request(self, data: bytes, *, unix: bool = True, timeout: float = 30) -> bytes:
        """One raw spamd exchange: send, half-close, read to EOF."""
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = str(self.unix_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (self.host, self.port)
        sock.settimeout(timeout)
        with sock:
            sock.connect(address)  # type: ignore[arg-type]
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def wait_for_log(self, pattern: str, timeout: float = 30, count: int = 1) -> re.Match[str]:
        return wait_for_log(self.proc, self.log, pattern, name="daemon", timeout=timeout, count=count)

    def milter_port(self) -> int:
        """The port of a milter listener started with ``--milter-listen 127.0.0.1:0``."""
        return int(self.wait_for_log(r"listening for milter on 127\.0\.0\.1:(\d+)").group(1))


def start_daemon(tmp_path: Path, *args: str, config: str = "", workers: int = 2, metrics: bool = True) -> Daemon:
    """Start the daemon on a Unix socket and an ephemeral loopback TCP port; wait until ready."""
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    run.mkdir()
    unix_path = run / "spamd.sock"
    cfg = run / "filterd.yaml"
    if "network:" not in config and "dns:" not in config:
        config = "network: {enabled: false}\n" + config  # never the system resolver in tests
    cfg.write_text(config)
    log_path = run / "daemon.log"
    cmd = [
        sys.executable,
        "-m",
        "filterd",
        "daemon",
        "--config",
        str(cfg),
        "--state-dir",
        str(run / "state"),
        "--listen",
        str(unix_path),
        "--listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
        *args,
    ]
    if metrics:
        cmd += ["--metrics-listen", "127.0.0.1:0"]
    daemon = Daemon(spawn(cmd, log_path), log_path, unix_path)
    try:
        m = daemon.wait_for_log(r"listening for spamd on 127\.0\.0\.1:(\d+)")
        daemon.host, daemon.port = "127.0.0.1", int(m.group(1))
        if metrics:
            daemon.metrics_port = int(daemon.wait_for_log(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
        daemon.wait_for_log(r"filterd daemon ready")
        wait_until(  # the workers accept once their loops run
            lambda: daemon.request(b"PING SPAMC/1.5\r\n\r\n", timeout=5).startswith(b"SPAMD/1.5 0 PONG"),
            daemon.proc, name="daemon", waiting_for="answer PING", log=daemon.log,
        )  # fmt: skip
    except BaseException:
        daemon.stop()
        raise
    return daemon


def milter_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A one-worker daemon with its milter on a loopback port (`Daemon.milter_port`), for a
    module-scoped fixture to ``yield from``; stopped cleanly afterwards."""
    d = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", workers=1, metrics=False)
    yield d
    assert d.stop() == 0, d.log()


def through_milter(daemon: Daemon, data: bytes, *, client: str, queue_id: str) -> tuple[Verdict, MessageEdits]:
    """One message from alice@sender.test to bob@local.test through the daemon's milter on
    loopback (started with ``--milter-listen 127.0.0.1:0``), as an MTA connected from ``client``
    would send it; the end-of-message verdict and the edits asked for."""
    port = daemon.milter_port()

    async def session() -> tuple[Verdict, MessageEdits]:
        s = MilterSession(f"127.0.0.1:{port}", connect_timeout=10, timeout=60)
        try:
            assert (await s.connect(client, 4711, "mail.sender.test", {"j": "mx.local.test"})).kind == "continue"
            assert (await s.helo("mail.sender.test", {})).kind == "continue"
            assert (await s.mail("alice@sender.test", [], {})).kind == "continue"
            assert (await s.rcpt("bob@local.test", [], {"i": queue_id})).kind == "continue"
            assert (await s.data({})).kind == "continue"
            return await s.message(data, {"i": queue_id})
        finally:
            await s.close()

    return asyncio.run(session())
