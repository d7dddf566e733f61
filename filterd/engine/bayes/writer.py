"""A process's Bayes writes beside its event loop: spamd TELL, autolearn batches and the atimes of
scanned buckets go to one thread per process, which makes them with a store handle of its own.

Each of those writes is a SQLite write transaction (a Redis script): made on a worker's loop, it
stalled every connection the worker serves for as long as another writer held the lock (a big
`filterd learn`, another worker's expiry step, a restore), up to the busy timeout
(``state.timeout``). The loop now hands the write over and goes on serving; a TELL awaits its
write, autolearn does not.

One long-lived thread rather than a thread per write (as `ExpiryJob`):

* order: the thread takes the writes one after another, as they were handed over, so a learn and
  then a forget of one message, from one worker, are never swapped;
* cost: the thread keeps one connection rather than opening one per write of 1 to 8 messages.
  Its handle is write-only (`BayesStoreBase`): learning reads the messages' stored records, not
  the counts, so it loads none (a full handle would hold a second copy of the scanning
  handle's, 2 x 4 x n_features bytes and n_features for seen marks, 36 MB at 2**22 buckets).
  A SQLite snapshot that learning makes due is built from the last one and the log, written,
  and dropped. The handle is closed after a minute without writes (a worker that learns
  nothing, or little, holds it for the minute after each write, the atimes every 10 minutes
  among them).

Expiry keeps its own thread: it runs for seconds, and TELLs must not wait behind it.

The handle is opened (the store created) in the thread, at the first write after it was
closed; a failure to open fails that write, and the next one tries again. The thread ends when
`stop` is called or when the `BayesWriter` is garbage-collected, closing its handle either way.

Stopping (`stop`): no more writes are taken; those already handed over are waited for, up to a
time limit. Past it the writer's `CommitGate` is shut: a write still waiting for the lock then
rolls back instead of committing, so a stopping worker never leaves behind a TELL that was
learnt but not answered (it gets no answer and learnt nothing; spamc says so).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from filterd.config import Config
from filterd.engine.bayes.backend import open_bayes_store
from filterd.engine.bayes.base import BayesStoreBase, StoreInterrupted

__all__ = ["BayesWriter", "CommitGate"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_Job = tuple[Callable[[BayesStoreBase], Any], Future[Any]]
_IDLE_CLOSE = 60.0  # seconds without a write after which the writer closes its handle


class CommitGate:
    """Lets commits through (one at a time) until `shut`; after that, entering it raises
    StoreInterrupted, which rolls the write back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shut = False

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._shut:
            self._lock.release()
            raise StoreInterrupted("the process is stopping: this write is not committed")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()

    def shut(self) -> None:
        """Refuse every later commit; a commit under way (milliseconds) ends first."""
        with self._lock:
            self._shut = True


class _Progress:
    """What the thread tells the loop (plain attributes: one writer, readers that poll)."""

    def __init__(self) -> None:
        self.finished = 0  # writes finished, committed or not: a handle scoring beside it refreshes when it moves
        self.handle_open = False


class BayesWriter:
    """One thread making this process's Bayes writes in the order they are handed over (module
    docstring). `submit` may be called from any thread; the jobs run in the writer's."""

    def __init__(self, config: Config, state_dir: str = "", *, idle_close: float = _IDLE_CLOSE) -> None:
        self.config = config
        self.state_dir = state_dir
        self.idle_close = idle_close
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._gate = CommitGate()
        self._progress = _Progress()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # submit against stop
        self._stopped = False

    @property
    def finished(self) -> int:
        """How many writes the thread has finished (a counter that only grows)."""
        return self._progress.finished

    @property
    def handle_open(self) -> bool:
        """Whether the thread holds a store handle now (between a write and `idle_close`)."""
        return self._progress.handle_open

    def submit(self, job: Callable[[BayesStoreBase], T]) -> Future[T]:
        """Run ``job(store)`` in the writer's thread after every job submitted before it; its
        result or exception comes back through the future. Raises StoreInterrupted once
        `stop` was called. Cancelling the future before the job starts means it never runs."""
        future: Future[T] = Future()
        with self._lock:
            if self._stopped:
                raise StoreInterrupted("the Bayes writer has stopped: nothing more is written")
            self._jobs.put((job, future))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_serve,
                    args=(self._jobs, self._gate, self._progress, self.config, self.state_dir, self.idle_close),
                    name="bayes-writer", daemon=True,
                )  # fmt: skip
                self._thread.start()
                # Collected without stop() (an engine dropped by a test): the thread closes its
                # handle and ends. _serve holds no reference to self, or this would never run.
                weakref.finalize(self, self._jobs.put, None)
        return future

    def stop(self, timeout: float | None = None) -> bool:
        """Take no more writes; wait up to ``timeout`` seconds (None: as long as it takes) for
        those handed over, and for the thread to close its handle. True if all that is done;
        otherwise nothing more commits (the gate is shut) and the thread is left to end with the
        process. Blocking: on an event loop, use `stop_async`."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                if self._thread is not None:
                    self._jobs.put(None)
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if not thread.is_alive():
            return True
        self._gate.shut()
        return False

    async def stop_async(self, within: float) -> bool:
        """`stop` with a timeout of ``within`` seconds, awaited in a helper thread: the loop goes
        on serving (answering the TELLs whose writes commit meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.stop, within)


def _serve(
    jobs: queue.SimpleQueue[_Job | None],
    gate: CommitGate,
    progress: _Progress,
    config: Config,
    state_dir: str,
    idle_close: float,
) -> None:
    """The writer's thread: jobs one at a time, with one handle, opened at the first and closed
    once idle."""
    store: BayesStoreBase | None = None
    try:
        while True:
            try:
                item = jobs.get(timeout=idle_close) if store is not None else jobs.get()
            except queue.Empty:
                _close(store, progress)
                store = None
                continue
            if item is None:
                break
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if store is None:
                    store = open_bayes_store(config, state_dir, write_only=True)
                    store.commit_guard = gate
                    progress.handle_open = True
                result = job(store)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                progress.finished += 1  # first: whoever the future wakes sees a write to catch up with
                future.set_exception(exc)
            else:
                progress.finished += 1
                future.set_result(result)
    finally:
        _close(store, progress)


def _close(store: BayesStoreBase | None, progress: _Progress) -> None:
    if store is None:
        return
    progress.handle_open = False
    try:
        store.close()  # writes the atimes it holds (unless the gate is shut)
    except Exception as exc:  # say so, go on (or end quietly)
        log.warning("closing the Bayes writer's store %s failed: %s", store.where, exc)
