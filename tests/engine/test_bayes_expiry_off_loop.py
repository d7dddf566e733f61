"""Bayes expiry beside a worker's loop: `Engine.maintain_bayes` (what a worker's upkeep awaits)
expires in a thread with its own SQLite connection, so the loop goes on scanning meanwhile;
one expiry at a time; a stopping worker interrupts it and does not hang on it; a failure is
logged and changes nothing for the loop.

Real SQLite stores, no mocks. Nothing here compares wall-clock times: "the loop kept serving" is
shown by what the loop did (scans, ticks) while the expiry was not finished, seen through its
own commits or through a write lock the test holds, under which an expiry cannot finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from filterd.config import Config, Duration
from filterd.engine.bayes import BayesCheck, BayesStore, token_ids
from filterd.engine.engine import Engine
from tests.conftest import offline_config
from tests.daemon_fixture import start_daemon
from tests.engine.bayes_helpers import bayes_config, check_consistent, make_raw, parse

MAX_TOKENS = 10_000  # the smallest bayes.max_tokens allowed
N_FEATURES = 1 << 18
PROBE = make_raw(1, True)  # learnt; scanning it marks its buckets as seen


def config(state_dir: Path) -> Config:
    cfg = offline_config()
    bayes = bayes_config(max_tokens=MAX_TOKENS, n_features=N_FEATURES)
    # An expiry waits for the test's lock up to state.timeout: longer than the tests hold it.
    state = dataclasses.replace(cfg.state, timeout=Duration(60.0))
    return dataclasses.replace(cfg, state_dir=str(state_dir), bayes=bayes, state=state)


def overdue_store(state_dir: Path, messages: int = 140) -> Path:
    """A store far over MAX_TOKENS (~60 000 buckets, from random token hashes), each bucket with
    its own atime, long ago (so that expiry picks by atime, not by id), last expired in 1970."""
    path = state_dir / "bayes.sqlite"
    rng = np.random.default_rng(5)
    items = [(f"m{i}", np.unique(rng.integers(0, 2**32, 500, dtype=np.uint32)), i % 2 == 0) for i in range(messages)]
    with BayesStore.open(path, config(state_dir).bayes) as store:
        store.learn_hashed(items)
        store.learn(parse(PROBE), True)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE buckets SET atime = 1000000 + (id * 7919) % 1000003")
        conn.execute("UPDATE state SET last_expiry = 0")
    conn.close()
    return path


def table(path: Path, sql: str) -> list[tuple[int, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def bayes_check(engine: Engine) -> BayesCheck:
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck)
    return check


def expiry_threads() -> int:
    return sum(t.name == "bayes-expiry" for t in threading.enumerate())


def expiry_threads_left() -> int:
    """Expiry threads still alive once those that have settled their job finish returning (the
    job closed its store before settling; the thread then has nothing left but to return)."""
    for thread in threading.enumerate():
        if thread.name == "bayes-expiry":
            thread.join(timeout=30)
    return expiry_threads()


def test_expiry_runs_beside_the_loop_which_scans_meanwhile(tmp_path: Path) -> None:
    path = overdue_store(tmp_path)
    probe_ids = set(token_ids(parse(PROBE), N_FEATURES).tolist())
    with sqlite3.connect(path) as conn:  # the probe's buckets are the oldest: only its scan keeps them
        conn.execute(f"UPDATE buckets SET atime = 1 WHERE id IN ({','.join(map(str, probe_ids))})")
    conn.close()
    rows = table(path, "SELECT id FROM buckets ORDER BY atime, id")
    others = [b for (b,) in rows if b not in probe_ids]
    excess = len(rows) - MAX_TOKENS
    assert excess > 40_000  # several of the expiry's write transactions
    expected_dropped = set(others[:excess])  # least recently seen first, the probe's now the newest
    engine = Engine.load(config(tmp_path), state_dir=str(tmp_path))
    check = bayes_check(engine)

    async def run() -> tuple[int | None, list[int], int]:
        await engine.scan(PROBE)  # marks the probe's buckets as seen, as a worker's scans do
        watch = sqlite3.connect(path)
        seen_totals: list[int] = []
        scans = 0
        expiry = asyncio.create_task(engine.maintain_bayes())
        try:
            while not expiry.done():
                result = await engine.scan(make_raw(scans + 100, scans % 2 == 0))
                assert "bayes" in result.timings and not result.problems  # a whole scan, Bayes included
                scans += 1
                seen_totals.append(watch.execute("SELECT expired_total FROM state").fetchone()[0])
                await asyncio.sleep(0.002)
            return await expiry, seen_totals, scans
        finally:
            watch.close()

    try:
        dropped, seen_totals, scans = asyncio.run(run())
        assert dropped == excess
        # The loop scanned between two of the expiry's commits, not only before or after it.
        assert any(0 < total < excess for total in seen_totals), (scans, sorted(set(seen_totals)))
        kept = {b for (b,) in table(path, "SELECT id FROM buckets")}
        assert kept == {b for (b,) in rows} - expected_dropped and probe_ids <= kept
        assert table(path, "SELECT expired_total FROM state") == [(excess,)]
        check_consistent(path, exact=False)
        store = check.store
        assert store is not None
        store.refresh()  # the loop's handle catches up through the change log, as with another process
        with BayesStore.open(path, config(tmp_path).bayes) as fresh:
            assert np.array_equal(store._spam, fresh._spam) and np.array_equal(store._ham, fresh._ham)
        assert expiry_threads_left() == 0
    finally:
        check.close()


def test_one_expiry_at_a_time_and_cancelling_it_interrupts_its_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = overdue_store(tmp_path)
    before = table(path, "SELECT count(*), expired_total, last_expiry FROM buckets, state")
    engine = Engine.load(config(tmp_path), state_dir=str(tmp_path))
    lock = sqlite3.connect(path, isolation_level=None)

    async def run() -> None:
        lock.execute("BEGIN IMMEDIATE")  # another writer: the expiry cannot drop anything yet
        expiry = asyncio.create_task(engine.maintain_bayes())
        for _ in range(20):  # the loop runs on while the expiry waits in its thread
            await asyncio.sleep(0.01)
        assert not expiry.done() and expiry_threads() == 1
        assert await engine.maintain_bayes() is None  # one at a time: the second look starts nothing
        assert expiry_threads() == 1
        expiry.cancel()  # what a stopping worker does
        for _ in range(3000):  # its task takes the cancellation and interrupts the job
            if "Bayes expiry interrupted" in caplog.text:
                break
            await asyncio.sleep(0.01)
        lock.execute("COMMIT")  # the thread gets the lock, finds itself interrupted, lets go
        with pytest.raises(asyncio.CancelledError):
            await expiry

    try:
        with caplog.at_level(logging.INFO, logger="filterd.engine.bayes.check"):
            asyncio.run(run())
        assert expiry_threads_left() == 0  # its thread has ended, its connection closed
        assert "did not stop" not in caplog.text
        # Nothing was dropped, and the expiry is still due: the next look does it.
        assert table(path, "SELECT count(*), expired_total, last_expiry FROM buckets, state") == before
        check_consistent(path, exact=False)
        (ntokens,) = table(path, "SELECT count(*) FROM buckets")[0]
        assert asyncio.run(engine.maintain_bayes()) == ntokens - MAX_TOKENS
        assert table(path, "SELECT count(*) FROM buckets") == [(MAX_TOKENS,)]
    finally:
        lock.close()
        bayes_check(engine).close()


def test_a_failed_expiry_is_logged_and_the_loop_keeps_its_seen_marks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = overdue_store(tmp_path)
    engine = Engine.load(config(tmp_path), state_dir=str(tmp_path))
    check = bayes_check(engine)
    probe_ids = set(token_ids(parse(PROBE), N_FEATURES).tolist())

    async def scan_then_expire() -> int | None:
        await engine.scan(PROBE)
        return await engine.maintain_bayes()

    try:
        with sqlite3.connect(path) as conn:  # the expiry's own connection fails, the loop's reads go on
            conn.execute("ALTER TABLE buckets RENAME TO buckets_away")
        conn.close()
        with caplog.at_level(logging.WARNING, logger="filterd.engine.bayes.check"):
            assert asyncio.run(scan_then_expire()) is None
        assert "Bayes expiry failed" in caplog.text and "buckets" in caplog.text
        store = check.store
        assert store is not None
        assert set(store.take_seen_marks().tolist()) == probe_ids  # handed back, to be written later
        store.add_seen_marks(np.array(sorted(probe_ids), dtype=np.int64))
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE buckets_away RENAME TO buckets")
        conn.close()
        result = asyncio.run(engine.scan(PROBE))  # the loop's handle still serves
        assert any(rule.startswith("BAYES_") for rule in result.rule_names), result.rule_names
        (ntokens,) = table(path, "SELECT count(*) FROM buckets")[0]
        assert asyncio.run(engine.maintain_bayes()) == ntokens - MAX_TOKENS  # the next look expires
        kept = {b for (b,) in table(path, "SELECT id FROM buckets")}
        assert probe_ids <= kept  # the marks given back were written before the expiry picked
        assert expiry_threads_left() == 0
    finally:
        check.close()


def test_daemon_scans_while_an_expiry_waits_and_sigterm_stops_it(tmp_path: Path) -> None:
    """Through a real worker: spamd scans are answered while the worker's expiry cannot finish
    (the test holds the store's write lock), and SIGTERM interrupts it without waiting for it."""
    state = tmp_path / "state"
    state.mkdir()
    path = overdue_store(state)
    before = table(path, "SELECT count(*), expired_total, last_expiry FROM buckets, state")
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    # No autolearn: its writes would wait for the lock the test holds (as they wait for one of the
    # expiry's short transactions at most, without the test).
    bayes_yaml = (
        f"bayes: {{max_tokens: {MAX_TOKENS}, n_features: {N_FEATURES}, min_spam: 5, min_ham: 5, autolearn: false}}\n"
        "state: {timeout: 60s}\n"  # the expiry waits for the test's lock (up to state.timeout)
    )
    d = start_daemon(tmp_path, "--state-dir", str(state), config=bayes_yaml, workers=1, metrics=False)
    try:
        d.wait_for_log(r"Bayes expiry is due", timeout=60)  # the worker's first look: 1-10 s after start
        for n in range(5):
            body = make_raw(n + 200, n % 2 == 0)
            reply = d.request(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(body) + body)
            assert reply.startswith(b"SPAMD/1.1 0 EX_OK"), reply
        assert "Bayes expiry dropped" not in d.log()  # it was still waiting while those were served
        d.signal(signal.SIGTERM)
        d.wait_for_log(r"Bayes expiry interrupted")
        lock.execute("COMMIT")
        assert d.stop() == 0, d.log()
    finally:
        lock.close()
        d.stop()
    log = d.log()
    assert "did not stop" not in log and "Bayes expiry failed" not in log, log
    assert table(path, "SELECT count(*), expired_total, last_expiry FROM buckets, state") == before
    check_consistent(path, exact=False)
