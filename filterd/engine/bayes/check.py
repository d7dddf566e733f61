"""The Bayes check plugin: BAYES_00 ... BAYES_999 from the store's spam probability.

Bands as SpamAssassin's ``check_bayes(min, max)``: a rule fires when min < p <= max, and the
lowest band also takes p = 0. BAYES_999 (p > 0.999) fires together with BAYES_99. Nothing
fires until the store holds min_spam spam and min_ham ham messages.

The store is the one `open_bayes_store` picks: ``<state_dir>/bayes.sqlite`` in the state
directory given to the engine (or ``state_dir`` of the configuration; without one the check
stays silent), or Redis with ``state.backend: redis``. It is opened on first use, so that each
worker process opens its own connection after fork, and refreshed at most once a second, which
bounds how stale a worker's counts can be. Scanning never creates the store (a filter that has
learnt nothing has nothing to say); `BayesCheck.store`, used to learn, does.

When Redis cannot be reached, scans go on with the counts this process last read (or without
Bayes if it never read any) and the store is tried again 10 s later, so a dead server costs a
worker one timeout per 10 s rather than one per message.

Expiry (`BayesCheck.expire_if_due`, the workers' upkeep) runs in a thread of its own with a
store handle (connection) of its own, opened and closed in that thread: on a store of a million
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
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from filterd.config import Config
from filterd.engine.bayes.backend import STORE_FILE, open_bayes_store, open_existing_bayes_store
from filterd.engine.bayes.base import BayesStoreBase, Ids, StoreInterrupted
from filterd.engine.plugin import CheckSetup, Hit, Scan, Stage
from filterd.errors import StateError

__all__ = ["BANDS", "STORE_FILE", "BayesCheck", "ExpiryJob", "bayes_rules"]

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
        store = open_existing_bayes_store(self.config, self.state_dir)
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

    @property
    def store(self) -> BayesStoreBase | None:
        """The store, opened (and created) on first use in this process; None without a state
        directory (SQLite) or with Bayes disabled."""
        if not self.active:
            return None
        if self._store is None or self._pid != os.getpid():
            # After fork the parent's connection must not be used; a fresh one is opened.
            self._adopt(open_bayes_store(self._full_config, self.state_dir))
        return self._store

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
            found = open_existing_bayes_store(self._full_config, self.state_dir)
            if found is None:
                self._looked = now
                return None
            self._adopt(found)
            return found
        if now - self._refreshed >= _REFRESH_INTERVAL:
            self._refreshed = now
            store.refresh()
        return store

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

    def _give_back(self, job: ExpiryJob) -> None:
        """A failed job's seen marks go back to this process's handle, to be written later."""
        store = self._opened()
        if store is not None:
            store.add_seen_marks(job.seen)

    def close(self) -> None:
        """Close the store (workers on their way out; tests)."""
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None


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
