"""Pre-queue filtering: `filterd mta --filter` against a real `filterd daemon --milter-listen`."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_fixture import Daemon, need_binary, start_daemon
from tests.mta.mta_fixture import Mta, start_mta

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("daemon"), "--milter-listen", "127.0.0.1:0", workers=1, metrics=False)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, daemon: Daemon) -> Iterator[Mta]:
    port = int(daemon.wait_for_log(r"listening for milter on 127\.0\.0\.1:(\d+)").group(1))
    m = start_mta(
        tmp_path_factory.mktemp("mta"), "--filter", f"127.0.0.1:{port}", config="mta: {milter_timeout: 30s}\n"
    )
    yield m
    assert m.stop() == 0, m.log()


def swaks(mta: Mta, *args: str) -> tuple[int, str]:
    cmd = [need_binary("swaks"), "--server", f"{mta.host}:{mta.port}", "--helo", "client.example",
           "--from", "alice@example.org", "--to", "bob@localhost", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gtube_is_rejected_before_the_queue(mta: Mta) -> None:
    before = mta.queue.ids("incoming")
    rc, out = swaks(mta, "--header", "Subject: test", "--body", f"hello\n{GTUBE}\n")
    assert rc != 0, out
    assert re.search(r"<\*\* +550 5\.7\.1 .*", out), out
    assert mta.queue.ids("incoming") == before
    assert re.search(r"milter reject: ", mta.log()), mta.log()


def test_clean_mail_is_queued_with_the_filter_headers(mta: Mta, daemon: Daemon) -> None:
    rc, out = swaks(mta, "--header", "Subject: lunch on friday?", "--body", "Shall we meet at noon?\n")
    assert rc == 0, out
    qid = re.search(r"queued as (\S+)", out)
    assert qid, out
    envelope, path = mta.queue.load(qid[1])
    data = path.read_bytes()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert data.startswith(b"Received: from client.example (unknown [127.0.0.1])")
    assert re.search(rb"\r\nX-Spam-Status: No, score=-?\d+\.\d+", head), head
    assert b"\n" not in data.replace(b"\r\n", b"")  # header edits keep CRLF line ends
    assert envelope.size == len(data)
    # the daemon saw our queue id (macro i) and the client's address ({client_addr})
    daemon.wait_for_log(re.escape(qid[1]))


@pytest.mark.parametrize("action", ["tempfail", "accept"])
def test_filter_down_applies_milter_default_action(tmp_path: Path, action: str) -> None:
    mta = start_mta(
        tmp_path,
        "--filter",
        f"127.0.0.1:{_dead_port()}",
        config=f"mta: {{milter_default_action: {action}, milter_connect_timeout: 2s}}\n",
    )
    try:
        rc, out = swaks(mta, "--header", "Subject: hi", "--body", "hello\n")
        if action == "tempfail":
            assert rc != 0 and "451 4.7.1 Service unavailable - try again later" in out, out
            assert mta.queue.ids("incoming") == []
        else:
            assert rc == 0, out
            [(_, data)] = mta.queued()
            assert b"X-Spam-Status" not in data
        assert f"milter_default_action={action}" in mta.log()
    finally:
        assert mta.stop() == 0, mta.log()
