"""A worker process: one asyncio loop serving many spamd, milter and policy connections with one
engine (the milter and the policy service live in milter_service.py and policy_service.py).

CPU work (parsing, rules) runs inline and is short; network checks are awaited, so one slow
lookup never holds up other messages. Every read has an idle timeout and the whole request a
read timeout; a client gets the same read timeout to take each answer, else it is dropped.
SIGTERM stops accepting and lets the connections in flight finish within the grace period. A
worker whose master has gone away exits by itself.

``daemon.max_connections`` bounds the connections a worker holds of each protocol (spamd,
milter, policy) on its own: MTAs keep milter and policy connections for whole SMTP sessions, and
they must not lock spamd clients out, nor the other way round. A worker at the limit stops
accepting that protocol until one closes: new clients wait in the kernel's listen backlog or
another worker takes them, as with spamd's own children. Nothing is refused for being one too
many; the connections accepted at shutdown (already waiting in the backlog) may go past it.

A failure of ours while serving a connection (a bug: the services answer their own errors) is
logged once with its traceback, counted, and ends that connection only: a spamd client still gets
an EX_SOFTWARE status line; a milter or policy client gets nothing more (never a stray byte
between the milter's framed packets) and the connection is closed, which its MTA treats as the
filter failing (milter_default_action, a retried policy lookup).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Sequence

from filterd.config import Config
from filterd.daemon.listeners import Listener
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.milter_service import MilterService
from filterd.daemon.policy_service import PolicyService
from filterd.daemon.service import SpamdService
from filterd.engine.engine import Engine
from filterd.errors import RemoteProtocolError
from filterd.greylist import Greylist
from filterd.protocols.spamd import (
    EX_SOFTWARE,
    EX_TIMEOUT,
    NEED_DATA,
    SpamdRequest,
    SpamdServerConnection,
    render_error,
)
from filterd.state import StateStore, open_state_store
from filterd.streams import WriteTimeout, close, drain

__all__ = ["Worker"]

log = logging.getLogger("filterd.daemon")

_MAINTAIN_FIRST = 10.0  # seconds: the latest first look at the Bayes store's upkeep
_MAINTAIN_INTERVAL = 60.0  # seconds between a worker's looks at whether Bayes expiry is due
# Seconds, past the grace period: how long the Bayes writer gets to finish what it holds, then how
# long TELLs whose learning it committed meanwhile get to send their answers. The master kills
# a worker 5 s after the grace period.
_WRITER_STOP_WAIT = 2.0
_LAST_ANSWERS_WAIT = 0.5


class Worker:
    """Serves spamd on inherited listening sockets until told to stop."""

    def __init__(self, engine: Engine, config: Config, listeners: Sequence[Listener], report_fd: int | None) -> None:
        self.engine = engine
        self.config = config
        self.listeners = listeners
        self.report_fd = report_fd
        self.metrics = WorkerMetrics()
        self.service = SpamdService(engine, config, self.metrics)
        # The store opens nothing until its first use, in this process.
        self.store: StateStore | None = open_state_store(config, config.state_path) if config.greylist.enabled else None
        greylist = Greylist.from_config(config, self.store) if self.store is not None else None
        self.milter = MilterService(
            engine, config, self.metrics, greylist=greylist, prefs=self.service.prefs, scans=self.service.scans
        )
        self.policy = PolicyService(config, self.metrics, greylist=greylist, prefs=self.service.prefs)
        self._open: Counter[str] = Counter()  # connections held, by protocol (max_connections each)
        self._reading: set[int] = set()  # the listening sockets we accept on now
        self._backoff: set[int] = set()  # ... and those resting after a failed accept
        self._allowed = [ipaddress.ip_network(n) for n in config.daemon.allowed_ips]
        self._stopping: asyncio.Event | None = None
        self._parent = os.getppid()
        self._tasks: set[asyncio.Task[None]] = set()
        self._upkeep: asyncio.Task[int | None] | None = None  # the Bayes expiry, in its thread

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master reloads, not us
        self._update_readers()
        reporter = asyncio.create_task(self._report_loop())
        await self._stopping.wait()
        self._update_readers()  # stop accepting; the master keeps the sockets open for the next generation
        log.info("worker %d: stopping; %d connection(s) in flight", os.getpid(), len(self._tasks))
        upkeep = self._upkeep
        if upkeep is not None:
            upkeep.cancel()  # interrupts an expiry running in its thread; what it committed stays
        self._take_pending()
        grace = self.config.daemon.grace_period
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self.active:
            log.warning(
                "worker %d: %d connection(s) still open after the %.0fs grace period", os.getpid(), self.active, grace
            )
        reporter.cancel()
        # Bayes writes left (autolearn, TELLs waiting for a lock) get a last few seconds, after
        # which nothing more commits: a TELL is either answered or not learnt.
        await asyncio.gather(
            asyncio.wait([upkeep]) if upkeep is not None else asyncio.sleep(0),  # the expiry's thread lets go
            self.engine.stop_learning(_WRITER_STOP_WAIT),
        )
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_LAST_ANSWERS_WAIT)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        self._report()

    @property
    def active(self) -> int:
        """Connections open now, all protocols."""
        return sum(self._open.values())

    def _update_readers(self) -> None:
        """Accept on a listening socket while the worker is not stopping, the socket is not resting
        after a failed accept, and fewer than max_connections of its protocol are open."""
        loop = asyncio.get_running_loop()
        stopping = self._stopping is None or self._stopping.is_set()
        limit = self.config.daemon.max_connections
        for listener in self.listeners:
            fd = listener.sock.fileno()
            wanted = not stopping and fd not in self._backoff and self._open[listener.protocol] < limit
            if wanted and fd not in self._reading:
                loop.add_reader(fd, self._accept_one, listener)
                self._reading.add(fd)
            elif not wanted and fd in self._reading:
                loop.remove_reader(fd)
                self._reading.discard(fd)

    def _accept_one(self, listener: Listener) -> None:
        """Take one connection per readiness event, then let handlers run.

        asyncio's own server accepts every pending connection at once, so with several workers
        on one socket whichever wakes first hoards the queue while the others idle; one at a
        time, a worker busy scanning leaves new connections to an idle one. A plain reader
        callback (not an awaited accept) also means a connection is never accepted and then
        dropped by a cancellation at shutdown.
        """
        try:
            conn, _ = listener.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off, keep listening
            log.error("accept on %s failed: %s; pausing 100 ms", listener.bound, exc)
            fd = listener.sock.fileno()
            self._backoff.add(fd)
            self._update_readers()

            def resume() -> None:
                self._backoff.discard(fd)
                self._update_readers()

            asyncio.get_running_loop().call_later(0.1, resume)
            return
        self._spawn(conn, listener)

    def _spawn(self, conn: socket.socket, listener: Listener) -> None:
        """Serve ``conn``; it counts against max_connections from now until it is closed."""
        conn.setblocking(False)
        protocol = listener.protocol
        self._open[protocol] += 1
        if self._open[protocol] >= self.config.daemon.max_connections:
            self._update_readers()

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._open[protocol] -= 1
            self._update_readers()
            if not task.cancelled() and (exc := task.exception()) is not None:  # _connection let it out
                log.error("%s connection task failed", protocol, exc_info=exc)

        task = asyncio.create_task(self._socket(conn, listener))
        self._tasks.add(task)
        task.add_done_callback(done)

    def _take_pending(self) -> None:
        """Serve the connections already waiting in the backlog: their clients have connected."""
        for listener in self.listeners:
            for _ in range(self.config.daemon.max_connections):
                try:
                    conn, _ = listener.sock.accept()
                except OSError:  # BlockingIOError: nothing more is waiting
                    break
                self._spawn(conn, listener)

    async def _socket(self, conn: socket.socket, listener: Listener) -> None:
        try:
            if listener.address.is_unix:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=65536)
            else:
                reader, writer = await asyncio.open_connection(sock=conn, limit=65536)
        except OSError:
            conn.close()
            return
        await self._connection(reader, writer, listener.protocol)

    async def _report_loop(self) -> None:
        # Workers look at Bayes upkeep at different moments: the first a few seconds after start
        # (a store may be overdue), then about a minute apart. The look is cheap (one row or one
        # key read, on this loop); an expiry that is due runs in a thread with its own connection
        # (seconds on a big store), one at a time, while this loop goes on serving. A worker that
        # finds it due while another's runs drops what that one has not, and stops once it is done.
        maintain_at = time.monotonic() + random.uniform(1.0, _MAINTAIN_FIRST)
        while True:
            await asyncio.sleep(1.0)
            self._report()
            stopping = self._stopping is not None and self._stopping.is_set()
            if time.monotonic() >= maintain_at and not stopping:
                if self._upkeep is None or self._upkeep.done():
                    self._upkeep = asyncio.create_task(self.engine.maintain_bayes())
                maintain_at = time.monotonic() + _MAINTAIN_INTERVAL * random.uniform(0.8, 1.2)
            if os.getppid() != self._parent:  # the master died: nobody supervises us any more
                log.error("worker %d: master is gone, exiting", os.getpid())
                assert self._stopping is not None
                self._stopping.set()

    def _report(self) -> None:
        if self.report_fd is None:
            return
        if self.engine.resolver is not None:
            self.metrics.observe_dns(self.engine.resolver)
        for protocol in {listener.protocol for listener in self.listeners}:
            self.metrics.connections[protocol] = self._open[protocol]
        for kind, count in (("autolearn_failed", self.engine.autolearn_failed),
                            ("autolearn_skipped", self.engine.autolearn_skipped)):  # fmt: skip
            if count:
                self.metrics.errors[kind] = count
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(self.report_fd, self.metrics.snapshot())

    def _allowed_peer(self, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        peer = writer.get_extra_info("peername")
        if not isinstance(peer, tuple):  # Unix socket: file permissions decide
            return True, "unix"
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False, str(peer[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._allowed), str(ip)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str = "spamd"
    ) -> None:
        """Serve one connection and close it; the time a client has to take what we write is
        daemon.read_timeout, as for sending its request, past which it is dropped."""
        write_timeout = self.config.daemon.read_timeout
        allowed, peer = self._allowed_peer(writer)
        try:
            if not allowed:
                self.metrics.refused += 1
                log.warning("refused connection from %s (%s): not in daemon.allowed_ips", peer, protocol)
            elif protocol == "milter":
                await self.milter.serve(reader, writer, peer)
            elif protocol == "policy":
                assert self._stopping is not None
                await self.policy.serve(reader, writer, peer, self._stopping)
            else:
                try:
                    reply, whole = await self._exchange(reader)
                except OSError:
                    raise
                except Exception:
                    self.metrics.errors["internal"] += 1
                    log.exception("spamd connection from %s: internal error, answering EX_SOFTWARE", peer)
                    reply, whole = render_error(EX_SOFTWARE, "Internal error: see the daemon log"), False
                if not whole:  # an error before the request was read to its end, or ours
                    await self._refuse(reader, writer, reply)
                elif reply:
                    writer.write(reply)
                    await drain(writer, write_timeout)
        except WriteTimeout as exc:
            self.metrics.errors["write_timeout"] += 1
            log.warning("%s connection from %s dropped: %s", protocol, peer, exc)
        except (ConnectionError, OSError) as exc:
            log.info("%s connection from %s lost: %s", protocol, peer, exc)
        except Exception:  # a bug: this connection ends, the worker goes on serving the others
            self.metrics.errors["internal" if protocol == "spamd" else f"{protocol}_internal"] += 1
            log.exception("%s connection from %s: internal error, closing", protocol, peer)
        finally:
            if not await close(writer, write_timeout):
                self.metrics.errors["write_timeout"] += 1
                log.warning("%s connection from %s dropped: the peer did not take our last bytes", protocol, peer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes) -> None:
        """Answer and close without a reset: closing with the request unread would send an RST
        that can overtake the answer, so the request is read and dropped first (for 1 s at most)."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            writer.write(reply)
            await drain(writer, self.config.daemon.read_timeout)
            writer.write_eof()
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass

    async def _exchange(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """Read one request and answer it; the flag says whether the request was read whole."""
        d = self.config.daemon
        conn = SpamdServerConnection(max_body_size=d.max_request_size)
        deadline = time.monotonic() + d.read_timeout
        try:
            while True:
                event = conn.next_event()
                if event is not NEED_DATA:
                    break
                remaining = min(d.idle_timeout, deadline - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    data = await reader.read(65536)
                conn.receive_data(data)
        except RemoteProtocolError as exc:
            self.metrics.errors["protocol"] += 1
            log.info("protocol error: %s", exc)
            return exc.reply or render_error(76, f"Bad header line: {exc}"), False
        except TimeoutError:
            self.metrics.errors["timeout"] += 1
            return render_error(EX_TIMEOUT, "Timeout: (the client sent nothing for too long)"), False
        assert isinstance(event, SpamdRequest)
        return await self.service.handle(event), True
