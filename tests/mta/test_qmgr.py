"""The queue manager with local delivery through a real command: retries, bounces, lifetimes,
flush and delete, and what survives a crash."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from filterd.config import FrozenMap, default_config
from filterd.mta.delivery import DeliveryResult, LocalDelivery, MessageData
from filterd.mta.qmgr import backoff, request_delete, request_flush
from filterd.mta.queue import Envelope, Queue, Recipient
from tests.mta.qmgr_helpers import (
    MESSAGE,
    all_ids,
    bounces,
    calls,
    count_opens,
    delivery_status,
    enqueue,
    eventually,
    make_qmgr,
    mta_config,
    run_until,
)

# -- backoff maths ----------------------------------------------------------------------------


def test_backoff_doubles_from_min_to_max() -> None:
    waits = [backoff(n, 300, 4000) for n in range(1, 8)]
    assert waits == [300, 600, 1200, 2400, 4000, 4000, 4000]


def test_backoff_never_below_min_even_for_nonsense_attempts() -> None:
    assert backoff(0, 300, 4000) == 300
    assert backoff(-5, 300, 4000) == 300
    assert backoff(10_000, 300, 4000) == 4000  # no overflow


def test_backoff_jitter_is_small_and_within_bounds() -> None:
    rng = random.Random(7)
    for attempts in range(1, 10):
        plain = backoff(attempts, 300, 4000)
        for _ in range(200):
            wait = backoff(attempts, 300, 4000, rng=rng)
            assert plain <= wait <= min(4000, plain * 1.1)
    spread = {round(backoff(1, 300, 4000, rng=rng)) for _ in range(100)}
    assert len(spread) > 10  # messages deferred together come back apart


def test_backoff_equal_min_and_max_is_constant() -> None:
    assert {backoff(n, 60, 60, rng=random.Random(n)) for n in range(1, 20)} == {60}


# -- local delivery through the queue manager -------------------------------------------------


def test_delivered_recipient_removes_the_message(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "bob+news@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    out = tmp_path / "out"
    delivered = (out / "bob+news@example.org.1").read_bytes()
    # The MTA adds Return-Path and Delivered-To; the command gets LF line ends.
    assert delivered.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: bob+news@example.org\nFrom: Alice")
    assert b"\r" not in delivered and delivered.endswith(b"Hi Bob.\n.leading dot\n")
    # {user} is the local part without the extension; {mailbox} comes from the template.
    log = (out / "log").read_text().split()
    assert log == ["bob+news@example.org", "alice@example.org", "bob", "news", "bob", f"{config.state_path}/mail/bob"]
    assert qmgr.stats.delivered == 1 and qmgr.stats.removed == 1 and not bounces(queue)
    assert queue.state_of(qid) is None and not list(queue.data.iterdir())


def test_tempfail_is_retried_with_backoff_until_it_works(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    enqueue(queue, "flaky@example.org")
    qmgr = make_qmgr(config, queue)
    started = time.monotonic()
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert time.monotonic() - started >= 0.2  # waited min_backoff
    assert (tmp_path / "out" / "flaky@example.org.calls").read_text() == "2"
    assert (tmp_path / "out" / "flaky@example.org.2").exists()
    assert qmgr.stats.deferred == 1 and qmgr.stats.delivered == 1 and not bounces(queue)


def test_tempfail_keeps_the_message_deferred_with_status_saved(tmp_path: Path) -> None:
    config = mta_config(tmp_path, min_backoff=60.0, max_backoff=120.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "temp@example.org", "bob@example.org")
    qmgr = make_qmgr(config, queue)
    before = time.time()
    asyncio.run(run_until(qmgr, lambda: queue.ids("deferred") == [qid]))
    after = time.time()
    envelope, _ = queue.load(qid)
    temp, bob = envelope.rcpts
    assert (bob.status, bob.attempts) == ("delivered", 1)
    assert (temp.status, temp.attempts) == ("pending", 1)
    assert "exited 75" in temp.last_error
    assert (temp.last_status, bob.last_status, bob.last_error) == ("4.3.0", "", "")
    assert before + 60 <= temp.next_attempt <= after + 66  # min_backoff, stretched by at most 10%


def test_an_envelope_listing_an_address_twice_is_delivered_once(tmp_path: Path) -> None:
    # an envelope queued before duplicates were eliminated at RCPT TO
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "bob@example.org", "carol@example.org", "bob@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    out = tmp_path / "out"
    assert calls(out, "bob@example.org") == 1 and calls(out, "carol@example.org") == 1
    assert qmgr.stats.delivered == 2 and queue.state_of(qid) is None and not bounces(queue)


def test_a_deferred_address_listed_twice_keeps_both_copies_in_step(tmp_path: Path) -> None:
    config = mta_config(tmp_path, min_backoff=60.0, max_backoff=120.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "temp@example.org", "temp@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: queue.ids("deferred") == [qid]))
    envelope, _ = queue.load(qid)
    first, second = envelope.rcpts
    assert (first.status, first.attempts) == (second.status, second.attempts) == ("pending", 1)
    assert first.next_attempt == second.next_attempt and "exited 75" in second.last_error
    assert calls(tmp_path / "out", "temp@example.org") == 1


def test_permanent_failure_bounces_with_a_dsn_to_the_sender(tmp_path: Path) -> None:
    config = mta_config(tmp_path, local_domains=("example.org", "example.com"))
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "nouser@example.org", "bob@example.org", sender="carol@example.com")
    qmgr = make_qmgr(config, queue)
    # The DSN goes to carol, a local user: it is delivered by the same command.
    out = tmp_path / "out"
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue) and (out / "carol@example.com.1").exists()))
    assert qmgr.stats.bounced == 1 and qmgr.stats.dsns == 1 and qmgr.stats.delivered == 2
    dsn = (out / "carol@example.com.1").read_bytes()
    assert dsn.startswith(b"Return-Path: <>\nDelivered-To: carol@example.com\n")
    assert b"Final-Recipient: rfc822; nouser@example.org" in dsn
    assert b"Status: 5.1.1" in dsn and b"no such user here: nouser" in dsn
    assert f"X-Filterd-Queue-ID: {qid}".encode() in dsn
    assert b"bob@example.org" not in dsn.split(b"message/delivery-status")[1].split(b"text/rfc822-headers")[0]


def test_bounce_waits_in_the_queue_as_a_null_sender_message(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    enqueue(queue, "nouser@example.org", sender="someone@remote.example")
    # The DSN is for a remote sender: with no DNS it stays deferred, which lets us look at it.
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: len(bounces(queue)) == 1 and not queue.ids("incoming")))
    [(envelope, msg)] = bounces(queue)
    assert envelope.mail_from == "" and [r.address for r in envelope.rcpts] == ["someone@remote.example"]
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"].addresses[0].addr_spec == "someone@remote.example"
    assert msg["Auto-Submitted"] == "auto-replied"


def test_null_sender_is_never_bounced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    enqueue(queue, "nouser@example.org", sender="")
    qmgr = make_qmgr(config, queue)
    with caplog.at_level("WARNING", logger="filterd.mta.qmgr"):
        asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert qmgr.stats.dropped == 1 and qmgr.stats.dsns == 0
    assert "a bounce is never bounced" in caplog.text


def test_lifetime_expiry_bounces_a_recipient_that_keeps_failing(tmp_path: Path) -> None:
    config = mta_config(tmp_path, max_lifetime=1.0, min_backoff=0.2, max_backoff=0.3)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "temp@example.org", sender="someone@remote.example")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: queue.state_of(qid) is None))
    assert 3 <= calls(tmp_path / "out", "temp@example.org") <= 7  # tried until the lifetime ran out, then given up
    [(_, msg)] = bounces(queue)
    report = delivery_status(msg)
    assert report[1]["Action"] == "failed" and report[1]["Status"] == "4.3.0"
    text = msg.get_body(("plain",))
    assert text is not None and "gave up" in text.get_content()


def test_null_sender_expiry_uses_bounce_lifetime_and_drops(tmp_path: Path) -> None:
    config = mta_config(tmp_path, bounce_lifetime=0.5, max_lifetime=100.0)
    queue = Queue(tmp_path / "q")
    enqueue(queue, "temp@example.org", sender="")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert qmgr.stats.dropped == 1 and not bounces(queue)


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    config = mta_config(tmp_path, delay_warning=0.3, min_backoff=0.1, max_backoff=0.1, max_lifetime=100.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "temp@example.org", sender="someone@remote.example")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: calls(tmp_path / "out", "temp@example.org") >= 8))
    [(_, msg)] = bounces(queue)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    report = delivery_status(msg)
    assert report[1]["Action"] == "delayed" and report[1]["Status"] == "4.3.0"
    assert report[1]["Will-Retry-Until"]
    assert queue.load(qid)[0].delay_warned


def test_mail_loop_by_hop_count_bounces_without_an_attempt(tmp_path: Path) -> None:
    config = mta_config(tmp_path, max_hops=5)
    queue = Queue(tmp_path / "q")
    queue.enqueue(Envelope("someone@remote.example", [Recipient("bob@example.org")], hops=6), MESSAGE)
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: len(bounces(queue)) == 1 and not queue.ids("incoming")))
    assert not (tmp_path / "out" / "bob@example.org.calls").exists()
    assert delivery_status(bounces(queue)[0][1])[1]["Status"] == "5.4.6"


def test_delivered_to_loop_is_bounced(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    enqueue(
        queue, "bob@example.org", sender="someone@remote.example", data=b"Delivered-To: Bob@example.org\r\n" + MESSAGE
    )
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: len(bounces(queue)) == 1 and not queue.ids("incoming")))
    assert delivery_status(bounces(queue)[0][1])[1]["Status"] == "5.4.6"


def test_unknown_local_user_without_home_is_bounced_before_running_the_command(tmp_path: Path) -> None:
    config = mta_config(tmp_path, mailbox="{home}/Maildir/")
    queue = Queue(tmp_path / "q")
    enqueue(queue, "no-such-unix-user-here@example.org", sender="someone@remote.example")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: len(bounces(queue)) == 1 and not queue.ids("incoming")))
    assert delivery_status(bounces(queue)[0][1])[1]["Status"] == "5.1.1"
    assert not (tmp_path / "out" / "log").exists()


def test_mailboxes_map_wins_over_the_template(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    mailboxes = FrozenMap({"bob": "/srv/mail/{user}/box"})
    config = dataclasses.replace(config, mta=dataclasses.replace(config.mta, mailboxes=mailboxes))
    queue = Queue(tmp_path / "q")
    enqueue(queue, "bob@example.org")
    asyncio.run(run_until(make_qmgr(config, queue), lambda: not all_ids(queue)))
    assert (tmp_path / "out" / "log").read_text().split()[-1] == "/srv/mail/bob/box"


def test_a_command_that_cannot_start_defers(tmp_path: Path) -> None:
    config = mta_config(tmp_path, local_delivery_command=("/nonexistent/deliver", "{user}"))
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "bob@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: queue.ids("deferred") == [qid]))
    rcpt = queue.load(qid)[0].rcpts[0]
    assert rcpt.status == "pending" and "cannot run /nonexistent/deliver" in rcpt.last_error
    assert not bounces(queue)


def test_a_command_that_times_out_is_killed_and_deferred(tmp_path: Path) -> None:
    config = mta_config(tmp_path, local_delivery_timeout=0.5, min_backoff=60.0, max_backoff=60.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "slow@example.org")
    qmgr = make_qmgr(config, queue)
    started = time.monotonic()
    asyncio.run(run_until(qmgr, lambda: queue.ids("deferred") == [qid]))
    assert time.monotonic() - started < 10
    assert "timed out" in queue.load(qid)[0].rcpts[0].last_error


def test_flush_makes_deferred_mail_due_now(tmp_path: Path) -> None:
    config = mta_config(tmp_path, min_backoff=3600.0, max_backoff=3600.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "flaky@example.org")
    qmgr = make_qmgr(config, queue)

    async def scenario() -> None:
        task = asyncio.create_task(run_until(qmgr, lambda: not all_ids(queue), limit=10))
        await eventually(lambda: queue.ids("deferred") == [qid])
        request_flush(queue.root)  # as `filterd mta queue flush` does while the MTA runs
        await task

    asyncio.run(scenario())
    assert (tmp_path / "out" / "flaky@example.org.2").exists()


def test_delete_request_removes_a_deferred_message_without_bounce(tmp_path: Path) -> None:
    config = mta_config(tmp_path, min_backoff=3600.0, max_backoff=3600.0)
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "temp@example.org")
    qmgr = make_qmgr(config, queue)

    async def scenario() -> None:
        task = asyncio.create_task(run_until(qmgr, lambda: not all_ids(queue), limit=10))
        await eventually(lambda: queue.ids("deferred") == [qid])
        request_delete(queue.root, qid)
        await task

    asyncio.run(scenario())
    assert not bounces(queue) and not list(queue.data.iterdir())


def test_delivered_recipients_are_not_delivered_again_after_a_crash(tmp_path: Path) -> None:
    # A crash after the first recipient's status was saved: the envelope sits in active/ with
    # one recipient delivered. Recovery puts it back in incoming/; only the other is tried.
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    envelope = Envelope(
        "alice@example.org", [Recipient("bob@example.org", "delivered", 1), Recipient("carol@example.org")]
    )
    qid = queue.enqueue(envelope, MESSAGE, state="active")
    assert queue.recover().active_requeued == 1
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    out = tmp_path / "out"
    assert (out / "carol@example.org.1").exists() and not (out / "bob@example.org.calls").exists()
    assert queue.state_of(qid) is None


def test_deferred_messages_are_picked_up_after_a_restart(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    envelope = Envelope("alice@example.org", [Recipient("bob@example.org", attempts=3, next_attempt=time.time() + 0.3)])
    qid = queue.enqueue(envelope, MESSAGE, state="deferred")
    qmgr = make_qmgr(config, queue)
    started = time.monotonic()
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert time.monotonic() - started >= 0.25  # not before it was due
    assert queue.state_of(qid) is None and (tmp_path / "out" / "bob@example.org.1").exists()


def test_corrupt_envelope_is_quarantined_and_the_rest_delivered(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    bad = enqueue(queue, "bob@example.org")
    (queue.root / "incoming" / bad).write_bytes(b'{"version": 1, "trunc')
    good = enqueue(queue, "carol@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert (queue.corrupt / f"{bad}.env").exists() and queue.state_of(good) is None
    assert (tmp_path / "out" / "carol@example.org.1").exists()


def test_hold_is_left_alone(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    held = queue.enqueue(
        Envelope("a@example.org", [Recipient("bob@example.org")], hold_reason="quarantine"), MESSAGE, state="hold"
    )
    other = enqueue(queue, "carol@example.org")
    asyncio.run(run_until(make_qmgr(config, queue), lambda: queue.state_of(other) is None))
    assert queue.state_of(held) == "hold"


def test_per_destination_concurrency_is_respected(tmp_path: Path) -> None:
    # The recorder is slow enough that deliveries overlap; count the most at once.
    script = tmp_path / "concurrent.py"
    script.write_text(
        "import os, sys, time, fcntl\n"
        "d = sys.argv[1]\n"
        "sys.stdin.buffer.read()\n"
        "def bump(k):\n"
        "    with open(os.path.join(d, 'lock'), 'a') as l:\n"
        "        fcntl.flock(l, fcntl.LOCK_EX)\n"
        "        p = os.path.join(d, 'now'); n = int(open(p).read()) if os.path.exists(p) else 0\n"
        "        n += k; open(p, 'w').write(str(n))\n"
        "        m = os.path.join(d, 'max'); mx = int(open(m).read()) if os.path.exists(m) else 0\n"
        "        open(m, 'w').write(str(max(mx, n)))\n"
        "bump(1); time.sleep(0.2); bump(-1)\n"
    )
    import sys

    out = tmp_path / "out"
    config = mta_config(
        tmp_path, per_destination_concurrency=3, local_delivery_command=(sys.executable, str(script), str(out))
    )
    queue = Queue(tmp_path / "q")
    for i in range(12):
        enqueue(queue, f"user{i}@example.org")
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert (out / "max").read_text() == "3"
    assert qmgr.stats.delivered == 12


def test_a_delivery_that_raises_is_deferred_and_the_rest_goes_on(tmp_path: Path) -> None:
    config = mta_config(tmp_path, min_backoff=60.0, max_backoff=60.0)

    class Broken(LocalDelivery):
        async def deliver(
            self, queue_id: str, sender: str, recipient: str, data_path: Path | MessageData
        ) -> DeliveryResult:
            if recipient.startswith("bug"):
                raise RuntimeError("a bug")
            return await super().deliver(queue_id, sender, recipient, data_path)

    local = Broken(config.mta, state_dir=str(config.state_path), hostname="mx.example.org")
    queue = Queue(tmp_path / "q")
    bad = enqueue(queue, "bug@example.org")
    good = enqueue(queue, "bob@example.org")
    qmgr = make_qmgr(config, queue, local=local)
    asyncio.run(run_until(qmgr, lambda: queue.ids("deferred") == [bad] and queue.state_of(good) is None))
    rcpt = queue.load(bad)[0].rcpts[0]
    assert rcpt.status == "pending" and "internal error: RuntimeError: a bug" in rcpt.last_error
    assert not bounces(queue)


def test_active_limit_holds_the_rest_back_without_spinning(tmp_path: Path) -> None:
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    for i in range(4):
        enqueue(queue, f"new{i}@example.org")
        queue.enqueue(
            Envelope("a@example.org", [Recipient(f"old{i}@example.org", attempts=1)]), MESSAGE, state="deferred"
        )
    qmgr = make_qmgr(config, queue, active_limit=1)
    started = time.monotonic()
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue)))
    assert qmgr.stats.delivered == 8
    # One message at a time, the others waiting: the loop sleeps meanwhile (it does not spin):
    # a turn per poll interval (50 ms) and a few per message at most.
    assert qmgr.stats.wakeups <= (time.monotonic() - started) / 0.05 + 8 * 4


@pytest.mark.parametrize(("milter", "flag"), [("", "--filter"), ("127.0.0.1:9", "--no-filter")])
def test_filter_placeholder_says_whether_the_milter_scored_the_message(tmp_path: Path, milter: str, flag: str) -> None:
    """{filter} tells `filterd deliver` not to ask the daemon again after the MTA's milter did."""
    recorder = mta_config(tmp_path).mta.local_delivery_command
    config = mta_config(tmp_path, milter=milter, local_delivery_command=(*recorder, "{filter}"))
    queue = Queue(tmp_path / "q")
    enqueue(queue, "bob@example.org")
    asyncio.run(run_until(make_qmgr(config, queue), lambda: not all_ids(queue)))
    assert (tmp_path / "out" / "log").read_text().split()[-1] == flag


def test_default_delivery_command_carries_the_filter_placeholder() -> None:
    assert default_config().mta.local_delivery_command[-1] == "{filter}"


# -- one read of the data file, one parse of each envelope --------------------------------------


def test_one_attempt_opens_the_data_file_once_for_all_local_recipients(tmp_path: Path) -> None:
    # Five local recipients, one of them bounced: the four deliveries and the DSN's copy of the
    # header all come from one read. Counted as the process's real open(2)s of the data file.
    config = mta_config(tmp_path, local_domains=("example.org", "example.com"))
    queue = Queue(tmp_path / "q")
    rcpts = [f"user{i}@example.org" for i in range(4)]
    qid = enqueue(queue, *rcpts, "nouser@example.org", sender="carol@example.com")
    data_path = str(queue.data / qid)
    out = tmp_path / "out"
    with count_opens() as opened:
        asyncio.run(run_until(make_qmgr(config, queue), lambda: not all_ids(queue) and calls(out, "carol@example.com")))
    assert opened[data_path] == 1
    lf = MESSAGE.replace(b"\r\n", b"\n")
    for rcpt in rcpts:
        top = f"Return-Path: <carol@example.com>\nDelivered-To: {rcpt}\n".encode()
        assert (out / f"{rcpt}.1").read_bytes() == top + lf
    dsn = (out / "carol@example.com.1").read_bytes()
    assert b"Final-Recipient: rfc822; nouser@example.org" in dsn and b"Subject: hello" in dsn


def count_envelope_parses(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each envelope is parsed from here on (queue id -> parses)."""
    parsed: Counter[str] = Counter()
    from_json = Envelope.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Envelope], raw: bytes) -> Any:
        envelope = from_json(cls, raw)
        parsed[envelope.id] += 1
        return envelope

    monkeypatch.setattr(Envelope, "from_json", classmethod(counting))
    return parsed


def test_start_up_parses_each_deferred_envelope_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Recovery parses every envelope anyway; the manager's schedule starts from what it found.
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    later, soon = time.time() + 3600, time.time() + 0.2
    waiting = [
        queue.enqueue(
            Envelope("alice@example.org", [Recipient(f"w{i}@example.org", attempts=1, next_attempt=later)]),
            MESSAGE,
            state="deferred",
        )
        for i in range(5)
    ]
    due = queue.enqueue(
        Envelope("alice@example.org", [Recipient("bob@example.org", attempts=1, next_attempt=soon)]),
        MESSAGE,
        state="deferred",
    )
    parsed = count_envelope_parses(monkeypatch)
    recovery = queue.recover()
    assert dict(recovery.deferred) == {**{qid: later for qid in waiting}, due: soon}
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: queue.state_of(due) is None, recovery=recovery))
    # once each at start-up; the one that came due once more when it was taken for delivery
    assert parsed == {**dict.fromkeys(waiting, 1), due: 2}
    assert (tmp_path / "out" / "bob@example.org.1").exists()
    assert queue.ids("deferred") == sorted(waiting) and qmgr.stats.attempts == 1


def test_start_up_parses_each_incoming_envelope_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Recovery leaves incoming/ (the former active/ too) to the manager, which parses when it loads.
    config = mta_config(tmp_path)
    queue = Queue(tmp_path / "q")
    ids = [enqueue(queue, f"r{i}@example.org") for i in range(3)]
    queue.move(ids[0], "active")  # a crash mid-delivery
    broken = enqueue(queue, "broken@example.org")
    (queue.root / "incoming" / broken).write_bytes(b'{"version": 1, "trunc')
    parsed = count_envelope_parses(monkeypatch)
    recovery = queue.recover()
    assert recovery.active_requeued == 1 and not recovery.corrupt and not parsed
    qmgr = make_qmgr(config, queue)
    asyncio.run(run_until(qmgr, lambda: not all_ids(queue), recovery=recovery))
    assert parsed == dict.fromkeys(ids, 1)
    assert all((tmp_path / "out" / f"r{i}@example.org.1").exists() for i in range(3))
    assert (queue.corrupt / f"{broken}.env").exists() and (queue.corrupt / f"{broken}.data").exists()


def test_delay_warning_takes_the_status_from_last_status_or_from_an_old_last_error(tmp_path: Path) -> None:
    # An envelope written before last_status was kept: the warning reads the status the old way.
    config = mta_config(tmp_path, delay_warning=1.0, min_backoff=60.0, max_backoff=60.0, max_lifetime=86400.0)
    queue = Queue(tmp_path / "q")
    now, later = time.time(), time.time() + 3600
    rcpts = [
        Recipient("temp@example.org", attempts=1, last_error="4.2.2 mailbox full"),  # due: tried again now
        Recipient("old@remote.example", attempts=1, last_error="4.4.1 connect to mx[192.0.2.7]: refused"),
        Recipient("odd@remote.example", attempts=1, last_error="451 try later"),  # no enhanced status
        Recipient("new@remote.example", attempts=1, last_error="greylisted", last_status="4.7.1"),
    ]
    for r in rcpts[1:]:
        r.next_attempt = later
    qid = queue.enqueue(Envelope("someone@remote.example", rcpts, received_at=now - 600, hops=1), MESSAGE)
    queue.move(qid, "deferred")
    path = queue.root / "deferred" / qid
    obj = json.loads(path.read_bytes())
    for r in obj["rcpts"][:3]:
        del r["last_status"]  # as the code before it wrote them
    path.write_text(json.dumps(obj))
    assert [r.last_status for r in queue.load(qid)[0].rcpts] == ["", "", "", "4.7.1"]

    recovery = queue.recover()
    qmgr = make_qmgr(config, queue)
    warned = lambda: len(bounces(queue)) == 1 and queue.state_of(qid) == "deferred"  # noqa: E731
    asyncio.run(run_until(qmgr, warned, recovery=recovery))
    [(_, msg)] = bounces(queue)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    report = {block["Final-Recipient"].partition("; ")[2]: block for block in delivery_status(msg)[1:]}
    assert {rcpt: block["Status"] for rcpt, block in report.items()} == {
        "temp@example.org": "4.3.0",  # this attempt's, kept in last_status
        "old@remote.example": "4.4.1",
        "odd@remote.example": "4.0.0",
        "new@remote.example": "4.7.1",
    }
    assert report["old@remote.example"]["Diagnostic-Code"] == "x-filterd; connect to mx[192.0.2.7]: refused"
    assert report["new@remote.example"]["Diagnostic-Code"] == "x-filterd; greylisted"
    assert report["temp@example.org"]["Diagnostic-Code"].startswith("x-filterd; command exited 75")
    envelope = queue.load(qid)[0]
    assert envelope.delay_warned and envelope.rcpts[0].last_status == "4.3.0"
