"""Helpers the benchmark and evaluation scripts share (not part of the filterd package)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin"
_X_SPAM = re.compile(rb"^X-Spam-[^:]*:.*\n(?:[ \t].*\n)*", re.M | re.I)


def strip_x_spam(data: bytes) -> bytes:
    """Remove top-level X-Spam-* fields, as the corpus split's rules ask before scoring."""
    end = data.find(b"\n\n")
    head, body = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
    return _X_SPAM.sub(b"", head) + body


def corpus_rows(corpus: Path, part: str) -> list[tuple[str, str]]:
    """(path relative to the corpus, label) of one part of split.tsv."""
    rows = [line.split("\t") for line in (corpus / "split.tsv").read_text().splitlines()[1:]]
    return [(path, label) for path, label, where in rows if where == part]


def load_corpus(corpus: Path, part: str, limit: int = 0) -> list[bytes]:
    rows = corpus_rows(corpus, part)
    if limit:
        rows = rows[:limit]
    return [strip_x_spam((corpus / path).read_bytes()) for path, _ in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            return s.recv(100).startswith(b"SPAMD/1.5 0 PONG")
    except OSError:
        return False


def start_filterd(workers: int, tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start `filterd daemon` on a free loopback port; its log goes to tmp/filterd.log."""
    port = free_port()
    log = (tmp / "filterd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "filterd", "daemon", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
         "--state-dir", str(tmp / "state"), "--local", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    return proc, port


def wait_ready(proc: subprocess.Popen[bytes], port: int, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with status {proc.returncode} before answering")
        if ping(port):
            return
        time.sleep(0.2)
    raise SystemExit(f"{name} did not answer PING within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
