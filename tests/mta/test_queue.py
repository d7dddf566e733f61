"""The MTA spool: format, API, recovery, and crashes at every step of enqueue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from filterd.errors import QueueError
from filterd.mta.queue import STATES, Envelope, Queue, Recipient

ROOT = Path(__file__).resolve().parents[2]


def _envelope(*rcpts: str) -> Envelope:
    return Envelope("sender@example.org", [Recipient(r) for r in rcpts or ("rcpt@example.net",)], client_ip="192.0.2.1")


def test_enqueue_then_load_round_trips(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    env = _envelope("a@example.net", "b@example.net")
    qid = q.enqueue(env, b"Subject: hi\r\n\r\nbody\r\n")
    loaded, data = q.load(qid)
    assert loaded == env and loaded.id == qid and loaded.size == 21
    assert data.read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
    assert q.ids("incoming") == [qid] and q.state_of(qid) == "incoming"
    assert not os.listdir(q.tmp)
    assert (q.root / "incoming" / qid).stat().st_mode & 0o777 == 0o600


def test_envelope_file_is_versioned_json(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.enqueue(_envelope(), b"x")
    obj = json.loads((tmp_path / "incoming" / qid).read_bytes())
    assert obj["version"] == 1 and obj["id"] == qid and obj["rcpts"][0]["status"] == "pending"


def test_ids_are_unique_and_time_ordered(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    ids = [q.new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    enqueued = [q.enqueue(_envelope(), b"x") for _ in range(50)]
    assert q.ids("incoming") == enqueued


def test_enqueue_refuses_an_id_in_use(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.enqueue(_envelope(), b"first")
    with pytest.raises(QueueError):
        q.enqueue(_envelope(), b"second", qid=qid)
    assert q.load(qid)[1].read_bytes() == b"first"


def test_move_save_and_remove(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.enqueue(_envelope("a@example.net", "b@example.net"), b"x")
    for state in STATES:
        q.move(qid, state)
        assert q.state_of(qid) == state and q.ids(state) == [qid]
    env, _ = q.load(qid)
    env.rcpts[0].status, env.rcpts[0].attempts, env.rcpts[0].last_error = "delivered", 1, ""
    env.rcpts[1].attempts, env.rcpts[1].last_error, env.rcpts[1].next_attempt = 1, "451 try later", 123.5
    q.save_envelope(qid, env)
    assert q.load(qid)[0] == env and env.pending == [env.rcpts[1]]
    q.remove(qid)
    assert q.state_of(qid) is None and not os.listdir(q.data)
    with pytest.raises(QueueError):
        q.load(qid)


def test_enqueue_in_hold(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    env = _envelope()
    env.hold_reason = "quarantined by the filter"
    qid = q.enqueue(env, b"x", state="hold")
    assert q.ids("hold") == [qid] and q.ids("incoming") == []


def test_lock_is_exclusive(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    code = f"import pathlib, filterd.mta.queue as m\nwith m.Queue(pathlib.Path({str(tmp_path)!r})).lock(): pass"
    with q.lock():
        held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert held.returncode != 0 and "in use by another process" in held.stderr
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_recover_quarantines_unreadable_envelopes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = Queue(tmp_path)
    good = q.enqueue(_envelope(), b"good", state="deferred")
    truncated = q.enqueue(_envelope(), b"truncated", state="deferred")
    path = tmp_path / "deferred" / truncated
    path.write_bytes(path.read_bytes()[:-5])
    no_data = q.enqueue(_envelope(), b"no data", state="hold")
    (q.data / no_data).unlink()
    wrong_size = q.enqueue(_envelope(), b"wrong size", state="deferred")
    (q.data / wrong_size).write_bytes(b"short")
    future = q.enqueue(_envelope(), b"future", state="deferred")
    obj = json.loads((tmp_path / "deferred" / future).read_bytes())
    obj["version"] = 99
    (tmp_path / "deferred" / future).write_text(json.dumps(obj))
    # incoming/ is left to the queue manager, which parses (and quarantines) when it loads
    unparsed = q.enqueue(_envelope(), b"incoming")
    (tmp_path / "incoming" / unparsed).write_bytes(b"{")

    result = q.recover()

    assert sorted(result.corrupt) == sorted([truncated, no_data, wrong_size, future])
    assert q.ids("deferred") == [good] and q.ids("incoming") == [unparsed]
    assert (q.data / unparsed).exists()  # named by its envelope: not an orphan
    with pytest.raises(QueueError, match="unreadable"):
        q.load(unparsed)
    q.remove(unparsed)
    envs = [f"{i}.env" for i in (truncated, no_data, wrong_size, future)]
    assert sorted(os.listdir(q.corrupt)) == sorted(envs + [f"{i}.data" for i in (truncated, wrong_size, future)])
    assert (q.corrupt / f"{truncated}.data").read_bytes() == b"truncated"
    assert caplog.text.count("moved to") == 4
    # a second pass finds nothing new and never deletes what is in corrupt/
    assert q.recover().corrupt == ()
    assert len(os.listdir(q.corrupt)) == 7


def test_recover_requeues_active_and_removes_leftovers(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.enqueue(_envelope(), b"x")
    q.move(qid, "active")
    (q.tmp / "stale.data").write_bytes(b"partial")
    (q.data / q.new_id()).write_bytes(b"orphan")
    result = q.recover()
    assert (result.tmp_removed, result.active_requeued, result.orphans_removed) == (1, 1, 1)
    assert q.ids("incoming") == [qid] and os.listdir(q.data) == [qid] and not os.listdir(q.tmp)


# -- crashes ---------------------------------------------------------------------------------

_CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from filterd.mta.queue import Envelope, Queue, Recipient

    class Crashing(Queue):
        def _step(self, name):
            if name == sys.argv[2]:
                os._exit(9)

    q = Crashing(Path(sys.argv[1]))
    qid = q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), b"M" * 100000)
    print("250 queued as", qid, flush=True)
    """
)


@pytest.mark.parametrize(
    ("step", "survives"),
    [
        ("data-written", False),
        ("envelope-written", False),
        ("data-renamed", False),
        # the envelope is in incoming/ (a 250 was not given yet): complete, delivered once
        ("envelope-renamed", True),
        ("done", True),
    ],
)
def test_crash_during_enqueue_leaves_nothing_half_written(tmp_path: Path, step: str, survives: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(tmp_path), step], capture_output=True, text=True)
    assert proc.returncode == 9 and "250" not in proc.stdout, proc.stderr
    q = Queue(tmp_path)
    q.recover()
    assert not os.listdir(q.tmp) and not os.listdir(q.corrupt)
    ids = q.ids("incoming")
    if survives:
        assert len(ids) == 1
        env, data = q.load(ids[0])
        assert data.read_bytes() == b"M" * 100000 and env.rcpts[0].address == "b@example.net"
    else:
        assert ids == [] and not os.listdir(q.data)


_LOOPER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from filterd.mta.queue import Envelope, Queue, Recipient

    q = Queue(Path(sys.argv[1]))
    n = 0
    while True:
        n += 1
        qid = q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), str(n).encode() * 3000)
        print(qid, n, flush=True)
    """
)


def test_sigkill_at_random_moments_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    acknowledged: dict[str, int] = {}
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _LOOPER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3 + 0.037 * round_)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        # A line cut off by the kill (no newline yet) was never an acknowledgement.
        for line in out.split("\n")[:-1]:
            qid, count = line.split()
            acknowledged[qid] = int(count)
        q = Queue(tmp_path)
        q.recover()
        assert not os.listdir(q.corrupt)
        present = set(q.ids("incoming"))
        assert set(acknowledged) <= present
        # at most the message in flight was stored without an acknowledgement
        assert len(present - set(acknowledged)) <= round_ + 1
        for qid, n in acknowledged.items():
            assert q.load(qid)[1].read_bytes() == str(n).encode() * 3000
    assert len(acknowledged) > 8


def test_last_status_round_trips_and_an_envelope_without_it_still_loads(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    env = _envelope("a@example.net", "b@example.net")
    for r in env.rcpts:
        r.attempts, r.last_error, r.last_status = 1, "4.4.1 connect refused", "4.4.1"
    qid = q.enqueue(env, b"x")
    assert [r.last_status for r in q.load(qid)[0].rcpts] == ["4.4.1", "4.4.1"]
    # written by the code before last_status was kept: the key is absent
    path = tmp_path / "incoming" / qid
    obj = json.loads(path.read_bytes())
    del obj["rcpts"][0]["last_status"]
    path.write_text(json.dumps(obj))
    first, second = q.load(qid)[0].rcpts
    assert (first.last_error, first.last_status) == ("4.4.1 connect refused", "")
    assert second.last_status == "4.4.1"


def test_recover_reports_when_each_deferred_message_is_due(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    env = Envelope(
        "s@example.org",
        [Recipient("done@example.net", "delivered", 1), Recipient("a@example.net", next_attempt=200.0),
         Recipient("b@example.net", next_attempt=100.0)],
    )  # fmt: skip
    deferred = q.enqueue(env, b"x", state="deferred")
    q.enqueue(_envelope(), b"y")  # incoming, and held: not scheduled
    q.enqueue(_envelope(), b"z", state="hold")
    broken = q.enqueue(_envelope(), b"w", state="deferred")
    (tmp_path / "deferred" / broken).write_text("{")
    result = q.recover()
    assert result.deferred == ((deferred, 100.0),) and result.corrupt == (broken,)


def test_last_reply_round_trips_and_an_envelope_without_it_still_loads(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    env = _envelope("a@example.net", "b@example.net")
    env.rcpts[0].last_reply_code, env.rcpts[0].last_reply_status = 450, "4.2.1"
    qid = q.enqueue(env, b"x")
    path = tmp_path / "incoming" / qid
    stored = json.loads(path.read_bytes())["rcpts"]
    assert [(r["last_reply_code"], r["last_reply_status"]) for r in stored] == [(450, "4.2.1"), (0, "")]
    # written by the code before the reply was kept: neither key, nor last_status
    for r in stored:
        del r["last_reply_code"], r["last_reply_status"], r["last_status"]
    stored[0]["last_error"] = "4.4.1 connect refused"
    path.write_text(json.dumps({**json.loads(path.read_bytes()), "rcpts": stored}))
    first, second = q.load(qid)[0].rcpts
    assert (first.last_reply_code, first.last_reply_status) == (0, "")
    assert (first.last_status, first.failure_status, second.failure_status) == ("", "4.4.1", "")
    stored[0]["last_reply_code"] = "450"
    path.write_text(json.dumps({**json.loads(path.read_bytes()), "rcpts": stored}))
    with pytest.raises(QueueError, match="last_reply_code"):
        q.load(qid)


def test_failure_status_prefers_last_status_and_reads_only_a_status_word() -> None:
    assert Recipient("a@x", last_error="4.4.1 refused", last_status="4.7.1").failure_status == "4.7.1"
    assert Recipient("a@x", last_error="4.4.1 refused").failure_status == "4.4.1"
    assert Recipient("a@x", last_error="451 try later").failure_status == ""
    assert Recipient("a@x").failure_status == ""
