"""Helpers the benchmark and evaluation scripts share (not part of the filterd package)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
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


def start_filterd(
    workers: int, tmp: Path, *extra: str, local: bool = True, name: str = "filterd"
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `filterd daemon` on a free loopback port; its log goes to tmp/NAME.log.

    ``local`` (the default) turns network checks off: corpus runs judge text, not today's DNS.
    """
    port = free_port()
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "filterd",
            "daemon",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--state-dir",
            str(tmp / f"{name}-state"),
            *(["--local"] if local else []),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
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


@dataclass
class Run:
    concurrency: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def drive(port: int, messages: list[bytes], concurrency: int, method: str) -> Run:
    latencies: list[float] = []
    failures = 0
    queue = iter(messages)

    async def lane() -> None:
        nonlocal failures
        for body in queue:
            request = f"{method} SPAMC/1.5\r\nUser: bench\r\nContent-length: {len(body)}\r\n\r\n".encode() + body
            started = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 120)
                writer.close()
            except (OSError, TimeoutError):
                failures += 1
                continue
            if not reply.startswith(b"SPAMD/1.1 0 EX_OK"):
                failures += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return Run(concurrency, time.perf_counter() - started, latencies, failures)
