"""The embedded state store: one SQLite file shared by the worker processes of one machine.

One row per record (fields as a JSON object, an expiry time). Every write is one ``BEGIN
IMMEDIATE`` transaction (read, change, write), so increments from several processes never
lose an update: SQLite lets one writer in at a time and the others wait up to the busy
timeout. WAL mode lets readers go on meanwhile.

Blocking calls run on one dedicated thread per store (and process), never on the event loop;
that thread owns the connection. Expired rows are invisible at once and deleted by a sweep
every ``sweep_period`` seconds, run by a task on the loop that uses the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from filterd.errors import StateError
from filterd.state.base import FieldValue, format_number, text_fields

__all__ = ["SqliteStateStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    key     TEXT PRIMARY KEY,
    fields  TEXT NOT NULL,  -- JSON object: field name -> text
    expires REAL            -- Unix time; NULL = never
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS state_expires ON state (expires) WHERE expires IS NOT NULL;
"""
_SCAN_BATCH = 500
_SWEEP_BATCH = 5000  # rows deleted per transaction, so writers elsewhere are not held up long


class SqliteStateStore:
    """`filterd.state.StateStore` on a SQLite file; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        timeout: float = 2.0,
        sweep_period: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.sweep_period = sweep_period
        self._clock = clock
        # Nothing is opened here: see `_call`.
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the executor's thread only
        self._pid = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def backend(self) -> Literal["sqlite"]:
        return "sqlite"

    # -- the interface --------------------------------------------------------------------------

    async def get_fields(self, key: str) -> dict[str, str] | None:
        return await self._call(self._get, key)

    async def set_fields(self, key: str, fields: Mapping[str, FieldValue], *, ttl: float | None = None) -> None:
        values = text_fields(fields)

        def merge(current: dict[str, str]) -> None:
            current.update(values)

        await self._call(self._write, key, merge, ttl)

    async def incr_fields(self, key: str, deltas: Mapping[str, float], *, ttl: float | None = None) -> dict[str, float]:
        if not deltas:
            raise ValueError("expected at least one field")
        result: dict[str, float] = {}

        def add(current: dict[str, str]) -> None:
            for name, delta in deltas.items():
                try:
                    value = float(current.get(name, "0")) + delta
                except ValueError:
                    raise ValueError(f"{key}: field {name} is not a number: {current[name]!r}") from None
                current[name] = format_number(value)
                result[name] = value

        await self._call(self._write, key, add, ttl)
        return result

    async def delete(self, key: str) -> bool:
        return await self._call(self._delete, key)

    async def scan(self, prefix: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        after: str | None = None
        while True:
            rows = await self._call(self._scan_batch, prefix, after)
            for key, fields in rows:
                yield key, fields
            if len(rows) < _SCAN_BATCH:
                return
            after = rows[-1][0]

    async def sweep(self) -> int:
        """Delete expired records now; returns how many."""
        return await self._call(self._sweep)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and not sweeper.done():
            sweeper.cancel()
            if sweeper.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
        executor, self._executor = self._executor, None
        if executor is not None and self._pid == os.getpid():
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
            executor.shutdown(wait=False)

    # -- running on the store's thread ----------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StateError(f"state store {self.path} is closed")
        if self._executor is None or self._pid != os.getpid():
            # First use in this process. A connection inherited over fork is never touched (nor
            # closed: SQLite forbids using one in the child); the child opens its own.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="filterd-state")
            self._conn = None
            self._pid = os.getpid()
        self._start_sweeper()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.path}: {exc}") from exc

    def _start_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep_forever(), name=f"sweep {self.path}")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_period)
            try:
                removed = await self.sweep()
            except StateError as exc:
                log.warning("sweeping expired state failed: %s", exc)
            else:
                if removed:
                    log.debug("swept %d expired state records from %s", removed, self.path)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                # Greylist and reputation records may lose the last moments on power loss, never
                # the file's consistency; NORMAL spares an fsync per transaction.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _get(self, key: str) -> dict[str, str] | None:
        row = self._db().execute("SELECT fields, expires FROM state WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        fields: dict[str, str] = json.loads(row[0])
        return fields

    def _write(self, key: str, change: Callable[[dict[str, str]], None], ttl: float | None) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self._clock()
            row = db.execute("SELECT fields, expires FROM state WHERE key = ?", (key,)).fetchone()
            current: dict[str, str] = {}
            expires: float | None = None
            if row is not None and (row[1] is None or row[1] > now):
                current, expires = json.loads(row[0]), row[1]
            change(current)
            if ttl is not None:
                expires = now + ttl
            db.execute(
                "INSERT INTO state (key, fields, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET fields = excluded.fields, expires = excluded.expires",
                (key, json.dumps(current, separators=(",", ":")), expires),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _delete(self, key: str) -> bool:
        now = self._clock()
        cur = self._db().execute("DELETE FROM state WHERE key = ? RETURNING expires", (key,))
        rows = cur.fetchall()
        return any(expires is None or expires > now for (expires,) in rows)

    def _scan_batch(self, prefix: str, after: str | None) -> list[tuple[str, dict[str, str]]]:
        sql = "SELECT key, fields FROM state WHERE key >= ? AND key > ? AND (expires IS NULL OR expires > ?)"
        args: list[object] = [prefix, after if after is not None else "", self._clock()]
        if prefix and ord(prefix[-1]) < 0x10FFFF:
            # Keys starting with prefix sort below prefix[:-1] + next character (UTF-8 byte order
            # is code point order), so the primary key's index bounds the range.
            sql += " AND key < ?"
            args.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        sql += f" ORDER BY key LIMIT {_SCAN_BATCH}"
        rows = self._db().execute(sql, args).fetchall()
        return [(key, json.loads(fields)) for key, fields in rows if key.startswith(prefix)]

    def _sweep(self) -> int:
        db = self._db()
        removed = 0
        while True:
            cur = db.execute(
                "DELETE FROM state WHERE key IN (SELECT key FROM state WHERE expires <= ? LIMIT ?)",
                (self._clock(), _SWEEP_BATCH),
            )
            removed += cur.rowcount
            if cur.rowcount < _SWEEP_BATCH:
                return removed

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
