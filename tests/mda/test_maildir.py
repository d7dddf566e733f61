"""Maildir delivery: durable (fsync before link, directory after), unique names under
concurrency, Maildir++ subfolders, and nothing left behind when a write fails."""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from filterd.mda import maildir as maildir_module
from filterd.mda.maildir import Maildir, folder_dirname, imap_utf7
from tests.mda.helpers import Deliver, maildir_files

MSG = b"From: a@example.org\nTo: b@example.org\nSubject: hello\n\nbody line\n"
# maildir(5) modern unique name, then Dovecot's size fields
NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)R([0-9a-f]{16})\.([^,/:]+),S=(\d+),W=(\d+)$")


def test_delivery_creates_the_maildir_and_stores_in_new(tmp_path: Path) -> None:
    root = tmp_path / "home" / "alice" / "Maildir"
    path = Maildir(root).deliver(MSG)
    assert path.parent == root / "new" and path.read_bytes() == MSG
    assert all((root / sub).is_dir() for sub in ("cur", "new", "tmp"))
    assert list((root / "tmp").iterdir()) == []
    m = NAME.match(path.name)
    assert m is not None, path.name
    assert abs(int(m.group(1)) - time.time()) < 60 and int(m.group(3)) == os.getpid()
    assert int(m.group(7)) == len(MSG) and int(m.group(8)) == len(MSG) + MSG.count(b"\n")
    assert (path.stat().st_mode & 0o777) == 0o600


def test_sizes_in_names_can_be_turned_off(tmp_path: Path) -> None:
    path = Maildir(tmp_path / "md", sizes=False).deliver(MSG)
    assert ",S=" not in path.name and path.name.endswith("." + maildir_module._escaped_host())


def test_host_name_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "a/b:c,d")
    assert maildir_module._escaped_host() == "a\\057b\\072c\\054d"


def test_fsync_file_before_link_then_the_new_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path) -> None:
        events.append(("link", str(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    md = Maildir(tmp_path / "md")
    md.ensure()
    events.clear()
    path = md.deliver(MSG)
    assert events == [
        ("fsync", str(tmp_path / "md" / "tmp" / path.name)),
        ("link", str(path)),
        ("fsync", str(tmp_path / "md" / "new")),
    ]


def test_rename_where_hard_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: str | Path, dst: str | Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = Maildir(tmp_path / "md").deliver(MSG)
    assert path.read_bytes() == MSG and list((tmp_path / "md" / "tmp").iterdir()) == []


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir_module, "write_all", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        Maildir(tmp_path / "md").deliver(MSG)
    assert list((tmp_path / "md" / "tmp").iterdir()) == [] and list((tmp_path / "md" / "new").iterdir()) == []


def test_subfolders_are_maildir_plus_plus(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "md")
    junk = md.deliver(MSG, "Junk")
    assert junk.parent == tmp_path / "md" / ".Junk" / "new"
    folder = tmp_path / "md" / ".Junk"
    assert (folder / "maildirfolder").is_file() and all((folder / s).is_dir() for s in ("cur", "new", "tmp"))
    assert md.deliver(MSG, "Lists/dev").parent.parent.name == ".Lists.dev"
    assert md.deliver(MSG, "INBOX.Archive").parent.parent.name == ".Archive"
    assert md.deliver(MSG, "Entwürfe").parent.parent.name == ".Entw&APw-rfe"
    assert md.deliver(MSG, "inbox").parent == tmp_path / "md" / "new"


def test_imap_utf7_and_folder_names() -> None:
    assert imap_utf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"  # RFC 3501's example
    assert imap_utf7("Tom & Jerry") == "Tom &- Jerry"
    assert folder_dirname("INBOX") is None and folder_dirname("Junk") == ".Junk"
    for bad in ("", ".Junk", "a..b", "a/", "a. b", "a\nb", "INBOX."):
        with pytest.raises(ValueError, match="not a folder name"):
            folder_dirname(bad)


def test_200_concurrent_deliveries_in_threads_get_unique_names(tmp_path: Path) -> None:
    root = tmp_path / "md"
    barrier = threading.Barrier(200)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            Maildir(root).deliver(MSG + b"%d\n" % i, "Junk" if i % 2 else "INBOX")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = maildir_files(root) + maildir_files(root, ".Junk")
    assert len(files) == 200 and len({f.name for f in files}) == 200
    assert sorted(int(f.read_bytes().rsplit(b"\n", 2)[-2]) for f in files) == list(range(200))


# 5 deliveries per process, all processes released at the same moment
_WORKER = """
import sys, time
from filterd.mda.maildir import Maildir
root, start, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
md = Maildir(root)
time.sleep(max(0.0, start - time.time()))
for i in range(5):
    md.deliver(b"Subject: x\\n\\n%d %d\\n" % (n, i))
"""


def test_200_deliveries_from_40_processes_at_once_get_unique_names(tmp_path: Path) -> None:
    root = tmp_path / "md"
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(start), str(n)]) for n in range(40)]
    assert [p.wait(60) for p in procs] == [0] * 40
    files = maildir_files(root)
    assert len({f.name for f in files}) == 200
    bodies = {f.read_bytes().split(b"\n\n", 1)[1] for f in files}
    assert bodies == {b"%d %d\n" % (n, i) for n in range(40) for i in range(5)}


def test_cli_maildir_delivery_and_exit_codes(tmp_path: Path, deliver: Deliver) -> None:
    root = tmp_path / "Maildir"
    proc = deliver("--user", "alice", "--maildir", str(root), "--no-filter", "-f", "s@example.org", data=MSG)
    assert proc.returncode == 0 and proc.stderr == b"", proc
    (stored,) = maildir_files(root)
    assert stored.read_bytes() == b"Return-Path: <s@example.org>\nDelivered-To: alice\n" + MSG
    # a file where the Maildir should be: cannot create (73), never exit 0
    (tmp_path / "file").write_bytes(b"")
    proc = deliver("--user", "alice", "--maildir", str(tmp_path / "file"), "--no-filter", data=MSG)
    assert proc.returncode == 73, proc


def test_cli_write_failure_defers_and_leaves_nothing(tmp_path: Path, deliver: Deliver) -> None:
    """RLIMIT_FSIZE makes the write fail with EFBIG part way, like a full disk: exit 75."""
    root = tmp_path / "Maildir"
    Maildir(root).ensure()
    big = MSG + b"x" * 200_000 + b"\n"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    proc = deliver("--user", "alice", "--maildir", str(root), "--no-filter", data=big, preexec_fn=limit)
    assert proc.returncode == 75, proc
    assert b"File too large" in proc.stderr and b"deferred" in proc.stderr
    assert list((root / "tmp").iterdir()) == [] and list((root / "new").iterdir()) == []


def test_deliveries_per_second(tmp_path: Path) -> None:
    """Not a pass/fail bound: the rate printed with -s (each delivery fsyncs a file and new/)."""
    md = Maildir(tmp_path / "md")
    md.ensure()
    n = 300
    started = time.perf_counter()
    for i in range(n):
        md.deliver(MSG + b"%d\n" % i)
    rate = n / (time.perf_counter() - started)
    print(f"\nMaildir: {rate:.0f} deliveries/s in one process (fsync on)")
    assert len(maildir_files(tmp_path / "md")) == n
