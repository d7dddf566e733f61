"""Reading big mboxes message by message, unreadable directories, and which "From " lines
start a message."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import filterd.mailbox
from filterd.mailbox import iter_messages
from tests.daemon_fixture import need_binary

CAP = 64 * 1024


def entry(n: int, body: bytes = b"hello\n") -> bytes:
    return b"From s%d@example.org Mon Jan  5 10:00:00 2026\nSubject: m%d\n\n%s\n\n" % (n, n, body.rstrip(b"\n"))


def subjects(items: list[filterd.mailbox.MailItem]) -> list[bytes]:
    return [i.data.split(b"\n")[1] for i in items if not i.skipped]


def test_mbox_bigger_than_the_cap_is_read_message_by_message(tmp_path: Path) -> None:
    box = tmp_path / "big.mbox"
    box.write_bytes(b"".join(entry(n) for n in range(4000)))
    assert box.stat().st_size > 2 * CAP
    items = list(iter_messages(box, max_message=CAP))
    assert [i.skipped for i in items if i.skipped] == []
    assert subjects(items) == [b"Subject: m%d" % n for n in range(4000)]
    assert items[-1].identifier == f"{box}#4000"


def test_a_message_over_the_cap_inside_an_mbox_is_one_skip(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(entry(1) + entry(2, b"x" * (3 * CAP)) + entry(3) + entry(4, b"y" * CAP))
    items = list(iter_messages(box, max_message=CAP))
    assert [(i.identifier, i.skipped) for i in items if i.skipped] == [
        (f"{box}#2", f"larger than {CAP} bytes"),
        (f"{box}#4", f"larger than {CAP} bytes"),
    ]
    assert subjects(items) == [b"Subject: m1", b"Subject: m3"]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunk_boundaries_do_not_change_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Wherever a read ends (inside "\\nFrom ", a From_ line or a quoted line), the same messages."""
    data = entry(1, b"a\n>From quoted\n\nFrom the desk of the CEO") + entry(2, b"z" * 300) + entry(3)
    data += data.replace(b"\n", b"\r\n")
    box = tmp_path / "box"
    box.write_bytes(data)
    whole = list(iter_messages(box, max_message=200))
    monkeypatch.setattr(filterd.mailbox, "_CHUNK", chunk)
    assert list(iter_messages(box, max_message=200)) == whole
    assert [bool(i.skipped) for i in whole] == [False, True, False] * 2


def test_a_one_message_file_over_the_cap_is_skipped(tmp_path: Path) -> None:
    one = tmp_path / "one.eml"
    one.write_bytes(b"Subject: big\n\n" + b"x" * CAP)
    assert [i.skipped for i in iter_messages(one, max_message=CAP)] == [f"larger than {CAP} bytes"]
    assert [i.skipped for i in iter_messages(one)] == [""]
    assert [i.skipped for i in iter_messages(one, max_message=256 * 1024 * 1024)] == [""]


def stdin_items(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[filterd.mailbox.MailItem]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return list(iter_messages("-", max_message=CAP))


def test_stdin_gets_the_same_per_message_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    items = stdin_items(monkeypatch, b"".join(entry(n) for n in range(3000)) + entry(7, b"x" * CAP))
    assert len(subjects(items)) == 3000
    assert [(i.identifier, i.skipped) for i in items if i.skipped] == [("<stdin>#3001", f"larger than {CAP} bytes")]
    items = stdin_items(monkeypatch, b"Subject: big\n\n" + b"x" * CAP)
    assert [(i.identifier, i.skipped) for i in items] == [("<stdin>", f"larger than {CAP} bytes")]
    assert subjects(stdin_items(monkeypatch, entry(1))) == [b"Subject: m1"]


def test_unreadable_directories_are_skips_not_a_traceback(tmp_path: Path) -> None:
    """Run as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so mode 000 stops reads."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as CI runs it (setpriv drops the capabilities that bypass modes)")
    setpriv = need_binary("setpriv")
    caps = "-dac_override,-dac_read_search"
    good = b"From: a@example.org\nSubject: readable\n\nbody %d\n"
    mail = tmp_path / "mail"
    (mail / "plain" / "locked").mkdir(parents=True)
    (mail / "plain" / "ok.eml").write_bytes(good % 1)
    (mail / "plain" / "locked" / "m.eml").write_bytes(good % 2)
    for md in ("md_cur", "md_root"):
        for sub in ("cur", "new", "tmp"):
            (mail / md / sub).mkdir(parents=True)
        (mail / md / "new" / "1.host").write_bytes(good % 3)
        (mail / md / "cur" / "2.host:2,S").write_bytes(good % 4)
    locked = [mail / "plain" / "locked", mail / "md_cur" / "cur", mail / "md_root"]
    for path in locked:
        path.chmod(0)
    try:
        proc = subprocess.run(
            [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-m", "filterd", "learn"]
            + [
                "--state-dir",
                str(tmp_path / "state"),
                "--ham",
                *(str(mail / d) for d in ("plain", "md_cur", "md_root")),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        for path in locked:
            path.chmod(0o755)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for path in locked:
        assert f"skipped {path}: cannot read directory: Permission denied" in proc.stderr, proc.stderr
    assert "learnt 2 as ham" in proc.stdout and "skipped 3 " in proc.stdout, proc.stdout  # ok.eml, md_cur/new


FROM_LINES = [
    b"From MAILER-DAEMON Mon Jan 12 10:00:05 2026",
    b"From <> Tue Feb  3 09:08:07 2026 +0100",
    b"From a@example.org Wed Mar  4 10:00:00 CET 2026",
    b"From a@example.org Thu Mar  5 10:00 2026 remote from relay",
    b"From - Fri Jan 09 10:00:00 +0000 2026",
    b"From a@example.org Sat Jan 10 10:00:00 2026",
]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_only_a_from_line_after_an_empty_line_starts_a_message(tmp_path: Path, newline: bytes) -> None:
    body = b"hello\n\nFrom the desk of the CEO: buy now\n\nFrom here on Mon Jan 12 we sell\n\nbye\n"
    data = b"".join(line + b"\nSubject: s%d\n\n" % n + body + b"\n" for n, line in enumerate(FROM_LINES))
    box = tmp_path / "box"
    box.write_bytes(data.replace(b"\n", newline))
    items = list(iter_messages(box))
    assert [i.skipped for i in items] == [""] * len(FROM_LINES)
    for n, (item, line) in enumerate(zip(items, FROM_LINES, strict=True)):
        assert item.identifier == f"{box}#{n + 1}"
        expected = line + b"\nSubject: s%d\n\n" % n + body + b"\n"
        assert item.data == expected.replace(b"\n", newline)


def test_a_file_that_begins_with_from_is_an_mbox_whatever_follows(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(b"From someone, sometime\nSubject: odd first line\n\nbody\n")
    assert [(i.identifier, i.skipped) for i in iter_messages(box)] == [(str(box), "")]
