"""`filterd mta`'s SMTP server, driven by swaks (a client we did not write) and raw sockets."""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.errors import ConfigError
from filterd.mta.auth import hash_password, load_users, verify_password
from tests.daemon_fixture import need_binary
from tests.mta.mta_fixture import Mta, make_cert, start_mta


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(tmp)
    users = tmp / "users"
    users.write_text(f"# test users\nalice:{hash_password('s3cret pass', ln=10)}\n")
    users.chmod(0o600)
    return cert, key, users


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]) -> Iterator[Mta]:
    """An MTA that takes mail for example.net, relays for 127.0.0.1 only, TLS and AUTH on."""
    cert, key, users = tls_files
    config = (
        "mta:\n"
        "  local_domains: [example.net]\n"
        "  mynetworks: [127.0.0.1/32]\n"
        "  max_message_size: 64K\n"
        "  max_hops: 20\n"
        f"  tls_cert: {cert}\n  tls_key: {key}\n  auth_users_file: {users}\n"
    )
    m = start_mta(tmp_path_factory.mktemp("smtpd"), "--tls-listen", "127.0.0.1:0", config=config)
    yield m
    assert m.stop() == 0, m.log()


def swaks(mta: Mta, *args: str) -> tuple[int, str]:
    cmd = [need_binary("swaks"), "--server", f"{mta.host}:{mta.port}", "--helo", "client.example", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def queued_id(output: str) -> str:
    m = re.search(r"250 2\.0\.0 Ok: queued as (\S+)", output)
    assert m, output
    return m[1]


class Raw:
    """A line-at-a-time SMTP client on a plain socket, for what swaks will not send."""

    def __init__(self, mta: Mta, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((mta.host, mta.port), timeout=30, source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        try:
            self.reply()
        except BaseException:
            self.close()
            raise

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_ehlo_lists_the_extensions_and_no_auth_in_clear(mta: Mta) -> None:
    rc, out = swaks(mta, "--quit-after", "EHLO")
    assert rc == 0, out
    for keyword in ("PIPELINING", "SIZE 65536", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"):
        assert re.search(rf"<-  250[- ]{keyword}\n", out), out
    assert "AUTH" not in out.split("EHLO client.example")[1]
    assert "<-  220 mx.test ESMTP filterd" in out


def test_message_is_queued_with_our_received_header(mta: Mta) -> None:
    rc, out = swaks(mta, "--from", "a@example.org", "--to", "bob@example.net", "--header", "Subject: hello")
    assert rc == 0, out
    qid = queued_id(out)
    envelope, path = mta.queue.load(qid)
    assert envelope.mail_from == "a@example.org" and [r.address for r in envelope.rcpts] == ["bob@example.net"]
    assert envelope.client_ip == "127.0.0.1" and envelope.client_helo == "client.example" and envelope.hops == 1
    data = path.read_bytes()
    received = re.match(
        rb"Received: from client\.example \(unknown \[127\.0\.0\.1\]\)\r\n"
        rb"\tby mx\.test \(filterd [^)]+\) with ESMTP id (\S+)\r\n"
        rb"\tfor <bob@example\.net>; \w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n",
        data,
    )
    assert received and received[1].decode() == qid, data[:300]
    assert b"\r\nSubject: hello\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_pipelining_with_swaks(mta: Mta) -> None:
    rc, out = swaks(mta, "--pipeline", "--from", "a@example.org", "--to", "bob@example.net,carol@example.net")
    assert rc == 0, out
    envelope, _ = mta.queue.load(queued_id(out))
    assert [r.address for r in envelope.rcpts] == ["bob@example.net", "carol@example.net"]


def test_a_repeated_recipient_is_accepted_and_queued_once(mta: Mta) -> None:
    raw = Raw(mta)
    try:
        raw.command("EHLO client.example")
        assert raw.command("MAIL FROM:<a@example.org>").startswith("250")
        for rcpt in ("bob@example.net", "bob@example.net", "Bob@EXAMPLE.NET", "carol@example.net", "CAROL@example.net"):
            assert raw.command(f"RCPT TO:<{rcpt}>").startswith("250 2.1.5"), rcpt
        assert raw.command("DATA").startswith("354")
        reply = raw.command("Subject: twice\r\n\r\nhi\r\n.")
    finally:
        raw.close()
    envelope, path = mta.queue.load(queued_id(reply))
    assert [r.address for r in envelope.rcpts] == ["bob@example.net", "carol@example.net"]


def test_starttls_then_auth_plain_relays(mta: Mta) -> None:
    rc, out = swaks(
        mta, "-tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "s3cret pass",
        "--from", "alice@example.org", "--to", "someone@elsewhere.example",
    )  # fmt: skip
    assert rc == 0, out
    assert "250 AUTH PLAIN LOGIN" in out and "235 2.7.0 Authentication successful" in out
    envelope, path = mta.queue.load(queued_id(out))
    assert envelope.auth_user == "alice"
    head = path.read_bytes()[:400]
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)\r\n", head), head
    assert b" with ESMTPSA id " in head


def test_auth_login_over_tls_and_a_wrong_password(mta: Mta) -> None:
    rc, out = swaks(mta, "-tls", "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "s3cret pass",
                    "--quit-after", "AUTH")  # fmt: skip
    assert rc == 0 and "235 2.7.0" in out, out
    rc, out = swaks(mta, "-tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong",
                    "--quit-after", "AUTH")  # fmt: skip
    assert rc != 0 and "535 5.7.8 Authentication credentials invalid" in out, out
    assert "PLAIN authentication failed for 'alice'" in mta.log()


def test_auth_is_refused_without_tls(mta: Mta) -> None:
    rc, out = swaks(mta, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "s3cret pass",
                    "--quit-after", "AUTH")  # fmt: skip
    assert rc != 0, out  # swaks: the server did not offer AUTH
    raw = Raw(mta)
    raw.command("EHLO client.example")
    token = base64.b64encode(b"\0alice\0s3cret pass").decode()
    assert raw.command(f"AUTH PLAIN {token}").startswith("530 5.7.0 Must issue a STARTTLS command first")
    raw.close()


def test_implicit_tls_port_offers_auth_at_once(mta: Mta) -> None:
    tls_port = mta.wait_for_log(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)")[1]
    rc, out = swaks(
        mta, "--server", f"127.0.0.1:{tls_port}", "--tlsc", "--auth", "PLAIN", "--auth-user", "alice",
        "--auth-password", "s3cret pass", "--from", "alice@example.org", "--to", "x@elsewhere.example",
    )  # fmt: skip
    assert rc == 0, out
    assert "STARTTLS" not in out and "235 2.7.0" in out
    envelope, path = mta.queue.load(queued_id(out))
    assert envelope.auth_user == "alice" and b" with ESMTPSA id " in path.read_bytes()[:400]


def test_passwd_prints_a_line_the_server_accepts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "mta", "passwd", "bob"], input="pa55 word\n", capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    users = tmp_path / "users"
    users.write_text(proc.stdout)
    users.chmod(0o600)
    stored = load_users(users)["bob"]
    assert verify_password("pa55 word", stored) and not verify_password("pa55 wor", stored)
    users.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_users(users)


def test_relay_is_denied_to_clients_outside_mynetworks(mta: Mta) -> None:
    # mynetworks is 127.0.0.1/32: a client on 127.0.0.2 is a stranger
    stranger = ("--local-interface", "127.0.0.2", "--from", "a@example.org")
    rc, out = swaks(mta, *stranger, "--to", "victim@elsewhere.example")
    assert rc != 0 and "554 5.7.1 <victim@elsewhere.example>: Relay access denied" in out, out
    # ... who may still send to our own domains (case-insensitive)
    rc, out = swaks(mta, *stranger, "--to", "bob@EXAMPLE.net")
    assert rc == 0, out
    # and 127.0.0.1 may relay
    rc, out = swaks(mta, "--from", "a@example.org", "--to", "someone@elsewhere.example")
    assert rc == 0, out


def test_relay_denied_leaves_nothing_queued(mta: Mta) -> None:
    raw = Raw(mta, source="127.0.0.3")
    raw.command("EHLO client.example")
    assert raw.command("MAIL FROM:<a@example.org>").startswith("250")
    assert raw.command("RCPT TO:<x@elsewhere.example>").startswith("554 5.7.1")
    assert raw.command("RCPT TO:<x@[192.0.2.1]>").startswith("554 5.7.1")
    assert raw.command("RCPT TO:<x@example.net.>").startswith("250")  # a trailing dot is the same domain
    raw.close()


def test_size_limit(mta: Mta, tmp_path: Path) -> None:
    raw = Raw(mta)
    raw.command("EHLO client.example")
    assert raw.command("MAIL FROM:<a@example.org> SIZE=70000").startswith("552 5.3.4")
    raw.close()
    big = tmp_path / "big.txt"
    big.write_text(("x" * 76 + "\n") * 1000)
    rc, out = swaks(mta, "--from", "a@example.org", "--to", "bob@example.net", "--body", f"@{big}")
    assert rc != 0 and "552 5.3.4 Error: message size exceeds fixed limit" in out, out[-500:]


def test_bare_lf_smuggling_is_refused(mta: Mta) -> None:
    before = {qid for qid in mta.queue.ids("incoming")}
    raw = Raw(mta)
    raw.command("EHLO client.example")
    raw.command("MAIL FROM:<a@example.org>")
    raw.command("RCPT TO:<bob@example.net>")
    assert raw.command("DATA").startswith("354")
    raw.send(
        b"From: a@example.org\r\nSubject: real\r\n\r\nhello\n.\r\n"
        b"MAIL FROM:<ceo@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nFrom: ceo@example.net\r\n\r\nforged\r\n"
        b".\r\n"
    )
    assert raw.reply().startswith("550 5.5.2 Error: bare CR or LF in message data")
    # the session goes on, and nothing was queued by the smuggled commands
    assert raw.command("NOOP").startswith("250")
    raw.close()
    assert {qid for qid in mta.queue.ids("incoming")} == before


def test_too_many_received_headers_is_a_loop(mta: Mta) -> None:
    headers = [
        f"Received: from hop{i}.example by hop{i + 1}.example; Thu, 1 Jan 2026 00:00:00 +0000" for i in range(20)
    ]
    args = [a for h in headers for a in ("--add-header", h)]
    rc, out = swaks(mta, "--from", "a@example.org", "--to", "bob@example.net", *args)
    assert rc != 0 and "554 5.4.6 Error: too many hops" in out, out[-500:]
    rc, out = swaks(mta, "--from", "a@example.org", "--to", "bob@example.net", *args[2:])
    assert rc == 0, out[-500:]
    assert mta.queue.load(queued_id(out))[0].hops == 20


def _flood(mta: Mta, acknowledged: list[tuple[str, bytes]], stop: threading.Event) -> None:
    """Send messages one session after another until the server dies; note each 250."""
    n = 0
    while not stop.is_set():
        n += 1
        body = f"Subject: {threading.get_ident()}-{n}\r\n\r\n".encode() + b"x" * 2000 + b"\r\n"
        try:
            raw = Raw(mta)
        except (OSError, AssertionError):
            return
        try:
            raw.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            for _ in range(4):
                raw.reply()
            raw.send(body + b".\r\n")
            reply = raw.reply()
        except (OSError, AssertionError):
            return
        finally:
            raw.close()
        if m := re.match(r"250 2\.0\.0 Ok: queued as (\S+)", reply):
            acknowledged.append((m[1], body))


def test_sigkill_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    state = tmp_path / "state"
    acknowledged: list[tuple[str, bytes]] = []
    for round_ in range(4):
        mta = start_mta(tmp_path, state_dir=state)
        stop = threading.Event()
        threads = [threading.Thread(target=_flood, args=(mta, acknowledged, stop)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.7 + 0.3 * round_)
        mta.proc.send_signal(signal.SIGKILL)
        mta.proc.wait()
        stop.set()
        for t in threads:
            t.join(30)
    mta = start_mta(tmp_path, state_dir=state)  # its start-up runs the recovery
    try:
        queue = mta.queue
        assert len(acknowledged) > 20
        for qid, body in acknowledged:
            envelope, path = queue.load(qid)
            assert path.read_bytes().endswith(body), qid
        assert not list(queue.corrupt.iterdir()) and not list(queue.tmp.iterdir())
    finally:
        assert mta.stop() == 0, mta.log()
