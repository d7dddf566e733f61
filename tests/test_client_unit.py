"""filterc against a fake spamd, and side by side with Debian's spamc where it is installed.

Each scenario runs ``python -m filterd.client`` as a subprocess (real exit codes, real stdout
bytes) against a small spamd stand-in that records the request bytes and answers with canned
responses from the protocol reference (shared/reference/protocols.md §1.3). When ``spamc`` is
on PATH (Debian package ``spamc``, installed by CI) the same scenario runs with it too, and its
stdout, exit code and request bytes must equal filterc's.

Run this file directly (``python tests/test_client_unit.py``) to print the start-time
benchmark: median wall time of 20 runs of filterc and spamc for one small message.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILTERC = [sys.executable, "-m", "filterd.client"]
SPAMC = shutil.which("spamc")
CAT = shutil.which("cat") or "/bin/cat"
SH = shutil.which("sh") or "/bin/sh"

# The reference's 113-byte example message.
MSG = (
    b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: lunch?\r\n"
    b"Message-ID: <k7@example.net>\r\n\r\nSee you at noon.\r\n"
)
PROCESSED = b"X-Spam-Checker-Version: filterd 0.1.0\r\nX-Spam-Status: No, score=1.3 required=5.0\r\n" + MSG
HEADER_BLOCK = PROCESSED[: PROCESSED.index(b"\r\n\r\n") + 4]
REPORT_TEXT = (
    b'Spam detection software, running on the system "mx.test", has\nidentified this incoming email '
    b"as possible spam.\n\nContent analysis details:   (7.3 points, 5.0 required)\n\n"
    b" pts rule name              description\n---- ---------------------- --------------\n"
    b" 7.3 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n\n"
)

CHECK_SPAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7.3 / 5.0\r\n\r\n"
CHECK_HAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.3 / 5.0\r\n\r\n"
PONG = b"SPAMD/1.5 0 PONG\r\n"
LEARNED = b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n\r\n"
NOTHING_DONE = b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n"
FORGOTTEN = b"SPAMD/1.1 0 EX_OK\r\nDidRemove: local\r\n\r\n\r\n"
REPORTED = b"SPAMD/1.1 0 EX_OK\r\nDidSet: local,remote\r\n\r\n"
REVOKED = b"SPAMD/1.1 0 EX_OK\r\nDidRemove: remote\r\n\r\n"

# Two self-signed P-256 certificates (valid until 2126) for the -S tests; A also has its key.
CERT_A = """-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUFwd/ueeMw1qRluR1B61on8tD4DEwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOZmlsdGVyZC10ZXN0LWEwIBcNMjYxMTI4MTAxNjMzWhgPMjEy
NjExMDQxMDE2MzNaMBkxFzAVBgNVBAMMDmZpbHRlcmQtdGVzdC1hMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEL0qwlkn5KUQXpdqvTb2p95wyQk9jmps+ekma3AhN
oiRi0M6dxhdNIRn1edVjuUnJuD+jhlgBRZu7/E+D8lvRDKNTMFEwHQYDVR0OBBYE
FNV/c/Af/oxsRje3UFE31iW+Yy9dMB8GA1UdIwQYMBaAFNV/c/Af/oxsRje3UFE3
1iW+Yy9dMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAP0vTzop
79LSGVo5djin/AJxiEn2nix+68yc8Ps61Ao2AiAkXuUiGV7Cz7qSsm3+fQMrffZA
3biCAbh+nS5MlW5CtA==
-----END CERTIFICATE-----
"""
KEY_A = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgi47VuLL4b/RSTCZb
FpUPLSgWUvYMhqRRdbl9hjHQZ6ihRANCAAQvSrCWSfkpRBel2q9Nvan3nDJCT2Oa
mz56SZrcCE2iJGLQzp3GF00hGfV51WO5Scm4P6OGWAFFm7v8T4PyW9EM
-----END PRIVATE KEY-----
"""
CERT_B = """-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUJN4EJm8sgCC8DIUldzLtA7+PfuIwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOZmlsdGVyZC10ZXN0LWIwIBcNMjYxMTI4MTAxNjMzWhgPMjEy
NjExMDQxMDE2MzNaMBkxFzAVBgNVBAMMDmZpbHRlcmQtdGVzdC1iMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEV9Lr9aLkppxfWIu+U2tQ6U6bwYu97FQ0Rz+gO2Is
3NgdCq6MnFeB0+PXS1ZjfLLPmr9goWRgv5xOrZkja8JOaKNTMFEwHQYDVR0OBBYE
FFgojzWMpVGFCaQB3dW4LXQwWGAwMB8GA1UdIwQYMBaAFFgojzWMpVGFCaQB3dW4
LXQwWGAwMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgXxAOs9G0
0OFS0OqGRI8ZF1c1MPvdrU7eRlcg6gd53xQCIQCC9LCv8Iwm7zH5RN61go6dWM1x
6xCkeZCSJWe+3CqqXA==
-----END CERTIFICATE-----
"""


def reply(body: bytes, spam: bytes = b"False ; 1.3 / 5.0", status: bytes = b"SPAMD/1.1 0 EX_OK") -> bytes:
    """A spamd answer with a body: Content-length first, then Spam, as spamd orders them."""
    return status + b"\r\nContent-length: %d\r\nSpam: %s\r\n\r\n" % (len(body), spam) + body


def request(method: bytes, body: bytes = MSG, *, user: bytes = b"alice", extra: bytes = b"") -> bytes:
    """A request as spamc builds it: User, Compress, Content-length, blank line, body."""
    return b"%s SPAMC/1.5\r\nUser: %s\r\n%sContent-length: %d\r\n\r\n" % (method, user, extra, len(body)) + body


def tell(headers: bytes, body: bytes = MSG) -> bytes:
    return b"TELL SPAMC/1.5\r\n%sUser: alice\r\nContent-length: %d\r\n\r\n" % (headers, len(body)) + body


# --------------------------------------------------------------------------- the fake spamd


class FakeSpamd:
    """A spamd stand-in: records each request (head + Content-length bytes), sends ``response``.

    ``hang`` makes it read the request and then answer nothing until the test ends.
    """

    def __init__(self, listener: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        self.listener = listener
        self.tls = tls
        self.response = b""
        self.queue: list[bytes] = []  # answers used before ``response``, one per connection
        self.hang = False
        self.eager = False  # answer before reading the request, and record nothing
        self.requests: list[bytes] = []
        self.port = listener.getsockname()[1] if listener.family == socket.AF_INET else 0
        self._stop = threading.Event()
        self._handlers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> FakeSpamd:
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        self.listener.close()
        for handler in self._handlers:
            handler.join(20)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            handler = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        try:
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    return
            response = self.queue.pop(0) if self.queue else self.response
            if self.eager:  # nothing recorded: the client may be gone before the read ends
                conn.sendall(response)
                self._read_request(conn)
                return
            self.requests.append(self._read_request(conn))
            if self.hang:  # until the test ends (the client half-closed: no EOF to wait for)
                self._stop.wait(30)
                return
            conn.sendall(response)
            # close without losing the answer: an unread byte at close() would turn FIN into RST
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(5)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"Content-length: "):
                length = int(line.split(b": ", 1)[1])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


@pytest.fixture
def spamd() -> Iterator[FakeSpamd]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = FakeSpamd(listener).start()
    yield server
    server.stop()


@pytest.fixture
def unix_spamd(tmp_path: Path) -> Iterator[tuple[FakeSpamd, Path]]:
    path = tmp_path / "spamd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    server = FakeSpamd(listener).start()
    yield server, path
    server.stop()


@pytest.fixture
def tls_spamd(tmp_path: Path) -> Iterator[FakeSpamd]:
    (tmp_path / "a.crt").write_text(CERT_A)
    (tmp_path / "a.key").write_text(KEY_A)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "a.crt", tmp_path / "a.key")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = FakeSpamd(listener, tls=context).start()
    yield server
    server.stop()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 but not listening: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


# --------------------------------------------------------------------------- running clients


@dataclass(frozen=True)
class Outcome:
    stdout: bytes
    code: int
    stderr: bytes
    requests: tuple[bytes, ...]
    seconds: float


def run(command: list[str], args: list[str], stdin: bytes, server: FakeSpamd | None) -> Outcome:
    if server is not None:
        server.requests.clear()
    started = time.monotonic()
    proc = subprocess.run([*command, *args], input=stdin, capture_output=True, timeout=60, cwd=ROOT)
    seconds = time.monotonic() - started
    requests = tuple(server.requests) if server is not None else ()
    return Outcome(proc.stdout, proc.returncode, proc.stderr, requests, seconds)


def check(
    args: list[str],
    *,
    stdout: bytes,
    code: int,
    server: FakeSpamd | None = None,
    stdin: bytes = MSG,
    requests: tuple[bytes, ...] | None = None,
) -> Outcome:
    """Run filterc and assert stdout, exit code (and request bytes); then spamc must agree."""
    got = run(FILTERC, args, stdin, server)
    assert (got.stdout, got.code) == (stdout, code), got.stderr.decode(errors="replace")
    if requests is not None:
        assert got.requests == requests
    if SPAMC is not None:
        ref = run([SPAMC], args, stdin, server)
        assert (ref.stdout, ref.code) == (got.stdout, got.code), "spamc differs"
        assert ref.requests == got.requests, "spamc sent different bytes"
    return got


def to(server: FakeSpamd, *args: str) -> list[str]:
    """Options reaching ``server`` as user alice, with an empty config file (hermetic)."""
    return ["-F", os.devnull, "-d", "127.0.0.1", "-p", str(server.port), "-u", "alice", *args]


def dead(port: int, *args: str) -> list[str]:
    return ["-F", os.devnull, "-d", "127.0.0.1", "-p", str(port), "-u", "alice", "--retry-sleep", "0", *args]


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("options", "response", "expected"),
    [
        ([], reply(PROCESSED), request(b"PROCESS")),
        (["-c"], CHECK_HAM, request(b"CHECK")),
        (["-y"], reply(b"GTUBE"), request(b"SYMBOLS")),
        (["-r"], reply(REPORT_TEXT, b"Yes ; 7.3 / 5.0"), request(b"REPORT_IFSPAM")),
        (["-R"], reply(REPORT_TEXT), request(b"REPORT")),
        (["--headers"], reply(HEADER_BLOCK), request(b"HEADERS")),
        (["-E"], reply(PROCESSED), request(b"PROCESS")),
        (["-K"], PONG, b"PING SPAMC/1.5\r\n\r\n"),
        (["-L", "spam"], LEARNED, tell(b"Message-class: spam\r\nSet: local\r\n")),
        (["-L", "ham"], LEARNED, tell(b"Message-class: ham\r\nSet: local\r\n")),
        (["-L", "forget"], LEARNED, tell(b"Remove: local\r\n")),
        (["-C", "report"], LEARNED, tell(b"Message-class: spam\r\nSet: local,remote\r\n")),
        (["-C", "revoke"], LEARNED, tell(b"Message-class: ham\r\nSet: local\r\nRemove: remote\r\n")),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_request_bytes_match_spamc(spamd: FakeSpamd, options: list[str], response: bytes, expected: bytes) -> None:
    spamd.response = response
    got = run(FILTERC, to(spamd, *options), MSG, spamd)
    assert got.requests == (expected,)
    if SPAMC is not None:
        assert run([SPAMC], to(spamd, *options), MSG, spamd).requests == (expected,)


def test_request_user_defaults_to_the_login_name(spamd: FakeSpamd) -> None:
    spamd.response = CHECK_HAM
    user = pwd.getpwuid(os.geteuid()).pw_name.encode()
    args = ["-F", os.devnull, "-d", "127.0.0.1", "-p", str(spamd.port), "-c"]
    check(args, server=spamd, stdout=b"1.3/5.0\n", code=0, requests=(request(b"CHECK", user=user),))


def test_request_is_half_closed_after_the_body(spamd: FakeSpamd) -> None:
    """The fake server reads by Content-length; a server reading to EOF must get EOF too."""
    spamd.response = CHECK_HAM
    seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):  # to EOF: needs the client's shutdown(SHUT_WR)
                    data += chunk
                seen.append(data)
                conn.sendall(CHECK_HAM)

        thread = threading.Thread(target=serve)
        thread.start()
        got = run(FILTERC, ["-F", os.devnull, "-d", "127.0.0.1", "-p", str(port), "-u", "alice", "-c"], MSG, None)
        thread.join(10)
    assert got.stdout == b"1.3/5.0\n"
    assert seen == [request(b"CHECK")]


def test_zlib_body_is_a_valid_zlib_stream_of_the_message(spamd: FakeSpamd) -> None:
    """-z (spamc's Debian build has no zlib): Compress header, compressed Content-length."""
    spamd.response = CHECK_SPAM
    got = run(FILTERC, to(spamd, "-z", "-c"), MSG, spamd)
    assert (got.stdout, got.code) == (b"7.3/5.0\n", 1)
    compressed = zlib.compress(MSG, 3)  # libspamc's deflateInit level
    assert got.requests == (request(b"CHECK", compressed, extra=b"Compress: zlib\r\n"),)
    body = got.requests[0].partition(b"\r\n\r\n")[2]
    assert zlib.decompress(body) == MSG


def test_zlib_is_not_used_for_tell(spamd: FakeSpamd) -> None:
    spamd.response = LEARNED
    got = run(FILTERC, to(spamd, "-z", "-L", "spam"), MSG, spamd)
    assert got.requests == (tell(b"Message-class: spam\r\nSet: local\r\n"),)


# --------------------------------------------------------------------------- outputs per mode


@pytest.mark.parametrize(
    ("options", "response", "stdout", "code"),
    [
        ([], reply(PROCESSED), PROCESSED, 0),
        (["-E"], reply(PROCESSED), PROCESSED, 0),
        (["-E"], reply(PROCESSED, b"True ; 7.3 / 5.0"), PROCESSED, 1),
        (["-c"], CHECK_SPAM, b"7.3/5.0\n", 1),
        (["-c"], CHECK_HAM, b"1.3/5.0\n", 0),
        (["-c", "-E"], CHECK_SPAM, b"7.3/5.0\n", 1),
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: Yes ; 7.3 / 5.0\r\n\r\n", b"7.3/5.0\n", 0),
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n", b"1000.0/5.0\n", 1),
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 4.95 / 5.0\r\n\r\n", b"4.9/5.0\n", 0),  # C float
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: true ; -0.05 / 5.05\r\n\r\n", b"-0.1/5.1\n", 1),
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 12 / 5.0\r\n\r\n", b"12.0/5.0\n", 0),
        (["-c"], b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.x5 / 5.0\r\n\r\n", b"1.0/5.0\n", 0),
        (["-c"], b"SPAMD/1.1 0 EX_OK\nContent-length: 3\nSpam: True ; 7.3 / 5.0\n\nabc", b"7.3/5.0\n", 1),
        (["-y"], reply(b"GTUBE,NO_RECEIVED,NO_RELAYS", b"True ; 1000.0 / 5.0"), b"GTUBE,NO_RECEIVED,NO_RELAYS", 0),
        (["-y"], reply(b""), b"", 0),
        (["-y", "-E"], reply(b"GTUBE", b"True ; 1000.0 / 5.0"), b"GTUBE", 1),
        (["-R"], reply(REPORT_TEXT, b"True ; 7.3 / 5.0"), b"7.3/5.0\n" + REPORT_TEXT, 0),
        (["-R"], reply(REPORT_TEXT), b"1.3/5.0\n" + REPORT_TEXT, 0),
        (["-r"], reply(REPORT_TEXT, b"Yes ; 7.3 / 5.0"), REPORT_TEXT, 0),  # spamd's Yes: no score line
        (["-r"], reply(REPORT_TEXT, b"True ; 7.3 / 5.0"), b"7.3/5.0\n" + REPORT_TEXT, 0),
        (["-r"], reply(b"", b"No ; 1.3 / 5.0"), b"", 0),
        (["--headers"], reply(HEADER_BLOCK), HEADER_BLOCK + b"See you at noon.\r\n", 0),
        (["-K"], PONG, b"SPAMD/1.5 0\n", 0),
        (["-K"], b"SPAMD/1.0 76 Bad header line: x\r\n", b"SPAMD/1.0 76\n", 0),
        (["-L", "spam"], LEARNED, b"Message successfully un/learned\n", 0),
        (["-L", "ham"], NOTHING_DONE, b"Message was already un/learned\n", 0),
        (["-L", "forget"], FORGOTTEN, b"Message successfully un/learned\n", 0),
        (["-L", "forget"], LEARNED, b"Message was already un/learned\n", 0),
        (["-C", "report"], REPORTED, b"Message successfully reported/revoked\n", 0),
        (["-C", "report"], LEARNED, b"Unable to report/revoke message\n", 0),
        (["-C", "revoke"], REVOKED, b"Message successfully reported/revoked\n", 0),
    ],
)
def test_output_and_exit_code_per_mode(
    spamd: FakeSpamd, options: list[str], response: bytes, stdout: bytes, code: int
) -> None:
    spamd.response = response
    check(to(spamd, *options), server=spamd, stdout=stdout, code=code)


def test_headers_mode_without_a_body_separator_prints_the_message(spamd: FakeSpamd) -> None:
    spamd.response = reply(b"X-Spam-Status: No\r\nSubject: x\r\n\r\n")
    check(to(spamd, "--headers"), server=spamd, stdin=b"Subject: x\r\n", stdout=b"Subject: x\r\n", code=0)


def test_large_message_round_trip(spamd: FakeSpamd) -> None:
    big = MSG + b"".join(b"line %06d of a long body, bytes \x00\xff\r\n" % i for i in range(9000))
    assert 300_000 < len(big) < 500 * 1024
    spamd.response = reply(b"X-Spam-Flag: NO\r\n" + big)
    got = check(to(spamd), server=spamd, stdin=big, stdout=b"X-Spam-Flag: NO\r\n" + big, code=0)
    assert got.requests == (request(b"PROCESS", big),)


def test_unix_socket(unix_spamd: tuple[FakeSpamd, Path]) -> None:
    server, path = unix_spamd
    server.response = CHECK_SPAM
    args = ["-F", os.devnull, "-U", str(path), "-u", "alice", "-c"]
    check(args, server=server, stdout=b"7.3/5.0\n", code=1, requests=(request(b"CHECK"),))
    server.response = reply(PROCESSED)
    check(args[:-1], server=server, stdout=PROCESSED, code=0)


def test_default_transport_is_the_loopback(spamd: FakeSpamd) -> None:
    """Without -d: getaddrinfo(NULL) - ::1 (refused here) and then 127.0.0.1."""
    spamd.response = CHECK_SPAM
    args = ["-F", os.devnull, "-p", str(spamd.port), "-u", "alice", "--retry-sleep", "0", "-c"]
    check(args, server=spamd, stdout=b"7.3/5.0\n", code=1)


def test_config_file_options_come_first(spamd: FakeSpamd, tmp_path: Path) -> None:
    conf = tmp_path / "spamc.conf"
    conf.write_text(f"# filterc test\n\n-d 127.0.0.1\n-p {spamd.port}  -u alice\n")
    spamd.response = CHECK_SPAM
    check(["-F", str(conf), "-c"], server=spamd, stdout=b"7.3/5.0\n", code=1, requests=(request(b"CHECK"),))


@pytest.mark.parametrize(
    "text",
    ["-c\n-x", "-c " * 23 + "\n", "-d " + "x" * 9000 + "\n"],
    ids=["no final newline", "too many arguments", "line too long"],
)
def test_config_file_errors_exit_78(tmp_path: Path, text: str) -> None:
    conf = tmp_path / "spamc.conf"
    conf.write_text(text)
    check(["-F", str(conf)], stdout=b"", code=78)


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    got = check(["-F", str(tmp_path / "missing.conf"), "-c"], stdout=b"", code=78)
    assert f"Failed to open config file: {tmp_path / 'missing.conf'}".encode() in got.stderr


# --------------------------------------------------------------------------- safe fallback


@pytest.mark.parametrize(
    ("options", "stdout", "code"),
    [
        ([], MSG, 0),
        (["-E"], MSG, 0),
        (["-c"], b"0/0\n", 0),
        (["-R"], b"0/0\n", 0),
        (["-r"], b"0/0\n", 0),
        (["-y"], b"\n", 0),
        (["--headers"], MSG, 0),
        (["-x"], b"", 69),
        (["-x", "-E"], b"", 69),
        (["-x", "-X"], b"", 75),
        (["-X", "-x"], b"", 69),  # -X counts only after -x, as in spamc
        (["-c", "-x"], b"0/0\n", 69),
        (["-c", "-x", "-X"], b"0/0\n", 75),
        (["-y", "-x"], b"\n", 69),
        (["-K"], b"", 69),
        (["-L", "spam"], b"", 69),
        (["-C", "report"], MSG, 0),  # spamc passes the message through here
        (["-C", "report", "-x"], b"", 69),
    ],
)
def test_fallback_when_connection_refused(dead_port: int, options: list[str], stdout: bytes, code: int) -> None:
    check(dead(dead_port, *options), stdout=stdout, code=code)


def test_connection_retries_sleep_between_rounds(dead_port: int) -> None:
    got = check(
        ["-F", os.devnull, "-d", "127.0.0.1", "-p", str(dead_port), "--connect-retries", "2", "--retry-sleep", "1"],
        stdout=MSG,
        code=0,
    )
    assert 0.9 < got.seconds < 5


@pytest.mark.parametrize(
    ("response", "options", "stdout", "code"),
    [
        (b"", [], MSG, 0),  # closed without a word
        (b"", ["-x"], b"", 74),
        (b"", ["-c", "-x"], b"0/0\n", 74),
        (b"HTTP/1.0 200 OK\r\n\r\n", [], MSG, 0),  # garbage
        (b"HTTP/1.0 200 OK\r\n\r\n", ["-x"], b"", 76),
        (b"HTTP/1.0 200 OK\r\n\r\n", ["-K"], b"", 76),
        (b"SPAMD/0.9 0 EX_OK\r\n\r\n", ["-x"], b"", 76),  # version below 1.0
        (b"SPAMD/1.0 76 Bad header line: (closed before headers)\r\n", [], MSG, 0),
        (b"SPAMD/1.0 76 Bad header line: (closed before headers)\r\n", ["-x"], b"", 74),
        (b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled\r\n", ["-L", "ham"], b"", 74),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 500\r\nSpam: False ; 1.3 / 5.0\r\n\r\nshort", [], MSG, 0),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 500\r\nSpam: False ; 1.3 / 5.0\r\n\r\nshort", ["-x"], b"", 76),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\nSpam: False ; 1.3 / 5.0\r\n\r\nlonger", ["-x"], b"", 76),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.3 / 5.0\r\n\r\nno length", ["-x"], b"", 76),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-Length: 9\r\nSpam: False ; 1.3 / 5.0\r\n\r\nno length", ["-x"], b"", 76),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 4\r\n\r\nbody", ["-c", "-x"], b"0/0\n", 76),  # no Spam:
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 4\r\n\r\nbody", ["-c"], b"0/0\n", 0),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\n\r\nno length", ["-R", "-x"], b"no length", 0),
        (b"SPAMD/1.1 0 EX_OK\r\n" + b"X" * 9000 + b"\r\n\r\n", ["-x"], MSG, 0),  # line too long: EX_TOOBIG
    ],
)
def test_fallback_on_bad_answers(
    spamd: FakeSpamd, response: bytes, options: list[str], stdout: bytes, code: int
) -> None:
    spamd.response = response
    check(to(spamd, *options), server=spamd, stdout=stdout, code=code)


def test_answer_bigger_than_the_buffer_passes_the_message_even_with_x(spamd: FakeSpamd) -> None:
    """libspamc keeps max_size + 16 KiB for the answer; beyond that it is EX_TOOBIG, exit 0."""
    spamd.response = reply(b"x" * 20_000)
    check(to(spamd, "-s", "200", "-x"), server=spamd, stdout=MSG, code=0)


def test_timeout_falls_back(spamd: FakeSpamd) -> None:
    spamd.hang = True
    got = check(to(spamd, "-t", "1"), server=spamd, stdout=MSG, code=0)
    assert 0.9 < got.seconds < 10
    check(to(spamd, "-t", "1", "-x"), server=spamd, stdout=b"", code=74)
    check(to(spamd, "-t", "1", "-c"), server=spamd, stdout=b"0/0\n", code=0)


def test_first_host_dead_second_answers() -> None:
    """Two -d hosts: the refused one is skipped without a sleep; -x keeps only the first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.2", 0))
        server = FakeSpamd(listener).start()
        try:
            server.response = CHECK_SPAM
            hosts = ["-F", os.devnull, "-d", "127.0.0.3,127.0.0.2", "-p", str(server.port), "-u", "alice"]
            got = check([*hosts, "-c"], server=server, stdout=b"7.3/5.0\n", code=1)
            assert got.seconds < 0.9
            check([*hosts, "--retry-sleep", "0", "-c", "-x"], server=server, stdout=b"0/0\n", code=69)
        finally:
            server.stop()


def test_unix_socket_missing_is_ex_software(tmp_path: Path) -> None:
    args = ["-F", os.devnull, "-U", str(tmp_path / "nothing.sock"), "-u", "alice"]
    check(args, stdout=MSG, code=0)
    check([*args, "-x"], stdout=b"", code=70)


@pytest.mark.parametrize(
    ("hosts", "code"),
    [(["-d", ""], 68), (["-6", "-d", "127.0.0.1"], 71)],  # EAI_NONAME; EAI_ADDRFAMILY, unknown to libspamc
)
def test_unresolvable_host(hosts: list[str], code: int) -> None:
    args = ["-F", os.devnull, *hosts, "-p", "1", "-u", "alice"]
    check([*args, "-c"], stdout=b"0/0\n", code=0)
    check([*args, "-x"], stdout=b"", code=code)


def test_filter_retries_reconnect_after_a_failed_read(spamd: FakeSpamd) -> None:
    spamd.response = CHECK_SPAM
    for command in [FILTERC, [SPAMC]] if SPAMC is not None else [FILTERC]:
        spamd.queue = [b""]  # the first connection closes without a word
        got = run(command, to(spamd, "--filter-retries", "2", "-c"), MSG, spamd)
        assert (got.stdout, got.code, got.requests) == (b"7.3/5.0\n", 1, (request(b"CHECK"),) * 2), command


# --------------------------------------------------------------------------- size and input


@pytest.mark.parametrize(
    ("options", "stdout"), [([], MSG), (["-x"], MSG), (["-c"], b"0/0\n"), (["-c", "-x"], b"0/0\n"), (["-y"], b"\n")]
)
def test_message_over_max_size_is_not_sent(spamd: FakeSpamd, options: list[str], stdout: bytes) -> None:
    spamd.response = CHECK_SPAM
    check(to(spamd, "-s", str(len(MSG) - 1), *options), server=spamd, stdout=stdout, code=0, requests=())


def test_message_at_max_size_is_sent(spamd: FakeSpamd) -> None:
    spamd.response = CHECK_SPAM
    check(to(spamd, "-s", str(len(MSG)), "-c"), server=spamd, stdout=b"7.3/5.0\n", code=1)


def test_message_over_the_default_500k_passes_through_whole(spamd: FakeSpamd) -> None:
    big = MSG + b"x" * (600 * 1024) + b"\r\nend\r\n"
    spamd.response = reply(b"nope")
    check(to(spamd), server=spamd, stdin=big, stdout=big, code=0, requests=())


@pytest.mark.parametrize(("options", "stdout", "code"), [([], b"", 0), (["-x"], b"", 74), (["-c"], b"0/0\n", 0)])
def test_empty_input(spamd: FakeSpamd, options: list[str], stdout: bytes, code: int) -> None:
    spamd.response = CHECK_SPAM
    check(to(spamd, *options), server=spamd, stdin=b"", stdout=stdout, code=code, requests=())


def test_unwritable_output_exits_74(spamd: FakeSpamd) -> None:
    """A deliberate difference: spamc exits 0 when it cannot write the message out."""
    spamd.response = reply(PROCESSED)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*FILTERC, *to(spamd)], input=MSG, stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 74


def test_unreadable_input_exits_74(spamd: FakeSpamd) -> None:
    """A deliberate difference: spamc exits 0 with no output when reading stdin fails.

    Standard input is a TCP socket whose peer resets the connection: read() fails ECONNRESET.
    """
    spamd.response = reply(PROCESSED)
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()) as sock:
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        proc = subprocess.run([*FILTERC, *to(spamd)], stdin=sock.fileno(), capture_output=True, timeout=60)
    assert (proc.stdout, proc.returncode) == (b"", 74), proc.stderr
    assert spamd.requests == []


def test_ping_does_not_read_stdin(spamd: FakeSpamd) -> None:
    spamd.response = PONG
    check(to(spamd, "-K"), server=spamd, stdin=b"", stdout=b"SPAMD/1.5 0\n", code=0)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (["-s", str(256 * 1024 * 1024 + 1)], 64),
        (["-L", "bogus"], 64),
        (["-C", "bogus"], 64),
        (["-L", "spam", "-c"], 64),
        (["-L", "spam", "-C", "report"], 64),
        (["-Q"], 64),
        (["--bogus"], 64),
        (["-d"], 64),
        (["-d", "-c"], 64),
        (["--dest"], 64),
        (["-S", "-x", "--ssl-cert", "a.crt"], 64),
        (["--ssl=tlsv1"], 64),
    ],
)
def test_usage_errors_exit_64(options: list[str], code: int) -> None:
    got = run(FILTERC, ["-F", os.devnull, *options], MSG, None)
    assert got.code == code
    if SPAMC is not None:
        ref = run([SPAMC], ["-F", os.devnull, *options], MSG, None)
        assert ref.code == got.code
        assert (ref.stdout == b"") == (got.stdout == b"")  # the usage text, or nothing
        getopt_lines = [line for line in ref.stderr.splitlines() if line.startswith(b"Error in argument")]
        assert getopt_lines == [line for line in got.stderr.splitlines() if line.startswith(b"Error in argument")]


def test_unknown_option_prints_usage_on_stdout() -> None:
    got = run(FILTERC, ["-F", os.devnull, "-Q"], MSG, None)
    assert got.code == 64
    assert b"Usage: filterc [options] [-e command [args]] < message" in got.stdout
    assert b"Error in argument 3, char 2: option not found Q" in got.stderr


def test_one_letter_per_argument_like_spamc(spamd: FakeSpamd) -> None:
    """spamc's getopt reads one letter per word: -cx is -c (the x is ignored)."""
    spamd.response = CHECK_SPAM
    check(to(spamd, "-cx"), server=spamd, stdout=b"7.3/5.0\n", code=1, requests=(request(b"CHECK"),))


def test_parsing_stops_at_the_first_non_option(spamd: FakeSpamd) -> None:
    spamd.response = reply(PROCESSED)
    check(to(spamd, "extra", "-c"), server=spamd, stdout=PROCESSED, code=0, requests=(request(b"PROCESS"),))


def test_long_options_with_equals_and_separate_values(spamd: FakeSpamd) -> None:
    spamd.response = CHECK_SPAM
    args = ["-F", os.devnull, "--dest=127.0.0.1", "--port", str(spamd.port), "--username=alice", "--check"]
    check(args, server=spamd, stdout=b"7.3/5.0\n", code=1, requests=(request(b"CHECK"),))


def test_help_and_version_exit_0() -> None:
    got = run(FILTERC, ["-h"], b"", None)
    assert got.code == 0
    assert got.stdout.startswith(b"filterc version ")
    assert b"\nUsage: filterc [options] [-e command [args]] < message\n" in got.stdout
    version = run(FILTERC, ["-V"], b"", None)
    assert (version.code, version.stdout.splitlines()[0]) == (0, got.stdout.splitlines()[0])
    if SPAMC is not None:
        ref = run([SPAMC], ["-h"], b"", None)
        assert ref.code == 0
        # the same option list, but for the -z line (Debian's spamc is built without zlib)
        z_line = b"  -z                  Compress mail message sent to spamd.\n"
        assert got.stdout.split(b"\nOptions:\n", 1)[1].replace(z_line, b"") == ref.stdout.split(b"\nOptions:\n", 1)[1]


# --------------------------------------------------------------------------- -e, -B, -S


def test_pipe_to_command(spamd: FakeSpamd) -> None:
    spamd.response = reply(PROCESSED)
    check(to(spamd, "-e", CAT), server=spamd, stdout=PROCESSED, code=0)


def test_pipe_to_command_exit_status_is_the_commands(spamd: FakeSpamd) -> None:
    spamd.response = reply(PROCESSED)
    check(to(spamd, "-e", SH, "-c", "cat; exit 3"), server=spamd, stdout=PROCESSED, code=3)


def test_pipe_to_command_not_started_on_failure_with_x(dead_port: int) -> None:
    check(dead(dead_port, "-x", "-e", SH, "-c", "echo started"), stdout=b"", code=69)
    check(dead(dead_port, "-e", SH, "-c", "cat; exit 4"), stdout=MSG, code=4)


def test_pipe_to_missing_command_exits_71(spamd: FakeSpamd, tmp_path: Path) -> None:
    spamd.response = reply(PROCESSED)
    check(to(spamd, "-e", str(tmp_path / "no-such-command")), server=spamd, stdout=b"", code=71)


BSMTP = (
    b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
    b"From: bob@example.net\r\nSubject: dots\r\n\r\n..a stuffed dot\r\n.x\r\nbody\r\n.\r\nQUIT\r\n"
)


def test_bsmtp_unwraps_and_rewraps(spamd: FakeSpamd) -> None:
    inner = b"From: bob@example.net\r\nSubject: dots\r\n\r\n.a stuffed dot\r\n.x\r\nbody\r\n"
    spamd.response = reply(b"X-Spam-Flag: NO\r\n" + inner)
    got = check(
        to(spamd, "-B"),
        server=spamd,
        stdin=BSMTP,
        stdout=BSMTP[: BSMTP.index(b"From:")]
        + b"X-Spam-Flag: NO\r\n"
        + inner.replace(b"\n.", b"\n..")
        + b".\r\nQUIT\r\n",
        code=0,
    )
    assert got.requests == (request(b"PROCESS", inner),)


def test_bsmtp_fallback_and_missing_data_line(spamd: FakeSpamd) -> None:
    spamd.response = b"garbage\r\n"
    check(to(spamd, "-B"), server=spamd, stdin=BSMTP, stdout=BSMTP.replace(b"\n.x", b"\n..x"), code=0)
    no_data = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nFrom: x\r\n\r\nbody\r\n.\r\n"
    check(to(spamd, "-B"), server=spamd, stdin=no_data, stdout=no_data, code=0, requests=())
    check(to(spamd, "-B", "-x"), server=spamd, stdin=no_data, stdout=b"", code=65, requests=())


def test_bsmtp_without_final_dot_passes_through_unaltered(spamd: FakeSpamd) -> None:
    """A deliberate difference: spamc prints its half-unstuffed buffer here ("..a" becomes
    ".a" and the last byte is repeated); filterc passes the input through as it came."""
    unterminated = BSMTP[: BSMTP.index(b".\r\nQUIT")]
    got = run(FILTERC, to(spamd, "-B"), unterminated, spamd)
    assert (got.stdout, got.code, got.requests) == (unterminated, 0, ())
    got = run(FILTERC, to(spamd, "-B", "-x"), unterminated, spamd)
    assert (got.stdout, got.code) == (b"", 65)


@pytest.mark.parametrize(
    ("ca", "stdout", "code"),
    [(None, b"7.3/5.0\n", 1), (CERT_A, b"7.3/5.0\n", 1), (CERT_B, b"0/0\n", 69)],
    ids=["no check", "right CA", "wrong CA"],
)
def test_ssl(tls_spamd: FakeSpamd, tmp_path: Path, ca: str | None, stdout: bytes, code: int) -> None:
    tls_spamd.response = CHECK_SPAM
    options = ["-S", "-x", "-c"]
    if ca is not None:
        (tmp_path / "ca.crt").write_text(ca)
        options += ["--ssl-ca-file", str(tmp_path / "ca.crt")]
    expected = (request(b"CHECK"),) if code == 1 else ()
    check(to(tls_spamd, *options), server=tls_spamd, stdout=stdout, code=code, requests=expected)


def test_ssl_against_a_plain_server_is_unavailable(spamd: FakeSpamd) -> None:
    spamd.response = CHECK_SPAM
    spamd.eager = True  # plain text where the TLS server hello should be
    check(to(spamd, "-S", "-x", "-c"), server=spamd, stdout=b"0/0\n", code=69)


def test_ssl_unreadable_client_certificate_is_oserr(tls_spamd: FakeSpamd, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    check(to(tls_spamd, "-S", "-x", "--ssl-cert", missing, "--ssl-key", missing, "-c"), stdout=b"0/0\n", code=71)


# --------------------------------------------------------------------------- start time
