"""mbox delivery: mboxrd quoting read back by filterd's own reader, locking against other
processes (fcntl holders, procmail's lockfile, stale dot-locks), truncate-back on failure."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filterd.errors import TemporaryDeliveryError
from filterd.mailbox import iter_messages
from filterd.mda import mbox as mbox_module
from filterd.mda.mbox import deliver_mbox, from_line, mbox_entry, quote_from_lines
from tests.daemon_fixture import need_binary
from tests.mda.helpers import Deliver

TRICKY = (
    b"From: a@example.org\nSubject: quoting\n\n"
    b"From the start of a line\n"
    b">From already quoted once\n"
    b">>From twice\n"
    b"From\n"  # no space: not a From_ line
    b"From:looks like a header\n"
    b" From indented\n"
    b"\n"
    b"From after an empty line\n"
    b"last line without newline"
)
PLAIN = b"From: b@example.org\nSubject: plain\n\nhello\n"


def test_quoting() -> None:
    assert quote_from_lines(b"From x\n>From y\n>>From z\nFromage\n From w\n") == (
        b">From x\n>>From y\n>>>From z\nFromage\n From w\n"
    )
    when = time.mktime((2026, 1, 5, 10, 0, 0, 0, 0, -1))
    assert from_line("a@example.org", when) == b"From a@example.org Mon Jan  5 10:00:00 2026\n"
    assert from_line("", when).startswith(b"From MAILER-DAEMON ")
    assert from_line(None, when).startswith(b"From MAILER-DAEMON ")
    assert from_line("odd sender@x", when).startswith(b"From odd_sender@x ")
    assert mbox_entry(b"Subject: x\n\nno newline", "a@b", when).endswith(b"no newline\n\n")


def test_round_trip_through_filterds_mbox_reader(tmp_path: Path) -> None:
    box = tmp_path / "mbox"
    messages = [TRICKY, PLAIN, TRICKY.replace(b"quoting", b"again")]
    for i, message in enumerate(messages):
        deliver_mbox(box, message, sender=f"s{i}@example.org")
    items = list(iter_messages(box))
    assert len(items) == 3
    for i, (item, original) in enumerate(zip(items, messages, strict=True)):
        head, _, rest = item.data.partition(b"\n")
        assert head.startswith(b"From s%d@example.org " % i)
        expected = original if original.endswith(b"\n") else original + b"\n"
        assert rest == expected + b"\n"  # the reader keeps the empty separator line
    assert (box.stat().st_mode & 0o777) == 0o600


def test_appending_after_a_message_without_an_empty_line(tmp_path: Path) -> None:
    box = tmp_path / "mbox"
    box.write_bytes(b"From x Mon Jan  5 10:00:00 2026\nSubject: old\n\nno final newline")
    deliver_mbox(box, PLAIN, sender="s@example.org")
    data = box.read_bytes()
    assert b"no final newline\n\nFrom s@example.org " in data
    assert [i.data.split(b"\n")[1] for i in iter_messages(box)] == [b"Subject: old", b"From: b@example.org"]


def test_failed_write_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "mbox"
    deliver_mbox(box, PLAIN, sender="s@example.org")
    before = box.read_bytes()

    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mbox_module, "write_all", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        deliver_mbox(box, TRICKY, sender="s@example.org")
    assert box.read_bytes() == before and not (tmp_path / "mbox.lock").exists()


def test_failed_fsync_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "mbox"
    deliver_mbox(box, PLAIN, sender="s@example.org")
    before = box.read_bytes()
    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        deliver_mbox(box, TRICKY, sender="s@example.org")
    assert box.read_bytes() == before


def test_cli_write_failure_mid_way_leaves_the_mbox_byte_identical(tmp_path: Path, deliver: Deliver) -> None:
    """RLIMIT_FSIZE lets the append start and fail part way (EFBIG), as a full disk would."""
    box = tmp_path / "mbox"
    for i in range(3):
        deliver_mbox(box, PLAIN + b"%d\n" % i, sender="s@example.org")
    before = box.read_bytes()
    limit = len(before) + 1000

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    big = PLAIN + b"y" * 100_000 + b"\n"
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=big, preexec_fn=set_limit)
    assert proc.returncode == 75, proc
    assert b"File too large" in proc.stderr
    assert box.read_bytes() == before
    assert not (tmp_path / "mbox.lock").exists()
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=big)  # without the limit
    assert proc.returncode == 0 and box.read_bytes().startswith(before)


# holds the fcntl lock of argv[1] until stdin closes (or argv[2] seconds pass)
_FCNTL_HOLDER = """
import fcntl, os, sys, time, select
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))
"""


def test_fcntl_lock_held_by_another_process(tmp_path: Path, deliver: Deliver) -> None:
    box = tmp_path / "mbox"
    deliver_mbox(box, PLAIN, sender="s@example.org")
    before = box.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", _FCNTL_HOLDER, str(box), "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=TRICKY, lock_timeout="1s")
        assert proc.returncode == 75 and b"locked (fcntl) by another program" in proc.stderr, proc
        assert 1 <= time.monotonic() - started < 20
        assert box.read_bytes() == before and not (tmp_path / "mbox.lock").exists()
    finally:
        holder.communicate(timeout=10)
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=TRICKY, lock_timeout="1s")
    assert proc.returncode == 0, proc


def test_waits_for_a_lock_released_in_time(tmp_path: Path, deliver: Deliver) -> None:
    box = tmp_path / "mbox"
    holder = subprocess.Popen(
        [sys.executable, "-c", _FCNTL_HOLDER, str(box), "1.5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    started = time.monotonic()
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=PLAIN, lock_timeout="30s")
    holder.communicate(timeout=10)
    assert proc.returncode == 0 and time.monotonic() - started >= 1.0, proc
    assert len(list(iter_messages(box))) == 1


def test_dotlock_of_procmails_lockfile(tmp_path: Path, deliver: Deliver) -> None:
    """procmail's lockfile(1) makes PATH.lock the way procmail does; we must wait for it."""
    lockfile = need_binary("lockfile")
    box = tmp_path / "mbox"
    lock = tmp_path / "mbox.lock"
    subprocess.run([lockfile, "-r0", str(lock)], check=True, timeout=30)
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=PLAIN, lock_timeout="1s")
    assert proc.returncode == 75 and b"held by another program" in proc.stderr, proc
    assert lock.exists() and box.read_bytes() == b""  # created empty, then nothing written
    # older than deliver.stale_lock: left over by a crash, removed (with a warning)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=PLAIN, stale_lock="10m")
    assert proc.returncode == 0 and b"removed stale lock" in proc.stderr, proc
    assert not lock.exists() and len(list(iter_messages(box))) == 1


def test_our_dotlock_keeps_lockfile_out(tmp_path: Path) -> None:
    lockfile = need_binary("lockfile")
    box = tmp_path / "mbox"
    fd = os.open(box, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with mbox_module.MboxLock(box, fd, timeout=5, stale=500):
            assert (tmp_path / "mbox.lock").read_bytes() == b"%d\n" % os.getpid()
            proc = subprocess.run([lockfile, "-r0", str(tmp_path / "mbox.lock")], capture_output=True, timeout=30)
            assert proc.returncode != 0
        assert not (tmp_path / "mbox.lock").exists()
        (tmp_path / "mbox.lock").write_text("someone else\n")

        def take() -> None:
            with mbox_module.MboxLock(box, fd, timeout=0.2, stale=500):
                pass

        with pytest.raises(TemporaryDeliveryError, match="lock timeout"):
            take()
        assert (tmp_path / "mbox.lock").read_text() == "someone else\n"  # not ours to remove
    finally:
        os.close(fd)


def test_concurrent_appends_from_12_processes_stay_whole(tmp_path: Path, deliver: Deliver) -> None:
    box = tmp_path / "mbox"
    config = deliver.config_file({})
    body = b"z" * 20_000 + b"\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "filterd", "deliver", "--config", str(config), "--user", "alice"]
            + ["--mbox", str(box), "--no-filter", "-f", f"p{n}@example.org"],
            stdin=subprocess.PIPE,
        )
        for n in range(12)
    ]
    for n, p in enumerate(procs):
        assert p.stdin is not None
        p.stdin.write(PLAIN + b"%d\n" % n + body)
        p.stdin.close()
    assert [p.wait(60) for p in procs] == [0] * 12
    items = list(iter_messages(box))
    assert len(items) == 12
    numbers = sorted(int(i.data.split(b"hello\n")[1].split(b"\n")[0]) for i in items)
    assert numbers == list(range(12)) and all(i.data.endswith(body + b"\n") for i in items)


def test_not_a_regular_file(tmp_path: Path, deliver: Deliver) -> None:
    (tmp_path / "dir").mkdir()
    proc = deliver("--user", "alice", "--mbox", str(tmp_path / "dir"), "--no-filter", data=PLAIN)
    assert proc.returncode == 73, proc
