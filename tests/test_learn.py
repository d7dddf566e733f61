"""`filterd learn` as an admin runs it, and learning through the daemon (spamc -L, filterc -L)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.daemon_fixture import need_binary, start_daemon
from tests.learn_helpers import dump, learn

ROOT = Path(__file__).resolve().parent.parent
SPAM = sorted((ROOT / "corpora" / "spam").glob("*.eml"))
HAM = sorted((ROOT / "corpora" / "ham").glob("*.eml"))


def test_learn_relearn_move_forget_and_summary(tmp_path: Path) -> None:
    state = tmp_path / "state"
    spam_dir = ROOT / "corpora" / "spam"
    proc = learn(state, "--spam", str(spam_dir))
    assert proc.returncode == 0, proc.stderr
    assert f"learnt {len(SPAM)} as spam, already known 0" in proc.stdout
    assert "Bayes stays silent until" in proc.stdout
    proc = learn(state, "--spam", str(spam_dir))
    assert f"learnt 0 as spam, already known {len(SPAM)}" in proc.stdout  # twice counts once
    proc = learn(state, "--ham", str(spam_dir / SPAM[0].name))
    assert "moved from the other class 1" in proc.stdout
    facts = dump(state)
    assert (facts["nspam"], facts["nham"]) == (len(SPAM) - 1, 1)
    proc = learn(state, "--forget", str(spam_dir))
    assert f"forgot {len(SPAM)}, not known 0" in proc.stdout
    facts = dump(state)
    assert (facts["nspam"], facts["nham"]) == (0, 0)


def test_learn_skips_what_is_not_mail_and_reads_mbox_and_stdin(tmp_path: Path) -> None:
    state = tmp_path / "state"
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.txt").write_text("just some notes, not a message\n")
    mbox = b"".join(
        b"From x@example.org Mon Jan  5 10:00:00 2026\n" + p.read_bytes().rstrip(b"\n") + b"\n\n"
        for p in HAM[:3]
        if not p.read_bytes().startswith(b"From ")
    )
    (folder / "inbox.mbox").write_bytes(mbox)
    proc = learn(state, "--ham", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1" in proc.stdout and "notes.txt" in proc.stderr
    learnt = int(proc.stdout.split("learnt ")[1].split(" ")[0])
    assert learnt == mbox.count(b"From x@example.org")
    proc = learn(state, "--spam", "-", stdin=SPAM[0].read_bytes())
    assert "learnt 1 as spam" in proc.stdout


def test_backup_clear_restore_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert learn(state, "--spam", str(ROOT / "corpora" / "spam")).returncode == 0
    assert learn(state, "--ham", str(ROOT / "corpora" / "ham")).returncode == 0
    before = dump(state)
    backup = tmp_path / "bayes.txt"
    assert learn(state, "--backup", str(backup)).returncode == 0
    assert learn(state, "--clear").returncode == 0
    assert dump(state)["nspam"] == 0
    assert learn(state, "--restore", str(backup)).returncode == 0
    after = dump(state)
    assert (after["nspam"], after["nham"], after["ntokens"]) == (before["nspam"], before["nham"], before["ntokens"])


def test_learning_through_the_daemon_reaches_every_worker(tmp_path: Path) -> None:
    """spamc -L / filterc -L learn through the daemon; every worker's BAYES_ scores change within 5 s."""
    spamc = need_binary("spamc")
    filterc = str(Path(sys.executable).parent / "filterc")
    d = start_daemon(tmp_path, "--allow-tell", config="bayes:\n  min_spam: 5\n  min_ham: 5\n", workers=2, metrics=False)
    try:
        where = ["-U", str(d.unix_path)]
        for path in SPAM[:8]:
            out = subprocess.run(
                [spamc, *where, "-L", "spam"], input=path.read_bytes(), capture_output=True, timeout=60
            )
            assert out.stdout == b"Message successfully un/learned\n", out
        out = subprocess.run([spamc, *where, "-L", "spam"], input=SPAM[0].read_bytes(), capture_output=True, timeout=60)
        assert out.stdout == b"Message was already un/learned\n"
        for path in HAM[:8]:
            out = subprocess.run(
                [filterc, *where, "-L", "ham"], input=path.read_bytes(), capture_output=True, timeout=60
            )
            assert out.stdout == b"Message successfully un/learned\n", out
        probe = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(SPAM[10].read_bytes()) + SPAM[10].read_bytes()
        deadline = time.monotonic() + 5
        answers: list[bytes] = []
        while time.monotonic() < deadline:
            answers = [d.request(probe) for _ in range(12)]  # several connections: both workers answer
            if all(b"BAYES_" in a for a in answers):
                break
            time.sleep(0.2)
        assert all(b"BAYES_" in a for a in answers), answers
        out = subprocess.run(
            [filterc, *where, "-L", "forget"], input=SPAM[1].read_bytes(), capture_output=True, timeout=60
        )
        assert out.stdout == b"Message successfully un/learned\n"
    finally:
        assert d.stop() == 0, d.log()
    facts = dump(next(tmp_path.glob("run*/state")))
    assert (facts["nspam"], facts["nham"]) == (7, 8)
