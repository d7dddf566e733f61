"""The Bayes store: token counts in SQLite (WAL), mirrored in memory for scoring.

Scoring must not touch SQLite per token, so each process keeps two int32 arrays of
``n_features`` counts (spam and ham messages containing each hashed bucket) and scores a
message with a numpy gather. SQLite is the shared, durable truth; each process pulls what the
others learnt with `BayesStore.refresh`, which reads a change log instead of the counts:

* ``state`` (one row): nspam, nham, ``seq`` (the last change) and ``epoch`` (bumped by
  clear/restore, which makes every reader reload everything).
* ``buckets``: id, spam, ham, atime (last learnt or seen), one row per non-empty bucket.
* ``messages``: digest (`message_digest`), class, when, and the message's token hashes
  (uint32, little-endian), so that forgetting or moving it undoes exactly what learning did.
* ``changes``: one row per transaction, keyed by seq, holding the delta it applied:
  increments, clamped decrements (never below 0) and buckets zeroed by expiry. A reader at
  seq k applies k+1, k+2, ... in order. Both sides apply a delta the same way (increments,
  then clamped decrements, then zeroing), so memory always equals the table.
* ``snapshot`` (one row): all non-empty buckets as one blob, with the seq and epoch it
  reflects. Reading 1M bucket rows through Python takes seconds; the blob takes tens of ms.
  A process starting (or fallen behind the log) loads the snapshot and applies the changes
  after it. A writer that is up to date writes a new snapshot from its memory once the log
  since the last one passes 2000 changes or 8 MB, then drops older changes (keeping 10
  minutes' worth for readers that are nearly up to date). Without a usable snapshot the
  reader falls back to reading the table, and writes a snapshot for the next one. A write-only
  handle (`BayesStoreBase`), which keeps no counts, loads them as a reader would when a
  snapshot is due, writes it, and lets go of them.

Every learn/forget is one ``BEGIN IMMEDIATE`` transaction (`learn_many`: one per batch of
messages), and so is each step of an expiry (`expire`): a crash (kill -9) loses at most the open
transaction, never the consistency of counts and messages. ``synchronous=NORMAL``: in WAL mode a
power loss may also lose the last few committed transactions, but never corrupts the file; Bayes
can afford that, an fsync per learnt message in a scanning worker it cannot. A writer waits for
another's transaction up to the busy timeout (``state.timeout`` through `open_bayes_store`),
then fails with StateError.

Token atime: learning sets it; scanning marks the buckets it read in memory, and the marks
are written out at most every 10 minutes (and on close, and before an expiry), so expiry drops
what is neither learnt nor seen any more. A daemon worker's scanning handle writes nothing
itself (`BayesStoreBase.upkeep` off): its writer thread writes its marks, and the snapshots,
as it writes what the worker learns (`filterd.engine.bayes.writer`).

The backup format and what both backends share are described in `filterd.engine.bayes.base`;
`filterd.engine.bayes.redis_store` keeps the same data in Redis.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

import numpy as np
import numpy.typing as npt

from filterd.config import BayesConfig
from filterd.engine.bayes.base import (
    EMPTY_IDS,
    EMPTY_TRIPLES,
    BayesStoreBase,
    Hashed,
    Ids,
    LearnPlan,
    LearnResult,
    StoreError,
    StoreInterrupted,
    Triples,
    aggregate,
    apply_delta,
    buckets_from_messages,
    decode_counts,
    decode_delta,
    encode_counts,
    encode_delta,
    read_backup,
    write_backup,
)
from filterd.engine.bayes.tokenizer import TOKENIZER_VERSION, message_digest
from filterd.engine.message import ParsedMessage
from filterd.errors import StateError

__all__ = ["SCHEMA_VERSION", "BayesStore", "LearnResult", "StoreError"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_CHANGE_LOG_KEEP = 600  # seconds of changes kept past a snapshot, for readers nearly up to date
_SNAPSHOT_AFTER_CHANGES = 2000
_SNAPSHOT_AFTER_BYTES = 8 << 20
_EXPIRE_CHUNK = 5_000  # buckets dropped per write transaction (~30 ms)
_EXPIRE_PAUSE_MAX = 0.2  # seconds: the longest pause between two of them
_OPEN_TIMEOUT = 30.0  # seconds: the busy timeout of a handle opened without one (tools, tests)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    nspam INTEGER NOT NULL,
    nham INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    last_expiry INTEGER NOT NULL,
    expired_total INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS buckets (
    id INTEGER PRIMARY KEY,
    spam INTEGER NOT NULL,
    ham INTEGER NOT NULL,
    atime INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    digest TEXT PRIMARY KEY,
    spam INTEGER NOT NULL,
    learnt INTEGER NOT NULL,
    hashes BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    size INTEGER NOT NULL,
    delta BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    counts BLOB NOT NULL
);
"""


def _load_counts(
    conn: sqlite3.Connection, n_features: int, seq: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], bool]:
    """All counts as of change ``seq`` of the current epoch (inside the caller's read
    transaction): the snapshot and the changes after it, or else every row of the table; and
    whether a new snapshot is due."""
    snap = conn.execute("SELECT seq, epoch, counts FROM snapshot").fetchone()
    (epoch,) = conn.execute("SELECT epoch FROM state").fetchone()
    if snap is not None and snap[1] == epoch and snap[0] <= seq:
        rows = conn.execute("SELECT seq, delta FROM changes WHERE seq > ? ORDER BY seq", (snap[0],)).fetchall()
        if len(rows) == seq - snap[0] and (not rows or rows[0][0] == snap[0] + 1):
            spam, ham = decode_counts(bytes(snap[2]), n_features)
            for _, blob in rows:
                apply_delta(spam, ham, *decode_delta(blob))
            return spam, ham, len(rows) >= _SNAPSHOT_AFTER_CHANGES
    spam = np.zeros(n_features, dtype=np.int32)
    ham = np.zeros(n_features, dtype=np.int32)
    cursor = conn.execute("SELECT id, spam, ham FROM buckets")
    while rows := cursor.fetchmany(65536):
        data = np.array(rows, dtype=np.int64)
        spam[data[:, 0]] = data[:, 1]
        ham[data[:, 0]] = data[:, 2]
    return spam, ham, True


class BayesStore(BayesStoreBase):
    """One process's (or thread's) handle on the shared SQLite store. Not thread-safe
    (`interrupt` aside); open one per process or thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        config: BayesConfig,
        n_features: int,
        *,
        write_only: bool = False,
        timeout: float = _OPEN_TIMEOUT,
    ) -> None:
        super().__init__(config, n_features, write_only=write_only)
        self._conn = conn
        self.timeout = timeout
        self._conn_lock = threading.Lock()  # interrupt() (another thread) against close()
        self._closed = False
        self.path = path
        self._seq = -1
        self._epoch = -1
        self._snapshot_due = False

    @property
    def backend(self) -> Literal["sqlite"]:
        return "sqlite"

    @property
    def where(self) -> str:
        return str(self.path)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: BayesConfig,
        *,
        upkeep: bool = True,
        write_only: bool = False,
        timeout: float = _OPEN_TIMEOUT,
    ) -> BayesStore:
        """Open the store at ``path``, creating the file (and its directory) if missing.

        A store keeps the n_features it was created with; a different configured value is
        logged and ignored (restore a backup into a new store to change it). Without ``upkeep``
        (`BayesStoreBase.upkeep`) neither opening nor refreshing writes a snapshot or atimes.
        ``write_only``: no counts are loaded or kept (`BayesStoreBase`). ``timeout``: seconds a
        write waits for another's lock before StateError (`open_bayes_store` passes
        ``state.timeout``).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA journal_size_limit=67108864")  # a snapshot must not leave a huge WAL
            if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'snapshot'").fetchone()[0] == 0:
                cls._create(conn, config)  # a new file (or one a crash interrupted before this commit)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path}: not a usable Bayes store: {exc}") from exc
        try:
            version, n_features = int(meta["schema_version"]), int(meta["n_features"])
            tokenizer_version = int(meta["tokenizer_version"])
        except (KeyError, ValueError) as exc:
            conn.close()
            raise StoreError(f"{path}: not a filterd Bayes store (meta: {exc})") from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
        if n_features != config.n_features:
            log.warning(
                "%s was built with n_features=%d; ignoring the configured %d", path, n_features, config.n_features
            )
        if tokenizer_version != TOKENIZER_VERSION:
            log.warning(
                "%s was learnt with tokenizer version %s (this is %d): retrain for best results",
                path,
                meta["tokenizer_version"],
                TOKENIZER_VERSION,
            )
        store = cls(conn, path, config, n_features, write_only=write_only, timeout=timeout)
        store.upkeep = upkeep
        store.refresh()
        if upkeep:
            store._maybe_snapshot()
        return store

    @staticmethod
    def _create(conn: sqlite3.Connection, config: BayesConfig) -> None:
        """The tables and their first rows, in one transaction (several processes may race here)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            now = int(time.time())
            conn.execute("INSERT OR IGNORE INTO state VALUES (1, 0, 0, 0, 0, ?, 0)", (now,))
            for key, value in (
                ("schema_version", SCHEMA_VERSION),
                ("tokenizer_version", TOKENIZER_VERSION),
                ("n_features", config.n_features),
                ("created", now),
            ):
                conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, str(value)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Write pending atimes (with `upkeep`) and close the connection."""
        if self._pid == os.getpid() and self.upkeep:
            with contextlib.suppress(sqlite3.Error, StateError, StoreInterrupted):
                self._flush_touches()
        with self._conn_lock:
            self._closed = True
            self._conn.close()

    def interrupt(self) -> None:
        """`BayesStoreBase.interrupt`; a statement running now (the scan that picks what to
        expire takes seconds on a big store) is aborted too. A wait for another writer's lock
        is not: that ends within one of its transactions, or at the busy timeout."""
        super().interrupt()
        with self._conn_lock:
            if not self._closed:
                self._conn.interrupt()

    # -- reading -----------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(spam, ham) messages learnt, as the file says now."""
        row = self._conn.execute("SELECT nspam, nham FROM state").fetchone()
        return int(row[0]), int(row[1])

    def refresh(self) -> None:
        """Catch up with what other processes (or this one) committed; cheap when nothing did.
        A write-only handle has nothing to catch up with: only the upkeep writes are made."""
        if not self.write_only:
            self._catch_up()
        if self.upkeep and self._touch_flush_due():
            self._flush_touches()
        if self.upkeep and self._snapshot_due:
            self._maybe_snapshot()

    def _catch_up(self) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            seq, epoch, nspam, nham = conn.execute("SELECT seq, epoch, nspam, nham FROM state").fetchone()
            if epoch != self._epoch:
                self._reload(seq, epoch)
            elif seq != self._seq:
                rows = conn.execute(
                    "SELECT seq, delta FROM changes WHERE seq > ? ORDER BY seq", (self._seq,)
                ).fetchall()
                if len(rows) != seq - self._seq or (rows and rows[0][0] != self._seq + 1):
                    self._reload(seq, epoch)  # the log was pruned past our position
                else:
                    for _, blob in rows:
                        self._apply(*decode_delta(blob))
                    self._seq = seq
            self._nspam, self._nham = int(nspam), int(nham)
        finally:
            conn.execute("COMMIT")

    def _reload(self, seq: int, epoch: int) -> None:
        """Load all counts as of ``seq`` (inside the caller's read transaction)."""
        self._spam, self._ham, self._snapshot_due = _load_counts(self._conn, self.n_features, seq)
        self._totals()
        self._seq, self._epoch = seq, epoch

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; taken at once (IMMEDIATE) so it cannot deadlock on upgrade.
        It commits inside `commit_guard`, which may refuse (StoreInterrupted: rolled back)."""
        self._check_pid()
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            raise StateError(
                f"Bayes store {self.path}: another writer held the lock longer than {self.timeout:g}s (state.timeout)"
            ) from exc
        try:
            yield conn
            with self.commit_guard:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # an interrupted write has rolled back by itself
                conn.execute("ROLLBACK")
            raise

    def _commit_delta(
        self, conn: sqlite3.Connection, inc: Triples, dec: Triples, zero: Ids, d_spam: int, d_ham: int
    ) -> None:
        """Apply a delta to the tables and log it (inside a write transaction)."""
        now = int(time.time())
        if len(inc):
            conn.executemany(
                "INSERT INTO buckets (id, spam, ham, atime) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " spam = spam + excluded.spam, ham = ham + excluded.ham, atime = max(atime, excluded.atime)",
                [(b, s, h, now) for b, s, h in inc.tolist()],
            )
        if len(dec):
            conn.executemany(
                "UPDATE buckets SET spam = max(spam - ?, 0), ham = max(ham - ?, 0) WHERE id = ?",
                [(s, h, b) for b, s, h in dec.tolist()],
            )
            conn.executemany(
                "DELETE FROM buckets WHERE id = ? AND spam = 0 AND ham = 0", [(b,) for b in dec[:, 0].tolist()]
            )
        if len(zero):
            conn.executemany("DELETE FROM buckets WHERE id = ?", [(b,) for b in zero.tolist()])
        conn.execute("UPDATE state SET nspam = nspam + ?, nham = nham + ?, seq = seq + 1", (d_spam, d_ham))
        (seq,) = conn.execute("SELECT seq FROM state").fetchone()
        delta = encode_delta(inc, dec, zero)
        conn.execute("INSERT INTO changes (seq, at, size, delta) VALUES (?, ?, ?, ?)", (seq, now, len(delta), delta))

    def _maybe_snapshot(self) -> None:
        """Write a snapshot when the log since the last one has grown (see the module docstring)."""
        if not self._snapshot_due:
            row = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0),"
                " (SELECT count(*) FROM snapshot WHERE epoch = (SELECT epoch FROM state)) FROM changes"
                " WHERE seq > coalesce((SELECT seq FROM snapshot WHERE epoch = (SELECT epoch FROM state)), -1)"
            ).fetchone()
            # Without a snapshot (a new store) every reader that opens reads the whole table: due
            # at once (a handle with counts knows it from its own load; a write-only one asks).
            if row[2] and row[0] < _SNAPSHOT_AFTER_CHANGES and row[1] < _SNAPSHOT_AFTER_BYTES:
                return
        if self._pid != os.getpid():
            return
        if self.write_only:
            self._snapshot_loaded()
            return
        with self._write() as conn:
            seq, epoch = conn.execute("SELECT seq, epoch FROM state").fetchone()
            if (seq, epoch) != (self._seq, self._epoch):
                return  # someone else committed since our refresh; they or a later writer will
            self._write_snapshot(conn, seq, epoch, self._spam, self._ham)
        self._snapshot_due = False

    def _snapshot_loaded(self) -> None:
        """A write-only handle's snapshot: the counts as of the last change, loaded as a reader
        loads them (outside the write lock) and dropped once written. A snapshot of an older
        change is as good as one of the newest (readers apply the changes after it), so it is
        written unless another handle wrote a newer one, or a clear or restore came, meanwhile."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            seq, epoch = conn.execute("SELECT seq, epoch FROM state").fetchone()
            spam, ham, _ = _load_counts(conn, self.n_features, seq)
        finally:
            conn.execute("COMMIT")
        with self._write() as conn:
            snap = conn.execute("SELECT seq, epoch FROM snapshot").fetchone()
            (now_epoch,) = conn.execute("SELECT epoch FROM state").fetchone()
            if now_epoch == epoch and (snap is None or snap[1] != epoch or snap[0] < seq):
                self._write_snapshot(conn, seq, epoch, spam, ham)
        self._snapshot_due = False

    @staticmethod
    def _write_snapshot(
        conn: sqlite3.Connection, seq: int, epoch: int, spam: npt.NDArray[np.int32], ham: npt.NDArray[np.int32]
    ) -> None:
        conn.execute("INSERT OR REPLACE INTO snapshot VALUES (1, ?, ?, ?)", (seq, epoch, encode_counts(spam, ham)))
        conn.execute("DELETE FROM changes WHERE seq <= ? AND at < ?", (seq, int(time.time()) - _CHANGE_LOG_KEEP))

    def _learn_batch(self, batch: list[Hashed]) -> list[LearnResult]:
        out: list[LearnResult] = []
        now = int(time.time())
        plan = LearnPlan(self.n_features)
        with self._write() as conn:
            known: dict[str, tuple[bool, bytes | None]] = {}
            for digest, hashes, is_spam in batch:
                if digest not in known:
                    row = conn.execute("SELECT spam, hashes FROM messages WHERE digest = ?", (digest,)).fetchone()
                    known[digest] = (bool(row[0]), bytes(row[1])) if row is not None else (False, None)
                result, blob = plan.learn(hashes, is_spam, known[digest])
                out.append(result)
                if blob is None:
                    continue
                if result is LearnResult.MOVED:
                    conn.execute(
                        "UPDATE messages SET spam = ?, learnt = ?, hashes = ? WHERE digest = ?",
                        (int(is_spam), now, blob, digest),
                    )
                else:
                    conn.execute("INSERT INTO messages VALUES (?, ?, ?, ?)", (digest, int(is_spam), now, blob))
                known[digest] = (is_spam, blob)
            if plan.changes:
                self._commit_delta(conn, aggregate(plan.inc), aggregate(plan.dec), EMPTY_IDS, plan.d_spam, plan.d_ham)
        if plan.changes:
            self.refresh()
            self._maybe_snapshot()
        return out

    def forget(self, msg: ParsedMessage) -> LearnResult:
        """Undo what learning ``msg`` did: FORGOTTEN, or NOT_KNOWN if it was never learnt."""
        digest = message_digest(msg)
        with self._write() as conn:
            row = conn.execute("SELECT spam, hashes FROM messages WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                return LearnResult.NOT_KNOWN
            plan = LearnPlan(self.n_features)
            plan.forget(bool(row[0]), bytes(row[1]))
            conn.execute("DELETE FROM messages WHERE digest = ?", (digest,))
            self._commit_delta(conn, EMPTY_TRIPLES, aggregate(plan.dec), EMPTY_IDS, plan.d_spam, plan.d_ham)
        self.refresh()
        self._maybe_snapshot()
        return LearnResult.FORGOTTEN

    # -- maintenance ---------------------------------------------------------------------

    def _flush_touches(self) -> None:
        """Write the atime of buckets scanned since the last flush (one short transaction)."""
        self._touched_since = time.monotonic()
        ids = self.take_seen_marks()
        if ids.size == 0:
            return
        now = int(time.time())
        for start in range(0, ids.size, 20_000):  # short transactions: other writers wait less
            with self._write() as conn:
                conn.executemany(
                    "UPDATE buckets SET atime = ? WHERE id = ?",
                    [(now, b) for b in ids[start : start + 20_000].tolist()],
                )

    def expire(self, max_tokens: int | None = None) -> int:
        """Drop the least recently seen buckets beyond ``max_tokens`` (default: the configured
        maximum); returns how many were dropped. Message counts stay as they are, as in
        SpamAssassin: expiry forgets rare old clues, not messages.

        The buckets to drop are picked in a read transaction, which holds up no one (seconds on a
        store of millions), and dropped in write transactions of 5 000 (tens of ms), each one
        change of the log, with the lock left free as long between two: another writer (a
        worker's autolearn, `filterd learn`) waits for one of them, not for the whole expiry,
        which takes about twice as long for it. As in the Redis store, a bucket learnt or seen
        since it was picked is kept, and the expiry stops early when a clear or restore, or
        another handle's expiry, has finished meanwhile. `interrupt` stops it between two
        transactions, or aborts the statement running, with StoreInterrupted; last_expiry is
        then left as it was, so the next look finds expiry still due and drops the rest.
        """
        limit = self.config.max_tokens if max_tokens is None else max_tokens
        self._check_pid()
        try:
            dropped = self._expire(limit)
        except sqlite3.OperationalError as exc:
            if self._interrupted.is_set():  # "interrupted", from the statement interrupt() aborted
                raise StoreInterrupted(f"{self.where}: expiry interrupted") from exc
            raise
        if dropped:
            self.refresh()
            self._snapshot_due = True  # a good moment: expiry runs rarely and just rewrote many buckets
            self._maybe_snapshot()
        return dropped

    def _expire(self, limit: int) -> int:
        self._flush_touches()
        conn = self._conn
        conn.execute("BEGIN")
        try:
            state = conn.execute("SELECT epoch, last_expiry FROM state").fetchone()
            (n,) = conn.execute("SELECT count(*) FROM buckets").fetchone()
            parts = [np.zeros((0, 2), dtype=np.int64)]
            if n > limit:
                cursor = conn.execute("SELECT id, atime FROM buckets ORDER BY atime, id LIMIT ?", (n - limit,))
                while rows := cursor.fetchmany(65536):
                    parts.append(np.array(rows, dtype=np.int64))
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        picked = np.concatenate(parts)  # (bucket, atime when picked)
        # Dropped by bucket id: each transaction then rewrites a few neighbouring pages of the
        # table, not (ids being hashes) some of nearly every page, over and over.
        picked = picked[np.argsort(picked[:, 0], kind="stable")]
        dropped, held = 0, 0.0
        for start in range(0, len(picked), _EXPIRE_CHUNK):
            # Leave the lock free as long as it was held: a writer waiting for it sleeps in its
            # busy handler (up to 100 ms a nap) and would otherwise miss every gap between two.
            time.sleep(min(held, _EXPIRE_PAUSE_MAX))
            chunk = picked[start : start + _EXPIRE_CHUNK]
            with self._write() as conn:
                began = time.monotonic()
                self._raise_if_interrupted()
                if conn.execute("SELECT epoch, last_expiry FROM state").fetchone() != state:
                    return dropped  # cleared or restored, or another handle's expiry finished
                seen = dict(chunk.tolist())
                current = conn.execute(
                    "SELECT id, atime FROM buckets WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(chunk[:, 0].tolist()),),
                ).fetchall()
                zero = np.array([b for b, atime in current if atime <= seen[b]], dtype=np.int64)
                if len(zero):
                    self._commit_delta(conn, EMPTY_TRIPLES, EMPTY_TRIPLES, zero, 0, 0)
                    conn.execute("UPDATE state SET expired_total = expired_total + ?", (len(zero),))
                    dropped += len(zero)
            held = time.monotonic() - began
        with self._write() as conn:
            self._raise_if_interrupted()
            conn.execute("UPDATE state SET last_expiry = ?", (int(time.time()),))
        return dropped

    def expiry_due(self) -> bool:
        (last,) = self._conn.execute("SELECT last_expiry FROM state").fetchone()
        return bool(time.time() - last >= self.config.expiry_period)

    def dump(self) -> dict[str, object]:
        """What ``sa-learn --dump magic`` shows, and a little more."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            nspam, nham, seq, epoch, last_expiry, expired = conn.execute(
                "SELECT nspam, nham, seq, epoch, last_expiry, expired_total FROM state"
            ).fetchone()
            ntokens, oldest, newest = conn.execute("SELECT count(*), min(atime), max(atime) FROM buckets").fetchone()
            (nmessages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.execute("COMMIT")
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "version": SCHEMA_VERSION,
            "tokenizer_version": int(meta["tokenizer_version"]),
            "n_features": self.n_features,
            "combiner": self._params.combiner,
            "nspam": nspam,
            "nham": nham,
            "nmessages": nmessages,
            "ntokens": ntokens,
            "oldest_atime": oldest,
            "newest_atime": newest,
            "last_expiry": last_expiry,
            "expired_total": expired,
            "seq": seq,
            "epoch": epoch,
            "size": size,
            "path": str(self.path),
            "backend": self.backend,
        }

    def backup(self, out: IO[str]) -> None:
        """Write the whole store in the portable text format (`filterd.engine.bayes.base`)."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            nspam, nham = conn.execute("SELECT nspam, nham FROM state").fetchone()
            write_backup(
                out,
                self.n_features,
                (nspam, nham),
                conn.execute("SELECT id, spam, ham, atime FROM buckets ORDER BY id"),
                conn.execute("SELECT digest, spam, learnt, hashes FROM messages ORDER BY digest"),
            )
        finally:
            conn.execute("COMMIT")

    def restore(self, inp: IO[str]) -> None:
        """Replace the store's contents with a backup, all or nothing. Raises StoreError."""
        backup = read_backup(inp)
        buckets, messages = backup.buckets, backup.messages
        if backup.n_features != self.n_features:
            buckets = buckets_from_messages(messages, self.n_features)
        with self._write() as conn:
            conn.execute("DELETE FROM buckets")
            conn.execute("DELETE FROM messages")
            conn.execute("DELETE FROM changes")
            conn.executemany("INSERT INTO buckets VALUES (?, ?, ?, ?)", buckets)
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)", messages)
            conn.execute(
                "UPDATE state SET nspam = ?, nham = ?, seq = seq + 1, epoch = epoch + 1", (backup.nspam, backup.nham)
            )
            seq, epoch = conn.execute("SELECT seq, epoch FROM state").fetchone()
            spam_counts = np.zeros(self.n_features, dtype=np.int32)
            ham_counts = np.zeros(self.n_features, dtype=np.int32)
            if buckets:
                table = np.array(buckets, dtype=np.int64)
                spam_counts[table[:, 0]] = table[:, 1]
                ham_counts[table[:, 0]] = table[:, 2]
            self._write_snapshot(conn, seq, epoch, spam_counts, ham_counts)
        self.refresh()

    def clear(self) -> None:
        """Forget everything (messages, counts, the change log)."""
        with self._write() as conn:
            conn.execute("DELETE FROM buckets")
            conn.execute("DELETE FROM messages")
            conn.execute("DELETE FROM changes")
            conn.execute("UPDATE state SET nspam = 0, nham = 0, seq = seq + 1, epoch = epoch + 1")
            seq, epoch = conn.execute("SELECT seq, epoch FROM state").fetchone()
            empty = np.zeros(self.n_features, dtype=np.int32)
            self._write_snapshot(conn, seq, epoch, empty, empty)
        self.refresh()
