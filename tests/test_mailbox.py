"""Reading messages from Maildir, mbox (mboxo/mboxrd quoting), directories and stdin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from filterd.mailbox import count_sources, iter_messages, looks_like_mail

MBOX = (
    b"From alice@example.org Mon Jan  5 10:00:00 2026\n"
    b"Subject: one\n\nfirst body\n>From the start, quoted\n>>From twice quoted\n\n"
    b"From bob@example.org Mon Jan  5 11:00:00 2026\n"
    b"Subject: two\n\nsecond body\nFrom inside a paragraph is not a separator\n"
)


def test_mbox_splits_on_from_lines_after_blank_lines_and_unquotes(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(MBOX)
    items = list(iter_messages(box))
    assert [i.identifier for i in items] == [f"{box}#1", f"{box}#2"]
    assert items[0].data.endswith(b"first body\nFrom the start, quoted\n>From twice quoted\n\n")
    assert b"From inside a paragraph" in items[1].data
    assert count_sources(box) == 1


def test_maildir_with_subfolders_skips_tmp(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp", ".Junk/cur", ".Junk/new", ".Junk/tmp"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1.host").write_bytes(b"Subject: new\n\nx\n")
    (md / "cur" / "2.host:2,S").write_bytes(b"Subject: seen\n\nx\n")
    (md / "tmp" / "3.host").write_bytes(b"Subject: half-delivered\n\nx\n")
    (md / ".Junk" / "cur" / "4.host:2,").write_bytes(b"Subject: junk\n\nx\n")
    subjects = [i.data.split(b"\n")[0] for i in iter_messages(md)]
    assert subjects == [b"Subject: new", b"Subject: seen", b"Subject: junk"]


def test_directory_recursion_and_skips_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "m1").write_bytes(b"From: x@example.org\nSubject: deep\n\nbody\n")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"Subject: hidden\n\n")
    items = list(iter_messages(tmp_path))
    good = [i for i in items if not i.skipped]
    skipped = {Path(i.identifier).name: i.skipped for i in items if i.skipped}
    assert [Path(i.identifier).name for i in good] == ["m1"]
    assert skipped == {"empty": "empty", "picture.png": "not a mail message (no header lines at the start)"}
    assert list(iter_messages(tmp_path / "nope"))[0].skipped == "no such file or directory"


def test_stdin_mbox() -> None:
    code = "from filterd.mailbox import iter_messages\nprint(len([i for i in iter_messages('-') if i.data]))"
    out = subprocess.run([sys.executable, "-c", code], input=MBOX, capture_output=True, check=True).stdout
    assert out.strip() == b"2"


def test_looks_like_mail() -> None:
    assert looks_like_mail(b"From a@b Mon\nReceived: from x\n\n")
    assert looks_like_mail(b"\nSubject: leading blank line\n\n")
    assert not looks_like_mail(b"Hello there, this is prose.\n")
