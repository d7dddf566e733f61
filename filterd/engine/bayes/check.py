"""The Bayes check plugin: BAYES_00 ... BAYES_999 from the store's spam probability.

Bands as SpamAssassin's ``check_bayes(min, max)``: a rule fires when min < p <= max, and the
lowest band also takes p = 0. BAYES_999 (p > 0.999) fires together with BAYES_99. Nothing
fires until the store holds min_spam spam and min_ham ham messages.

The store is the one `open_bayes_store` picks: ``<state_dir>/bayes.sqlite`` in the state
directory given to the engine (or ``state_dir`` of the configuration; without one the check
stays silent), or Redis with ``state.backend: redis``. It is opened on first use, so that each
worker process opens its own connection after fork, and refreshed at most once a second, which
bounds how stale a worker's counts can be. Scanning never creates the store (a filter that has
learnt nothing has nothing to say); learning does.

That handle only reads (`BayesStoreBase.upkeep` off). Every write of the process goes to its
`BayesWriter`, one thread with a handle of its own (`filterd.engine.bayes.writer`): spamd TELL
(`tell`, awaited: the answer comes once it is committed), autolearn batches (`write`, not
awaited) and, every 10 minutes, the atimes of the buckets scans marked as seen. Once the writer
has finished a write, the next scan refreshes first, whatever the second: the process scores
with its own learning at once, and with other processes' within a second.

When Redis cannot be reached, scans go on with the counts this process last read (or without
Bayes if it never read any) and the store is tried again 10 s later, so a dead server costs a
worker one timeout per 10 s rather than one per message.

Expiry (`BayesCheck.expire_if_due`, the workers' upkeep) runs in a thread of its own with a
write-only store handle (connection) of its own, opened and closed in that thread: on a store of a million
buckets it takes seconds, which on the worker's loop would stall every connection the worker
serves. The loop only looks whether it is due (one row or key read) and hands over the buckets
its scans marked as seen; its own handle catches up with the expiry's changes by `refresh`, as
with any other process's. One expiry at a time per process; cancelled (a worker stopping), it
is interrupted and waited for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar, TypeVar

from filterd.config import Config
from filterd.engine.bayes.backend import STORE_FILE, open_bayes_store, open_existing_bayes_store
from filterd.engine.bayes.base import BayesStoreBase, Hashed, Ids, LearnResult, StoreInterrupted
from filterd.engine.bayes.tokenizer import Tokenizer, message_digest
from filterd.engine.bayes.writer import BayesWriter
from filterd.engine.message import ParsedMessage
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.errors import StateError

__all__ = ["BANDS", "STORE_FILE", "BayesCheck", "ExpiryJob", "bayes_rules"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_REFRESH_INTERVAL = 1.0  # seconds
_RETRY_AFTER = 10.0  # seconds without trying an unreachable store again
_STOP_WAIT = 5.0  # seconds a cancelled expiry is waited for (its thread is a daemon thread)

BANDS: tuple[tuple[str, float, float], ...] = (
    ("BAYES_00", 0.0, 0.01),
    ("BAYES_05", 0.01, 0.05),
    ("BAYES_20", 0.05, 0.20),
    ("BAYES_40", 0.20, 0.40),
    ("BAYES_50", 0.40, 0.60),
    ("BAYES_60", 0.60, 0.80),
    ("BAYES_80", 0.80, 0.95),
    ("BAYES_95", 0.95, 0.99),
    ("BAYES_99", 0.99, 1.00),
    ("BAYES_999", 0.999, 1.00),
)
"""(rule, min, max): the rule fires when min < p <= max (or p == min == 0)."""


def bayes_rules(probability: float) -> list[str]:
    """The BAYES_xx rules a probability fires (one, or BAYES_99 and BAYES_999)."""
    return [
        name for name, low, high in BANDS if (low < probability or probability == low == 0.0) and probability <= high
    ]


class ExpiryJob:
    """One expiry, run by `run` in any thread with a store handle of its own; `cancel` (from any
    thread) interrupts it. ``seen`` are the buckets the scanning handle marked as seen: their
    atimes are written before anything is picked, so what scans use now is not expired."""

    def __init__(self, config: Config, state_dir: str, seen: Ids, where: str = "") -> None:
        self.config = config
        self.state_dir = state_dir
        self.seen = seen
        self.where = where  # the store, for messages
        self._cancelled = threading.Event()
        self._store: BayesStoreBase | None = None

    def run(self) -> int | None:
        """Open a handle, expire, close it; the buckets dropped, or None if the store has gone.
        Raises what opening or expiring raises (StoreInterrupted once cancelled)."""
        store = open_existing_bayes_store(self.config, self.state_dir, write_only=True)
        if store is None:
            return None
        self._store = store  # before looking at the flag: a cancel() either sees it or is seen
        try:
            if self._cancelled.is_set():
                raise StoreInterrupted(f"{store.where}: expiry cancelled")
            store.add_seen_marks(self.seen)
            return store.expire()
        finally:
            self._store = None
            store.close()

    def cancel(self) -> None:
        self._cancelled.set()
        store = self._store
        if store is not None:
            store.interrupt()  # safe against a close() in the job's thread


class BayesCheck:
    """Scores the message with the Bayes store; see the module docstring."""

    name: ClassVar[str] = "bayes"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = ""
    emits: ClassVar[frozenset[str]] = frozenset(name for name, _, _ in BANDS)

    def __init__(self, setup: CheckSetup) -> None:
        self.config = setup.config.bayes
        self._full_config = setup.config
        self.state_dir = setup.state_dir or setup.config.state_dir
        redis = setup.config.state.backend == "redis"
        self.active = self.config.enabled and (redis or bool(self.state_dir))
        self.path: Path | None = Path(self.state_dir) / STORE_FILE if self.active and not redis else None
        self._store: BayesStoreBase | None = None
        self._pid = 0
        self._refreshed = 0.0
        self._looked = -_REFRESH_INTERVAL  # when scanning last found no store
        self._retry_at = 0.0  # when an unreachable store may be tried again
        self._expiring: ExpiryJob | None = None
        self._writer: BayesWriter | None = None
        self._writer_pid = 0
        self._finished_seen = 0  # the writer's finished writes when this process's handle last refreshed
        self._tokenizer: Tokenizer | None = None  # for learning before this process has a handle

    @property
    def store(self) -> BayesStoreBase | None:
        """This process's scoring handle, opened (and the store created) on first use; None
        without a state directory (SQLite) or with Bayes disabled. It only reads: learn
        through `tell` or `write` (tools that want a handle to write with open their own)."""
        if not self.active:
            return None
        if self._store is None or self._pid != os.getpid():
            # After fork the parent's connection must not be used; a fresh one is opened.
            self._adopt(open_bayes_store(self._full_config, self.state_dir, upkeep=False))
        return self._store

    @property
    def writer(self) -> BayesWriter:
        """This process's writer (module docstring), made at first use in the process."""
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer = BayesWriter(self._full_config, self.state_dir)
            self._writer_pid = os.getpid()
            self._finished_seen = 0
        return self._writer

    def _own_writer(self) -> BayesWriter | None:
        """The writer this process made, if any."""
        return self._writer if self._writer is not None and self._writer_pid == os.getpid() else None

    def _adopt(self, store: BayesStoreBase) -> None:
        self._store = store
        self._pid = os.getpid()
        self._refreshed = time.monotonic()

    def _opened(self) -> BayesStoreBase | None:
        """The store this process opened, if any."""
        return self._store if self._store is not None and self._pid == os.getpid() else None

    def _store_for_scan(self, now: float) -> BayesStoreBase | None:
        """The store if it exists (looked for at most once a second), refreshed at most once a
        second."""
        store = self._opened()
        if store is None:
            if not self.active or now - self._looked < _REFRESH_INTERVAL:
                return None
            found = open_existing_bayes_store(self._full_config, self.state_dir, upkeep=False)
            if found is None:
                self._looked = now
                return None
            self._adopt(found)
            return found
        writer = self._own_writer()
        finished = writer.finished if writer is not None else self._finished_seen
        if now - self._refreshed >= _REFRESH_INTERVAL or finished != self._finished_seen:
            self._refreshed = now
            self._finished_seen = finished
            store.refresh()
            marks = store.take_seen_marks_if_due()
            if marks is not None and marks.size:
                self._write_seen_marks(marks)
        return store

    def _write_seen_marks(self, marks: Ids) -> None:
        """The atimes of buckets scans used, written by the writer (a failure is logged)."""

        def job(store: BayesStoreBase) -> None:
            store.refresh()  # into the current generation (Redis), should a clear or restore have come
            store.write_seen_marks(marks)

        try:
            future = self.writer.submit(job)
        except StoreInterrupted:
            return  # the process is stopping
        future.add_done_callback(_log_failure(f"writing the atimes of {marks.size} scanned buckets"))

    def run(self, scan: Scan) -> Sequence[Hit]:
        now = time.monotonic()
        store = self._opened()
        if now >= self._retry_at:
            try:
                store = self._store_for_scan(now)
            except StateError as exc:
                self._retry_at = now + _RETRY_AFTER
                log.warning("Bayes store unavailable (%s); scanning with the counts last read for %.0fs",
                            exc, _RETRY_AFTER)  # fmt: skip
        if store is None:
            return ()
        probability = store.spam_probability(scan.message)
        if probability is None:
            return ()
        detail = f"score: {probability:.4f}"
        return [Hit(rule, detail) for rule in bayes_rules(probability)]

    async def expire_if_due(self) -> int | None:
        """Expire the store, in a thread (module docstring), if `bayes.expiry_period` has passed
        since its last expiry; the buckets dropped, or None when nothing ran (not due, another
        expiry of this process still running, no store, a failure). Only a store that exists is
        opened (as for a scan), an unreachable one is not tried again before the scans'
        back-off ends, and nothing but cancellation is raised: upkeep must not stop a worker."""
        job = self.expiry_job()
        if job is None:
            return None
        self._expiring = job
        log.info("Bayes expiry is due: expiring %s in a background thread", job.where)
        try:
            dropped = await _run_in_thread(job)
        except StateError as exc:
            self._retry_at = time.monotonic() + _RETRY_AFTER
            self._give_back(job)
            log.warning("Bayes expiry failed: %s", exc)
            return None
        except Exception as exc:  # a broken file: say so, keep serving
            self._give_back(job)
            log.warning("Bayes expiry failed: %s", exc)
            return None
        finally:
            self._expiring = None
        if dropped:
            log.info("Bayes expiry dropped %d tokens beyond bayes.max_tokens", dropped)
        return dropped

    def expiry_job(self) -> ExpiryJob | None:
        """An `ExpiryJob` if expiry is due and none of this process's is running, else None
        (also when looking failed, which is logged). Cheap: one row or key read."""
        now = time.monotonic()
        if now < self._retry_at or self._expiring is not None:
            return None
        try:
            store = self._store_for_scan(now)
            if store is None or not store.expiry_due():
                return None
        except StateError as exc:
            self._retry_at = now + _RETRY_AFTER
            log.warning("Bayes expiry failed: %s", exc)
            return None
        except Exception as exc:  # a broken file: say so, keep serving
            log.warning("Bayes expiry failed: %s", exc)
            return None
        return ExpiryJob(self._full_config, self.state_dir, store.take_seen_marks(), store.where)

    # -- learning, beside the loop --------------------------------------------------------------

    def hashed(self, msg: ParsedMessage, is_spam: bool) -> Hashed:
        """What learning ``msg`` writes (`BayesStoreBase.hashed`): the tokens of the message this
        process's handle just scored are not computed again."""
        store = self._opened()
        if store is not None:
            return store.hashed(msg, is_spam)
        if self._tokenizer is None:
            self._tokenizer = Tokenizer()
        return message_digest(msg), self._tokenizer.hashes(msg), bool(is_spam)

    def write(self, job: Callable[[BayesStoreBase], T]) -> Future[T]:
        """Run ``job`` with the writer's handle, after every write handed over before it (module
        docstring). Raises StoreInterrupted once the writer has stopped."""
        return self.writer.submit(job)

    async def tell(
        self, msg: ParsedMessage, *, forget: bool, learn_as: bool | None
    ) -> tuple[LearnResult | None, LearnResult | None]:
        """spamd TELL: forget ``msg`` if asked, then learn it as spam (True) or ham (False) if
        asked, each one transaction, in the writer; returns once both are committed: what
        forgetting and learning did (None for what was not asked). Raises what they raise."""

        def job(store: BayesStoreBase) -> tuple[LearnResult | None, LearnResult | None]:
            forgotten = store.forget(msg) if forget else None
            learnt = store.learn(msg, learn_as) if learn_as is not None else None
            return forgotten, learnt

        return await asyncio.wrap_future(self.write(job))

    async def stop_writes(self, within: float) -> bool:
        """Let the writer finish what it was handed (``within`` seconds, after which
        nothing more commits) and close its handle, with the seen marks of this process's scans
        written; True if it finished. A worker on its way out."""
        writer = self._own_writer()
        if writer is None:
            return True
        self._hand_over_seen_marks(writer, self._opened())
        return await writer.stop_async(within)

    @staticmethod
    def _hand_over_seen_marks(writer: BayesWriter, store: BayesStoreBase | None) -> None:
        """The scans' seen marks go to the writer's handle, which writes them as it closes."""
        if store is not None:
            marks = store.take_seen_marks()
            with contextlib.suppress(StoreInterrupted):
                writer.submit(lambda s: s.add_seen_marks(marks))

    def _give_back(self, job: ExpiryJob) -> None:
        """A failed job's seen marks go back to this process's handle, to be written later."""
        store = self._opened()
        if store is not None:
            store.add_seen_marks(job.seen)

    def close(self) -> None:
        """Let the writer finish (waiting as long as that takes) and close it, with the seen marks
        of this process's scans; close the scoring handle (tools, tests)."""
        writer = self._own_writer()
        store = self._opened()
        if writer is not None:
            self._hand_over_seen_marks(writer, store)
            writer.stop()
        elif store is not None:
            store.upkeep = True  # no writer, no loop to keep free: it writes its marks as it closes
        self._writer = None
        if store is not None:
            store.close()
        self._store = None


def _log_failure(what: str) -> Callable[[Future[None]], None]:
    def done(future: Future[None]) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.warning("Bayes writer: %s failed: %s", what, exc)

    return done


async def _run_in_thread(job: ExpiryJob) -> int | None:
    """``job.run()`` in a daemon thread of its own, awaited. Cancelled, the job is interrupted
    and waited for `_STOP_WAIT` seconds at most: its thread may be waiting for another writer's
    lock (up to the busy timeout), and a stopping worker must not hang on it; a daemon thread
    left behind ends with the process, and SQLite drops a transaction it left open."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()

    def settle(result: int | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = job.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    # Whatever ends the job counts as looked at, also once nobody awaits it any more.
    done.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    threading.Thread(target=target, name="bayes-expiry", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        log.info("Bayes expiry interrupted (the worker is stopping); what it dropped stays dropped")
        job.cancel()
        await asyncio.wait([done], timeout=_STOP_WAIT)
        if not done.done():
            log.warning("Bayes expiry did not stop within %.0fs of being interrupted; leaving it", _STOP_WAIT)
        raise
