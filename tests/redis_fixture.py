"""A real `redis-server` on loopback for tests: no persistence, its files in a temporary directory.

Use the fixtures from a test module with ``pytest_plugins = ["tests.redis_fixture"]`` (asserts
here are not rewritten, PYTEST_DONT_REWRITE, so importing names from it too is fine):

    def test_shared(redis_server: RedisServer) -> None:     # one server for the whole session
        store = RedisStateStore(redis_server.url, key_prefix=redis_server.unique_prefix())

    def test_outage(make_redis_server: MakeRedisServer) -> None:   # a server of the test's own
        server = make_redis_server()
        server.stop()

A missing redis-server binary fails the test (`need_binary`): scripts/run-tests installs it.
"""

from __future__ import annotations

import atexit
import itertools
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_fixture import need_binary

READY_TIMEOUT = 10.0

_running: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        proc.kill()


def free_tcp_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at host:port (inline command, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, persisting nothing, with its files in `directory`."""

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.binary = need_binary("redis-server")
        self.directory = directory
        self.port = 0
        self.log_path = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._prefixes = itertools.count(1)
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def unique_prefix(self) -> str:
        """A key prefix no other user of this server has: tests sharing one server stay apart."""
        return f"test{next(self._prefixes)}:"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start (or restart after `stop`, on a new port) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a port found free may be taken before the server binds it
            self.port = free_tcp_port(self.host)
            # fmt: off
            argv = [
                self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.log_path),
                "--daemonize", "no", "--protected-mode", "no",
            ]  # fmt: on
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _running.add(proc)
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                if ping(self.host, self.port, timeout=0.5):
                    self.proc = proc
                    return
                time.sleep(0.02)
            self._end(proc)
        raise AssertionError(f"redis-server did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            self._end(self.proc)
            self.proc = None

    @staticmethod
    def _end(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        _running.discard(proc)


MakeRedisServer = Callable[[], RedisServer]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; tests keep apart with `RedisServer.unique_prefix`."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[MakeRedisServer]:
    """Start servers of the test's own (stopped in teardown)."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}")
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
