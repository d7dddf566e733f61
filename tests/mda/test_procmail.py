"""procmail (Debian's) as a peer: the classic ``:0fw | filterc`` recipe against a real daemon,
`filterd deliver` as procmail's delivery command, and procmail and `filterd deliver` appending
to one mbox at the same time (both take the dot-lock and the fcntl lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.mailbox import iter_messages
from tests.daemon_fixture import Daemon, need_binary, start_daemon
from tests.mda.helpers import Deliver, maildir_files

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GTUBE = (
    b"From: tester@example.org\nTo: alice@example.org\nSubject: a GTUBE test\nMessage-ID: <gtube@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
HAM = (ROOT / "corpora" / "ham" / "17-one-line-lunch.eml").read_bytes()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("procmail-daemon"), metrics=False)
    yield d
    assert d.stop() == 0, d.log()


def procmail(tmp_path: Path, rcfile: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {"HOME": str(tmp_path), "PATH": f"{BIN}:/usr/bin:/bin", "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [need_binary("procmail"), "-m", str(rcfile)], input=data, env=env, capture_output=True, timeout=60
    )


def test_procmail_filters_through_filterc(tmp_path: Path, daemon: Daemon) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    rc = tmp_path / "procmailrc"
    rc.write_text(
        f"SHELL=/bin/sh\nMAILDIR={mail}\nLOGFILE={tmp_path}/procmail.log\n"
        f":0fw\n| {BIN}/filterc -U {daemon.unix_path}\n"
        ":0:\n* ^X-Spam-Flag: YES\nJunk-mbox\n"
        ":0:\ninbox-mbox\n"
    )
    for data in (GTUBE, HAM):
        proc = procmail(tmp_path, rc, data)
        assert proc.returncode == 0, (proc, (tmp_path / "procmail.log").read_text())
    (junk,) = iter_messages(mail / "Junk-mbox")
    (inbox,) = iter_messages(mail / "inbox-mbox")
    assert b"\nX-Spam-Flag: YES\n" in junk.data and b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL" in junk.data
    assert b"X-Spam-Flag: YES" not in inbox.data and b"X-Spam-Status: No" in inbox.data
    assert not list(mail.glob("*.lock"))


def test_procmail_hands_ham_to_filterd_deliver(tmp_path: Path, daemon: Daemon, deliver: Deliver) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    maildir = tmp_path / "Maildir"
    config = deliver.config_file({})
    rc = tmp_path / "procmailrc"
    rc.write_text(
        f"SHELL=/bin/sh\nMAILDIR={mail}\nLOGFILE={tmp_path}/procmail.log\n"
        f":0fw\n| {BIN}/filterc -U {daemon.unix_path}\n"
        ":0:\n* ^X-Spam-Flag: YES\nJunk-mbox\n"
        # procmail's own From_ line goes along: deliver drops it and takes the sender from it
        f":0w\n| {BIN}/filterd deliver --config {config} --user alice --maildir {maildir} --no-filter\n"
    )
    ham = HAM.split(b"\n", 1)[1]  # without its Return-Path line, so the From_ line is the sender
    assert HAM.startswith(b"Return-Path:") and b"Return-Path" not in ham
    for data in (GTUBE, ham):
        proc = procmail(tmp_path, rc, b"From owner@example.com Mon Jan  5 10:00:00 2026\n" + data)
        assert proc.returncode == 0, (proc, (tmp_path / "procmail.log").read_text())
    (junk,) = iter_messages(mail / "Junk-mbox")
    assert b"X-Spam-Flag: YES" in junk.data
    (stored,) = maildir_files(maildir)
    data = stored.read_bytes()
    # PROCESS puts procmail's From_ line back on top, as SpamAssassin's does: its sender becomes
    # our Return-Path, and the line itself is not stored
    assert data.startswith(b"Return-Path: <owner@example.com>\nDelivered-To: alice\n")
    # procmail ends what it hands on with an empty line, as it does in an mbox
    assert b"X-Spam-Status: No" in data and data.endswith(HAM.split(b"\n\n", 1)[1] + b"\n")


def test_from_line_kept_by_the_filter_is_written_once_to_an_mbox(
    tmp_path: Path, daemon: Daemon, deliver: Deliver
) -> None:
    """procmail's From_ line comes back from the filter; procmail (Junk) and `filterd deliver`
    (INBOX, which writes a From_ line of its own) each store one separator, no quoted copy."""
    mail = tmp_path / "mail"
    mail.mkdir()
    inbox = tmp_path / "inbox-mbox"
    config = deliver.config_file({})
    rc = tmp_path / "procmailrc"
    rc.write_text(
        f"SHELL=/bin/sh\nMAILDIR={mail}\nLOGFILE={tmp_path}/procmail.log\n"
        f":0fw\n| {BIN}/filterc -U {daemon.unix_path}\n"
        ":0:\n* ^X-Spam-Flag: YES\nJunk-mbox\n"
        f":0w\n| {BIN}/filterd deliver --config {config} --user alice --mbox {inbox} --no-filter\n"
    )
    separator = b"From owner@example.com Mon Jan  5 10:00:00 2026\n"
    for data in (GTUBE, HAM.split(b"\n", 1)[1]):
        proc = procmail(tmp_path, rc, separator + data)
        assert proc.returncode == 0, (proc, (tmp_path / "procmail.log").read_text())
    for box in (mail / "Junk-mbox", inbox):
        raw = box.read_bytes()
        assert raw.startswith(b"From owner@example.com "), raw[:200]
        assert raw.count(b"From owner@example.com ") == 1 and b">From " not in raw, raw[:300]
        (item,) = iter_messages(box)
        assert b"X-Spam-Status: " in item.data
    assert b"\nX-Spam-Flag: YES\n" in (mail / "Junk-mbox").read_bytes()
    assert b"\nReturn-Path: <owner@example.com>\nDelivered-To: alice\n" in inbox.read_bytes()


def test_procmail_and_deliver_append_to_one_mbox_at_once(tmp_path: Path, deliver: Deliver) -> None:
    box = tmp_path / "shared-mbox"
    rc = tmp_path / "procmailrc"
    # LOCKSLEEP: procmail waits 8 s between tries at a dot-lock by default
    rc.write_text(f"SHELL=/bin/sh\nLOGFILE={tmp_path}/procmail.log\nLOCKSLEEP=1\n:0:\n{box}\n")
    config = deliver.config_file({})
    body = b"p" * 50_000 + b"\n"
    env = {"HOME": str(tmp_path), "PATH": f"{BIN}:/usr/bin:/bin"}
    procs = []
    for n in range(8):
        message = b"From: x@example.org\nSubject: %s %d\n\n" % (b"procmail" if n % 2 else b"deliver", n) + body
        if n % 2:  # procmail -m writes the From_ line it is given (an MTA gives one)
            message = b"From x@example.org Mon Jan  5 10:00:00 2026\n" + message
            cmd = [need_binary("procmail"), "-m", str(rc)]
        else:
            cmd = [sys.executable, "-m", "filterd", "deliver", "--config", str(config), "--user", "alice"]
            cmd += ["--mbox", str(box), "--no-filter"]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, env={**os.environ, **env})
        procs.append((p, message))
    for p, message in procs:
        assert p.stdin is not None
        p.stdin.write(message)
        p.stdin.close()
    assert [p.wait(60) for p, _ in procs] == [0] * 8
    items = list(iter_messages(box))
    subjects = sorted(i.data.split(b"Subject: ")[1].split(b"\n")[0] for i in items)
    assert subjects == sorted(b"%s %d" % (b"procmail" if n % 2 else b"deliver", n) for n in range(8))
    assert all(i.data.endswith(body + b"\n") for i in items)
