"""The queue manager: takes messages from the queue, delivers them, retries, bounces.

    recovery = queue.recover()
    qmgr = QueueManager(config, queue, resolver)
    task = asyncio.create_task(qmgr.run(recovery))
    ...
    queue.enqueue(envelope, data); qmgr.wake()     # the SMTP server, after each 250
    ...
    qmgr.stop(); await task                         # waits for attempts in progress (grace)

It runs inside ``filterd mta`` on the server's event loop; queue file operations (each ends in
an fsync) run in worker threads so that SMTP sessions never wait for the disk.

What it does, per message (the queue's states are directories, see `filterd.mta.queue`):

- A message in incoming/ (new, or put back there by recovery after a crash) is moved to active/
  and every pending recipient is tried at once. A message in deferred/ is taken when its
  earliest pending recipient is due (each recipient has its own ``next_attempt``).
- Recipients are grouped by destination: all local ones ("local", one command per recipient)
  or one remote domain (one SMTP transaction for up to ``destination_recipient_limit``). The
  groups of one attempt share the message's data (`MessageData`): the groups delivering at
  the same time share one read of the data file (a group waiting for a slot holds no copy,
  so memory stays bounded by the deliveries in progress), and it is DKIM-signed once for all
  remote domains. An
  attempt holds one of ``max_concurrency`` slots and one of ``per_destination_concurrency``
  slots of its destination; the destination's slot is taken first, so a slow domain never
  holds global slots while it waits.
- After each attempt the recipients' status, attempt count, last error (and its status alone,
  ``last_status``, which a delay warning reports), the server's reply to it (code and
  enhanced status, ``last_reply_*``, for `filterd mta queue list`) and next attempt are
  written to the envelope (atomic replace + fsync) before anything else happens, so a crash
  never re-delivers a recipient marked delivered and never forgets one. A crash between a
  delivery and that write delivers it again after recovery: duplicates are the accepted price.
- Delivered: done. Bounced (5.x.x, or still failing ``max_lifetime`` after arrival): a DSN
  (`filterd.mta.bounce`) is enqueued in the same queue *before* the recipient is marked
  bounced, so a crash can duplicate a DSN but not lose one. Mail from the null sender is never
  bounced: a failed bounce is dropped with a log line (after ``bounce_lifetime`` if temporary).
  Deferred (4.x.x): next attempt after `backoff` (``min_backoff`` doubling per failed attempt up
  to ``max_backoff``, stretched by up to 10% at random), never later than the expiry time.
- When no recipient is pending the message is removed; otherwise it goes to deferred/.
- A message with more than ``max_hops`` Received headers is bounced without an attempt (a loop).
- ``delay_warning``: once a message has waited that long, its sender is told (a "delayed" DSN).

Control while running: `wake` (the SMTP server, after an enqueue), `flush` (everything deferred
is due now, and tried at once), `delete` (a message or "ALL", without a bounce) and `stop`.
Other processes (``filterd mta queue flush|delete``) use `request_flush` / `request_delete`,
which drop a file in the queue's control/ directory; the manager looks there at least every
``poll_interval`` (1 s). It also rescans incoming/ then, so mail enqueued by another process is
picked up without a wake.
"""

from __future__ import annotations

__all__ = ["CONTROL_DIR", "QueueManager", "QueueStats", "backoff", "request_delete", "request_flush"]

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from filterd.config import Config
from filterd.errors import QueueError
from filterd.mta.bounce import DsnRecipient, build_dsn
from filterd.mta.delivery import DeliveryResult, LocalDelivery, MessageData, RemoteDelivery
from filterd.mta.names import own_domains, own_hostname
from filterd.mta.queue import Envelope, Queue, QueueState, Recipient, Recovery, fsync_dir
from filterd.net.dns import Resolver

log = logging.getLogger(__name__)

Failure = tuple[Recipient, DeliveryResult, str]  # a recipient that failed for good, and why (for the DSN)


def _storable(text: str) -> str:
    """``text`` as the envelope (UTF-8 JSON) can store it: a remote reply's undecodable bytes,
    kept as surrogate escapes, become U+FFFD (they made the envelope unwritable: the message was
    stuck, each attempt failing on the save)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclasses.dataclass(slots=True)
class _Failures:
    """One pass's permanent failures over all its groups, for its one DSN; with the original's
    head, taken while a delivery still held the data (the DSN then reads no file)."""

    items: list[Failure] = dataclasses.field(default_factory=list)
    head: bytes | None = None


CONTROL_DIR = "control"
JITTER = 0.1  # retries of messages deferred together spread over 10% of their backoff


def backoff(
    attempts: int, min_backoff: float, max_backoff: float, *, rng: random.Random | None = None, jitter: float = JITTER
) -> float:
    """Seconds to wait after a recipient's ``attempts``-th failed attempt.

    ``min_backoff * 2**(attempts - 1)``, stretched by a random factor in [1, 1 + jitter) when
    ``rng`` is given, then kept within [min_backoff, max_backoff]."""
    base = min_backoff * 2.0 ** min(max(attempts, 1) - 1, 64)
    if rng is not None and jitter > 0:
        base *= 1.0 + rng.uniform(0.0, jitter)
    return max(min_backoff, min(max_backoff, base))


def request_flush(root: Path) -> None:
    """Ask the running queue manager of the queue at ``root`` to try every deferred message now."""
    _request(root, "flush")


def request_delete(root: Path, qid: str) -> None:
    """Ask the running queue manager to delete message ``qid`` ("ALL": every message)."""
    _request(root, f"delete-{qid}")


def _request(root: Path, name: str) -> None:
    control = root / CONTROL_DIR
    control.mkdir(mode=0o700, exist_ok=True)
    (control / name).touch()


@dataclass(slots=True)
class QueueStats:
    """Counters since start, for logs, tests and benchmarks."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    dsns: int = 0  # DSNs enqueued (bounces and delay warnings)
    dropped: int = 0  # undeliverable bounces dropped
    removed: int = 0  # messages finished and removed
    attempts: int = 0
    wakeups: int = 0  # turns of the main loop (a busy loop shows here)
    by_outcome: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Destination:
    slots: asyncio.Semaphore
    users: int = 0


class QueueManager:
    """Delivers what is in ``queue``; see the module docstring."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        resolver: Resolver,
        *,
        local: LocalDelivery | None = None,
        remote: RemoteDelivery | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        poll_interval: float = 1.0,
        grace: float = 30.0,
        active_limit: int = 0,
    ) -> None:
        mta = config.mta
        self.config = config
        self.queue = queue
        self.hostname = own_hostname(mta)
        self.local_domains = own_domains(mta)
        deliver = config.deliver
        if mta.milter:  # scored before it was accepted: delivery must not ask the daemon again
            deliver = dataclasses.replace(deliver, filter=False)
        self.local = local or LocalDelivery(
            mta, state_dir=str(config.state_path), hostname=self.hostname, tmp_dir=str(queue.tmp),
            deliver=deliver,
        )  # fmt: skip
        # A dead resolver is not waited for: deliveries are deferred at once (shared with the server).
        resolver.guard_resolver(failures=mta.dns_breaker_failures, cooldown=mta.dns_breaker_cooldown)
        self.remote = remote or RemoteDelivery(config, resolver, hostname=self.hostname, rng=rng)
        self.clock = clock
        self.rng = rng or random.Random()
        self.poll_interval = poll_interval
        self.grace = grace
        # Messages held in memory at once; the rest wait in their directory.
        self.active_limit = active_limit or 10 * mta.max_concurrency
        self.stats = QueueStats()
        self._control = queue.root / CONTROL_DIR
        self._control.mkdir(mode=0o700, exist_ok=True)
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._due: dict[str, float] = {}  # deferred message -> when its first recipient is due
        self._schedule: list[tuple[float, str]] = []  # heap over _due, with stale entries
        self._forced: set[str] = set()  # flushed: every pending recipient is due
        self._doomed: set[str] = set()  # deleted while an attempt was running
        self._unsynced: dict[str, Path] = {}  # claimed message -> directory its move left, not fsync'd
        self._destinations: dict[str, _Destination] = {}
        self._total = asyncio.Semaphore(mta.max_concurrency)
        self._event: asyncio.Event | None = None
        self._stopping = False

    # -- control --------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at incoming/ now (call from the event loop, after an enqueue)."""
        if self._event is not None:
            self._event.set()

    def stop(self) -> None:
        """Stop taking messages; `run` returns once attempts in progress end (or ``grace`` passes)."""
        self._stopping = True
        self.wake()

    def flush(self) -> None:
        """Make every deferred message due now (postqueue -f)."""
        now = self.clock()
        for qid in self._due:
            self._due[qid] = now
            self._forced.add(qid)
        self._schedule = [(now, qid) for qid in self._due]
        heapq.heapify(self._schedule)
        log.info("queue flush: %d deferred messages due now", len(self._due))
        self.wake()

    async def delete(self, qid: str) -> int:
        """Delete message ``qid`` ("ALL": all) without a bounce; how many were deleted."""
        if qid == "ALL":
            states: tuple[QueueState, ...] = ("incoming", "deferred", "hold")
            found = await asyncio.to_thread(lambda: {i for s in states for i in self.queue.ids(s)})
            ids = sorted(found | set(self._busy))
        else:
            ids = [qid]
        count = 0
        for one in ids:
            if one in self._busy:
                self._doomed.add(one)  # removed when its attempt ends
                count += 1
                continue
            self._due.pop(one, None)
            try:
                if await asyncio.to_thread(self.queue.state_of, one) is None:
                    continue
                await asyncio.to_thread(self.queue.remove, one)
            except QueueError as exc:
                log.warning("queue delete %s: %s", one, exc)
                continue
            log.info("%s: deleted by request", one)
            count += 1
        return count

    # -- main loop ------------------------------------------------------------------------

    async def run(self, recovery: Recovery | None = None) -> None:
        """Deliver until `stop`; call once, after `Queue.recover`. Given what that recovery
        returned, the schedule of deferred messages starts from it; without, every envelope in
        deferred/ is read again for it."""
        self._event = asyncio.Event()
        self._stopping = False
        if recovery is not None:
            for qid, due in recovery.deferred:
                self._schedule_at(qid, due)
        else:
            await asyncio.to_thread(self._load_schedule)
        try:
            while not self._stopping:
                self.stats.wakeups += 1
                self._event.clear()
                await self._read_control()
                await self._start_incoming()
                self._start_due()
                wait = self.poll_interval
                if self._schedule and len(self._busy) < self.active_limit:  # at the limit, an ending task wakes us
                    wait = max(0.0, min(wait, self._schedule[0][0] - self.clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._event.wait()
        finally:
            await self._drain()

    async def _drain(self) -> None:
        tasks = list(self._busy.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.grace)
        for task in pending:  # their messages stay in active/; recovery puts them back
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _load_schedule(self) -> None:
        for qid in self.queue.ids("deferred"):
            try:
                envelope, _ = self.queue.load(qid)
            except QueueError as exc:
                log.warning("queue: %s", exc)
                continue
            self._set_due(qid, envelope)

    def _set_due(self, qid: str, envelope: Envelope) -> None:
        self._schedule_at(qid, envelope.due)

    def _schedule_at(self, qid: str, due: float) -> None:
        self._due[qid] = due
        heapq.heappush(self._schedule, (due, qid))

    async def _read_control(self) -> None:
        try:
            names = os.listdir(self._control)
        except FileNotFoundError:
            return
        for name in sorted(names):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._control / name)
            if name == "flush":
                self.flush()
            elif name.startswith("delete-"):
                await self.delete(name.removeprefix("delete-"))

    async def _start_incoming(self) -> None:
        if len(self._busy) >= self.active_limit:
            return
        for qid in await asyncio.to_thread(self.queue.ids, "incoming"):
            if len(self._busy) >= self.active_limit:
                return
            if qid not in self._busy:
                self._start(qid, "incoming")

    def _start_due(self) -> None:
        now = self.clock()
        while self._schedule and self._schedule[0][0] <= now and len(self._busy) < self.active_limit:
            due, qid = heapq.heappop(self._schedule)
            if self._due.get(qid) != due or qid in self._busy:
                continue  # stale: rescheduled, flushed or deleted since
            del self._due[qid]
            self._start(qid, "deferred")

    def _start(self, qid: str, state: QueueState) -> None:
        task = asyncio.get_running_loop().create_task(self._process(qid, state), name=f"qmgr-{qid}")
        self._busy[qid] = task

    # -- one message ----------------------------------------------------------------------

    def _claim(self, qid: str, state: QueueState) -> tuple[Envelope, Path] | None:
        if self.queue.state_of(qid) != state:
            return None  # deleted, or moved by someone else
        try:
            # Not synced yet (see _sync_claim): until something else is written for the message,
            # a crash that undoes the move leaves it where recovery would put it anyway.
            self.queue.move(qid, "active", sync=False)
        except (QueueError, FileNotFoundError):
            return None
        try:
            return self.queue.load(qid)
        except QueueError as exc:
            if self.queue.state_of(qid) is not None:
                self.queue.quarantine(qid, str(exc))
            return None

    async def _process(self, qid: str, state: QueueState) -> None:
        try:
            claimed = await asyncio.to_thread(self._claim, qid, state)
            if claimed is not None:
                self._unsynced[qid] = self.queue.root / state
                await self._deliver(qid, state, *claimed)
        except Exception:
            # A bug or a failing disk: keep serving the others, and try this one again later.
            log.exception("%s: queue manager failed on this message", qid)
            await self._park(qid)
        finally:
            self._busy.pop(qid, None)
            self._forced.discard(qid)
            self._unsynced.pop(qid, None)
            self.wake()

    async def _park(self, qid: str) -> None:
        """After a failure outside delivery: back to deferred/, due after max_backoff (if even
        that fails the message stays in active/, which recovery puts back at the next start)."""
        try:
            if await asyncio.to_thread(self.queue.state_of, qid) == "active":
                await asyncio.to_thread(self.queue.move, qid, "deferred")
                due = self.clock() + self.config.mta.max_backoff
                self._due[qid] = due
                heapq.heappush(self._schedule, (due, qid))
        except (OSError, QueueError):
            log.exception("%s: cannot put the message back in deferred/", qid)

    async def _sync_claim(self, qid: str) -> None:
        """Make the move into active/ durable before anything else is written for the message:
        else a crash could bring its old envelope back beside the new one. One directory fsync
        (the source), and only for messages that get that far."""
        source = self._unsynced.pop(qid, None)
        if source is not None:
            await asyncio.to_thread(fsync_dir, source)

    async def _deliver(self, qid: str, state: QueueState, envelope: Envelope, data_path: Path) -> None:
        now = self.clock()
        everything = state == "incoming" or qid in self._forced
        due = [r for r in envelope.pending if everything or r.next_attempt <= now]
        lock = asyncio.Lock()  # one envelope write at a time
        message = MessageData(data_path)  # read when a group needs it, kept while groups deliver
        failed = _Failures()  # this pass's permanent failures, all groups: one DSN for them
        if envelope.hops > self.config.mta.max_hops:
            limit = self.config.mta.max_hops
            text = f"mail loop: too many hops ({envelope.hops} Received headers, the limit is {limit})"
            results = [DeliveryResult(r.address, "5.4.6", text, f"x-filterd; {text}") for r in due]
            await self._record(qid, envelope, message, results, lock, failed)
        else:
            groups = self._groups(due)
            # Every group ends before anything fails the pass: one still running would write the
            # envelope after the message was parked (see _process).
            done = await asyncio.gather(
                *(self._attempt(qid, envelope, message, rcpts, lock, failed) for rcpts in groups),
                return_exceptions=True,
            )
            for outcome in done:
                if isinstance(outcome, BaseException):
                    raise outcome
        if failed.items:
            await self._bounce(qid, envelope, message, failed)
        await self._sync_claim(qid)
        if qid in self._doomed:
            self._doomed.discard(qid)
            await asyncio.to_thread(self.queue.remove, qid)
            log.info("%s: deleted by request", qid)
            return
        if not envelope.pending:
            await asyncio.to_thread(self.queue.remove, qid)
            self.stats.removed += 1
            log.info("%s: removed", qid)
            return
        await self._maybe_warn(qid, envelope, message)
        await asyncio.to_thread(self.queue.move, qid, "deferred")
        self._set_due(qid, envelope)

    def _destination(self, address: str) -> str:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        return "local:" if not domain or domain in self.local_domains else f"smtp:{domain}"

    def _groups(self, recipients: Iterable[Recipient]) -> list[list[Recipient]]:
        by_destination: dict[str, list[Recipient]] = {}
        seen: set[str] = set()
        for r in recipients:
            if r.address in seen:
                continue  # a copy of an address (older envelope): tried once, _record updates both
            seen.add(r.address)
            by_destination.setdefault(self._destination(r.address), []).append(r)
        groups: list[list[Recipient]] = []
        limit = self.config.mta.destination_recipient_limit
        for destination, rcpts in by_destination.items():
            if destination == "local:":
                groups += [[r] for r in rcpts]
            else:
                groups += [rcpts[i : i + limit] for i in range(0, len(rcpts), limit)]
        return groups

    @contextlib.asynccontextmanager
    async def _slot(self, destination: str) -> AsyncIterator[None]:
        entry = self._destinations.get(destination)
        if entry is None:
            entry = self._destinations[destination] = _Destination(
                asyncio.Semaphore(self.config.mta.per_destination_concurrency)
            )
        entry.users += 1
        try:
            async with entry.slots, self._total:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._destinations[destination]

    async def _attempt(
        self,
        qid: str,
        envelope: Envelope,
        message: MessageData,
        rcpts: list[Recipient],
        lock: asyncio.Lock,
        failed: _Failures,
    ) -> None:
        destination = self._destination(rcpts[0].address)
        with contextlib.ExitStack() as held:
            async with self._slot(destination):
                if qid in self._doomed:
                    return
                # The message's data stays read from here until the results (and a DSN) are
                # written, shared with its other deliveries running meanwhile; never while a
                # delivery only waits for a slot.
                held.enter_context(message.in_use())
                results = await self._deliver_group(qid, envelope, message, rcpts, destination)
            await self._record(qid, envelope, message, results, lock, failed)

    async def _deliver_group(
        self, qid: str, envelope: Envelope, message: MessageData, rcpts: list[Recipient], destination: str
    ) -> list[DeliveryResult]:
        self.stats.attempts += 1
        try:
            if destination == "local:":
                return [await self.local.deliver(qid, envelope.mail_from, rcpts[0].address, message)]
            return await self.remote.deliver(
                qid, envelope.mail_from, destination.removeprefix("smtp:"), [r.address for r in rcpts],
                message, eight_bit=envelope.body_type == "8BITMIME", smtputf8=envelope.smtputf8,
            )  # fmt: skip
        except Exception as exc:  # a bug or an unreadable data file: retry later, never bounce for it
            log.exception("%s: delivery to %s failed", qid, destination)
            text = f"internal error: {type(exc).__name__}: {exc}"
            return [DeliveryResult(r.address, "4.3.0", text, f"x-filterd; {text}") for r in rcpts]

    async def _record(
        self,
        qid: str,
        envelope: Envelope,
        message: MessageData,
        results: list[DeliveryResult],
        lock: asyncio.Lock,
        failed: _Failures,
    ) -> None:
        """Apply one attempt's results to the envelope and write it. Permanent failures go to
        ``failed`` and stay pending until `_bounce` has queued the pass's one DSN for them (a
        crash before then tries them again: a duplicate attempt, never a lost bounce)."""
        async with lock:
            await self._sync_claim(qid)
            now = self.clock()
            null_sender = envelope.mail_from == ""
            lifetime = self.config.mta.bounce_lifetime if null_sender else self.config.mta.max_lifetime
            expires = envelope.received_at + lifetime
            # Keyed on the Recipient objects: an envelope listing an address twice (one queued
            # before duplicates were eliminated) must not leave a copy pending, delivered again.
            by_address: dict[str, list[Recipient]] = {}
            for r in envelope.rcpts:
                if r.status == "pending":
                    by_address.setdefault(r.address, []).append(r)
            copies: list[list[Recipient]] = []  # the result went to the first; the rest follow it
            for result in results:
                same = by_address.pop(result.recipient, [])
                if not same:
                    continue
                rcpt = same[0]
                if len(same) > 1:
                    copies.append(same)
                rcpt.attempts += 1
                # The status first: `filterd mta queue list` shows it; a delay warning takes it
                # from last_status.
                failed_now = result.outcome != "delivered"
                rcpt.last_error = _storable(f"{result.status} {result.detail}") if failed_now else ""
                rcpt.last_status = result.status if failed_now else ""
                rcpt.last_reply_code, rcpt.last_reply_status = result.reply_code, result.reply_status
                outcome = result.outcome
                self._log(qid, envelope, result, now)
                if outcome == "delivered":
                    rcpt.status = "delivered"
                    self.stats.delivered += 1
                elif outcome == "deferred" and now < expires:
                    delay = backoff(
                        rcpt.attempts, self.config.mta.min_backoff, self.config.mta.max_backoff, rng=self.rng
                    )
                    rcpt.next_attempt = min(now + delay, expires)
                    self.stats.deferred += 1
                else:
                    why = result.detail
                    if outcome == "deferred":
                        days = lifetime / 86400
                        why = f"{result.detail} (gave up: still failing after {days:g} days in the queue)"
                    failed.items.append((rcpt, result, why))
                    if failed.head is None and envelope.mail_from:
                        failed.head = await message.head(_DSN_HEAD)
            for rcpt, *others in copies:
                for other in others:
                    other.status, other.attempts = rcpt.status, rcpt.attempts
                    other.last_error, other.next_attempt = rcpt.last_error, rcpt.next_attempt
                    other.last_status = rcpt.last_status
                    other.last_reply_code, other.last_reply_status = rcpt.last_reply_code, rcpt.last_reply_status
            if envelope.pending:
                await asyncio.to_thread(self.queue.save_envelope, qid, envelope)
            # else: nothing left to do; the removal that follows is the durable record (a crash
            # before it delivers again, exactly as a crash before this save would)

    def _log(self, qid: str, envelope: Envelope, result: DeliveryResult, now: float) -> None:
        outcome = {"delivered": "sent", "deferred": "deferred", "bounced": "bounced"}[result.outcome]
        self.stats.by_outcome[outcome] = self.stats.by_outcome.get(outcome, 0) + 1
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.1f, dsn=%s, status=%s (%s)",
            qid, result.recipient, result.relay or "none", now - envelope.received_at, result.status, outcome,
            result.detail,
        )  # fmt: skip

    async def _bounce(self, qid: str, envelope: Envelope, message: MessageData, failures: _Failures) -> None:
        """One DSN for all of a pass's permanent failures (RFC 3464: one report per message, as
        Postfix sends), queued before they are marked bounced and the envelope is written."""
        now = self.clock()
        failed = failures.items
        if envelope.mail_from == "":
            for rcpt, _, why in failed:
                self.stats.dropped += 1
                log.warning("%s: bounce to <%s> undeliverable, dropped (a bounce is never bounced): %s",
                            qid, rcpt.address, why)  # fmt: skip
        else:
            recipients = [
                DsnRecipient(
                    rcpt.address,
                    "failed",
                    result.status,
                    result.diagnostic,
                    result.remote_mta,
                    last_attempt=now,
                    text=why,
                )  # fmt: skip
                for rcpt, result, why in failed
            ]
            await self._send_dsn(qid, envelope, message, recipients, now, head=failures.head)
        bounced = {rcpt.address for rcpt, _, _ in failed}
        for rcpt in envelope.rcpts:  # copies of an address (an older envelope) follow it
            if rcpt.status == "pending" and rcpt.address in bounced:
                rcpt.status = "bounced"
        self.stats.bounced += len(failed)
        if envelope.pending:
            await asyncio.to_thread(self.queue.save_envelope, qid, envelope)

    async def _send_dsn(
        self,
        qid: str,
        envelope: Envelope,
        message: MessageData,
        recipients: list[DsnRecipient],
        now: float,
        *,
        head: bytes | None = None,
    ) -> None:
        # Enough for the header block (the DSN returns only that).
        original = head if head is not None else await message.head(_DSN_HEAD)
        try:
            dsn = build_dsn(
                reporting_mta=self.hostname, sender=envelope.mail_from, queue_id=qid, arrival=envelope.received_at,
                original=original, recipients=recipients, now=now,
            )  # fmt: skip
        except (ValueError, UnicodeError) as exc:  # a bug: trying again would fail the same way for ever
            log.error("%s: cannot write the %s notification for <%s>, the sender is not told: %s",
                      qid, recipients[0].action, envelope.mail_from, exc)  # fmt: skip
            return
        bounce = Envelope(
            mail_from="",
            rcpts=[Recipient(envelope.mail_from)],
            received_at=now,
            client_name=self.hostname,
            body_type="8BITMIME" if any(b > 127 for b in dsn) else "7BIT",
            smtputf8=not envelope.mail_from.isascii(),
        )
        dsn_id = await asyncio.to_thread(self.queue.enqueue, bounce, dsn)
        self.stats.dsns += 1
        action = recipients[0].action
        log.info("%s: sender %s notification: %s (to <%s>)", qid, action, dsn_id, envelope.mail_from)
        self.wake()

    async def _maybe_warn(self, qid: str, envelope: Envelope, message: MessageData) -> None:
        warn_after = self.config.mta.delay_warning
        now = self.clock()
        if not warn_after or envelope.delay_warned or envelope.mail_from == "":
            return
        if now - envelope.received_at < warn_after:
            return
        until = envelope.received_at + self.config.mta.max_lifetime
        recipients = []
        for r in envelope.pending:
            status, text = _last_failure(r)
            dsn = DsnRecipient(
                r.address, "delayed", status, f"x-filterd; {text}", last_attempt=now, will_retry_until=until, text=text
            )
            recipients.append(dsn)
        await self._send_dsn(qid, envelope, message, recipients, now)
        envelope.delay_warned = True
        await asyncio.to_thread(self.queue.save_envelope, qid, envelope)


_DSN_HEAD = 256 * 1024  # bytes of the original a DSN looks at for its header block


def _last_failure(rcpt: Recipient) -> tuple[str, str]:
    """A pending recipient's last failure as (4.x.x status, text) for a delay warning: from
    ``last_status``, or, in an envelope written before that was kept, from the status word
    ``last_error`` starts with; 4.0.0 when there is no such status (not tried yet)."""
    status = rcpt.failure_status
    if status:
        text = rcpt.last_error.removeprefix(f"{status} ")
    else:
        status, _, text = rcpt.last_error.partition(" ")
    return (status if status.startswith("4.") else "4.0.0"), text
