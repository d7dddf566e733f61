"""Bayes writes beside a worker's loop: spamd TELL, autolearn and the atimes of scanned buckets
go to the process's `BayesWriter` thread, so the loop goes on serving while another writer holds
the store; a TELL is answered once its learning is committed; one worker's writes keep their
order; a stopping worker either answers a TELL or leaves it unlearnt.

Real stores, no mocks: SQLite with its write lock held by the test (BEGIN IMMEDIATE on a
connection of its own), Redis with writes paused (CLIENT PAUSE WRITE: reads pass, every script
waits, as a writer waits for SQLite's lock). Nothing compares wall-clock times: "the loop kept
serving" is shown by what it did (whole scans, answered requests) while a write could not
commit because the test held the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from filterd.config import Config
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.service import SpamdService
from filterd.engine.bayes import BayesCheck, BayesStore, LearnResult, message_digest, open_bayes_store, token_ids
from filterd.engine.bayes.base import BayesStoreBase, StoreInterrupted, read_backup
from filterd.engine.bayes.writer import BayesWriter
from filterd.engine.engine import Engine
from filterd.engine.plugin import ScanContext
from filterd.protocols.spamd import SpamdRequest, SpamdServerConnection
from tests.conftest import offline_config
from tests.daemon_fixture import Daemon, start_daemon
from tests.engine.bayes_helpers import bayes_config, check_consistent, make_raw, parse
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]

N_FEATURES = 1 << 16
# Writes wait for another writer's lock (the test's hold of the store) up to state.timeout:
# longer than any hold here.
SQLITE_STATE = {"backend": "sqlite", "timeout": 60.0}


class Store:
    """One backend, and a way to hold it as another writer would."""

    def __init__(self, name: str, state_dir: Path, state: dict[str, Any]) -> None:
        self.name = name
        self.state_dir = state_dir
        self.state = state

    def config(self, **bayes: Any) -> Config:
        cfg = offline_config()
        daemon = dataclasses.replace(cfg.daemon, allow_tell=True)
        return dataclasses.replace(
            cfg,
            state=dataclasses.replace(cfg.state, **self.state),
            state_dir=str(self.state_dir),
            daemon=daemon,
            bayes=bayes_config(n_features=N_FEATURES, **bayes),
        )

    def train(self) -> None:
        with open_bayes_store(self.config(), self.state_dir) as store:
            store.learn_many([(parse(make_raw(i, i % 2 == 0)), i % 2 == 0) for i in range(20)])

    @contextmanager
    def held(self) -> Iterator[None]:
        """Another writer holds the store: no write commits until the block ends."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.state_dir / "bayes.sqlite", isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("COMMIT")
                conn.close()
            return
        client = redis.Redis.from_url(self.state["redis_url"])
        client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            yield
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
            client.close()

    def learnt(self, raw: bytes) -> str | None:
        """'spam', 'ham' or None: how the store (read afresh) knows the message."""
        with open_bayes_store(self.config(), self.state_dir) as store:
            backup = _backup_messages(store)
        return backup.get(message_digest(parse(raw)))


def _backup_messages(store: BayesStoreBase) -> dict[str, str]:
    """digest -> class of every learnt message, whatever the backend (read through a backup)."""
    out = io.StringIO()
    store.backup(out)
    return {m[0]: "spam" if m[1] else "ham" for m in read_backup(io.StringIO(out.getvalue())).messages}


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        found = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        state = {"backend": "redis", "redis_url": server.url, "redis_key_prefix": server.unique_prefix(),
                 "timeout": 60.0}  # fmt: skip
        found = Store("redis", tmp_path / "state", state)
    found.train()
    return found


def tell_request(raw: bytes, *, learn: str | None = None, forget: bool = False) -> SpamdRequest:
    headers = b""
    if learn is not None:
        headers += b"Message-class: %s\r\nSet: local\r\n" % learn.encode()
    if forget:
        headers += b"Remove: local\r\n"
    conn = SpamdServerConnection()
    conn.receive_data(b"TELL SPAMC/1.5\r\n%sContent-length: %d\r\n\r\n" % (headers, len(raw)) + raw)
    event = conn.next_event()
    assert isinstance(event, SpamdRequest), event
    return event


def bayes_check(engine: Engine) -> BayesCheck:
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck)
    return check


# -- spamd TELL ------------------------------------------------------------------------------------


def test_tell_waits_for_its_commit_while_the_loop_serves(store: Store) -> None:
    """While another writer holds the store, the loop scans whole messages and the TELL is not
    answered (it cannot have committed); freed, the TELL is answered, its message is in the
    store, and the loop's own counts show it at the next scan, without the 1 s refresh."""
    engine = Engine.load(store.config(), state_dir=str(store.state_dir))
    service = SpamdService(engine, engine.config, WorkerMetrics())
    check = bayes_check(engine)
    taught = make_raw(500, True, extra="zqxtaughtword " * 5)

    async def run() -> tuple[bytes, list[bool], int]:
        await engine.scan(make_raw(400, False))  # the loop's handle is open
        scoring = check.store
        assert scoring is not None
        nspam = scoring._nspam
        pending: list[bool] = []
        with store.held():
            tell = asyncio.create_task(service.handle(tell_request(taught, learn="spam")))
            for n in range(10):
                result = await engine.scan(make_raw(600 + n, n % 2 == 0))
                assert "bayes" in result.timings and not result.problems
                assert any(rule.startswith("BAYES_") for rule in result.rule_names)
                pending.append(not tell.done())
        reply = await tell
        check._refreshed = float("inf")  # no refresh by the clock: only the writer's news counts
        await engine.scan(make_raw(700, True))
        return reply, pending, scoring._nspam - nspam

    try:
        reply, pending, more_spam = asyncio.run(run())
        assert all(pending)  # ten scans answered while the TELL waited
        assert b"DidSet: local" in reply, reply
        assert store.learnt(taught) == "spam"
        assert more_spam == 1
    finally:
        writer = check.writer
        check.close()  # waits for the writer, which closes its handle
    assert writer._thread is not None and not writer._thread.is_alive()


def test_learn_then_forget_of_one_message_keep_their_order(store: Store) -> None:
    """Two TELLs handed over in this order while the store is held: learn, then forget. Were
    they swapped, the forget would find nothing and the message would stay learnt."""
    engine = Engine.load(store.config(), state_dir=str(store.state_dir))
    service = SpamdService(engine, engine.config, WorkerMetrics())
    raw = make_raw(800, True)

    async def run() -> tuple[bytes, bytes]:
        with store.held():
            learn = asyncio.create_task(service.handle(tell_request(raw, learn="spam")))
            forget = asyncio.create_task(service.handle(tell_request(raw, forget=True)))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not learn.done() and not forget.done()
        return await learn, await forget

    try:
        learnt, forgotten = asyncio.run(run())
        assert b"DidSet: local" in learnt, learnt
        assert b"DidRemove: local" in forgotten, forgotten
        assert store.learnt(raw) is None
    finally:
        bayes_check(engine).close()


def test_a_tell_overrides_an_autolearn_still_waiting_in_its_batch(tmp_path: Path) -> None:
    """Autolearn decides 'ham' for a message and keeps it for its batch; then a user says it is
    spam. The batch is handed over before the TELL, so the TELL's class is the one that stays."""
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    config = store.config(autolearn=True, autolearn_ham_below=1000.0, autolearn_spam_at=1000.0)
    engine = Engine.load(config, state_dir=str(store.state_dir))
    service = SpamdService(engine, engine.config, WorkerMetrics())
    raw = make_raw(900, False)

    async def run() -> bytes:
        engine._last_learn = float("inf")  # the batch waits for 8 messages, not for 2 seconds
        assert (await engine.scan(raw)).autolearn == "ham"
        return await service.handle(tell_request(raw, learn="spam"))

    try:
        reply = asyncio.run(run())
        assert b"DidSet: local" in reply, reply
        assert engine.flush_learning()
        assert store.learnt(raw) == "spam"
    finally:
        bayes_check(engine).close()


def test_tell_errors_keep_their_spamd_replies(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    engine = Engine.load(store.config(), state_dir=str(store.state_dir))
    service = SpamdService(engine, engine.config, WorkerMetrics())
    with sqlite3.connect(store.state_dir / "bayes.sqlite") as conn:  # the writer's learning fails
        conn.execute("ALTER TABLE messages RENAME TO messages_away")
    conn.close()
    try:
        reply = asyncio.run(service.handle(tell_request(make_raw(1, True), learn="spam")))
        assert reply.startswith(b"SPAMD/1.0 70 Internal error: learning failed"), reply
        assert service.metrics.errors["learn_failed"] == 1
    finally:
        bayes_check(engine).close()
    disabled = dataclasses.replace(store.config(), bayes=dataclasses.replace(store.config().bayes, enabled=False))
    plain = SpamdService(Engine.load(disabled), disabled, WorkerMetrics())
    reply = asyncio.run(plain.handle(tell_request(make_raw(1, True), learn="spam")))
    assert reply.startswith(b"SPAMD/1.0 69 Service Unavailable: Bayes is disabled"), reply


# -- autolearn and atimes ------------------------------------------------------------------------


def test_autolearn_keeps_scanning_and_never_holds_more_than_one_batch_unwritten(store: Store) -> None:
    """With the store held, every scan is answered; autolearn takes 8 messages (one batch: what a
    killed worker may lose) and marks the others unavailable; freed, exactly those 8 are learnt."""
    config = store.config(autolearn=True, autolearn_ham_below=1000.0, autolearn_spam_at=1000.0)
    engine = Engine.load(config, state_dir=str(store.state_dir))
    raws = [make_raw(1000 + n, False) for n in range(20)]

    async def run() -> list[str]:
        engine._last_learn = float("inf")  # batches of 8, whatever the time since the last one
        assert (await engine.scan(make_raw(999, True), ScanContext(no_autolearn=True))).autolearn == "disabled"
        with store.held():  # (the loop's handle is open: opening a Redis one runs a script)
            return [(await engine.scan(raw)).autolearn for raw in raws]

    try:
        outcomes = asyncio.run(run())
        assert outcomes.count("ham") == 8 and outcomes.count("unavailable") == 12, outcomes
        assert engine.autolearn_skipped == 12
        assert engine.flush_learning()
        learnt = {n for n, raw in enumerate(raws) if store.learnt(raw) == "ham"}
        assert learnt == {n for n, how in enumerate(outcomes) if how == "ham"}
        assert engine.autolearn_failed == 0
    finally:
        bayes_check(engine).close()


def test_autolearn_failure_is_logged_and_counted_never_failing_the_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    config = store.config(autolearn=True, autolearn_ham_below=1000.0, autolearn_spam_at=1000.0)
    engine = Engine.load(config, state_dir=str(store.state_dir))
    with sqlite3.connect(store.state_dir / "bayes.sqlite") as conn:
        conn.execute("ALTER TABLE messages RENAME TO messages_away")
    conn.close()
    try:
        results = [engine.scan_sync(make_raw(1100 + n, False)) for n in range(8)]
        assert all(r.autolearn == "ham" and not r.problems for r in results)
        assert not engine.flush_learning()
        assert engine.autolearn_failed == 8
        assert "autolearn of 8 messages failed" in caplog.text
    finally:
        bayes_check(engine).close()


def test_seen_marks_are_written_by_the_writer_while_the_loop_scans(tmp_path: Path) -> None:
    """The 10-minute write of scanned buckets' atimes happens in the writer: with the store held,
    the scan that hands them over is answered; freed, the atimes are written."""
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    path = store.state_dir / "bayes.sqlite"
    probe = make_raw(3, True)
    ids = sorted(set(token_ids(parse(probe), N_FEATURES).tolist()))
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE buckets SET atime = 1 WHERE id IN ({','.join(map(str, ids))})")
    conn.close()
    engine = Engine.load(store.config(), state_dir=str(store.state_dir))
    check = bayes_check(engine)

    async def run() -> None:
        await engine.scan(probe)  # marks the probe's buckets as seen
        scoring = check.store
        assert scoring is not None
        scoring._touched_since -= 700  # ten minutes have passed
        check._refreshed = -1e9
        with store.held():
            # Refreshes, and hands the marks over; had the loop's handle written them itself, the
            # scan would have waited for the lock (state.timeout) and failed (a problem, CHECK_ERROR_BAYES).
            result = await engine.scan(make_raw(1200, False))
            assert "bayes" in result.timings and not result.problems

    try:
        asyncio.run(run())
        check.writer.submit(lambda s: None).result()  # the writer has done what it was handed
        with sqlite3.connect(path) as conn:
            atimes = [a for (a,) in conn.execute(f"SELECT atime FROM buckets WHERE id IN ({','.join(map(str, ids))})")]
        conn.close()
        assert atimes and all(a > 1 for a in atimes)
    finally:
        check.close()


# -- the writer on its own -----------------------------------------------------------------------


def test_stopping_the_writer_past_its_wait_commits_nothing_more(tmp_path: Path) -> None:
    """A write waiting for the lock when `stop` gives up is rolled back when the lock comes free,
    not committed: a stopping worker that did not answer a TELL has not learnt it."""
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    writer = BayesWriter(store.config(), str(store.state_dir))
    msg = parse(make_raw(1300, True))
    assert writer.submit(lambda s: s.counts()).result() == (10, 10)  # the handle is open
    with store.held():
        waiting = writer.submit(lambda s: s.learn(msg, True))
        assert not writer.stop(0.05)  # cannot finish: the lock is held
        with pytest.raises(StoreInterrupted):
            writer.submit(lambda s: None)  # stopped: takes nothing more
    with pytest.raises(StoreInterrupted):
        waiting.result(timeout=60)
    assert store.learnt(make_raw(1300, True)) is None
    check_consistent(store.state_dir / "bayes.sqlite")
    assert writer.stop()  # now that it has given up its last write, it ends


def test_a_dropped_writer_closes_its_handle_and_ends(tmp_path: Path) -> None:
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    writer = BayesWriter(store.config(), str(store.state_dir))
    writer.submit(lambda s: s.counts()).result()
    thread = writer._thread
    assert thread is not None and thread.is_alive()
    del writer
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_an_idle_writer_lets_go_of_its_handle_and_opens_one_at_the_next_write(tmp_path: Path) -> None:
    """The second copy of the counts is held while the process writes, not for good."""
    store = Store("sqlite", tmp_path / "state", SQLITE_STATE)
    store.train()
    writer = BayesWriter(store.config(), str(store.state_dir), idle_close=0.05)
    try:
        assert not writer.handle_open
        assert writer.submit(lambda s: s.counts()).result() == (10, 10)
        for _ in range(6000):  # it closes once idle (waited for up to a minute)
            if not writer.handle_open:
                break
            time.sleep(0.01)
        assert not writer.handle_open
        msg = parse(make_raw(1350, True))
        assert writer.submit(lambda s: s.learn(msg, True)).result() is LearnResult.LEARNED
        assert store.learnt(make_raw(1350, True)) == "spam"
    finally:
        assert writer.stop()
    assert not writer.handle_open


# -- through a real daemon -------------------------------------------------------------------------


def _daemon_store(tmp_path: Path) -> Path:
    state = tmp_path / "dstate"
    state.mkdir()
    cfg = dataclasses.replace(offline_config(), bayes=bayes_config())
    with BayesStore.open(state / "bayes.sqlite", cfg.bayes) as trained:
        trained.learn_many([(parse(make_raw(i, i % 2 == 0)), i % 2 == 0) for i in range(20)])
    return state


def _send_tell(d: Daemon, raw: bytes) -> tuple[threading.Thread, list[bytes]]:
    """Connect and send a TELL now (the worker accepts in order: a request sent after this one
    and answered means this one is in flight); its answer is read in a thread."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(d.unix_path))
    sock.sendall(b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: %d\r\n\r\n" % len(raw) + raw)
    sock.shutdown(socket.SHUT_WR)
    out: list[bytes] = []

    def read() -> None:
        with sock:
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        out.append(b"".join(chunks))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, out


def _learnt(state: Path, raw: bytes) -> bool:
    conn = sqlite3.connect(state / "bayes.sqlite")
    try:
        digest = message_digest(parse(raw))
        count: int = conn.execute("SELECT count(*) FROM messages WHERE digest = ?", (digest,)).fetchone()[0]
        return count == 1
    finally:
        conn.close()


BAYES_YAML = (
    f"bayes: {{min_spam: 5, min_ham: 5, autolearn: false, n_features: {N_FEATURES}}}\n"
    "state: {timeout: 60s}\n"  # a TELL waits for the test's lock (up to state.timeout)
)


def test_daemon_answers_while_a_tell_waits_and_answers_it_when_it_commits_during_shutdown(
    tmp_path: Path,
) -> None:
    state = _daemon_store(tmp_path)
    raw = make_raw(1400, True, extra="zqxshutdownword")
    lock = sqlite3.connect(state / "bayes.sqlite", isolation_level=None)
    d = start_daemon(tmp_path, "--state-dir", str(state), "--allow-tell", config=BAYES_YAML, workers=1,
                     metrics=False)  # fmt: skip
    try:
        lock.execute("BEGIN IMMEDIATE")
        tell, reply = _send_tell(d, raw)
        for n in range(3):  # the one worker answers scans meanwhile (the TELL is in flight)
            body = make_raw(1500 + n, n % 2 == 0)
            answer = d.request(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(body) + body)
            assert answer.startswith(b"SPAMD/1.1 0 EX_OK") and b"BAYES_" in answer, answer
        assert tell.is_alive()  # it cannot have committed: the lock is held
        d.signal(signal.SIGTERM)
        d.wait_for_log(r"worker \d+: stopping; 1 connection\(s\) in flight")
        lock.execute("COMMIT")  # within the grace period: the TELL commits and is answered
        tell.join(timeout=120)
        assert reply and b"DidSet: local" in reply[0], reply
        assert d.stop() == 0, d.log()
    finally:
        lock.close()
        d.stop()
    assert _learnt(state, raw)
    assert "did not stop in time" not in d.log()


def test_daemon_stopping_past_its_wait_leaves_an_unanswered_tell_unlearnt(tmp_path: Path) -> None:
    state = _daemon_store(tmp_path)
    raw = make_raw(1600, True)
    lock = sqlite3.connect(state / "bayes.sqlite", isolation_level=None)
    config = BAYES_YAML + "daemon: {grace_period: 1s}\n"
    d = start_daemon(tmp_path, "--state-dir", str(state), "--allow-tell", config=config, workers=1, metrics=False)
    try:
        lock.execute("BEGIN IMMEDIATE")
        tell, reply = _send_tell(d, raw)
        answer = d.request(b"PING SPAMC/1.5\r\n\r\n")  # answered: the TELL is in flight
        assert answer.startswith(b"SPAMD/1.5 0 PONG")
        d.signal(signal.SIGTERM)
        d.wait_for_log(r"worker \d+: stopping; 1 connection\(s\) in flight")
        assert d.stop() == 0, d.log()  # the worker did not wait for the lock: it stopped in time
        tell.join(timeout=120)
        assert reply == [b""], reply  # no answer...
    finally:
        lock.execute("COMMIT")
        lock.close()
        d.stop()
    assert not _learnt(state, raw)  # ...and nothing learnt, even now that the lock is free
    log = d.log()
    assert "did not stop in time" not in log, log
    check_consistent(state / "bayes.sqlite")
