"""The queue manager killed with SIGKILL while it delivers, again and again: after the last
restart every recipient of every queued message has been delivered at least once; the
duplicates (a delivery done but not yet recorded when the process died) are counted."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from filterd.mta.queue import Envelope, Queue, Recipient
from tests.mta.mta_fixture import Mta

MESSAGES = 500
RECIPIENTS = ("bob@example.org", "carol@example.org")
KILLS = 6

# Each delivery is a file OUT/<queue id>.<recipient>.<pid>, renamed into place once complete.
RECORD = 'cat > "$0/$QUEUE_ID.$RECIPIENT.$$.tmp" && mv "$0/$QUEUE_ID.$RECIPIENT.$$.tmp" "$0/$QUEUE_ID.$RECIPIENT.$$"'


def _start(run: Path, n: int) -> Mta:
    log_path = run / f"mta{n}.log"
    cmd = [
        sys.executable, "-m", "filterd", "mta", "--config", str(run / "filterd.yaml"), "--state-dir",
        str(run / "state"), "--listen", "127.0.0.1:0", "--hostname", "mx.example.org",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    mta = Mta(proc, log_path, run / "state")
    mta.wait_for_log(r"filterd mta: ready")
    return mta


def test_sigkill_during_delivery_loses_nothing(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "filterd.yaml").write_text(
        "network: {enabled: false}\n"
        "dns: {nameservers: ['127.0.0.1:9']}\n"
        "mta:\n"
        "  peername_lookup: false\n"  # no DNS server here: 127.0.0.1:9 answers nothing
        "  local_domains: [example.org]\n"
        f"  local_delivery_command: ['/bin/sh', '-c', '{RECORD}', '{out}']\n"
        "  mailbox: '{state_dir}/mail/{user}'\n"
    )
    queue = Queue(tmp_path / "state" / "queue")
    ids = []
    for i in range(MESSAGES):
        data = f"From: a@example.org\r\nSubject: {i}\r\nMessage-ID: <{i}@test>\r\n\r\nbody {i}\r\n".encode()
        ids.append(queue.enqueue(Envelope("a@example.org", [Recipient(r) for r in RECIPIENTS], hops=1), data))

    rng = random.Random(20261128)
    kills = 0
    for n in range(KILLS):
        mta = _start(tmp_path, n)
        time.sleep(rng.uniform(0.05, 0.5))
        if not any(queue.ids(s) for s in ("incoming", "active", "deferred")):
            mta.stop()
            break
        mta.proc.send_signal(signal.SIGKILL)
        mta.proc.wait()
        kills += 1
    mta = _start(tmp_path, KILLS)
    deadline = time.monotonic() + 120
    while any(queue.ids(s) for s in ("incoming", "active", "deferred")):
        assert time.monotonic() < deadline, mta.log()
        time.sleep(0.1)
    assert mta.stop() == 0
    time.sleep(0.5)  # commands started by a killed MTA may still be finishing

    done = Counter(".".join(p.name.split(".")[:-1]) for p in out.iterdir() if not p.name.endswith(".tmp"))
    expected = {f"{qid}.{r}" for qid in ids for r in RECIPIENTS}
    lost = expected - set(done)
    duplicates = sum(count - 1 for count in done.values())
    record_property("kills", kills)
    record_property("duplicates", duplicates)
    print(f"\nqmgr crash test: {kills} SIGKILLs, {len(expected)} deliveries, {duplicates} duplicates, {len(lost)} lost")
    assert not lost, f"{len(lost)} deliveries lost after {kills} kills"
    assert set(done) == expected  # nothing delivered that was not queued
    assert kills >= 3  # the test killed it while it worked
    # Each kill can repeat only what was in flight or done but not yet recorded.
    assert duplicates <= kills * 40
    assert not list((queue.root / "corrupt").iterdir())
