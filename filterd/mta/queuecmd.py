"""`filterd mta queue list|show|flush|delete`: look at and act on the MTA's queue, like
Postfix's mailq, postqueue -f and postsuper -d.

    filterd mta queue list [--json]      # every message: id, size, arrival, sender, recipients
    filterd mta queue show ID            # its envelope and header
    filterd mta queue flush              # try every deferred message now
    filterd mta queue delete ID... | ALL # remove messages without bouncing them

The queue is ``<state-dir>/queue``. Reading needs no lock (the queue's files are replaced
atomically). Changing it depends on whether ``filterd mta`` is running, which the queue's lock
tells: if it is, flush and delete become requests in the queue's control/ directory that the
running queue manager carries out within a second (it alone may touch messages it is
delivering); if not, they are done here, holding the lock: flush moves deferred/ to incoming/,
which the manager tries first when it starts.

In ``list``, the id is followed by ``*`` when the message is being delivered (active/) and ``!``
when it is held (hold/); each pending recipient that failed before shows its last error in
parentheses, as mailq does, and a recipient whose last attempt got an SMTP reply shows its code
and enhanced status (``[last reply 450 4.2.1]``). ``--json`` gives each recipient's
``last_status`` (for envelopes written before it was kept, the status ``last_error`` starts
with), ``last_reply_code`` and ``last_reply_status`` (0 and "" when no server replied).
Exit status: 0 done; 1 no such message; 75 queue busy.
"""

from __future__ import annotations

__all__ = ["add_queue_command", "run_queue_command"]

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filterd.errors import QueueError
from filterd.mta.queue import ID_RE, Envelope, Queue, QueueState, Recipient

# Building `filterd`'s parser imports this module for every command: the delivery side
# (dkimpy, dnspython) is imported only when a queue action runs.

_MARK: dict[QueueState, str] = {"incoming": "", "active": "*", "deferred": "", "hold": "!"}
_ORDER: tuple[QueueState, ...] = ("active", "incoming", "deferred", "hold")


def add_queue_command(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``queue`` to `filterd mta`'s actions (``common`` adds --config, --state-dir, ...)."""
    p = actions.add_parser("queue", help="list, show, flush or delete queued messages (mailq, postqueue, postsuper)")
    p.set_defaults(mta_handler=run_queue_command)
    qa = p.add_subparsers(dest="queue_action", metavar="ACTION", required=True)
    a = qa.add_parser("list", help="every queued message with its recipients and their last errors (mailq)")
    common(a)
    a.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    a = qa.add_parser("show", help="a message's envelope and header")
    common(a)
    a.add_argument("id", help="queue id")
    a = qa.add_parser("flush", help="try every deferred message now (postqueue -f)")
    common(a)
    a = qa.add_parser("delete", help="remove messages without a bounce (postsuper -d)")
    common(a)
    a.add_argument("ids", nargs="+", metavar="ID", help="queue ids, or ALL")


def run_queue_command(args: argparse.Namespace) -> int:
    from filterd.config import load_config
    from filterd.mta.qmgr import request_flush

    config = load_config(args.config, state_dir=args.state_dir)
    root = config.state_path / "queue"
    action: str = args.queue_action
    if action == "list":
        return _list(root, as_json=args.json)
    if not root.is_dir():
        print(f"filterd mta queue: no queue at {root}", file=sys.stderr)
        return 1
    queue = Queue(root)
    if action == "show":
        return _show(queue, args.id)
    bad = [qid for qid in getattr(args, "ids", []) if qid != "ALL" and not ID_RE.match(qid)]
    if bad:
        print(f"filterd mta queue: not a queue id: {', '.join(bad)}", file=sys.stderr)
        return 1
    if action == "flush":
        return _change(queue, lambda: _flush_here(queue), lambda: request_flush(root), "flush")
    return _change(queue, lambda: _delete_here(queue, args.ids), lambda: _request_deletes(root, args.ids), "delete")


def _messages(queue: Queue) -> list[tuple[QueueState, Envelope]]:
    found: list[tuple[QueueState, Envelope]] = []
    for state in _ORDER:
        for qid in queue.ids(state):
            try:  # it may be delivered and gone between ids() and load()
                envelope, _ = queue.load(qid)
            except QueueError:
                continue
            found.append((state, envelope))
    found.sort(key=lambda item: item[1].id)
    return found


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%a %b %d %H:%M:%S")


def _list(root: Path, *, as_json: bool) -> int:
    messages = _messages(Queue(root)) if root.is_dir() else []
    if as_json:
        for state, env in messages:
            print(json.dumps(_as_dict(state, env), ensure_ascii=False))
        return 0
    if not messages:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<23} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------")
    for state, env in messages:
        sender = env.mail_from or "MAILER-DAEMON"
        print(f"{env.id + _MARK[state]:<23} {env.size:>8} {_when(env.received_at):<20} {sender}")
        if env.hold_reason:
            print(f"{'':<54}(held: {env.hold_reason})")
        for r in env.rcpts:
            if r.status == "pending" and r.last_error:
                print(f"{'':<54}({r.last_error})")
            notes: list[str] = [] if r.status == "pending" else [r.status]
            if r.last_reply_code:
                notes.append(_reply(r))
            print(f"{'':<54}{r.address}" + (f"  [{', '.join(notes)}]" if notes else ""))
        print()
    total = sum(env.size for _, env in messages)
    count = len(messages)
    print(f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return 0


def _reply(r: Recipient) -> str:
    return " ".join(["last reply", str(r.last_reply_code), *([r.last_reply_status] if r.last_reply_status else [])])


def _as_dict(state: QueueState, env: Envelope) -> dict[str, Any]:
    return {
        "id": env.id, "state": state, "size": env.size, "arrival": env.received_at, "sender": env.mail_from,
        "recipients": [
            {"address": r.address, "status": r.status, "attempts": r.attempts, "last_error": r.last_error,
             "last_status": r.failure_status, "last_reply_code": r.last_reply_code,
             "last_reply_status": r.last_reply_status, "next_attempt": r.next_attempt}
            for r in env.rcpts
        ],
        "client": {"ip": env.client_ip, "name": env.client_name, "helo": env.client_helo, "auth": env.auth_user},
        "hops": env.hops, "body_type": env.body_type, "smtputf8": env.smtputf8, "hold_reason": env.hold_reason,
    }  # fmt: skip


def _show(queue: Queue, qid: str) -> int:
    try:
        envelope, data = queue.load(qid)
        state = queue.state_of(qid)
        raw = data.read_bytes()
    except (QueueError, FileNotFoundError) as exc:
        print(f"filterd mta queue: {exc}", file=sys.stderr)
        return 1
    info = _as_dict(state or "incoming", envelope)
    print(f"id:        {envelope.id} ({state})")
    print(f"arrival:   {_when(envelope.received_at)}")
    print(f"size:      {envelope.size} bytes, {envelope.body_type}{', SMTPUTF8' if envelope.smtputf8 else ''}")
    print(f"sender:    <{envelope.mail_from}>")
    client = info["client"]
    print(f"client:    {client['name'] or 'unknown'}[{client['ip']}] helo={client['helo']}"
          + (f" auth={client['auth']}" if client["auth"] else ""))  # fmt: skip
    print(f"hops:      {envelope.hops}")
    for r in envelope.rcpts:
        line = f"recipient: <{r.address}> {r.status}, {r.attempts} attempts"
        if r.status == "pending" and r.next_attempt:
            line += f", next {_when(r.next_attempt)}"
        print(line)
        if r.last_error:
            print(f"           {r.last_error}")
        if r.last_reply_code:
            print(f"           {_reply(r)}")
    print()
    sys.stdout.flush()
    from filterd.mta.bounce import header_block

    sys.stdout.buffer.write(header_block(raw).replace(b"\r\n", b"\n"))
    return 0


def _change(queue: Queue, here: Callable[[], int], request: Callable[[], None], what: str) -> int:
    try:
        with queue.lock():
            return here()
    except QueueError:  # filterd mta holds it: ask its queue manager
        request()
        print(f"{what} requested from the running queue manager")
        return 0


def _flush_here(queue: Queue) -> int:
    ids = queue.ids("deferred")
    for qid in ids:
        queue.move(qid, "incoming")
    print(f"{len(ids)} deferred message{'s' if len(ids) != 1 else ''} will be tried when filterd mta starts")
    return 0


def _delete_here(queue: Queue, ids: list[str]) -> int:
    if ids == ["ALL"]:
        ids = [qid for state in _ORDER for qid in queue.ids(state)]
    missing = 0
    for qid in ids:
        try:
            if queue.state_of(qid) is None:
                raise QueueError(f"no message {qid} in the queue")
            queue.remove(qid)
        except QueueError as exc:
            print(f"filterd mta queue: {exc}", file=sys.stderr)
            missing += 1
            continue
        print(f"{qid}: removed")
    return 1 if missing else 0


def _request_deletes(root: Path, ids: list[str]) -> None:
    from filterd.mta.qmgr import request_delete

    for qid in ids:
        request_delete(root, qid)
