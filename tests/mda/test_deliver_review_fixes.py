"""`filterd deliver` stores what it was given, whatever the daemon or the recipe file does:

- with ``method: headers`` the original body goes back byte for byte (spamc's C buffer rules —
  cut to fit, a NUL ends the body — are for spamc's output, not for a stored message);
- a daemon answer with no header at all is not stored: the message goes in unfiltered;
- a recipe file that parses as YAML but holds an unusable value is a problem of the file like a
  syntax error: the mail goes to the inbox, it is not deferred for ever;
- a side copy (``stop: false``) that fails does not stop the delivery.

The daemon here is a scripted spamd on a Unix socket (one answer per test)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.errors import ConfigError
from filterd.mda.recipes import parse_recipes


@pytest.fixture
def spamd(tmp_path: Path) -> Iterator[Callable[[Callable[[bytes], bytes]], str]]:
    """A one-shot spamd: ``answer(message) -> the message part of the reply``."""
    servers: list[socket.socket] = []

    def start(answer: Callable[[bytes], bytes]) -> str:
        path = str(tmp_path / f"spamd{len(servers)}.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        servers.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length: *(\d+)", head)
            assert match is not None
            while len(body) < int(match.group(1)):
                body += conn.recv(65536)
            out = answer(body)
            conn.sendall(
                b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; 0.0 / 5.0\r\n\r\n%s" % (len(out), out)
            )
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield start
    for srv in servers:
        srv.close()


def deliver(tmp_path: Path, message: bytes, config: str, *args: str) -> tuple[int, list[bytes]]:
    cfg = tmp_path / "filterd.yaml"
    cfg.write_text(config)
    md = tmp_path / "md"
    proc = subprocess.run(
        [sys.executable, "-m", "filterd", "deliver", "--config", str(cfg), "--maildir", str(md), *args],
        input=message,
        capture_output=True,
        timeout=120,
    )
    stored = sorted((md / "new").iterdir()) if (md / "new").is_dir() else []
    return proc.returncode, [p.read_bytes() for p in stored]


def test_headers_method_keeps_the_body_byte_for_byte(tmp_path: Path, spamd: Callable[..., str]) -> None:
    # A NUL in the body, and headers from the daemon 20 KB longer than the message's own.
    body = b"line one\nbinary\x00part\n" + b"".join(b"line %05d of the body\n" % i for i in range(20_000))
    message = b"From: a@example.org\nSubject: big\n\n" + body

    def answer(got: bytes) -> bytes:
        report = b"X-Spam-Report: " + b"\n\t* 0.1 SOME_RULE description of the rule that hit" * 400 + b"\n"
        return report + got.split(b"\n\n", 1)[0] + b"\n\n"

    path = spamd(answer)
    config = "deliver: {recipes: '', method: headers, max_size: 500K}\n"
    code, [stored] = deliver(tmp_path, message, config, "--user", "nobody9", "--daemon", path)
    assert code == 0
    assert stored.endswith(b"\n\n" + body)  # the whole body, the NUL and what follows it included
    assert b"X-Spam-Report: " in stored


def test_an_answer_without_a_message_is_not_stored(tmp_path: Path, spamd: Callable[..., str]) -> None:
    message = b"From: a@example.org\nSubject: hi\n\nhello\n"
    path = spamd(lambda got: b"")
    code, [stored] = deliver(tmp_path, message, "deliver: {recipes: ''}\n", "--user", "nobody9", "--daemon", path)
    assert code == 0 and stored.endswith(message)


@pytest.mark.parametrize("value", ["name: 2024-02-30", "name: !include x", "score: !!int abc", "verdict: {[1]: 2}"])
def test_a_recipe_value_that_cannot_be_used_is_a_problem_of_the_file(tmp_path: Path, value: str) -> None:
    text = f"- {value}\n  sender: '*@example.org'\n  folder: Junk\n"
    with pytest.raises(ConfigError, match="<recipes>:1: unusable value"):
        parse_recipes(text)
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(text)
    message = b"From: a@example.org\nSubject: hi\n\nhello\n"
    config = "deliver: {filter: false}\n"
    code, [stored] = deliver(tmp_path, message, config, "--user", "nobody9", "--recipes", str(recipes))
    assert code == 0 and stored.endswith(message)  # in the inbox, not deferred (75) for ever


def test_a_failing_side_copy_does_not_stop_the_delivery(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("- size: '> 1'\n  pipe: 'cat >/dev/null; exit 1'\n  stop: false\n")
    message = b"From: a@example.org\nSubject: hi\n\nhello\n"
    code, [stored] = deliver(
        tmp_path, message, "deliver: {filter: false}\n", "--user", "nobody9", "--recipes", str(recipes)
    )
    assert code == 0 and stored.endswith(message)


@pytest.mark.parametrize(("owner_uid", "mode"), [(1, 0o644), (None, 0o666), (None, 0o664)])
def test_recipes_someone_else_could_write_are_not_followed(tmp_path: Path, owner_uid: int | None, mode: int) -> None:
    """As procmail with its rcfiles: a recipe file owned by another user, or writable by group
    or others, could make the recipient (or the MTA) run anyone's commands: it is ignored."""
    out = tmp_path / "ran"
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(f"- size: '> 1'\n  pipe: 'cat > {out}'\n  stop: false\n")
    recipes.chmod(mode)
    if owner_uid is not None:
        if os.geteuid() != 0:  # only root can give a file away: then it is root's own file to test
            pytest.fail("this test needs root, as CI runs it (os.chown)")
        os.chown(recipes, owner_uid, -1)
    message = b"From: a@example.org\nSubject: hi\n\nhello\n"
    code, [stored] = deliver(
        tmp_path, message, "deliver: {filter: false}\n", "--user", "nobody9", "--recipes", str(recipes)
    )
    assert code == 0 and stored.endswith(message) and not out.exists()


def test_the_first_delivery_to_a_root_owned_spool_creates_the_users_mbox() -> None:
    """/var/mail is root:mail 2775: no user may create a file there. Started as root, deliver
    creates the user's mbox (0600, theirs) before it becomes the user, as Postfix's local does;
    the first delivery used to be refused (77)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as CI runs it (deliver changes user only when started as root)")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="filterd-spool-"))  # outside pytest's 0700 tmp tree
    try:
        base.chmod(0o755)
        spool = base / "mail"
        spool.mkdir(mode=0o755)  # root's: nobody cannot create a file here
        message = b"From: a@example.org\nSubject: hi\n\nhello\n"
        config = base / "filterd.yaml"
        config.write_text("deliver: {filter: false}\n")
        mbox = spool / "nobody"
        proc = subprocess.run(
            [sys.executable, "-m", "filterd", "deliver", "--config", str(config), "--user", "nobody",
             "--mbox", str(mbox)],
            input=message, capture_output=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        st = mbox.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
        assert mbox.read_bytes().startswith(b"From ") and b"\nhello\n" in mbox.read_bytes()
    finally:
        shutil.rmtree(base)


def test_a_deliver_kept_as_root_runs_no_command_of_a_users_recipe_file(tmp_path: Path) -> None:
    """With ``drop_privileges: false`` a root deliver follows nobody's own recipe file (its folder
    rules) but not its pipe rule, which would run as root; the message goes to INBOX."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as CI runs it (os.chown, and deliver keeping root's rights)")
    out = tmp_path / "ran"
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(f"- size: '> 1'\n  pipe: 'cat > {out}'\n")
    os.chown(recipes, pwd.getpwnam("nobody").pw_uid, -1)
    message = b"From: a@example.org\nSubject: hi\n\nhello\n"
    config = "deliver: {filter: false, drop_privileges: false}\n"
    code, [stored] = deliver(tmp_path, message, config, "--user", "nobody", "--recipes", str(recipes))
    assert code == 0 and stored.endswith(message) and not out.exists()
