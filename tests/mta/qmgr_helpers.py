"""Small factories for the queue manager and delivery tests: a config, a recording delivery
command, and a way to run the manager until the queue reaches a state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.message
import email.policy
import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filterd.config import Config, Duration, default_config
from filterd.errors import QueueError
from filterd.mta.qmgr import QueueManager
from filterd.mta.queue import Envelope, Queue, Recipient, Recovery
from filterd.net.dns import Resolver

# A local delivery command for tests. The recipient's local part says what to do:
#   temp*  -> exit 75 (retry later);  nouser* -> exit 67 with a message on stderr;
#   flaky* -> exit 75 on the first call for that recipient, then deliver;
#   slow*  -> sleep 30 s (for timeouts);  anything else -> deliver.
# Delivering writes the message (stdin) to OUT/<recipient>.<n> and appends a line to OUT/log.
RECORDER = textwrap.dedent(
    """\
    import os, sys, time
    out = sys.argv[1]
    rcpt = os.environ["RECIPIENT"]
    local = rcpt.partition("@")[0]
    data = sys.stdin.buffer.read()
    calls = os.path.join(out, rcpt + ".calls")
    n = int(open(calls).read()) + 1 if os.path.exists(calls) else 1
    open(calls, "w").write(str(n))
    if local.startswith("temp"):
        sys.exit(75)
    if local.startswith("nouser"):
        sys.stderr.write("deliver: no such user here: " + local + "\\n")
        sys.exit(67)
    if local.startswith("flaky") and n == 1:
        sys.exit(75)
    if local.startswith("slow"):
        time.sleep(30)
    with open(os.path.join(out, f"{rcpt}.{n}"), "wb") as f:
        f.write(data)
    with open(os.path.join(out, "log"), "a") as f:
        env = os.environ
        f.write(" ".join([rcpt, env["SENDER"], env["USER"], env["EXTENSION"], *sys.argv[2:]]) + "\\n")
    """
)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nHi Bob.\r\n.leading dot\r\n"
)


def mta_config(tmp_path: Path, *, out: Path | None = None, **mta: Any) -> Config:
    """A config for queue manager tests: local domain example.org delivered by the recorder
    into ``out``, short backoffs, and a resolver that is never the system one."""
    out = out or tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    cfg = default_config()
    settings: dict[str, Any] = {
        "hostname": "mx.example.org",
        "local_domains": ("example.org",),
        "local_delivery_command": (sys.executable, str(script), str(out), "{user}", "{mailbox}"),
        "mailbox": "{state_dir}/mail/{user}",
        "min_backoff": 0.2,
        "max_backoff": 0.8,
        "local_delivery_timeout": 10.0,
    }
    settings.update(mta)
    return dataclasses.replace(
        cfg,
        state_dir=str(tmp_path / "state"),
        mta=dataclasses.replace(cfg.mta, **settings),
        dns=dataclasses.replace(cfg.dns, nameservers=("127.0.0.1:9",), timeout=Duration(1.0)),
    )


def enqueue(queue: Queue, *rcpts: str, sender: str = "alice@example.org", data: bytes = MESSAGE, **kw: Any) -> str:
    return queue.enqueue(Envelope(sender, [Recipient(r) for r in rcpts], hops=1, **kw), data)


def make_qmgr(config: Config, queue: Queue, **kw: Any) -> QueueManager:
    kw.setdefault("poll_interval", 0.05)
    return QueueManager(config, queue, Resolver(config.dns), **kw)


async def eventually(done: Callable[[], bool], limit: float = 20.0) -> None:
    """Return once ``done()`` holds (checked every 20 ms); fail after ``limit`` seconds."""
    for _ in range(int(limit / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached within {limit}s")


async def run_until(
    qmgr: QueueManager, done: Callable[[], object], limit: float = 20.0, *, recovery: Recovery | None = None
) -> None:
    """Run the manager until ``done()`` holds (checked every 20 ms); fail after ``limit`` seconds.
    ``recovery``: what `Queue.recover` returned, passed on to `QueueManager.run`."""
    task = asyncio.create_task(qmgr.run(recovery))
    try:
        deadline = time.monotonic() + limit
        while not done():
            if task.done():
                task.result()
                raise AssertionError("the queue manager stopped by itself")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {limit}s; stats {qmgr.stats}")
            await asyncio.sleep(0.02)
    finally:
        qmgr.stop()
        await task


def calls(out: Path, recipient: str) -> int:
    """How often the recorder ran for ``recipient`` (0 while its counter is being written)."""
    try:
        return int((out / f"{recipient}.calls").read_text() or 0)
    except FileNotFoundError:
        return 0


def all_ids(queue: Queue) -> list[str]:
    return sorted(qid for state in ("incoming", "active", "deferred", "hold") for qid in queue.ids(state))


def bounces(queue: Queue) -> list[tuple[Envelope, email.message.EmailMessage]]:
    """The DSNs in the queue (null sender), parsed."""
    found = []
    for qid in all_ids(queue):
        try:  # the manager may be moving it right now
            envelope, path = queue.load(qid)
            raw = path.read_bytes()
        except (QueueError, FileNotFoundError):
            continue
        if envelope.mail_from == "":
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, email.message.EmailMessage)
            found.append((envelope, msg))
    return found


def delivery_status(msg: email.message.EmailMessage) -> list[dict[str, str]]:
    """The message/delivery-status blocks of a DSN as dicts (per-message fields first)."""
    [part] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [{k: str(v) for k, v in block.items()} for block in blocks if isinstance(block, email.message.Message)]


# Every open(2) this process makes goes through the "open" audit event (io.open, os.open, Path's
# readers), from any thread. A hook cannot be removed once added: it is added once and counts
# only while a `count_opens` block runs.
_OPEN_COUNTERS: list[Counter[str]] = []
_OPEN_HOOK: list[bool] = []


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPEN_COUNTERS and isinstance(args[0], str | os.PathLike):
        path = os.fspath(args[0])
        for counter in _OPEN_COUNTERS:
            counter[str(path)] += 1


@contextlib.contextmanager
def count_opens() -> Iterator[Counter[str]]:
    """Within the block: how often each path (as the opener spelled it) was opened."""
    if not _OPEN_HOOK:
        sys.addaudithook(_on_audit)
        _OPEN_HOOK.append(True)
    opened: Counter[str] = Counter()
    _OPEN_COUNTERS.append(opened)
    try:
        yield opened
    finally:
        _OPEN_COUNTERS.remove(opened)
