"""In-process local delivery (``mta.local_delivery: maildir``): what `filterd deliver` does, without
its process: Maildir guarantees, recipes, sysexits read as the command's, the event loop never
blocked; and how ``auto`` chooses."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import pwd
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from filterd.config import DeliverConfig, FrozenMap, MtaConfig
from filterd.mda import maildir as maildir_module
from filterd.mta.delivery import DeliveryResult, LocalDelivery, delivery_mode
from filterd.mta.queue import Queue
from tests.mta.mta_fixture import start_mta
from tests.mta.qmgr_helpers import MESSAGE, enqueue, make_qmgr, mta_config, run_until


def _local(tmp_path: Path, *, recipes: str = "", homes: bool = True, **deliver: Any) -> LocalDelivery:
    mta = dataclasses.replace(
        MtaConfig(),
        local_delivery="maildir",
        mailbox="{home}/Maildir/",
        mailboxes=FrozenMap({"file": str(tmp_path / "a-file")}),
    )
    if recipes:
        (tmp_path / "recipes.yaml").write_text(recipes)
        deliver["recipes"] = str(tmp_path / "recipes.yaml")
    config = dataclasses.replace(DeliverConfig(), filter=False, **deliver)

    def home(user: str) -> str | None:
        return str(tmp_path / "home" / user) if homes and user != "nobody-here" else None

    return LocalDelivery(mta, state_dir=str(tmp_path / "state"), hostname="mx.test", lookup_user=home, deliver=config)


def _deliver(local: LocalDelivery, tmp_path: Path, recipient: str, data: bytes = MESSAGE) -> DeliveryResult:
    path = tmp_path / "data"
    path.write_bytes(data)
    return asyncio.run(local.deliver("QID1", "alice@example.org", recipient, path))


def _messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def test_auto_runs_the_command_as_root_or_when_one_is_configured() -> None:
    default = MtaConfig()
    assert default.local_delivery == "auto"
    assert delivery_mode(default, euid=1000) == "maildir"
    assert delivery_mode(default, euid=0) == "command"
    procmail = dataclasses.replace(default, local_delivery_command=("/usr/bin/procmail",))
    assert delivery_mode(procmail, euid=1000) == "command"
    assert delivery_mode(dataclasses.replace(default, local_delivery="maildir"), euid=0) == "maildir"
    assert delivery_mode(dataclasses.replace(procmail, local_delivery="maildir"), euid=1000) == "maildir"
    assert delivery_mode(dataclasses.replace(default, local_delivery="command"), euid=1000) == "command"


def test_delivers_into_new_with_the_lines_a_local_delivery_agent_adds(tmp_path: Path) -> None:
    local = _local(tmp_path)
    assert local.mode == "maildir"
    result = _deliver(local, tmp_path, "Bob+lists@example.org")
    assert (result.status, result.outcome) == ("2.0.0", "delivered")
    maildir = tmp_path / "home" / "bob" / "Maildir"
    [message] = _messages(maildir)
    assert message.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: Bob+lists@example.org\nFrom: Alice")
    assert b"\r\n" not in message and message.endswith(b"Hi Bob.\n.leading dot\n")
    assert not list((maildir / "tmp").iterdir()) and not list((maildir / "cur").iterdir())
    [name] = (maildir / "new").iterdir()
    assert f",S={len(message)}," in name.name


def test_every_file_is_fsynced_and_linked_before_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # the os module filterd.mda.maildir calls
    result = _deliver(_local(tmp_path), tmp_path, "bob@example.org")
    assert result.outcome == "delivered"
    new = tmp_path / "home" / "bob" / "Maildir" / "new"
    [final] = new.iterdir()
    # the message in tmp/ first, then new/ itself once the name is there
    tmp_syncs = [s for s in synced if s.endswith(final.name) and "/tmp/" in s]
    assert tmp_syncs and synced.index(str(new)) > synced.index(tmp_syncs[0])


def test_recipes_sort_into_folders(tmp_path: Path) -> None:
    local = _local(tmp_path, recipes="- {header: {Subject: '/^hello/'}, folder: Greetings}\n")
    assert _deliver(local, tmp_path, "bob@example.org").outcome == "delivered"
    maildir = tmp_path / "home" / "bob" / "Maildir"
    assert not _messages(maildir)
    [message] = _messages(maildir / ".Greetings")
    assert b"Subject: hello" in message
    assert (maildir / ".Greetings" / "maildirfolder").exists()


def test_pipe_recipes_run_as_the_command_would(tmp_path: Path) -> None:
    out = tmp_path / "piped"
    local = _local(tmp_path, recipes=f"- {{pipe: 'cat > {out}; echo \"$RECIPIENT\" >> {out}'}}\n")
    assert _deliver(local, tmp_path, "bob@example.org").outcome == "delivered"
    assert out.read_bytes().endswith(b"Hi Bob.\n.leading dot\nbob@example.org\n")
    assert not (tmp_path / "home" / "bob" / "Maildir").exists()


def test_a_users_own_pipe_recipe_does_not_run_as_the_mta(tmp_path: Path) -> None:
    """In-process delivery runs with the MTA's rights: a recipe file that is the recipient's own
    (theirs, writable by them alone, so it is followed) must not make the MTA run its commands.
    Its pipe rule falls back to INBOX, and the rest of the file is still followed."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as CI runs it (os.chown)")
    nobody = pwd.getpwnam("nobody")
    out = tmp_path / "piped"
    local = _local(
        tmp_path,
        recipes=f"- {{header: {{Subject: '/^hello/'}}, folder: Greetings, stop: false}}\n- {{pipe: 'cat > {out}'}}\n",
    )
    os.chown(tmp_path / "recipes.yaml", nobody.pw_uid, -1)
    assert _deliver(local, tmp_path, "nobody@example.org").outcome == "delivered"
    assert not out.exists()
    maildir = tmp_path / "home" / "nobody" / "Maildir"
    [inbox] = _messages(maildir)
    [copy] = _messages(maildir / ".Greetings")
    assert inbox == copy and inbox.endswith(b"Hi Bob.\n.leading dot\n")


def test_the_recipe_file_checked_is_the_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipient's recipes path is a symlink they control. Swapped right after the owner
    check, from a root-owned file to their own with a pipe rule, it must not get that pipe run
    with the MTA's rights: the file that was checked is the file that is read."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, as CI runs it (os.chown)")
    out = tmp_path / "piped"
    benign = tmp_path / "benign.yaml"
    benign.write_text("- {header: {Subject: '/^hello/'}, folder: Greetings}\n")
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"- {{pipe: 'cat > {out}'}}\n")
    os.chown(evil, pwd.getpwnam("nobody").pw_uid, -1)
    local = _local(tmp_path, recipes="[]\n")
    link = tmp_path / "recipes.yaml"
    link.unlink()
    link.symlink_to(benign)
    real_stat, real_fstat = os.stat, os.fstat
    swapped: list[bool] = []
    looks: list[str] = []

    def swap_after(result: os.stat_result) -> os.stat_result:
        if not swapped:  # the owner's move, right after the file's owner was looked at
            swapped.append(True)
            link.unlink()
            link.symlink_to(evil)
        return result

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(path, *args, **kwargs)
        if str(path) != str(link):
            return result
        looks.append("stat")  # a check by path: "does it exist", then the owner check (the second)
        return swap_after(result) if len(looks) == 2 else result

    def fstat(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        return swap_after(result) if os.readlink(f"/proc/self/fd/{fd}") == str(benign) else result

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "fstat", fstat)
    assert _deliver(local, tmp_path, "nobody@example.org").outcome == "delivered"
    assert swapped and not out.exists()
    assert _messages(tmp_path / "home" / "nobody" / "Maildir" / ".Greetings")


def test_a_fifo_for_recipes_is_refused_without_waiting(tmp_path: Path) -> None:
    local = _local(tmp_path, recipes="[]\n")
    fifo = tmp_path / "recipes.yaml"
    fifo.unlink()
    os.mkfifo(fifo)  # nobody writes to it: opening it to read would wait for a writer for ever
    rescued = threading.Event()

    def hang_guard() -> None:  # lets a delivery stuck on the FIFO finish, so the test fails, not hangs
        if not done.wait(30):
            rescued.set()
            with open(fifo, "wb") as f:
                f.write(b"[]\n")

    done = threading.Event()
    threading.Thread(target=hang_guard, daemon=True).start()
    try:
        assert _deliver(local, tmp_path, "bob@example.org").outcome == "delivered"
    finally:
        done.set()
    assert not rescued.is_set()
    assert _messages(tmp_path / "home" / "bob" / "Maildir")


@pytest.mark.parametrize(("code", "status"), [(75, "4.3.0"), (67, "5.1.1")])
def test_a_failing_pipe_is_read_as_sysexits_with_its_stderr(tmp_path: Path, code: int, status: str) -> None:
    local = _local(tmp_path, recipes=f"- {{pipe: 'echo no room for bob >&2; exit {code}'}}\n")
    result = _deliver(local, tmp_path, "bob@example.org")
    assert result.status == status
    assert "no room for bob" in result.detail and "no room for bob" in result.diagnostic


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_disk_full_or_quota_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    def full(fd: int, data: bytes) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(maildir_module, "write_all", full)
    result = _deliver(_local(tmp_path), tmp_path, "bob@example.org")
    assert (result.status, result.outcome) == ("4.3.0", "deferred")
    assert os.strerror(err) in result.detail
    maildir = tmp_path / "home" / "bob" / "Maildir"
    assert not list((maildir / "tmp").iterdir()) and not list((maildir / "new").iterdir())


def test_a_mailbox_path_that_cannot_be_a_maildir_is_bounced(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    result = _deliver(_local(tmp_path), tmp_path, "file@example.org")
    assert (result.status, result.outcome) == ("5.2.0", "bounced")
    assert "a-file" in result.detail and result.diagnostic.startswith("x-unix; ")


def test_unknown_users_and_loops_are_bounced(tmp_path: Path) -> None:
    assert _deliver(_local(tmp_path), tmp_path, "nobody-here@example.org").status == "5.1.1"
    looped = b"Delivered-To: bob@example.org\r\n" + MESSAGE
    assert _deliver(_local(tmp_path), tmp_path, "bob@example.org", looped).status == "5.4.6"
    # a mailbox that needs no home, for a user not in passwd: refused only with system_users_only
    local = _local(tmp_path, homes=False)
    local.config = dataclasses.replace(local.config, mailbox=str(tmp_path / "virtual" / "{user}"))
    assert _deliver(local, tmp_path, "carol@example.org").outcome == "delivered"
    strict = _local(tmp_path, homes=False, system_users_only=True)
    strict.config = local.config
    assert _deliver(strict, tmp_path, "carol@example.org").status == "5.1.1"
    assert len(_messages(tmp_path / "virtual" / "carol")) == 1


def test_the_event_loop_runs_while_deliveries_wait_for_the_disk(tmp_path: Path) -> None:
    local = _local(tmp_path, recipes="- {pipe: 'sleep 1; cat > /dev/null', stop: false}\n")
    path = tmp_path / "data"
    path.write_bytes(MESSAGE)

    async def main() -> tuple[list[DeliveryResult], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        results = await asyncio.gather(*(local.deliver(f"Q{i}", "", f"u{i}@example.org", path) for i in range(8)))
        assert time.monotonic() - started < 6.0  # side by side: one after another they take 8 s
        task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert all(r.outcome == "delivered" for r in results)
    assert ticks >= 20
    for i in range(8):
        assert len(_messages(tmp_path / "home" / f"u{i}" / "Maildir")) == 1


def test_concurrent_deliveries_to_one_maildir_keep_every_message(tmp_path: Path) -> None:
    local = _local(tmp_path)
    path = tmp_path / "data"
    path.write_bytes(MESSAGE)

    async def main() -> list[DeliveryResult]:
        return await asyncio.gather(*(local.deliver(f"Q{i}", "", "bob@example.org", path) for i in range(50)))

    assert all(r.outcome == "delivered" for r in asyncio.run(main()))
    assert len(_messages(tmp_path / "home" / "bob" / "Maildir")) == 50


def test_queue_manager_delivers_in_process(tmp_path: Path) -> None:
    config = mta_config(tmp_path, local_delivery="maildir")
    config = dataclasses.replace(config, deliver=dataclasses.replace(config.deliver, filter=False))
    queue = Queue(config.state_path / "queue")
    enqueue(queue, "bob@example.org", "carol@example.org")
    qmgr = make_qmgr(config, queue)
    assert qmgr.local.mode == "maildir"
    asyncio.run(run_until(qmgr, lambda: not queue.ids("incoming") and not queue.ids("active")))
    for user in ("bob", "carol"):
        [message] = _messages(config.state_path / "mail" / user)
        assert f"Delivered-To: {user}@example.org\n".encode() in message
    assert not list((tmp_path / "out").iterdir())  # the recorder command never ran


def test_filterd_mta_delivers_smtp_mail_into_the_maildir(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    mta = start_mta(
        tmp_path,
        config=(
            "deliver: {filter: false}\n"
            f"mta: {{local_delivery: maildir, local_domains: [example.org], mailbox: '{mail}/{{user}}/'}}\n"
        ),
        deliver=True,
    )
    try:
        with smtplib.SMTP(mta.host, mta.port) as smtp:
            smtp.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
        deadline = time.monotonic() + 20
        while not (mail / "bob" / "new").is_dir() or not list((mail / "bob" / "new").iterdir()):
            assert time.monotonic() < deadline, mta.log()
            time.sleep(0.05)
        [message] = _messages(mail / "bob")
        assert message.startswith(b"Return-Path: <alice@example.net>\nDelivered-To: bob@example.org\nReceived: ")
        assert "delivery on (local: maildir)" in mta.log()
    finally:
        assert mta.stop() == 0
