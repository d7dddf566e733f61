"""Mail for a local user who does not exist is refused at RCPT (550 5.1.1, Postfix's words), not
accepted and then bounced to a sender who is usually forged (backscatter). Who exists is what
local delivery would find (`filterd.mta.localusers`): a user the mailbox template can name."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
from pathlib import Path
from typing import Any

from filterd.config import FrozenMap, default_config
from filterd.mta.queue import Queue
from filterd.mta.smtpd import SmtpServer
from tests.mta.mta_fixture import start_mta

HOMES = {"bob": "/home/bob"}  # the password database of these tests


def _rcpt_replies(tmp_path: Path, addresses: list[str], **mta: Any) -> list[tuple[int, bytes]]:
    config = dataclasses.replace(
        default_config().mta, local_domains=("example.net",), hostname="mx.test", peername_lookup=False, **mta
    )

    async def main() -> list[tuple[int, bytes]]:
        server = SmtpServer(config, Queue(tmp_path / "queue"), home_of=HOMES.get)
        [(host, port)] = await server.start(["127.0.0.1:0"])

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP(host, port, timeout=30) as smtp:
                smtp.ehlo("client.test")
                smtp.mail("alice@example.org")
                return [smtp.rcpt(a) for a in addresses]

        try:
            return await asyncio.to_thread(session)
        finally:
            await server.close(grace=0.1)

    return asyncio.run(main())


def test_unknown_local_users_are_refused_at_rcpt(tmp_path: Path) -> None:
    replies = _rcpt_replies(
        tmp_path,
        [
            "bob@example.net",
            "nosuch@example.net",
            "Bob+lists@example.net",
            "postmaster@example.net",
            "abuse@example.net",
        ],
        mailbox="{home}/Maildir/",
        recipient_delimiter="+",
        mailboxes=FrozenMap({"abuse": "/var/mail/abuse/"}),
    )
    codes = [code for code, _ in replies]
    # bob exists; nosuch does not; an extension and the case do not matter; the postmaster is
    # always taken (RFC 5321 4.5.1); a user with a mailbox of its own needs no home directory.
    assert codes == [250, 550, 250, 250, 250], replies
    assert (
        replies[1][1]
        == b"5.1.1 <nosuch@example.net>: Recipient address rejected: User unknown in local recipient table"
    )


def test_with_a_mailbox_for_any_name_every_local_user_is_taken(tmp_path: Path) -> None:
    replies = _rcpt_replies(tmp_path, ["nosuch@example.net", "-bob@example.net"], mailbox="/var/mail/{user}/")
    # ... but no name that starts like an option: the delivery command would take it for one.
    assert [code for code, _ in replies] == [250, 550]


def test_filterd_mta_queues_nothing_for_an_unknown_user(tmp_path: Path) -> None:
    # The system's own password database: root exists, this name does not.
    mta = start_mta(tmp_path, config="mta: {local_domains: [example.org], mailbox: '{home}/Maildir/'}\n")
    try:
        with smtplib.SMTP(mta.host, mta.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("victim@example.com")
            assert smtp.rcpt("no-such-user-xyz@example.org")[0] == 550
            assert smtp.rcpt("root@example.org")[0] == 250
            smtp.data(b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        assert mta.stop() == 0, mta.log()
    [(envelope, _)] = mta.queued()
    assert [r.address for r in envelope.rcpts] == ["root@example.org"]
    assert "reject RCPT" in mta.log() and "no-such-user-xyz@example.org" in mta.log()
