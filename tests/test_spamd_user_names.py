"""Every spamd user is scanned: a name with no settings file, or one that cannot name a file in
the prefs directory, gets the global settings (spamd scans a user it does not know), never
EX_NOUSER, which spamc turns into "0/0" and the message passed on unscanned.

The name check guards the file lookup only: names that could reach outside the directory never
become a path. Proved here with settings files planted where such a path would lead, each with a
threshold no test would otherwise see.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.engine.prefs import UserPrefsStore
from tests.daemon_fixture import Daemon, need_binary, start_daemon

GTUBE = (
    b"From: tester@example.org\nTo: admin@example.org\nSubject: user names\nMessage-ID: <un@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
PLANTED = "required_score: 777\n"  # where a path built from an unsafe name would lead
SPAM_DEFAULT = re.compile(rb"^1\d{3}\.\d/5\.0\n$")  # GTUBE's 1000 and more, the global threshold


def layout(root: Path) -> Path:
    """``root/prefs`` with real users' files, and decoys around and inside it; the prefs dir."""
    prefs = root / "prefs"
    (prefs / "sub").mkdir(parents=True)
    (prefs / "user#1@example.org.yaml").write_text("required_score: 42\n")
    (prefs / "o'hara@example.org.yaml").write_text("required_score: 43\n")
    (root / "etc.yaml").write_text(PLANTED)  # "../etc"
    (root / "secret.yaml").write_text(PLANTED)  # the absolute name of it, minus .yaml
    (prefs / "sub" / "x.yaml").write_text(PLANTED)  # "sub/x"
    (prefs / ".hidden.yaml").write_text(PLANTED)  # ".hidden"
    (prefs / "a..b.yaml").write_text(PLANTED)  # "a..b"
    return prefs


def unsafe_names(root: Path) -> list[str]:
    return ["../etc", str(root / "secret"), "sub/x", ".hidden", "a..b", "sub\\x", "x" * 129, "../../etc/passwd"]


# -- the store on its own ------------------------------------------------------------------------


def test_store_gives_defaults_for_names_that_cannot_name_a_file_and_reads_nothing_for_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = UserPrefsStore(str(layout(tmp_path)))
    assert store.get("user#1@example.org").required_score == 42
    assert store.get("o'hara@example.org").required_score == 43
    assert store.get("nobody@example.org").required_score is None  # no file: defaults, as before
    caplog.set_level(logging.DEBUG, logger="filterd")
    touched: list[str] = []
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        # Only what a prefs lookup would stat: threads left by earlier tests stat files too.
        if isinstance(path, (str, os.PathLike)):
            name = os.fsdecode(os.fspath(path))
            if name.endswith(".yaml") and (str(tmp_path) in name or "passwd" in name):
                touched.append(name)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    for name in unsafe_names(tmp_path):
        for _ in range(3):
            assert store.get(name).required_score is None, name
    assert touched == []  # not even a stat for such a name
    assert store.get("user#1@example.org").required_score == 42 and touched  # (the spy works)
    records = [r for r in caplog.records if r.name == "filterd.engine.prefs"]
    assert all(r.levelno < logging.WARNING for r in records), records
    assert len(records) == len(unsafe_names(tmp_path)), records  # once per name, not per message


# -- a real daemon and Debian's spamc ------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user_names")


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[Daemon]:
    prefs = layout(root)
    config = "bayes: {enabled: true, autolearn: false}\n"
    d = start_daemon(root, "--user-prefs", str(prefs), "--allow-tell", config=config, workers=1)
    yield d
    assert d.stop() == 0, d.log()


def spamc(daemon: Daemon, *args: str, data: bytes = GTUBE) -> subprocess.CompletedProcess[bytes]:
    binary = need_binary("spamc")
    return subprocess.run([binary, "-U", str(daemon.unix_path), *args], input=data, capture_output=True, timeout=60)


@pytest.mark.parametrize("user", ["o'brien@example.org", "user#2@example.org", "!bang", "a b", "Ünïcode"])
def test_spamc_scans_a_user_without_a_settings_file(daemon: Daemon, user: str) -> None:
    proc = spamc(daemon, "-c", "-u", user)
    assert proc.returncode == 1 and SPAM_DEFAULT.match(proc.stdout), proc  # not "0/0": scanned
    proc = spamc(daemon, "-u", user)
    assert proc.returncode == 0 and b"X-Spam-Flag: YES" in proc.stdout, proc


def test_spamc_uses_the_settings_file_of_a_name_the_old_check_refused(daemon: Daemon) -> None:
    proc = spamc(daemon, "-c", "-u", "user#1@example.org")
    assert proc.returncode == 1 and proc.stdout.endswith(b"/42.0\n"), proc
    proc = spamc(daemon, "-c", "-u", "o'hara@example.org")
    assert proc.returncode == 1 and proc.stdout.endswith(b"/43.0\n"), proc


def test_spamc_scans_and_tell_learns_unsafe_names_with_global_settings_reading_no_planted_file(
    daemon: Daemon, root: Path
) -> None:
    for user in unsafe_names(root):
        proc = spamc(daemon, "-c", "-u", user)
        assert proc.returncode == 1 and SPAM_DEFAULT.match(proc.stdout), (user, proc)  # never /777.0
        proc = spamc(daemon, "-R", "-u", user)
        assert b"777" not in proc.stdout and b"GTUBE" in proc.stdout, (user, proc)
    # TELL: Bayes is one store for all users; it never looked at the name, and still does not.
    for user in ("o'brien@example.org", "../etc"):
        proc = spamc(daemon, "-L", "forget", "-u", user)
        assert proc.returncode == 0, proc
        proc = spamc(daemon, "-L", "spam", "-u", user)
        assert proc.returncode == 0 and b"Message successfully un/learned" in proc.stdout, proc
    log = daemon.log()
    for user in unsafe_names(root):  # logged once for the two requests, at INFO
        assert log.count(f"cannot name a settings file: {user[:64]!r}") == 1, user
    assert "WARNING filterd.engine.prefs" not in log and "refused request" not in log


def test_raw_check_with_a_traversing_user_is_answered_with_a_verdict(daemon: Daemon) -> None:
    reply = daemon.request(
        b"CHECK SPAMC/1.5\r\nUser: ../../../etc/shadow\r\nContent-length: %d\r\n\r\n%b" % (len(GTUBE), GTUBE)
    )
    assert re.fullmatch(rb"SPAMD/1\.1 0 EX_OK\r\nSpam: True ; 1\d{3}\.\d / 5\.0\r\n\r\n", reply), reply
