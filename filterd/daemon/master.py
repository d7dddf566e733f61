"""The master process: opens the listening sockets, forks workers, watches, reloads, stops.

The master loads the configuration and the engine itself before forking, so a broken rule
set is caught before any worker exists, and workers start in milliseconds sharing the loaded
engine copy-on-write. SIGHUP builds a new generation the same way: if it loads, new workers
start accepting first and the old ones are then told to drain (their in-flight scans finish
on the old rules); if it fails, the old generation keeps serving and the log says why.
SIGTERM drains every worker within the grace period and exits. A worker that dies is
replaced (with a pause if it keeps dying at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from filterd.config import Config
from filterd.daemon.listeners import Listener, open_listener, parse_address
from filterd.daemon.metrics import Aggregate, render_prometheus
from filterd.daemon.worker import Worker
from filterd.engine.engine import Engine
from filterd.errors import ConfigError, RuleError

__all__ = ["Master"]

log = logging.getLogger("filterd.daemon")


@dataclass(slots=True)
class _Child:
    pid: int
    generation: int
    started: float
    report_fd: int
    buffer: bytearray = field(default_factory=bytearray)
    stopping: bool = False


class Master:
    """Supervises worker processes; ``load`` builds (config, engine) for a generation."""

    def __init__(self, load: Callable[[], tuple[Config, Engine]], *, workers: int | None = None) -> None:
        self._load = load
        self._workers_override = workers
        self.config, self.engine = load()
        self.generation = 1
        self.listeners: list[Listener] = []
        self.children: dict[int, _Child] = {}
        self.metrics = Aggregate()
        self._stop: asyncio.Event | None = None
        self._metrics_server: asyncio.Server | None = None
        self._respawn_at: float = 0.0

    @property
    def worker_count(self) -> int:
        n = self._workers_override or self.config.daemon.workers
        return n or os.cpu_count() or 1

    def open_listeners(self) -> None:
        d = self.config.daemon
        wanted = _listen_addresses(self.config)
        if not any(wanted.values()):
            wanted["spamd"] = ["127.0.0.1:783"]  # nothing asked for: spamd on its usual port
        for protocol, addresses in wanted.items():
            for text in addresses:
                listener = open_listener(
                    parse_address(text), mode=d.socket_mode, owner=d.socket_owner, group=d.socket_group,
                    protocol=protocol,
                )  # fmt: skip
                self.listeners.append(listener)
                log.info("listening for %s on %s", protocol, listener.bound)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        self.open_listeners()
        pid_file = self.config.daemon.pid_file
        if pid_file:
            _write_pid_file(pid_file)
        try:
            asyncio.run(self._main())
        finally:
            for listener in self.listeners:
                listener.close()
            if pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(pid_file)
        return 0

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        if self.config.daemon.metrics_listen:
            address = parse_address(self.config.daemon.metrics_listen)
            self._metrics_server = await asyncio.start_server(self._http, address.host, address.port)
            for sock in self._metrics_server.sockets:
                log.info("metrics on http://%s:%d/metrics", *sock.getsockname()[:2])
        for _ in range(self.worker_count):
            self._spawn()
        log.info(
            "filterd daemon ready: %d workers, generation %d, pid %d", self.worker_count, self.generation, os.getpid()
        )
        watchdog = asyncio.create_task(self._watch())
        await self._stop.wait()
        watchdog.cancel()
        await self._shutdown()

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            self._become_worker(write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        child = _Child(pid, self.generation, time.monotonic(), read_fd)
        self.children[pid] = child
        asyncio.get_running_loop().add_reader(read_fd, self._read_report, child)

    def _become_worker(self, report_fd: int) -> None:
        """In the forked child: shed the master's loop and signal set-up, then serve."""
        code = 0
        try:
            asyncio._set_running_loop(None)  # the master's loop is not ours
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for child in self.children.values():
                with contextlib.suppress(OSError):
                    os.close(child.report_fd)
            if self._metrics_server is not None:
                for sock in self._metrics_server.sockets:
                    with contextlib.suppress(OSError):
                        os.close(sock.fileno())
            os.set_blocking(report_fd, False)
            worker = Worker(self.engine, self.config, self.listeners, report_fd)
            profile_dir = os.environ.get("FILTERD_PROFILE_DIR")
            if profile_dir:  # for performance work: one cProfile dump per worker
                import cProfile

                cProfile.runctx(
                    "asyncio.run(worker.serve())",
                    globals(),
                    {"worker": worker, "asyncio": asyncio},
                    os.path.join(profile_dir, f"worker-{os.getpid()}.prof"),
                )
            else:
                asyncio.run(worker.serve())
        except BaseException:  # noqa: BLE001 - a worker must never return into the master's code
            log.exception("worker %d failed", os.getpid())
            code = 70
        finally:
            logging.shutdown()
            os._exit(code)

    def _read_report(self, child: _Child) -> None:
        try:
            data = os.read(child.report_fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(child.report_fd)
            return
        child.buffer += data
        while b"\n" in child.buffer:
            line, _, rest = bytes(child.buffer).partition(b"\n")
            child.buffer = bytearray(rest)
            self.metrics.update(child.pid, line)

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                self._read_report(child)
                loop.remove_reader(child.report_fd)
                os.close(child.report_fd)
            self.metrics.retire(pid)
            code = os.waitstatus_to_exitcode(status)
            if child.stopping or (self._stop is not None and self._stop.is_set()):
                log.info("worker %d (generation %d) exited", pid, child.generation)
                continue
            self.metrics.worker_restarts += 1
            log.error(
                "worker %d died (%s); starting a new one", pid, f"signal {-code}" if code < 0 else f"exit status {code}"
            )

    async def _watch(self) -> None:
        """Keep the current generation at full strength; pause if workers die at once."""
        while True:
            await asyncio.sleep(0.2)
            current = [c for c in self.children.values() if c.generation == self.generation and not c.stopping]
            missing = self.worker_count - len(current)
            if missing > 0 and time.monotonic() >= self._respawn_at:
                young = [c for c in current if time.monotonic() - c.started < 1.0]
                for _ in range(missing):
                    self._spawn()
                if young or missing == self.worker_count:
                    self._respawn_at = time.monotonic() + 1.0

    # -- reload and shutdown -----------------------------------------------------------------

    def _reload(self) -> None:
        log.info("SIGHUP: reloading configuration, rules and model")
        try:
            config, engine = self._load()
        except (ConfigError, RuleError, OSError) as exc:
            self.metrics.failed_reloads += 1
            log.error("reload failed, generation %d keeps serving:\n%s", self.generation, exc)
            return
        before, after = _listen_addresses(self.config), _listen_addresses(config)
        if any(sorted(before[p]) != sorted(after[p]) for p in before):
            log.warning("reload: listen addresses changed; they take effect at the next restart")
        old = [c for c in self.children.values() if not c.stopping]
        self.config, self.engine = config, engine
        self.generation += 1
        for _ in range(self.worker_count):
            self._spawn()  # new workers accept before the old ones stop
        for child in old:
            child.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        self.metrics.reloads += 1
        log.info("reload done: generation %d serving, %d old workers draining", self.generation, len(old))

    async def _shutdown(self) -> None:
        log.info("stopping: draining %d workers (grace %.0fs)", len(self.children), self.config.daemon.grace_period)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for child in self.children.values():
            child.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.daemon.grace_period + 5
        while self.children and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._reap()
        for child in list(self.children.values()):
            log.warning("worker %d did not stop in time; killing it", child.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        while self.children:
            await asyncio.sleep(0.05)
            self._reap()
        log.info("filterd daemon stopped")

    # -- /metrics and /healthz ------------------------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        parts = request.split(b"\r\n", 1)[0].split()
        path = parts[1].decode("ascii", "replace") if len(parts) >= 2 else ""
        alive = sum(1 for c in self.children.values() if c.generation == self.generation and not c.stopping)
        if path == "/metrics":
            body = render_prometheus(self.metrics, workers=alive, generation=self.generation)
            status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
        elif path == "/healthz":
            healthy = alive > 0
            body = b"ok\n" if healthy else b"no workers\n"
            status, ctype = ("200 OK" if healthy else "503 Service Unavailable"), "text/plain"
        else:
            body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()


def _listen_addresses(config: Config) -> dict[str, list[str]]:
    """Addresses to listen on, per protocol, each once."""
    return {
        "spamd": list(dict.fromkeys(config.daemon.listen)),
        "milter": list(dict.fromkeys(config.milter.listen)),
        "policy": list(dict.fromkeys(config.milter.policy_listen)),
    }


def _write_pid_file(path: str) -> None:
    """Write our PID, refusing to start when another live daemon holds the file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"pid file {path} is locked: another filterd daemon is running") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    # The descriptor stays open (and locked) for the life of the master; workers inherit it harmlessly.
