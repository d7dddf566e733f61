"""What every fixture that runs a real server needs: a free loopback port, starting a process
with its output in a log file, waiting until it answers (or says so in its log), and stopping it.

PYTEST_DONT_REWRITE: plain asserts are not used here; failures raise AssertionError with the
server's log, so that a broken set-up reads like a failed test.

    proc = spawn([binary, "-c", str(conf)], tmp / "server.log")
    try:
        wait_until(lambda: greeting("127.0.0.1", port).startswith(b"220"), proc, name="server",
                   waiting_for=f"answer on port {port}", log=lambda: read_log(tmp / "server.log"))
    except BaseException:
        stop_process(proc)
        raise

Every process started with `spawn` (or handed to `track`) is killed when the interpreter exits
if nothing stopped it, so an interrupted session leaves no servers behind.
"""

from __future__ import annotations

__all__ = [
    "bind_retrying",
    "free_port",
    "greeting",
    "read_log",
    "spawn",
    "stop_process",
    "track",
    "wait_for_log",
    "wait_until",
]

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_running: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)  # a test may have paused it
        proc.kill()


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``address`` right now (someone may still take it before
    the server binds it: see `bind_retrying`)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def greeting(host: str, port: int, *, send: bytes = b"", timeout: float = 1.0, size: int = 200) -> bytes:
    """The first bytes a TCP server at host:port says (after ``send``); b"" if it does not answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(size)
    except OSError:
        return b""


def read_log(*paths: Path) -> str:
    """The files that exist among ``paths``, joined (a server's log and what it printed)."""
    return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Kill ``proc`` at exit unless `stop_process` stopped it first."""
    _running.add(proc)
    return proc


def spawn(
    argv: Sequence[str], log_path: Path, *, append: bool = False, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdin from /dev/null and stdout and stderr into ``log_path`` (appended
    to with ``append``, across restarts); tracked until `stop_process`."""
    with log_path.open("ab" if append else "wb") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    return track(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _running.discard(proc)
    return proc.returncode


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    *,
    name: str,
    waiting_for: str,
    log: Callable[[], str],
    timeout: float = 30,
    interval: float = 0.05,
) -> None:
    """Call ``ready`` until it returns True (an OSError counts as not yet). AssertionError with
    ``log()`` when ``proc`` exits first, or after ``timeout`` seconds: "NAME did not WAITING_FOR"."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited ({proc.returncode}):\n{log()}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not {waiting_for} within {timeout}s:\n{log()}")
        time.sleep(interval)


def wait_for_log(
    proc: subprocess.Popen[bytes],
    log: Callable[[], str],
    pattern: str,
    *,
    name: str,
    timeout: float = 30,
    count: int = 1,
) -> re.Match[str]:
    """The ``count``-th match of ``pattern`` in ``log()``, once there is one (see `wait_until`)."""
    matches: list[re.Match[str]] = []

    def logged() -> bool:
        matches[:] = re.finditer(pattern, log())
        return len(matches) >= count

    wait_until(logged, proc, name=name, waiting_for=f"log {pattern!r}", log=log, timeout=timeout)
    return matches[count - 1]


def bind_retrying(
    port: int,
    launch: Callable[[int], None],
    stop: Callable[[], None],
    log: Callable[[], str],
    *,
    name: str,
    address: str,
    pick: Callable[[str], int] = free_port,
) -> int:
    """Run ``launch(port)`` (start the server on ``port`` and wait until it answers, raising
    AssertionError if it does not); the port it runs on. With ``port`` 0 one is picked, and picked
    again (5 tries) when the server logs that someone took it between the pick and its bind."""
    for _ in range(5 if port == 0 else 1):
        chosen = port == 0
        if chosen:
            port = pick(address)
        mark = len(log())
        try:
            launch(port)
            return port
        except AssertionError:
            stop()
            if not (chosen and "already in use" in log()[mark:]):
                raise
            port = 0
    raise AssertionError(f"{name} could not bind a port on {address}:\n{log()}")
