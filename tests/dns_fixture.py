"""Real DNS servers on loopback for tests: Knot DNS (`knotd`) serving test zones, a proxy that
delays every answer, and a server that never answers (or answers SERVFAIL / REFUSED).

Tests never query the system resolver: every object here is a nameserver at `.address`/`.port`
(`.spec` is "ADDR:PORT"), and `.resolver()` / `.async_resolver()` build dnspython resolvers
pointed at it and nothing else.

Use the fixtures from a test module with `pytest_plugins = ["tests.dns_fixture"]` (pytest does not
rewrite this module's asserts, PYTEST_DONT_REWRITE, so importing names from it too is fine):

    def test_mx(make_dns_server: MakeDnsServer) -> None:
        server = make_dns_server({"example.com": "@ MX 10 mx\\nmx A 192.0.2.25"})
        answer = server.resolver().resolve("example.com", "MX")
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.zone
import pytest

from tests._servers import bind_retrying, read_log, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary

Records = str | Sequence[str]
"""A zone's records in RFC 1035 master-file syntax: one text (lines, dedented) or one record per item."""

Delay = float | Callable[[dns.message.Message], float]
"""Seconds to hold each answer back, or a function of the query giving them."""

DEFAULT_TTL = 60
SOA_MNAME = "ns.invalid."
SOA_RNAME = "hostmaster.invalid."
READY_TIMEOUT = 10.0

T = TypeVar("T")


# --- zone files and knotd configuration -----------------------------------------------------------


def absolute_name(name: str) -> str:
    """`Example.COM` or `example.com.` -> `example.com.`; the root stays `.`."""
    name = name.strip().lower().rstrip(".")
    return f"{name}." if name else "."


def zone_file_name(zone: str) -> str:
    """The file a zone is written to: `example.com.zone`, `root.zone` for the root."""
    zone = absolute_name(zone)
    return "root.zone" if zone == "." else f"{zone[:-1]}.zone"


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_CHAR = re.compile(r"\\\d{3}|\\.|.", re.DOTALL)
_UNQUOTED_TXT = re.compile(r"^(?P<head>\S*(?:\s+(?:\d\w*|IN))*\s+(?:TXT|SPF)\s+)(?P<data>[^\s\"(].*)$", re.IGNORECASE)


def split_character_string(content: str) -> str:
    """Quote the content of one master-file string, split into strings of at most 255 bytes
    (what a TXT record holds: a DKIM key is several). Escapes (`\\"`, `\\123`) are never cut."""
    chunks: list[str] = []
    chunk, size = "", 0
    for char in _CHAR.findall(content):
        width = 1 if char.startswith("\\") else len(char.encode())
        if size + width > 255:
            chunks.append(chunk)
            chunk, size = "", 0
        chunk += char
        size += width
    chunks.append(chunk)
    return " ".join(f'"{c}"' for c in chunks)


def prepare_record(line: str) -> str:
    """One master-file line as knotd needs it: a TXT/SPF record whose data has no quotes is
    taken whole as one string (so `_dmarc TXT v=DMARC1; p=reject` keeps its `;`), and quoted
    strings longer than 255 bytes are split into several."""
    if m := _UNQUOTED_TXT.match(line.rstrip()):
        data = m["data"].strip().replace('"', '\\"')
        line = f'{m["head"]}"{data}"'
    return _QUOTED.sub(lambda q: split_character_string(q[1]) if len(q[1]) > 255 else q[0], line)


def record_lines(records: Records) -> list[str]:
    """A zone's records as lines: a text is dedented and split into lines (blank ones dropped),
    a sequence gives one record per item."""
    if isinstance(records, str):
        lines = textwrap.dedent(records).splitlines()
    else:
        lines = [line for item in records for line in item.strip().splitlines()]
    return [prepare_record(line) for line in lines if line.strip()]


def zone_file_text(zone: str, records: Records, *, serial: int, ttl: int = DEFAULT_TTL) -> str:
    """A complete RFC 1035 zone file: `$ORIGIN`, `$TTL`, an SOA (negative answers cached for 1 s)
    and an NS at the apex, then the records, whose relative names are relative to the zone."""
    origin = absolute_name(zone)
    head = [
        f"$ORIGIN {origin}",
        f"$TTL {ttl}",
        f"@ SOA {SOA_MNAME} {SOA_RNAME} {serial} 3600 600 86400 1",
        f"@ NS {SOA_MNAME}",
    ]
    return "\n".join([*head, *record_lines(records)]) + "\n"


def check_zone_text(zone: str, text: str) -> None:
    """Parse a zone file with dnspython so that a mistake fails here, naming the line, instead
    of as a zone knotd silently refuses to load."""
    try:
        dns.zone.from_text(text, origin=absolute_name(zone), relativize=False, check_origin=True)
    except dns.exception.DNSException as exc:
        numbered = "\n".join(f"{n:4} {line}" for n, line in enumerate(text.splitlines(), 1))
        raise ValueError(f"zone {absolute_name(zone)}: {exc}\n{numbered}") from exc


def knot_config(
    *, directory: Path, control_socket: Path, address: str, port: int, zone_files: Mapping[str, Path]
) -> str:
    """A knotd configuration that needs no root: run and storage directories of its own, a
    control socket for knotc, one listening address, stderr logging, unsigned primary zones read
    whole from their files at each load and never written back (no journal)."""
    zones = "".join(f'  - domain: "{absolute_name(z)}"\n    file: "{f}"\n' for z, f in zone_files.items())
    return (
        "server:\n"
        f'    rundir: "{directory}"\n'
        f"    listen: {address}@{port}\n"
        "    udp-workers: 2\n"
        "    tcp-workers: 2\n"
        "    background-workers: 1\n"
        "log:\n"
        "  - target: stderr\n"
        "    any: info\n"
        "database:\n"
        f'    storage: "{directory}"\n'
        "control:\n"
        f'    listen: "{control_socket}"\n'
        "template:\n"
        "  - id: default\n"
        f'    storage: "{directory}"\n'
        "    zonefile-sync: -1\n"
        "    zonefile-load: whole\n"
        "    journal-content: none\n"
        "zone:\n" + zones
    )


def sbin_program(name: str) -> str:
    """A program that may sit in /usr/sbin, off a non-root user's PATH; missing fails the test."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    return path or need_binary(name)


def free_port(address: str) -> int:
    """A port free for both UDP and TCP on `address` (a DNS server listens on both)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp, socket.socket(family, socket.SOCK_STREAM) as tcp:
            udp.bind((address, 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind((address, port))
            except OSError:
                continue
            return port
    raise OSError(f"no port free for both UDP and TCP on {address}")


# --- anything that answers DNS --------------------------------------------------------------------


class Nameserver:
    """A DNS server at `address`:`port`, with dnspython clients that ask it and only it."""

    address: str
    port: int

    @property
    def spec(self) -> str:
        """`ADDR:PORT` (`[ADDR]:PORT` for IPv6)."""
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    def resolver(self, *, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A synchronous resolver using only this server (no system configuration, no cache)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.address]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = lifetime
        return resolver

    def async_resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """An asyncio resolver using only this server (no system configuration, no cache)."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.address]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = lifetime
        return resolver

    def query(self, name: str, rdtype: str = "A", *, tcp: bool = False, timeout: float = 2.0) -> dns.message.Message:
        """One raw query, the whole response back whatever its rcode."""
        request = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(request, self.address, timeout=timeout, port=self.port)
        return dns.query.udp(request, self.address, timeout=timeout, port=self.port)


# --- knotd ----------------------------------------------------------------------------------------


class DnsServer(Nameserver):
    """Knot DNS serving the given zones on `address`:`port`, authoritative and unsigned.

    `set_zone` replaces or adds a zone while it runs; `stop` and `start` take it down and bring
    it back on the same port. `close` (or leaving a `with` block) stops it for good."""

    def __init__(
        self, directory: Path, zones: Mapping[str, Records], *, address: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.knotd = sbin_program("knotd")
        self.knotc = sbin_program("knotc")
        self.directory = directory
        self.address = address
        self.port = port
        self.log_path = directory / "knotd.log"
        self.config_path = directory / "knot.conf"
        self.control_socket = directory / "knot.sock"
        self._socket_dir: Path | None = None
        if len(os.fsencode(self.control_socket)) > 100:  # sun_path holds 108 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="knot-"))
            self.control_socket = self._socket_dir / "knot.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._serial = 0
        self.zones: dict[str, int] = {}  # zone -> serial of its file
        for zone, records in zones.items():
            self._write_zone(zone, records)

    # zone files

    def _write_zone(self, zone: str, records: Records) -> int:
        self._serial += 1
        text = zone_file_text(zone, records, serial=self._serial)
        check_zone_text(zone, text)
        (self.directory / zone_file_name(zone)).write_text(text)
        self.zones[absolute_name(zone)] = self._serial
        return self._serial

    def _write_config(self) -> None:
        files = {zone: self.directory / zone_file_name(zone) for zone in self.zones}
        self.config_path.write_text(
            knot_config(
                directory=self.directory,
                control_socket=self.control_socket,
                address=self.address,
                port=self.port,
                zone_files=files,
            )
        )

    def set_zone(self, zone: str, records: Records) -> None:
        """Replace a zone's records, or add a zone; when this returns, the server answers from them."""
        zone = absolute_name(zone)
        new = zone not in self.zones
        serial = self._write_zone(zone, records)
        if self.running:
            if new:
                self._write_config()
                self._knotc("reload")
            else:
                self._knotc("zone-reload", zone)
            self._wait_for_zone(zone, serial)

    def remove_zone(self, zone: str) -> None:
        """Stop serving a zone (its queries get REFUSED)."""
        zone = absolute_name(zone)
        del self.zones[zone]
        (self.directory / zone_file_name(zone)).unlink()
        if self.running:
            self._write_config()
            self._knotc("reload")
            self._wait_for_zone(zone, None)

    # the process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything knotd wrote to stderr, across restarts."""
        return read_log(self.log_path)

    def start(self) -> None:
        """Start knotd (on the same port after a `stop`) and wait until every zone answers."""
        if not self.running:
            self.port = bind_retrying(
                self.port, self._launch, self.stop, self.log, name="knotd", address=self.address, pick=free_port
            )

    def _launch(self, port: int) -> None:
        self.port = port
        self._write_config()
        self.proc = spawn([self.knotd, "-c", str(self.config_path)], self.log_path, append=True)
        for zone, serial in self.zones.items():
            self._wait_for_zone(zone, serial)

    def stop(self) -> None:
        """Stop knotd; `start` brings it back on the same port with the same zones."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def close(self) -> None:
        """Stop knotd for good."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _knotc(self, *command: str) -> None:
        args = [self.knotc, "-c", str(self.config_path), "-s", str(self.control_socket), "-t", "10", "-b", *command]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"knotc {' '.join(command)} failed: {done.stdout}{done.stderr}\n{self.log()}")

    def _wait_for_zone(self, zone: str, serial: int | None, timeout: float = READY_TIMEOUT) -> None:
        """Poll the zone's SOA over UDP until it has `serial` (None: until the zone is gone)."""
        assert self.proc is not None

        def served() -> bool:
            try:
                response = self.query(zone, "SOA", timeout=0.2)
            except dns.exception.Timeout:
                return False
            soa = [rr.serial for rrset in response.answer for rr in rrset if rrset.rdtype == dns.rdatatype.SOA]
            if serial is None:
                return response.rcode() != dns.rcode.NOERROR
            return response.rcode() == dns.rcode.NOERROR and soa == [serial]

        want = "gone" if serial is None else f"serial {serial}"
        wait_until(
            served, self.proc, name=f"knotd on {self.spec}", waiting_for=f"serve zone {zone} ({want})", log=self.log,
            timeout=timeout, interval=0.01,
        )  # fmt: skip


def start_dns_server(
    tmp_path: Path, zones: Mapping[str, Records], *, address: str = "127.0.0.1", port: int = 0
) -> DnsServer:
    """Start knotd on `address` (any 127.x.y.z; port 0 picks a free one) serving `zones`
    (`{"example.com": records}`; SOA and NS are added) and return it once every zone answers.

    Records are master-file lines, relative to the zone or absolute: A, AAAA, MX, TXT, CNAME,
    PTR... A TXT string longer than 255 bytes (a DKIM key) is split for you; TXT data without
    quotes is one string, `;` included. Its files live in a new directory under `tmp_path`."""
    directory = Path(tempfile.mkdtemp(prefix="knot", dir=tmp_path))
    server = DnsServer(directory, zones, address=address, port=port)
    server.start()
    return server


# --- servers on a background event loop ---------------------------------------------------------


class _LoopThread:
    """An asyncio event loop running in a daemon thread, usable from sync and async tests alike."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _query_key(wire: bytes) -> tuple[dns.message.Message | None, tuple[str, str] | None]:
    try:
        message = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None, None
    if not message.question:
        return message, None
    question = message.question[0]
    return message, (question.name.to_text(), dns.rdatatype.to_text(question.rdtype))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Any], None]) -> None:
        self.received = received
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # 3.11's selector datagram transport does not derive from DatagramTransport; it has sendto.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients or the upstream: the query is simply not answered


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[bytes | None]) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_result(None)


class DelayingDnsProxy(Nameserver):
    """A forwarder (UDP and TCP) to `upstream` that holds every answer back `delay` seconds after
    the query arrived, each query on its own: 10 queries sent together all come back after about
    one delay, not ten. `delay` may be changed while it runs, or be a function of the query.

    `queries` lists (name, type) of every query received, e.g. `("www.example.com.", "A")`.
    A query the upstream does not answer within `upstream_timeout` is dropped.

    To show that a client sends queries concurrently without timing it: `in_flight` counts the
    queries received and not yet answered (or dropped), `peak_in_flight` the most at once, and
    `arrived` / `answered` hold the `time.monotonic()` of each query's arrival and of each answer
    sent. `peak_in_flight == len(queries)` means every query arrived before the first answer left:
    none of them waited for another's answer."""

    def __init__(
        self,
        upstream: Nameserver | tuple[str, int],
        *,
        delay: Delay = 0.05,
        address: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout: float = 5.0,
    ) -> None:
        self.upstream = (upstream.address, upstream.port) if isinstance(upstream, Nameserver) else upstream
        self.delay = delay
        self.upstream_timeout = upstream_timeout
        self.queries: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.arrived: list[float] = []
        self.answered: list[float] = []
        self.address = address
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._thread = _LoopThread("dns-delaying-proxy")
        try:
            self.port = self._thread.call(self._open(port))
        except BaseException:
            self._thread.close()
            raise

    async def _open(self, port: int) -> int:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._received_udp), local_addr=(self.address, port)
            )
            self._udp = transport
            bound: int = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.address, bound)
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            return bound
        raise OSError(f"no port free for both UDP and TCP on {self.address}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _note(self, wire: bytes) -> float:
        """Record the query (it is in flight until `_done`); the seconds its answer waits."""
        self.arrived.append(time.monotonic())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        message, key = _query_key(wire)
        if key is not None:
            self.queries.append(key)
        delay = self.delay
        if callable(delay):
            return delay(message) if message is not None else 0.0
        return delay

    def _done(self, answered: bool) -> None:
        """A query stops being in flight: answered, or dropped."""
        if answered:
            self.answered.append(time.monotonic())
        self.in_flight -= 1

    def _received_udp(self, data: bytes, addr: Any) -> None:
        async def send(answer: bytes, answered: Callable[[], None]) -> None:
            if self._udp is not None:
                answered()
                self._udp.sendto(answer, addr)

        self._spawn(self._answer(data, self._forward_udp, send))

    async def _answer(
        self,
        data: bytes,
        forward: Callable[[bytes], Awaitable[bytes | None]],
        send: Callable[[bytes, Callable[[], None]], Awaitable[None]],
    ) -> None:
        """Forward one query, hold its answer back until its delay is up, and send it. ``send``
        calls ``answered`` just before the answer leaves (a client holding it already sees it
        counted); a query that never got that far counts as dropped."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self._note(data)
        counted = False

        def answered() -> None:
            nonlocal counted
            self._done(answered=True)
            counted = True

        try:
            answer = await forward(data)
            if answer is None:
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            await send(answer, answered)
        finally:
            if not counted:
                self._done(answered=False)

    async def _forward_udp(self, data: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes | None] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _OneAnswer(answer), remote_addr=self.upstream)
        try:
            transport.sendto(data)
            return await asyncio.wait_for(answer, self.upstream_timeout)
        except TimeoutError:
            return None
        finally:
            transport.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lock = asyncio.Lock()
        pending: list[asyncio.Task[None]] = []
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                pending.append(self._spawn(self._answer_tcp(await reader.readexactly(size), writer, lock)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        await asyncio.gather(*pending, return_exceptions=True)
        writer.close()

    async def _answer_tcp(self, data: bytes, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        async def send(answer: bytes, answered: Callable[[], None]) -> None:
            async with lock:
                answered()
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()

        await self._answer(data, self._forward_tcp, send)

    async def _forward_tcp(self, data: bytes) -> bytes | None:
        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(*self.upstream)
            try:
                writer.write(len(data).to_bytes(2, "big") + data)
                size = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(size)
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(exchange(), self.upstream_timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None

    async def _shutdown(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    def close(self) -> None:
        """Stop listening; answers still held back are never sent."""
        if self._thread.thread.is_alive():
            self._thread.call(self._shutdown())
        self._thread.close()

    def __enter__(self) -> DelayingDnsProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SilentDnsServer(Nameserver):
    """A UDP socket on loopback standing for a broken DNS server. `mode="silent"` receives queries
    and never answers (a dead or blackholed server: clients time out); any rcode name
    (`"servfail"`, `"refused"`, `"nxdomain"`...) answers every query with that rcode at once.
    `mode` may be changed while it runs; `queries` lists (name, type) of every query received,
    `arrived` the `time.monotonic()` at which each arrived."""

    def __init__(self, mode: str = "silent", *, address: str = "127.0.0.1", port: int = 0) -> None:
        self.mode = mode
        self.address = address
        self.queries: list[tuple[str, str]] = []
        self.arrived: list[float] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._thread = _LoopThread("dns-silent-server")
        try:
            self.port = self._thread.call(self._open(port))
        except BaseException:
            self._thread.close()
            raise

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._rcode = None if mode == "silent" else dns.rcode.from_text(mode.upper())
        self._mode = mode

    async def _open(self, port: int) -> int:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(self._received), local_addr=(self.address, port)
        )
        self._udp = transport
        bound: int = transport.get_extra_info("sockname")[1]
        return bound

    def _received(self, data: bytes, addr: Any) -> None:
        self.arrived.append(time.monotonic())
        message, key = _query_key(data)
        if key is not None:
            self.queries.append(key)
        if self._rcode is None or message is None or self._udp is None:
            return
        response = dns.message.make_response(message)
        response.set_rcode(self._rcode)
        self._udp.sendto(response.to_wire(), addr)

    async def _shutdown(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def close(self) -> None:
        if self._thread.thread.is_alive():
            self._thread.call(self._shutdown())
        self._thread.close()

    def __enter__(self) -> SilentDnsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- pytest fixtures ------------------------------------------------------------------------------


class MakeDnsServer(Protocol):
    def __call__(self, zones: Mapping[str, Records], *, address: str = "127.0.0.1") -> DnsServer: ...


class MakeDelayingProxy(Protocol):
    def __call__(
        self, upstream: Nameserver | tuple[str, int], *, delay: Delay = 0.05, address: str = "127.0.0.1"
    ) -> DelayingDnsProxy: ...


class MakeSilentDnsServer(Protocol):
    def __call__(self, mode: str = "silent", *, address: str = "127.0.0.1") -> SilentDnsServer: ...


def _dns_server_factory(tmp_path: Path) -> Iterator[MakeDnsServer]:
    sbin_program("knotd")
    sbin_program("knotc")
    servers: list[DnsServer] = []

    def make(zones: Mapping[str, Records], *, address: str = "127.0.0.1") -> DnsServer:
        server = start_dns_server(tmp_path, zones, address=address)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def make_dns_server(tmp_path: Path) -> Iterator[MakeDnsServer]:
    """Start knotd servers for one test (see `start_dns_server`); all stopped when it ends."""
    yield from _dns_server_factory(tmp_path)


@pytest.fixture(scope="session")
def make_session_dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeDnsServer]:
    """Like `make_dns_server`, for module- or session-scoped fixtures: the servers live until
    the session ends, so tests sharing one must not change its zones."""
    yield from _dns_server_factory(tmp_path_factory.mktemp("dns"))


@pytest.fixture
def make_delaying_proxy() -> Iterator[MakeDelayingProxy]:
    """Start `DelayingDnsProxy`s for one test; all closed when it ends."""
    proxies: list[DelayingDnsProxy] = []

    def make(
        upstream: Nameserver | tuple[str, int], *, delay: Delay = 0.05, address: str = "127.0.0.1"
    ) -> DelayingDnsProxy:
        proxies.append(DelayingDnsProxy(upstream, delay=delay, address=address))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def make_silent_dns_server() -> Iterator[MakeSilentDnsServer]:
    """Start `SilentDnsServer`s for one test; all closed when it ends."""
    servers: list[SilentDnsServer] = []

    def make(mode: str = "silent", *, address: str = "127.0.0.1") -> SilentDnsServer:
        servers.append(SilentDnsServer(mode, address=address))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
