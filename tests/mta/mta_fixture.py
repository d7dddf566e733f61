"""Start a real `filterd mta` in a subprocess on loopback, for tests; and what its tests share."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filterd.mta.queue import Envelope, Queue


@dataclass
class Mta:
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def queue(self) -> Queue:
        return Queue(self.state_dir / "queue")

    def queued(self, state: str = "incoming") -> list[tuple[Envelope, bytes]]:
        q = self.queue
        out = []
        for qid in q.ids(state):  # type: ignore[arg-type]
            envelope, path = q.load(qid)
            out.append((envelope, path.read_bytes()))
        return out

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log()):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"filterd mta exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the mta log after {timeout}s:\n{self.log()}")


def start_mta(
    tmp_path: Path, *args: str, config: str = "", deliver: bool = False, state_dir: Path | None = None
) -> Mta:
    """`filterd mta` on an ephemeral loopback port (queue only unless ``deliver``); waits until ready.
    ``state_dir``: reuse one (a restart after a crash)."""
    run = tmp_path / f"mta{len(list(tmp_path.glob('mta*')))}"
    run.mkdir()
    cfg = run / "filterd.yaml"
    cfg.write_text("network: {enabled: false}\n" + config)
    log_path = run / "mta.log"
    cmd = [
        sys.executable,
        "-m",
        "filterd",
        "mta",
        "--config",
        str(cfg),
        "--state-dir",
        str(state_dir or run / "state"),
        "--listen",
        "127.0.0.1:0",
        "--hostname",
        "mx.test",
        *(() if deliver else ("--no-deliver",)),
        *args,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    mta = Mta(proc, log_path, state_dir or run / "state")
    mta.port = int(mta.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)\n").group(1))
    mta.wait_for_log(r"filterd mta: ready")
    return mta


def make_cert(directory: Path, name: str = "mx.test") -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl for this test run."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
