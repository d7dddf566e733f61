"""Mail delivered by `filterd deliver`, read back by a real Dovecot over IMAP (imaplib): the
bytes, the sizes taken from our file names, and the Junk folder filled by a recipe."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_fixture import Daemon, start_daemon
from tests.dovecot_fixture import Dovecot, start_dovecot
from tests.mda.helpers import Deliver, maildir_files

ROOT = Path(__file__).resolve().parents[2]
GTUBE = (
    b"From: tester@example.org\nTo: alice@example.org\nSubject: a GTUBE test\nMessage-ID: <gtube@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
HAM = (ROOT / "corpora" / "ham" / "17-one-line-lunch.eml").read_bytes()
EIGHT_BIT = (ROOT / "corpora" / "ham" / "13-french-utf8-quoted-printable.eml").read_bytes()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("dovecot-daemon"), metrics=False)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = start_dovecot(tmp_path, {"alice": "wonderland"})
    yield server
    server.stop()


def fetch_all(server: Dovecot, folder: str) -> list[tuple[bytes, int]]:
    """(RFC822 bytes, RFC822.SIZE) of every message in ``folder``, in order."""
    conn = server.imap("alice")
    try:
        typ, data = conn.select(folder, readonly=True)
        assert typ == "OK", data
        count = int(data[0] or b"0")
        out = []
        for n in range(1, count + 1):
            typ, parts = conn.fetch(str(n), "(RFC822.SIZE BODY.PEEK[])")
            assert typ == "OK" and isinstance(parts[0], tuple), parts
            head, body = parts[0]
            m = re.search(rb"RFC822\.SIZE (\d+)", head)
            assert m is not None, head
            out.append((body, int(m.group(1))))
        return out
    finally:
        conn.logout()


def test_dovecot_serves_what_deliver_stored(tmp_path: Path, deliver: Deliver, daemon: Daemon, dovecot: Dovecot) -> None:
    # read as the mail account (deliver drops root's privileges first): next to the mail
    recipes = dovecot.mail_root / "recipes.yaml"
    recipes.write_text("- {verdict: spam, folder: Junk}\n")
    maildir = dovecot.maildir("alice")
    # TCP: the daemon's Unix socket sits in pytest's private tmp, out of the mail account's reach
    args = ["--user", dovecot.mail_user, "--maildir", str(maildir), "--daemon", f"{daemon.host}:{daemon.port}"]
    args += ["--recipes", str(recipes), "--recipient", "alice@example.org", "-f", "sender@example.net"]
    for data in (HAM, GTUBE, EIGHT_BIT):
        proc = deliver(*args, data=data)
        assert proc.returncode == 0 and proc.stderr == b"", proc

    conn = dovecot.imap("alice")
    try:
        typ, listing = conn.list()
        assert typ == "OK"
        assert sorted(line.decode().rsplit(" ", 1)[-1] for line in listing if isinstance(line, bytes)) == [
            "INBOX",
            "Junk",
        ]
    finally:
        conn.logout()

    stored_inbox = [p.read_bytes() for p in maildir_files(maildir)]
    stored_junk = [p.read_bytes() for p in maildir_files(maildir, ".Junk")]
    assert len(stored_inbox) == 2 and len(stored_junk) == 1
    for folder, stored in (("INBOX", stored_inbox), ("Junk", stored_junk)):
        served = fetch_all(dovecot, folder)
        assert sorted(body for body, _ in served) == sorted(s.replace(b"\n", b"\r\n") for s in stored)
        assert all(size == len(body) for body, size in served)  # W= in the name was right
    (junk,) = stored_junk
    assert junk.startswith(b"Return-Path: <sender@example.net>\nDelivered-To: alice@example.org\n")
    assert b"\nX-Spam-Flag: YES\n" in junk
    for message in stored_inbox:
        assert b"X-Spam-Flag: YES" not in message and b"X-Spam-Status: No" in message
    assert any(m.endswith(EIGHT_BIT.split(b"\n\n", 1)[1]) for m in stored_inbox)
    assert "Error" not in dovecot.log() and "Warning" not in dovecot.log(), dovecot.log()
