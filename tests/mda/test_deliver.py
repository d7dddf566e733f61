"""`filterd deliver` end to end: headers it adds, recipes and their actions, exit codes, user
privileges, and the daemon: a real `filterd daemon`, down, slow, or skipped for big mail."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterd.mailbox import iter_messages
from tests.daemon_fixture import Daemon, start_daemon
from tests.mda.helpers import Deliver, maildir_files

ROOT = Path(__file__).resolve().parents[2]
GTUBE = (
    b"From: tester@example.org\nTo: alice@example.org\nSubject: a GTUBE test\nMessage-ID: <gtube@example.org>\n"
    b"Date: Mon, 05 Jan 2026 10:00:00 +0000\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
HAM = (ROOT / "corpora" / "ham" / "17-one-line-lunch.eml").read_bytes()
MSG = b"From: a@example.org\nTo: alice@example.org\nSubject: hello\n\nbody\n"


def only(root: Path, folder: str = "") -> bytes:
    files = maildir_files(root, folder)
    assert len(files) == 1, files
    return files[0].read_bytes()


def md_args(tmp_path: Path, *more: str, user: str = "alice") -> list[str]:
    return ["--user", user, "--maildir", str(tmp_path / "Maildir"), *more]


def recipes(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipes.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ envelope


def test_return_path_and_delivered_to_are_prepended(tmp_path: Path, deliver: Deliver) -> None:
    proc = deliver(
        *md_args(tmp_path, "--no-filter", "-f", "<s@example.org>", "--recipient", "alice@example.org"), data=MSG
    )
    assert proc.returncode == 0, proc
    assert only(tmp_path / "Maildir") == b"Return-Path: <s@example.org>\nDelivered-To: alice@example.org\n" + MSG


def test_what_the_mta_prepended_is_not_repeated_and_a_from_line_gives_the_sender(
    tmp_path: Path, deliver: Deliver
) -> None:
    # Postfix's local(8) hands mailbox_command the message with these two already on top
    prepended = b"Return-Path: <s@example.org>\nDelivered-To: alice\n" + MSG
    assert deliver(*md_args(tmp_path, "--no-filter"), data=prepended).returncode == 0
    assert only(tmp_path / "Maildir") == prepended
    # a procmail-style From_ line: dropped, its address becomes the sender; CRLF becomes LF
    box = tmp_path / "mbox"
    data = b"From bounce@example.net Mon Jan  5 10:00:00 2026\r\n" + MSG.replace(b"\n", b"\r\n")
    proc = deliver("--user", "alice", "--mbox", str(box), "--no-filter", data=data)
    assert proc.returncode == 0, proc
    (item,) = iter_messages(box)
    assert item.data.startswith(b"From bounce@example.net ")
    assert item.data.split(b"\n", 1)[1] == b"Return-Path: <bounce@example.net>\nDelivered-To: alice\n" + MSG + b"\n"


def test_null_sender(tmp_path: Path, deliver: Deliver) -> None:
    assert deliver(*md_args(tmp_path, "--no-filter", "-f", ""), data=MSG).returncode == 0
    assert only(tmp_path / "Maildir").startswith(b"Return-Path: <>\n")


# ---------------------------------------------------------------------------- exit codes


def test_exit_codes_of_bad_input_user_and_configuration(tmp_path: Path, deliver: Deliver) -> None:
    assert deliver(*md_args(tmp_path, "--no-filter"), data=b"").returncode == 65
    assert deliver(*md_args(tmp_path, "--no-filter", user="../etc"), data=MSG).returncode == 67
    proc = deliver(*md_args(tmp_path, "--no-filter", user="no-such-user-here"), data=MSG, system_users_only=True)
    assert proc.returncode == 67 and b"no such user" in proc.stderr
    # the MTA's mistakes defer mail rather than bounce it
    proc = deliver(*md_args(tmp_path), data=MSG, timeout="banana")
    assert proc.returncode == 75 and b"deliver.timeout" in proc.stderr, proc
    proc = deliver("--user", "alice", "--no-filter", data=MSG)
    assert proc.returncode == 75 and b"one of the arguments --maildir --mbox is required" in proc.stderr
    assert not (tmp_path / "Maildir").exists()


def test_privileges_are_dropped_only_when_started_as_root() -> None:
    """As root, deliver becomes the user before touching files; as anyone else it cannot and
    writes as itself (CI runs as root, so the switch itself is what CI checks)."""
    nobody = pwd.getpwnam("nobody")
    as_root = os.geteuid() == 0
    # a directory outside pytest's 0700 tmp tree, so that nobody can reach it
    base = Path(tempfile.mkdtemp(prefix="filterd-deliver-"))
    try:
        base.chmod(0o755)
        (base / "nobody").mkdir()
        if as_root:
            os.chown(base / "nobody", nobody.pw_uid, nobody.pw_gid)
        run = Deliver(base)
        (base / "filterd-1.yaml").touch()  # config files are read before the switch
        proc = run("--user", "nobody", "--maildir", str(base / "nobody" / "Maildir"), "--no-filter", data=MSG)
        assert proc.returncode == 0, proc
        owner = nobody.pw_uid if as_root else os.geteuid()
        (stored,) = maildir_files(base / "nobody" / "Maildir")
        assert stored.stat().st_uid == owner and (base / "nobody" / "Maildir").stat().st_uid == owner
        if as_root:  # a place only root may write: nobody is refused
            (base / "root-only").mkdir(mode=0o700)
            proc = run("--user", "nobody", "--maildir", str(base / "root-only" / "Maildir"), "--no-filter", data=MSG)
            assert proc.returncode == 77 and b"Permission denied" in proc.stderr, proc
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------------------- recipes


def test_broken_recipes_deliver_to_inbox_with_a_warning_naming_file_and_line(tmp_path: Path, deliver: Deliver) -> None:
    path = recipes(tmp_path, "- verdict: unfiltered\n  discard: true\n- score: '>= 5'\n  folder: [Junk, Spam]\n")
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=MSG)
    assert proc.returncode == 0, proc
    assert f"{path}:4: rule 2.folder: expected one folder".encode() in proc.stderr
    assert b"delivering to INBOX" in proc.stderr
    assert only(tmp_path / "Maildir").endswith(MSG)  # not discarded by the valid first rule
    missing = str(tmp_path / "missing.yaml")
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", missing), data=MSG)
    assert proc.returncode == 0 and f"{missing}: cannot read".encode() in proc.stderr
    assert len(maildir_files(tmp_path / "Maildir")) == 2


def test_recipes_from_the_configuration(tmp_path: Path, deliver: Deliver) -> None:
    path = recipes(tmp_path, "- {header: {Subject: '/^hello$/'}, folder: Greetings}\n")
    assert deliver(*md_args(tmp_path, "--no-filter"), data=MSG, recipes=path).returncode == 0
    assert only(tmp_path / "Maildir", ".Greetings").endswith(MSG)


def test_discard_copy_and_folder(tmp_path: Path, deliver: Deliver) -> None:
    path = recipes(
        tmp_path,
        """
- {size: '> 100K', discard: true}
- {sender: '*@example.org', copy: Archive}
- {header: {Subject: '/hello/'}, folder: Hello}
""",
    )
    assert deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=MSG).returncode == 0
    assert only(tmp_path / "Maildir", ".Archive").endswith(MSG) and only(tmp_path / "Maildir", ".Hello")
    assert maildir_files(tmp_path / "Maildir") == []
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path, "-v"), data=MSG + b"x" * 200_000)
    assert proc.returncode == 0 and b"discarded by rule 1" in proc.stderr
    assert len(maildir_files(tmp_path / "Maildir", ".Archive")) == 1  # nothing stored anywhere


def fake_command(tmp_path: Path, name: str, code: int = 0) -> Path:
    """A command recording its argv, environment and stdin under tmp_path/name.*, exiting ``code``."""
    script = tmp_path / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"base = {str(tmp_path / name)!r}\n"
        "n = len([f for f in os.listdir(os.path.dirname(base)) if f.startswith(os.path.basename(base) + '.in')])\n"
        "open(f'{base}.in{n}', 'wb').write(sys.stdin.buffer.read())\n"
        "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(f'{base}.call{n}', 'w'))\n"
        f"sys.exit({code})\n"
    )
    script.chmod(0o755)
    return script


def calls(tmp_path: Path, name: str) -> list[tuple[list[str], dict[str, str], bytes]]:
    import json

    out = []
    for n in range(100):
        if not (tmp_path / f"{name}.call{n}").exists():
            break
        call = json.loads((tmp_path / f"{name}.call{n}").read_text())
        out.append((call["argv"], call["env"], (tmp_path / f"{name}.in{n}").read_bytes()))
    return out


def test_forward_runs_the_sendmail_command(tmp_path: Path, deliver: Deliver) -> None:
    sendmail = fake_command(tmp_path, "sendmail")
    path = recipes(tmp_path, "- {sender: 's@*', forward: [me@phone.example, you@example.net], stop: false}\n")
    args = md_args(tmp_path, "--no-filter", "--recipes", path, "-f", "s@example.org")
    proc = deliver(*args, data=MSG, sendmail=[str(sendmail), "-i"])
    assert proc.returncode == 0, proc
    ((argv, env, data),) = calls(tmp_path, "sendmail")
    assert argv == ["-i", "-f", "s@example.org", "--", "me@phone.example", "you@example.net"]
    assert data == b"Delivered-To: alice\n" + MSG  # no Return-Path on the copy sent on
    assert env["SENDER"] == "s@example.org" and env["RECIPIENT"] == "alice" and env["USER"] == "alice"
    assert only(tmp_path / "Maildir").endswith(MSG)  # stop: false, so INBOX too
    # a message that already went through this mailbox: a loop, kept in INBOX instead
    looped = b"Received: from elsewhere\nDelivered-To: alice\n" + MSG
    proc = deliver(*args, data=looped, sendmail=[str(sendmail), "-i"])
    assert proc.returncode == 0 and b"a mail loop" in proc.stderr
    assert len(calls(tmp_path, "sendmail")) == 1 and len(maildir_files(tmp_path / "Maildir")) == 2


@pytest.mark.parametrize(
    ("code", "expected"),
    [(0, 0), (67, 67), (75, 75), (77, 77), (1, 69), (127, 69)],
)
def test_pipe_status_becomes_ours(tmp_path: Path, deliver: Deliver, code: int, expected: int) -> None:
    command = fake_command(tmp_path, "pipe", code)
    path = recipes(tmp_path, f"- {{verdict: unfiltered, pipe: ['{command}', '--flag']}}\n")
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=MSG)
    assert proc.returncode == expected, proc
    ((argv, env, data),) = calls(tmp_path, "pipe")
    assert argv == ["--flag"] and data == b"Delivered-To: alice\n" + MSG
    assert maildir_files(tmp_path / "Maildir") == []  # the pipe was the delivery (or it failed)


def test_pipe_through_the_shell_then_go_on(tmp_path: Path, deliver: Deliver) -> None:
    out = tmp_path / "piped"
    path = recipes(tmp_path, f"- pipe: 'cat > {out}; echo \"$SENDER\" >> {out}'\n  stop: false\n")
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path, "-f", "s@example.org"), data=MSG)
    assert proc.returncode == 0, proc
    assert out.read_bytes().endswith(MSG + b"s@example.org\n") and only(tmp_path / "Maildir").endswith(MSG)


def test_pipe_killed_or_too_slow_defers(tmp_path: Path, deliver: Deliver) -> None:
    path = recipes(tmp_path, "- pipe: 'kill -9 $$'\n")
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=MSG)
    assert proc.returncode == 75, proc
    path = recipes(tmp_path, "- pipe: 'exec sleep 30'\n")
    started = time.monotonic()
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=MSG, command_timeout="1s")
    assert proc.returncode == 75 and b"was killed" in proc.stderr and time.monotonic() - started < 20, proc
    assert maildir_files(tmp_path / "Maildir") == []


def test_mbox_folders(tmp_path: Path, deliver: Deliver) -> None:
    (tmp_path / "mail" / "Broken").mkdir(parents=True)  # a directory where an mbox file should be
    path = recipes(
        tmp_path,
        f"""
- {{header: {{Subject: '/hello/'}}, copy: lists/dev}}
- {{header: {{Subject: '/hello/'}}, copy: {tmp_path / "abs-box"}}}
- {{header: {{Subject: '/hello/'}}, copy: Broken}}
- {{header: {{Subject: '/hello/'}}, folder: Broken}}
""",
    )
    box = tmp_path / "inbox"
    args = ["--user", "alice", "--mbox", str(box), "--no-filter", "--recipes", path]
    proc = deliver(*args, data=MSG, mbox_folders=str(tmp_path / "mail"))
    assert proc.returncode == 0, proc
    assert b"copy to Broken (rule 3" in proc.stderr and b"delivering to INBOX instead of Broken" in proc.stderr
    for where in (tmp_path / "mail" / "lists" / "dev", tmp_path / "abs-box", box):  # lists/ made on demand
        (item,) = iter_messages(where)
        assert item.data.endswith(MSG + b"\n")
    # ~ in mbox_folders needs a home: alice has none, so relative folders fail and INBOX gets it
    proc = deliver(*args, data=MSG, mbox_folders="~/mail")
    assert proc.returncode == 0 and b"no home directory for alice" in proc.stderr
    assert len(list(iter_messages(box))) == 2 and len(list(iter_messages(tmp_path / "abs-box"))) == 2


# ---------------------------------------------------------------------------- the daemon

JUNK_RECIPES = "- {verdict: spam, folder: Junk}\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("deliver-daemon")
    prefs = tmp / "prefs"
    prefs.mkdir()
    (prefs / "paranoid.yaml").write_text("required_score: -50\n")
    (prefs / "wrapped.yaml").write_text("report_safe: 1\n")
    d = start_daemon(tmp, "--user-prefs", str(prefs), config="scoring: {report_safe: 0}\n")
    yield d
    assert d.stop() == 0, d.log()


def test_gtube_goes_to_junk_and_ham_to_inbox(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    path = recipes(tmp_path, JUNK_RECIPES)
    for data in (GTUBE, HAM):
        proc = deliver(*md_args(tmp_path, "--daemon", str(daemon.unix_path), "--recipes", path), data=data)
        assert proc.returncode == 0 and proc.stderr == b"", proc
    junk = only(tmp_path / "Maildir", ".Junk")
    assert junk.startswith(b"Return-Path:") is False  # no sender known: only Delivered-To
    assert b"\nX-Spam-Flag: YES\n" in junk and junk.endswith(GTUBE.split(b"\n\n", 1)[1])
    inbox = only(tmp_path / "Maildir")
    assert b"X-Spam-Flag: YES" not in inbox and b"X-Spam-Status: No" in inbox
    assert inbox.startswith(b"Delivered-To: alice\n")


def test_recipes_see_score_and_headers_over_tcp(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    path = recipes(
        tmp_path,
        """
- {score: '>= 100', header: {X-Spam-Flag: '/^YES$/'}, folder: Certain}
- {score: '< 5', verdict: ham, folder: Fine}
""",
    )
    args = md_args(tmp_path, "--daemon", f"{daemon.host}:{daemon.port}", "--recipes", path)
    assert deliver(*args, data=GTUBE).returncode == 0
    assert deliver(*args, data=HAM).returncode == 0
    assert only(tmp_path / "Maildir", ".Certain") and only(tmp_path / "Maildir", ".Fine")


def test_the_daemon_is_asked_as_the_user(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    """The user 'paranoid' has required_score -50 in the daemon's prefs: ham is spam to them."""
    path = recipes(tmp_path, JUNK_RECIPES)
    proc = deliver(*md_args(tmp_path, "--daemon", str(daemon.unix_path), "--recipes", path, user="paranoid"), data=HAM)
    assert proc.returncode == 0, proc
    assert b"X-Spam-Flag: YES" in only(tmp_path / "Maildir", ".Junk")


def test_headers_method_keeps_the_body(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    args = md_args(tmp_path, "--daemon", str(daemon.unix_path))
    assert deliver(*args, data=GTUBE, method="headers").returncode == 0
    stored = only(tmp_path / "Maildir")
    assert b"X-Spam-Flag: YES" in stored and stored.endswith(b"\n\n" + GTUBE.split(b"\n\n", 1)[1])


def test_daemon_down_delivers_unfiltered(tmp_path: Path, deliver: Deliver) -> None:
    path = recipes(tmp_path, JUNK_RECIPES + "- {verdict: unfiltered, folder: Unfiltered}\n")
    gone = str(tmp_path / "no-daemon.sock")
    proc = deliver(*md_args(tmp_path, "--daemon", gone, "--recipes", path), data=GTUBE)
    assert proc.returncode == 0 and b"delivering unfiltered" in proc.stderr, proc
    stored = only(tmp_path / "Maildir", ".Unfiltered")
    assert (
        stored
        == b"Delivered-To: alice\nX-Filterd-Skipped: daemon "
        + gone.encode()
        + b" failed (cannot connect"
        + (stored.split(b"(cannot connect", 1)[1])
    )
    assert stored.endswith(GTUBE) and b"X-Spam-Flag" not in stored
    # refused TCP connection, header turned off
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = deliver(*md_args(tmp_path, "--daemon", f"127.0.0.1:{port}"), data=MSG, mark_unfiltered=False)
    assert proc.returncode == 0, proc
    assert only(tmp_path / "Maildir") == b"Delivered-To: alice\n" + MSG


def test_daemon_down_can_defer_instead(tmp_path: Path, deliver: Deliver) -> None:
    proc = deliver(*md_args(tmp_path, "--daemon", str(tmp_path / "gone.sock")), data=MSG, on_daemon_error="tempfail")
    assert proc.returncode == 75 and b"delivery deferred" in proc.stderr, proc
    assert maildir_files(tmp_path / "Maildir") == []


def test_a_daemon_that_never_answers_times_out(tmp_path: Path, deliver: Deliver) -> None:
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen(5)  # connections complete in the backlog, nobody reads or answers
        started = time.monotonic()
        proc = deliver(*md_args(tmp_path, "--daemon", str(tmp_path / "silent.sock")), data=MSG, timeout="500ms")
    assert proc.returncode == 0 and time.monotonic() - started < 15, proc
    assert b"X-Filterd-Skipped: daemon" in only(tmp_path / "Maildir")


def test_big_messages_are_not_sent_to_the_daemon(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    big = GTUBE + b"y" * 3000 + b"\n"
    path = recipes(tmp_path, JUNK_RECIPES)
    proc = deliver(*md_args(tmp_path, "--daemon", str(daemon.unix_path), "--recipes", path), data=big, max_size="2K")
    assert proc.returncode == 0, proc
    stored = only(tmp_path / "Maildir")
    assert b"X-Filterd-Skipped: larger than deliver.max_size (2K)\n" in stored and b"X-Spam" not in stored


# ------------------------------------------------------------------- X-Filterd-Skipped

FORGED_SKIPPED = b"X-Filterd-Skipped: daemon down,\n\tnot scanned\nx-filterd-skipped : again\n"
UNSCANNED = MSG.replace(b"Subject: hello\n", b"Subject: hello\n" + FORGED_SKIPPED)


def skipped_fields(stored: bytes) -> list[bytes]:
    head = stored.partition(b"\n\n")[0]
    return [line for line in head.split(b"\n") if line.lower().startswith(b"x-filterd-skipped")]


@contextlib.contextmanager
def plain_spamd(path: Path) -> Iterator[list[bytes]]:
    """A spamd on a Unix socket that knows nothing of X-Filterd-Skipped (SpamAssassin's, say):
    PROCESS answers with its X-Spam-Status on top of the message as it came. Yields the
    messages it was sent."""
    received: list[bytes] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(5)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(body) < length:
                    body += conn.recv(65536)
                received.append(body)
                out = b"X-Spam-Status: No, score=1.0 required=5.0\n" + body
                conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; 1.0 / 5.0\r\n\r\n%s"
                             % (len(out), out))  # fmt: skip

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)


def test_a_scanned_message_loses_the_x_filterd_skipped_it_came_with(tmp_path: Path, deliver: Deliver) -> None:
    with plain_spamd(tmp_path / "spamd.sock") as received:
        proc = deliver(*md_args(tmp_path, "--daemon", str(tmp_path / "spamd.sock")), data=UNSCANNED)
    assert proc.returncode == 0, proc
    assert received == [b"Delivered-To: alice\n" + UNSCANNED]  # the daemon reads it as it came
    stored = only(tmp_path / "Maildir")
    assert skipped_fields(stored) == [] and b"not scanned" not in stored, stored
    assert stored == b"Delivered-To: alice\nX-Spam-Status: No, score=1.0 required=5.0\n" + MSG


def test_a_scanned_message_through_the_daemon_loses_it_too(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    crlf = UNSCANNED.replace(b"\n", b"\r\n")
    assert deliver(*md_args(tmp_path, "--daemon", str(daemon.unix_path)), data=crlf).returncode == 0
    stored = only(tmp_path / "Maildir")
    assert skipped_fields(stored) == [] and b"X-Spam-Status: No, score=" in stored, stored


def test_unscanned_mail_carries_our_x_filterd_skipped_alone(tmp_path: Path, deliver: Deliver) -> None:
    # the daemon down: ours, saying why, and not the one the message came with
    gone = str(tmp_path / "gone.sock")
    assert deliver(*md_args(tmp_path, "--daemon", gone), data=UNSCANNED).returncode == 0
    stored = only(tmp_path / "Maildir")
    (ours,) = skipped_fields(stored)
    assert ours.startswith(b"X-Filterd-Skipped: daemon " + gone.encode() + b" failed (cannot connect"), stored
    assert stored.endswith(b"\n" + MSG) and b"not scanned" not in stored
    # too big to send, and not marked (deliver.mark_unfiltered off): no X-Filterd-Skipped at all
    big = UNSCANNED + b"y" * 3000 + b"\n"
    cases: tuple[tuple[str, dict[str, Any]], ...] = (("a", {}), ("b", {"mark_unfiltered": False}))
    for folder, settings in cases:
        box = tmp_path / folder
        assert deliver("--user", "alice", "--maildir", str(box), "--daemon", gone, data=big, max_size="2K",
                       **settings).returncode == 0  # fmt: skip
        want = [b"X-Filterd-Skipped: larger than deliver.max_size (2K)"] if not settings else []
        assert skipped_fields(only(box)) == want


def test_no_filter_leaves_x_filterd_skipped_alone(tmp_path: Path, deliver: Deliver) -> None:
    # --no-filter makes no claim: an upstream milter's X-Filterd-Skipped is still true
    assert deliver(*md_args(tmp_path, "--no-filter"), data=UNSCANNED).returncode == 0
    assert only(tmp_path / "Maildir") == b"Delivered-To: alice\n" + UNSCANNED


def test_without_field_reads_the_header_block_only() -> None:
    from filterd.headerblock import without_fields

    name = b"x-filterd-skipped"
    assert without_fields(UNSCANNED, name) == MSG
    # in the body, or past the end of a header block missing its empty line: left alone
    body = b"Subject: a\n\nX-Filterd-Skipped: quoted\n"
    assert without_fields(body, name) == body
    no_blank = b"Subject: a\nX-Filterd-Skipped: x\n\tfolded\nnot a field\nX-Filterd-Skipped: body\n"
    assert without_fields(no_blank, name) == b"Subject: a\nnot a field\nX-Filterd-Skipped: body\n"
    assert without_fields(b"\nX-Filterd-Skipped: body\n", name) == b"\nX-Filterd-Skipped: body\n"
    assert without_fields(b"X-Filterd-Skipped: last", name) == b""


def test_mode_of_stored_files(tmp_path: Path, deliver: Deliver) -> None:
    assert deliver(*md_args(tmp_path, "--no-filter"), data=MSG).returncode == 0
    (path,) = maildir_files(tmp_path / "Maildir")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "Maildir").stat().st_mode) == 0o700


def test_a_forward_loop_skips_only_the_forward(tmp_path: Path, deliver: Deliver) -> None:
    sendmail = fake_command(tmp_path, "sendmail")
    path = recipes(tmp_path, "- {forward: me@phone.example, stop: false}\n- {folder: Kept}\n")
    looped = b"Received: from elsewhere\nDelivered-To: Alice\n" + MSG
    proc = deliver(*md_args(tmp_path, "--no-filter", "--recipes", path), data=looped, sendmail=[str(sendmail)])
    assert proc.returncode == 0 and b"a mail loop" in proc.stderr, proc
    assert calls(tmp_path, "sendmail") == [] and only(tmp_path / "Maildir", ".Kept").endswith(looped)


def test_filtered_mail_keeps_one_return_path_and_delivered_to(tmp_path: Path, deliver: Deliver, daemon: Daemon) -> None:
    """The daemon adds its X-Spam-* fields after the first header line, between the two we
    prepended; neither may then be prepended a second time (ham, tagged spam, wrapped spam)."""
    for n, (data, user) in enumerate(((HAM, "alice"), (GTUBE, "alice"), (GTUBE, "wrapped"))):
        maildir = tmp_path / f"m{n}"
        args = ["--user", user, "--maildir", str(maildir), "--sender", "s@example.org"]
        proc = deliver(*args, "--daemon", str(daemon.unix_path), data=data)
        assert proc.returncode == 0, proc
        stored = only(maildir)
        head = stored.split(b"\n\n", 1)[0]
        ours = [b"Delivered-To: %s\n" % user.encode()]
        if not data.startswith(b"Return-Path:"):  # else the MTA's own leads
            ours.insert(0, b"Return-Path: <s@example.org>\n")
        assert stored.startswith(b"".join(ours)), stored[:400]
        assert all(head.count(line) == 1 for line in ours), stored[:400]
        assert b"X-Spam-" in head
