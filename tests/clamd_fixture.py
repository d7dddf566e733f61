"""A real clamd on loopback for tests, with a signature database written here: no freshclam, no
network, a few milliseconds to load.

The database knows three test signatures (names as clamd reports them, `.UNOFFICIAL` appended
because they are not signed CVD files):

- `Eicar-Test-Signature`: MD5 hash of the exact 68-byte EICAR file (`test.hdb`);
- `Eicar-Test-String`: the EICAR string anywhere in any file (`test.ndb`);
- `Filterd.Test.Zip`: `ZIP_MARKER` in a file inside a zip archive, and only there (`test.ldb`,
  a logical signature restricted to the ZIP container): a hit proves clamd unpacked the zip.

Use the fixtures from a test module with `pytest_plugins = ["tests.clamd_fixture"]` (pytest does
not rewrite this module's asserts, PYTEST_DONT_REWRITE, so importing names from it is fine):

    def test_scan(clamd: Clamd) -> None:          # one clamd for the session: never stop or pause it
        config.antivirus.clamd = clamd.unix_spec  # or clamd.tcp_spec ("127.0.0.1:PORT")

    def test_down(make_clamd: MakeClamd) -> None:  # clamds of the test's own, stopped at its end
        server = make_clamd(stream_max_length="1M")
        with server.paused():                     # SIGSTOP: connects, never answers
            ...
        server.stop()                             # socket gone, port closed

clamd runs as the user running the tests (no `User` line: as root it simply stays root, which
clamd accepts). A missing clamd fails the test (scripts/run-tests installs it), never skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests._servers import bind_retrying, read_log, spawn, stop_process, wait_until
from tests.dns_fixture import sbin_program

# Written in two pieces so that this file is not itself the EICAR test file to a scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ZIP_MARKER = b"FILTERD-TEST-ZIP-" + b"MARKER-0c4f19a2"
EICAR_HASH_NAME = "Eicar-Test-Signature"
EICAR_STRING_NAME = "Eicar-Test-String"
ZIP_NAME = "Filterd.Test.Zip"
READY_TIMEOUT = 30.0
DEFAULT_STREAM_MAX_LENGTH = "8M"


def signature_files() -> dict[str, str]:
    """File name -> contents of the test database (see the module docstring)."""
    assert len(EICAR) == 68
    return {
        "test.hdb": f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{EICAR_HASH_NAME}\n",
        # name:target type (0 = any):offset (* = anywhere):hex
        "test.ndb": f"{EICAR_STRING_NAME}:0:*:{EICAR.hex()}\n",
        # name;target description block;logical expression;subsignature 0
        "test.ldb": f"{ZIP_NAME};Engine:81-255,Container:CL_TYPE_ZIP,Target:0;0;{ZIP_MARKER.hex()}\n",
    }


def zip_with(name: str, content: bytes) -> bytes:
    """A deflated zip archive holding one file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buf.getvalue()


def marker_zip() -> bytes:
    """A zip whose one file carries ZIP_MARKER; compressed, so the raw archive does not."""
    data = zip_with("readme.txt", b"Quarterly figures attached.\n" * 40 + ZIP_MARKER + b"\n" + b"end.\n" * 40)
    assert ZIP_MARKER not in data
    return data


def clamd_config(
    *, database: Path, socket_path: Path, port: int, log_file: Path, temp_dir: Path, stream_max_length: str
) -> str:
    """clamd.conf for a test: foreground, both sockets, everything in the test's directories."""
    return (
        "Foreground yes\n"
        f"DatabaseDirectory {database}\n"
        f"LocalSocket {socket_path}\n"
        f"TCPSocket {port}\n"
        "TCPAddr 127.0.0.1\n"
        f"StreamMaxLength {stream_max_length}\n"
        f"LogFile {log_file}\n"
        "LogTime yes\n"
        f"TemporaryDirectory {temp_dir}\n"
        "SelfCheck 3600\n"  # never re-reads the database during a test session
    )


def send_command(address: str | tuple[str, int], command: bytes, *, timeout: float = 1.0) -> bytes:
    """One raw clamd exchange (``b"zPING\\0"``...): send, read to clamd's close."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(command)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


class Clamd:
    """clamd serving the test database on a Unix socket and on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, *, stream_max_length: str = DEFAULT_STREAM_MAX_LENGTH) -> None:
        self.clamd = sbin_program("clamd")
        self.directory = directory
        self.database = directory / "db"
        self.temp_dir = directory / "tmp"
        self.config_path = directory / "clamd.conf"
        self.log_path = directory / "clamd.log"
        self.output_path = directory / "clamd.out"
        self.stream_max_length = stream_max_length
        self.host = "127.0.0.1"
        self.port = 0
        self._socket_dir: Path | None = None
        self.socket_path = directory / "clamd.sock"
        if len(os.fsencode(self.socket_path)) > 100:  # sun_path holds 108 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="clamd-"))
            self.socket_path = self._socket_dir / "clamd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_time = 0.0  # seconds the last start took, until both sockets answered PING
        self.database.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(exist_ok=True)
        for name, text in signature_files().items():
            (self.database / name).write_text(text)

    @property
    def unix_spec(self) -> str:
        """`antivirus.clamd` for the Unix socket."""
        return str(self.socket_path)

    @property
    def tcp_spec(self) -> str:
        """`antivirus.clamd` for TCP: `127.0.0.1:PORT`."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """clamd's log file and whatever it printed."""
        return read_log(self.log_path, self.output_path)

    def start(self) -> None:
        """Start clamd (on the same port after a `stop`) and wait until both sockets answer PING."""
        if not self.running:
            self.port = bind_retrying(self.port, self._launch, self.stop, self.log, name="clamd", address=self.host)

    def _launch(self, port: int) -> None:
        self.port = port
        self.config_path.write_text(
            clamd_config(
                database=self.database,
                socket_path=self.socket_path,
                port=port,
                log_file=self.log_path,
                temp_dir=self.temp_dir,
                stream_max_length=self.stream_max_length,
            )
        )
        started = time.monotonic()
        self.proc = spawn([self.clamd, "-c", str(self.config_path)], self.output_path, append=True)
        waiting: list[str | tuple[str, int]] = [str(self.socket_path), (self.host, port)]

        def answered() -> bool:
            while waiting and send_command(waiting[0], b"zPING\0", timeout=0.5) == b"PONG\0":
                waiting.pop(0)
            return not waiting

        where = f"{self.socket_path} and {self.host}:{port}"
        wait_until(
            answered, self.proc, name="clamd", waiting_for=f"answer PING on {where}", log=self.log,
            timeout=READY_TIMEOUT, interval=0.02,
        )  # fmt: skip
        self.start_time = time.monotonic() - started

    def ping(self, *, tcp: bool = False, timeout: float = 1.0) -> bool:
        try:
            address = (self.host, self.port) if tcp else str(self.socket_path)
            return send_command(address, b"zPING\0", timeout=timeout) == b"PONG\0"
        except OSError:
            return False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze clamd (SIGSTOP): connections are accepted by the kernel but never answered."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop clamd; its socket file goes and its port closes. `start` brings it back."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused clamd cannot act on SIGTERM
        stop_process(self.proc)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def close(self) -> None:
        """Stop clamd for good."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def clamdscan(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run Debian's clamdscan against this clamd (e.g. ``"--stream", path``)."""
        binary = sbin_program("clamdscan")
        return subprocess.run(
            [binary, f"--config-file={self.config_path}", "--no-summary", *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def __enter__(self) -> Clamd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_clamd(tmp_path: Path, *, stream_max_length: str = DEFAULT_STREAM_MAX_LENGTH) -> Clamd:
    """Start clamd with the test database in a new directory under `tmp_path`; returns once it
    answers PING on both its Unix socket and its TCP port. ``stream_max_length`` is clamd's
    StreamMaxLength (INSTREAM past it: ``size limit exceeded. ERROR``)."""
    server = Clamd(Path(tempfile.mkdtemp(prefix="clamd", dir=tmp_path)), stream_max_length=stream_max_length)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


class MakeClamd(Protocol):
    def __call__(self, *, stream_max_length: str = DEFAULT_STREAM_MAX_LENGTH) -> Clamd: ...


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One clamd for the whole session (StreamMaxLength 8M). Tests share it: never stop or pause it."""
    server = start_clamd(tmp_path_factory.mktemp("clamd"))
    yield server
    server.close()


@pytest.fixture
def make_clamd(tmp_path: Path) -> Iterator[MakeClamd]:
    """Start clamds of the test's own (to stop, pause or limit); all stopped when it ends."""
    servers: list[Clamd] = []

    def make(*, stream_max_length: str = DEFAULT_STREAM_MAX_LENGTH) -> Clamd:
        servers.append(start_clamd(tmp_path, stream_max_length=stream_max_length))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
