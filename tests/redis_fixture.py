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

import itertools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._servers import free_port, greeting, read_log, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary

READY_TIMEOUT = 10.0


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at host:port (inline command, no client library)."""
    return greeting(host, port, send=b"PING\r\n", timeout=timeout, size=64).startswith(b"+PONG")


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, persisting nothing, with its files in `directory`."""

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.binary = need_binary("redis-server")
        self.directory = directory
        self.port = 0
        self.log_path = directory / "redis.log"
        self.output_path = directory / "redis.out"  # what it printed before its log was open
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
        return read_log(self.log_path, self.output_path)

    def start(self) -> None:
        """Start (or restart after `stop`, on a new port) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a port found free may be taken before the server binds it
            self.port = free_port(self.host)
            # fmt: off
            argv = [
                self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.log_path),
                "--daemonize", "no", "--protected-mode", "no",
            ]  # fmt: on
            proc = spawn(argv, self.output_path, append=True)
            try:
                wait_until(
                    lambda: ping(self.host, self.port, timeout=0.5), proc, name="redis-server",
                    waiting_for="answer PING", log=self.log, timeout=READY_TIMEOUT, interval=0.02,
                )  # fmt: skip
            except AssertionError:
                stop_process(proc)
                continue
            self.proc = proc
            return
        raise AssertionError(f"redis-server did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


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
