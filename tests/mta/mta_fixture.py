"""Start a real `filterd mta` in a subprocess on loopback, for tests; and what its tests share."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from filterd.mta.queue import Envelope, Queue
from tests._servers import spawn, stop_process, wait_for_log


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
        return stop_process(self.proc, timeout)

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        return wait_for_log(self.proc, self.log, pattern, name="filterd mta", timeout=timeout)


def start_mta(
    tmp_path: Path, *args: str, config: str = "", deliver: bool = False, state_dir: Path | None = None
) -> Mta:
    """`filterd mta` on an ephemeral loopback port (queue only unless ``deliver``); waits until ready.
    ``state_dir``: reuse one (a restart after a crash). Without a ``dns:`` section in ``config``
    (a test's DNS server) client names are not looked up: never the system resolver in tests."""
    run = tmp_path / f"mta{len(list(tmp_path.glob('mta*')))}"
    run.mkdir()
    cfg = run / "filterd.yaml"
    cfg.write_text("network: {enabled: false}\n" + config)
    (run / "local.d").mkdir()
    if "dns:" not in config:  # a layer of its own, so that it merges with the test's mta: section
        (run / "local.d" / "00-no-peername.yaml").write_text("mta: {peername_lookup: false}\n")
    if "mailbox" not in config:  # every local user exists (no home directory needed): none refused at RCPT
        (run / "local.d" / "01-any-user.yaml").write_text("mta: {mailbox: '{state_dir}/mail/{user}/'}\n")
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
    mta = Mta(spawn(cmd, log_path), log_path, state_dir or run / "state")
    try:
        mta.port = int(mta.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)\n").group(1))
        mta.wait_for_log(r"filterd mta: ready")
    except BaseException:
        mta.stop()
        raise
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
