"""A message's permanent failures in one queue pass make one DSN (RFC 3464: one report may
cover many recipients; Postfix sends one), whatever the groups they were tried in, and a DSN
can always be written: an internationalised sender (a milter's CHGFROM can set one) gets it over
SMTPUTF8 instead of the message being stuck in the queue for ever."""

from __future__ import annotations

import asyncio
from email.message import Message
from pathlib import Path
from typing import cast

from filterd.mta.bounce import DsnRecipient, build_dsn
from filterd.mta.queue import Queue
from tests.mta.qmgr_helpers import all_ids, bounces, calls, enqueue, make_qmgr, mta_config, run_until

SENDER = "alice@example.net"  # not local: the DSN stays in the queue (no next hop) to be looked at


def test_one_dsn_for_all_the_failed_recipients_of_a_message(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "queue")
    rcpts = [f"nouser{i}@example.org" for i in range(5)] + ["bob@example.org"]
    qid = enqueue(queue, *rcpts, sender=SENDER)
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: qid not in all_ids(queue)))
    assert calls(tmp_path / "out", "bob@example.org") == 1  # delivered, and not in the report
    [(envelope, dsn)] = bounces(queue)
    assert [r.address for r in envelope.rcpts] == [SENDER]
    parts = cast(list[Message], dsn.get_payload())
    # message/delivery-status: the per-message block, then one each
    report = cast(list[Message], parts[1].get_payload())
    finals = sorted(str(block["Final-Recipient"]) for block in report[1:])
    assert finals == sorted(f"rfc822; {r}" for r in rcpts[:5])
    assert qmgr.stats.bounced == 5 and qmgr.stats.dsns == 1


def test_a_non_ascii_sender_gets_its_dsn_over_smtputf8(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "queue")
    sender = "jörg@exämple.net"
    qid = enqueue(queue, "nouser@example.org", sender=sender, smtputf8=True)
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: qid not in all_ids(queue)))  # it was stuck in deferred/ before
    [(envelope, _)] = bounces(queue)
    assert [r.address for r in envelope.rcpts] == [sender] and envelope.smtputf8
    [dsn_id] = all_ids(queue)
    assert f"To: <{sender}>\r\n".encode() in queue.load(dsn_id)[1].read_bytes()  # UTF-8 in a header: RFC 6532
    assert qmgr.stats.bounced == 1


def test_a_sender_that_cannot_stand_in_a_header_is_not_named_there() -> None:
    for sender, to in (("a@b.example", b"To: <a@b.example>"), ("j\udcf6rg@b.example", b"To: undisclosed-recipients:;")):
        dsn = build_dsn(
            reporting_mta="mx." + "very-long-label." * 6 + "example",
            sender=sender,
            queue_id="0123456789ABCDEF-123456",
            arrival=0.0,
            original=b"Subject: x\r\n\r\n",
            recipients=[DsnRecipient("b@example.org", "failed", "5.1.1")],
            now=0.0,
        )
        assert to in dsn
        boundary = dsn.split(b'boundary="', 1)[1].split(b'"', 1)[0]
        assert 0 < len(boundary) <= 70  # RFC 2046, whatever the host name
