"""The Bayes store on Redis, for several filterd machines: the same data, operations and
guarantees as the SQLite store (`filterd.engine.bayes.base` says what they share), so that every
daemon on every machine learns into, and scores from, one store.

Keys (P = ``state.redis_key_prefix`` + ``bayes:``; ``gE`` = generation E, see clear/restore)::

    P meta       hash: schema_version, tokenizer_version, n_features, created
    P state      hash: epoch (the current generation), generations (the last one allocated),
                 seq (the last change), last_id (the log entry of change seq), nspam, nham,
                 log_n and log_bytes (changes logged since the snapshot), last_expiry, expired_total
    P gE:msgs    hash: message digest -> "<s|h>:<seq of the change that wrote it>:<learnt>:"
                 followed by its token hashes (uint32 little-endian)
    P gE:b:<n>   hash of buckets 64n .. 64n+63: s<i>, h<i>, a<i> = spam count, ham count and
                 atime of bucket 64n+i, all absent for an empty bucket. At most 192 fields, so
                 Redis keeps it in its compact listpack encoding: ~35 bytes a bucket (35 MB for
                 1M tokens) where a key, or a sorted-set member, per bucket costs over 100.
    P gE:log     stream, one entry per change: seq, delta (the SQLite change-log format)
    P gE:snap    hash: seq, id (the log entry it includes last), counts (the snapshot blob)

Every change is one Lua script, which Redis runs atomically:

* Learning: the client reads the batch's message records (HMGET), works out the delta as the
  SQLite store does, and sends it with the version (the seq in the record, or none) of every
  message it read. The script changes nothing if one version moved (another client learnt or
  forgot that message meanwhile); the client then reads again and retries, so two daemons
  learning the same message at once count it once. Otherwise it takes the next seq, writes the
  records, applies the delta to the bucket hashes (increments, then decrements clamped at 0; an
  emptied bucket is deleted), adds to nspam/nham and appends the delta to the log (XADD). One
  script per 50 messages holds Redis for a few ms at a time.
* `refresh` is one MULTI (the state and the log entries after the last one applied): the usual
  answer is "nothing new", one round trip. Entries are applied in order and their seq must
  follow on; a gap or a new epoch makes the process reload: the snapshot and the log after it.
  A writer that finds 2000 changes or 8 MB logged since the snapshot writes a new one from its
  memory (only if nothing was committed since its refresh) and trims the log behind it (XTRIM
  MINID ~), keeping 10 minutes for readers nearly up to date. A reader finding no snapshot
  (evicted or deleted by hand) rebuilds the counts from the bucket hashes and writes one.
* Clear and restore build a new generation's keys beside the current ones, then switch
  ``epoch`` to it in one script: readers reload, writers' scripts refuse the old epoch and are
  retried on the new one. The old generation is then deleted. A restore that fails before the
  switch leaves the store as it was; what it wrote is deleted by the next clear or restore.
* Expiry counts the non-empty buckets in memory, reads their atimes from the bucket hashes
  (pipelined HGETALL, one per 64 buckets) and zeroes the oldest beyond max_tokens in a script
  that skips any bucket learnt or seen since it was read, logging the zeroing as a change.
  Scanning marks buckets as seen as with SQLite; the marks are written every 10 minutes.
* `backup` reads the state, the snapshot and the log and COPYs the message hash to a temporary
  key in one MULTI: counts and messages as of one seq, while others go on learning.

Times (atime, learnt, last expiry) come from the Redis server's clock, one for every machine.
It needs Redis 6.2 or newer (COPY, exclusive XRANGE), one primary (not Cluster: the scripts
address bucket hashes they derive from bucket ids), and an eviction policy that keeps these
keys (``noeviction``, or a volatile-* one).

The client is redis-py's synchronous one, as the store's API is: scoring reads memory; `refresh`
costs one round trip a second per worker, bounded by ``state.timeout``; writes come in batches
(TELL, autolearn, `filterd learn`). The SQLite store blocks its process for the same moments.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Concatenate, Literal, NamedTuple, ParamSpec, TypeVar, cast

import numpy as np
import numpy.typing as npt
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from filterd.config import BayesConfig
from filterd.engine.bayes.base import (
    EMPTY_IDS,
    EMPTY_TRIPLES,
    BayesStoreBase,
    BucketRow,
    Counts,
    Hashed,
    Ids,
    LearnResult,
    MessageRow,
    StoreError,
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

__all__ = ["SCHEMA_VERSION", "RedisBayesStore"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of the key layout above
_SHARD_BITS = 6  # 64 buckets per hash
_BATCH = 50  # messages per learning script
_READ_CHUNK = 64  # log entries per XRANGE
_PIPE_CHUNK = 500  # commands per pipelined round trip when reading many keys
_SCRIPT_CHUNK = 20_000  # buckets per touch or expiry script
_CONFLICT_RETRIES = 50
_RELOAD_TRIES = 5
_SNAPSHOT_AFTER_CHANGES = 2000
_SNAPSHOT_AFTER_BYTES = 8 << 20
_KEEP_LOG_MS = 600_000  # log kept behind a snapshot, for readers nearly up to date
_TEMP_TTL_MS = 3_600_000  # a backup's copy of the messages, should the backup die
_STATE_FIELDS = ("epoch", "seq", "last_id", "nspam", "nham", "log_n", "log_bytes")

_INIT = """
-- KEYS: meta, state, the first generation's snapshot; ARGV: schema, tokenizer version, n_features
if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')[1]
    if redis.call('EXISTS', KEYS[1]) == 0 then
        redis.call('HSET', KEYS[1], 'schema_version', ARGV[1], 'tokenizer_version', ARGV[2],
                   'n_features', ARGV[3], 'created', now)
    end
    redis.call('HSET', KEYS[2], 'epoch', 1, 'generations', 1, 'seq', 0, 'last_id', '0-0',
               'nspam', 0, 'nham', 0, 'log_n', 0, 'log_bytes', 0, 'last_expiry', now, 'expired_total', 0)
    redis.call('HSET', KEYS[3], 'seq', 0, 'id', '0-0', 'counts', '')
end
return redis.call('HGETALL', KEYS[1])
"""

_APPLY = """
-- KEYS: state, messages, log. ARGV: epoch, bucket key prefix, number of messages, d_spam, d_ham,
-- delta; then per message: digest, version read ('' = absent), class to write ('' = delete), hashes
local state, msgs, log = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HGET', state, 'epoch') ~= ARGV[1] then return {'epoch'} end
local n_msgs = tonumber(ARGV[3])
for i = 0, n_msgs - 1 do
    local at = 7 + 4 * i
    local record = redis.call('HGET', msgs, ARGV[at])
    local version = record and string.match(record, '^[sh]:(%d+):') or ''
    if version ~= ARGV[at + 1] then return {'conflict'} end
end
local seq = redis.call('HINCRBY', state, 'seq', 1)
local now = redis.call('TIME')[1]
for i = 0, n_msgs - 1 do
    local at = 7 + 4 * i
    if ARGV[at + 2] == '' then
        redis.call('HDEL', msgs, ARGV[at])
    else
        redis.call('HSET', msgs, ARGV[at], ARGV[at + 2] .. ':' .. seq .. ':' .. now .. ':' .. ARGV[at + 3])
    end
end
local delta, prefix = ARGV[6], ARGV[2]
local n_inc, n_dec, _, pos = struct.unpack('<i4i4i4', delta)
local b, ds, dh
for _ = 1, n_inc do
    b, ds, dh, pos = struct.unpack('<i4i4i4', delta, pos)
    local key, slot = prefix .. math.floor(b / @SHARD@), b % @SHARD@
    if ds ~= 0 then redis.call('HINCRBY', key, 's' .. slot, ds) end
    if dh ~= 0 then redis.call('HINCRBY', key, 'h' .. slot, dh) end
    redis.call('HSET', key, 'a' .. slot, now)
end
for _ = 1, n_dec do
    b, ds, dh, pos = struct.unpack('<i4i4i4', delta, pos)
    local key, slot = prefix .. math.floor(b / @SHARD@), b % @SHARD@
    local old = redis.call('HMGET', key, 's' .. slot, 'h' .. slot)
    local s = math.max((tonumber(old[1]) or 0) - ds, 0)
    local h = math.max((tonumber(old[2]) or 0) - dh, 0)
    if s == 0 and h == 0 then
        redis.call('HDEL', key, 's' .. slot, 'h' .. slot, 'a' .. slot)
    else
        redis.call('HSET', key, 's' .. slot, s, 'h' .. slot, h)
    end
end
redis.call('HINCRBY', state, 'nspam', ARGV[4])
redis.call('HINCRBY', state, 'nham', ARGV[5])
local id = redis.call('XADD', log, '*', 'seq', seq, 'delta', delta)
redis.call('HSET', state, 'last_id', id)
local log_n = redis.call('HINCRBY', state, 'log_n', 1)
local log_bytes = redis.call('HINCRBY', state, 'log_bytes', #delta)
return {'ok', seq, log_n, log_bytes}
"""

_TOUCH = """
-- KEYS: state; ARGV: epoch, bucket key prefix, bucket ids (int32 little-endian)
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local now = redis.call('TIME')[1]
local ids, prefix = ARGV[3], ARGV[2]
local pos, b, n = 1, 0, 0
for _ = 1, #ids / 4 do
    b, pos = struct.unpack('<i4', ids, pos)
    local key, field = prefix .. math.floor(b / @SHARD@), 'a' .. (b % @SHARD@)
    if redis.call('HEXISTS', key, field) == 1 then
        redis.call('HSET', key, field, now)
        n = n + 1
    end
end
return n
"""

_EXPIRE = """
-- KEYS: state, log; ARGV: epoch, bucket key prefix, (bucket int32, atime read uint32) pairs
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local pairs, prefix = ARGV[3], ARGV[2]
local zero = {}
local pos, b, seen = 1, 0, 0
for _ = 1, #pairs / 8 do
    b, seen, pos = struct.unpack('<i4I4', pairs, pos)
    local key, slot = prefix .. math.floor(b / @SHARD@), b % @SHARD@
    local cur = redis.call('HMGET', key, 's' .. slot, 'h' .. slot, 'a' .. slot)
    if (cur[1] or cur[2]) and (tonumber(cur[3]) or 0) <= seen then
        redis.call('HDEL', key, 's' .. slot, 'h' .. slot, 'a' .. slot)
        zero[#zero + 1] = struct.pack('<i4', b)
    end
end
redis.call('HSET', KEYS[1], 'last_expiry', redis.call('TIME')[1])
if #zero == 0 then return 0 end
local delta = struct.pack('<i4i4i4', 0, 0, #zero) .. table.concat(zero)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = redis.call('XADD', KEYS[2], '*', 'seq', seq, 'delta', delta)
redis.call('HSET', KEYS[1], 'last_id', id)
redis.call('HINCRBY', KEYS[1], 'log_n', 1)
redis.call('HINCRBY', KEYS[1], 'log_bytes', #delta)
redis.call('HINCRBY', KEYS[1], 'expired_total', #zero)
return #zero
"""

_SNAPSHOT = """
-- KEYS: state, snapshot, log; ARGV: epoch, seq, counts. Only when nothing was committed since.
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'last_id')
if state[1] ~= ARGV[1] or state[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'id', state[3], 'counts', ARGV[3])
redis.call('HSET', KEYS[1], 'log_n', 0, 'log_bytes', 0)
local snap_ms = tonumber(string.match(state[3], '^(%d+)'))
local now = redis.call('TIME')
local keep_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - @KEEP_MS@
redis.call('XTRIM', KEYS[3], 'MINID', '~', string.format('%.0f', math.min(snap_ms, keep_ms)))
return 1
"""

_SWITCH = """
-- KEYS: state, the new generation's snapshot; ARGV: generation, nspam, nham
if tonumber(ARGV[1]) <= tonumber(redis.call('HGET', KEYS[1], 'epoch')) then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'last_id', '0-0', 'nspam', ARGV[2], 'nham', ARGV[3],
           'log_n', 0, 'log_bytes', 0)
redis.call('HSET', KEYS[2], 'seq', seq, 'id', '0-0')
return seq
"""


def _lua(text: str) -> str:
    return text.replace("@SHARD@", str(1 << _SHARD_BITS)).replace("@KEEP_MS@", str(_KEEP_LOG_MS))


_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")

S = TypeVar("S", bound="RedisBayesStore")
P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    """Redis trouble (unreachable, timeout, a script error) as the StateError callers expect."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise StateError(f"Bayes store {where}: {type(exc).__name__}: {exc}") from exc


def _redis_errors(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        with _translated(self.where):
            return method(self, *args, **kwargs)

    return cast(Callable[Concatenate[S, P], R], wrapper)


def _hidden_password(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


class _State(NamedTuple):
    epoch: int
    seq: int
    last_id: str
    nspam: int
    nham: int
    log_n: int
    log_bytes: int


class RedisBayesStore(BayesStoreBase):
    """One process's handle on the Bayes store in Redis; see the module docstring. Not
    thread-safe; open one per process."""

    _batch_size = _BATCH

    def __init__(self, client: redis.Redis, url: str, prefix: str, config: BayesConfig, n_features: int) -> None:
        super().__init__(config, n_features)
        self._r = client
        self.url = url
        self.prefix = prefix
        self._seq = -1
        self._epoch = -1
        self._last_id = "0-0"
        self._log_size = (0, 0)
        self._snapshot_due = False
        self._closed = False
        self._scripts: dict[str, Script] = {
            name: client.register_script(_lua(text))
            for name, text in (
                ("apply", _APPLY),
                ("touch", _TOUCH),
                ("expire", _EXPIRE),
                ("snapshot", _SNAPSHOT),
                ("switch", _SWITCH),
            )
        }

    @property
    def backend(self) -> Literal["redis"]:
        return "redis"

    @property
    def where(self) -> str:
        return f"{_hidden_password(self.url)} {self.prefix}"

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, prefix: str, config: BayesConfig, *, timeout: float = 2.0) -> RedisBayesStore:
        """Open the store under ``prefix`` at ``url``, creating it if missing. Raises StateError
        when Redis cannot be reached, StoreError when the keys are not a store of this layout.

        A store keeps the n_features it was created with, as the SQLite one does."""
        store = cls._open(url, prefix, config, timeout=timeout, create=True)
        assert store is not None
        return store

    @classmethod
    def open_existing(
        cls, url: str, prefix: str, config: BayesConfig, *, timeout: float = 2.0
    ) -> RedisBayesStore | None:
        """`open`, or None (creating nothing) when nothing was ever learnt under ``prefix``."""
        return cls._open(url, prefix, config, timeout=timeout, create=False)

    @classmethod
    def _open(
        cls, url: str, prefix: str, config: BayesConfig, *, timeout: float, create: bool
    ) -> RedisBayesStore | None:
        where = f"{_hidden_password(url)} {prefix}"
        # One quick retry (a pooled connection the server closed); more would hold a worker's
        # loop for several timeouts when the server is down.
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        try:
            with _translated(where):
                if not create and not client.exists(prefix + "state"):
                    client.close()
                    return None
                raw = cast(
                    list[bytes],
                    client.eval(
                        _INIT,
                        3,
                        prefix + "meta",
                        prefix + "state",
                        prefix + "g1:snap",
                        SCHEMA_VERSION,
                        TOKENIZER_VERSION,
                        config.n_features,
                    ),
                )
                meta = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
                try:
                    version, n_features = int(meta["schema_version"]), int(meta["n_features"])
                    tokenizer_version = int(meta["tokenizer_version"])
                except (KeyError, ValueError) as exc:
                    raise StoreError(f"{where}: not a filterd Bayes store (meta: {exc})") from exc
                if version != SCHEMA_VERSION:
                    raise StoreError(f"{where}: layout version {version}, expected {SCHEMA_VERSION}")
                if n_features != config.n_features:
                    log.warning(
                        "%s was built with n_features=%d; ignoring the configured %d",
                        where,
                        n_features,
                        config.n_features,
                    )
                if tokenizer_version != TOKENIZER_VERSION:
                    log.warning(
                        "%s was learnt with tokenizer version %d (this is %d): retrain for best results",
                        where,
                        tokenizer_version,
                        TOKENIZER_VERSION,
                    )
                store = cls(client, url, prefix, config, n_features)
                store.refresh()
            return store
        except BaseException:
            client.close()
            raise

    @_redis_errors
    def close(self) -> None:
        """Write pending atimes and close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid():  # a client inherited over fork belongs to the parent
            with contextlib.suppress(redis.exceptions.RedisError):
                self._flush_touches()
            self._r.close()

    # -- keys --------------------------------------------------------------------------------------

    @property
    def _state_key(self) -> str:
        return self.prefix + "state"

    def _gen(self, epoch: int | None = None) -> str:
        """The key prefix of a generation (by default the current one)."""
        return f"{self.prefix}g{self._epoch if epoch is None else epoch}:"

    def _shard_key(self, gen: str, shard: int) -> str:
        return f"{gen}b:{shard}"

    def _read_state(self, raw: list[bytes | None]) -> _State:
        if raw[0] is None or None in raw:
            raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
        values = cast(list[bytes], raw)
        epoch, seq, last_id, nspam, nham, log_n, log_bytes = values
        return _State(int(epoch), int(seq), last_id.decode(), int(nspam), int(nham), int(log_n), int(log_bytes))

    def _set_state(self, state: _State) -> None:
        self._nspam, self._nham = state.nspam, state.nham
        self._log_size = (state.log_n, state.log_bytes)

    # -- reading -----------------------------------------------------------------------------------

    @_redis_errors
    def counts(self) -> tuple[int, int]:
        nspam, nham = cast(list[bytes | None], self._r.hmget(self._state_key, ["nspam", "nham"]))
        if nspam is None or nham is None:
            raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
        return int(nspam), int(nham)

    @_redis_errors
    def refresh(self) -> None:
        self._check_pid()
        pipe = self._r.pipeline(transaction=True)
        pipe.hmget(self._state_key, _STATE_FIELDS)
        pipe.xrange(self._gen() + "log", min="(" + self._last_id, count=_READ_CHUNK)
        raw, entries = pipe.execute()
        state = self._read_state(raw)
        if state.epoch != self._epoch or state.seq < self._seq or not self._catch_up(entries, state.seq):
            self._reload()
        else:
            self._set_state(state)
        if self._touch_flush_due():
            self._flush_touches()
        if self._snapshot_due:
            self._maybe_snapshot()

    def _catch_up(self, entries: list[tuple[bytes, dict[bytes, bytes]]], target: int) -> bool:
        """Apply log entries up to change ``target``; False on a gap (the log was trimmed past
        this process's position, or it holds another generation's changes)."""
        while self._seq < target:
            if not entries:
                return False
            for entry_id, fields in entries:
                seq = int(fields[b"seq"])
                if seq != self._seq + 1:
                    return False
                self._apply(*decode_delta(fields[b"delta"]))
                self._seq, self._last_id = seq, entry_id.decode()
                if seq == target:
                    return True
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                self._r.xrange(self._gen() + "log", min="(" + self._last_id, count=_READ_CHUNK),
            )
        return self._seq == target

    def _reload(self) -> None:
        """All counts as of the current change: the snapshot and the log after it, or else the
        bucket hashes themselves."""
        for _ in range(_RELOAD_TRIES):
            epoch_raw = self._r.hget(self._state_key, "epoch")
            if epoch_raw is None:
                raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
            epoch = int(cast(bytes, epoch_raw))
            pipe = self._r.pipeline(transaction=True)
            pipe.hmget(self._state_key, _STATE_FIELDS)
            pipe.hmget(self._gen(epoch) + "snap", ["seq", "id", "counts"])
            raw, (snap_seq, snap_id, counts) = pipe.execute()
            state = self._read_state(raw)
            if state.epoch != epoch:
                continue  # cleared or restored just now
            if snap_seq is None or snap_id is None or counts is None or int(snap_seq) > state.seq:
                break
            self._spam, self._ham = decode_counts(counts, self.n_features)
            self._totals()
            self._epoch, self._seq, self._last_id = epoch, int(snap_seq), snap_id.decode()
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                self._r.xrange(self._gen() + "log", min="(" + self._last_id, count=_READ_CHUNK),
            )
            if self._catch_up(entries, state.seq):
                self._set_state(state)
                return
            # A newer snapshot replaced this one and the log was trimmed meanwhile: again.
        log.warning("%s: no usable snapshot; reading every bucket", self.where)
        self._reload_from_buckets()

    def _reload_from_buckets(self) -> None:
        for _ in range(_RELOAD_TRIES):
            before = self._read_state(cast(list[bytes | None], self._r.hmget(self._state_key, _STATE_FIELDS)))
            spam = np.zeros(self.n_features, dtype=np.int32)
            ham = np.zeros(self.n_features, dtype=np.int32)
            gen = self._gen(before.epoch)
            pattern = _GLOB_SPECIAL.sub(rb"\\\1", gen.encode()) + b"b:*"
            shards = [int(key.rsplit(b":", 1)[1]) for key in self._r.scan_iter(match=pattern, count=1000)]
            for shard, fields in zip(shards, self._read_shards(gen, shards), strict=True):
                for bucket, s, h, _ in _bucket_rows(shard, fields):
                    spam[bucket], ham[bucket] = s, h
            after = self._read_state(cast(list[bytes | None], self._r.hmget(self._state_key, _STATE_FIELDS)))
            if (after.epoch, after.seq) == (before.epoch, before.seq):
                self._spam, self._ham = spam, ham
                self._totals()
                self._epoch, self._seq, self._last_id = after.epoch, after.seq, after.last_id
                self._set_state(after)
                self._snapshot_due = True
                return
        raise StoreError(f"{self.where}: the store kept changing while its buckets were read; try again")

    def _read_shards(self, gen: str, shards: Iterable[int]) -> Iterator[dict[bytes, bytes]]:
        """HGETALL of bucket hashes, pipelined, in the order given."""
        pending: list[int] = []

        def flush() -> list[dict[bytes, bytes]]:
            pipe = self._r.pipeline(transaction=False)
            for shard in pending:
                pipe.hgetall(self._shard_key(gen, shard))
            pending.clear()
            return cast(list[dict[bytes, bytes]], pipe.execute())

        for shard in shards:
            pending.append(shard)
            if len(pending) >= _PIPE_CHUNK:
                yield from flush()
        if pending:
            yield from flush()

    def _atimes(self, gen: str, ids: Ids, default: int) -> npt.NDArray[np.int64]:
        """The atime of each bucket in ``ids`` (sorted); ``default`` where there is none."""
        shards = np.unique(ids >> _SHARD_BITS).tolist()
        found_ids: list[int] = []
        found_at: list[int] = []
        for shard, fields in zip(shards, self._read_shards(gen, shards), strict=True):
            for bucket, _, _, atime in _bucket_rows(shard, fields):
                found_ids.append(bucket)
                found_at.append(atime)
        out = np.full(ids.size, default, dtype=np.int64)
        if found_ids:
            known = np.array(found_ids, dtype=np.int64)
            order = np.argsort(known)
            known, at = known[order], np.array(found_at, dtype=np.int64)[order]
            pos = np.minimum(np.searchsorted(known, ids), known.size - 1)
            hit = known[pos] == ids
            out[hit] = at[pos[hit]]
        return out

    def _server_time(self) -> int:
        return int(self._r.time()[0])

    # -- writing -----------------------------------------------------------------------------------

    def _run_apply(
        self, writes: list[tuple[str, bytes, bytes, bytes]], inc: Triples, dec: Triples, d_spam: int, d_ham: int
    ) -> bool:
        """One learning/forgetting script; False when it must be planned again (a message changed
        since it was read, or the store was cleared or restored)."""
        gen = self._gen()
        args: list[Any] = [self._epoch, gen + "b:", len(writes), d_spam, d_ham, encode_delta(inc, dec, EMPTY_IDS)]
        for digest, version, klass, blob in writes:
            args += [digest, version, klass, blob]
        reply = cast(list[Any], self._scripts["apply"](keys=[self._state_key, gen + "msgs", gen + "log"], args=args))
        if reply[0] == b"ok":
            self._log_size = (int(reply[2]), int(reply[3]))
            return True
        if reply[0] == b"epoch":
            self.refresh()
        return False

    @_redis_errors
    def _learn_batch(self, batch: list[Hashed]) -> list[LearnResult]:
        self._check_pid()
        for _ in range(_CONFLICT_RETRIES):
            out: list[LearnResult] = []
            inc: list[tuple[Ids, int, int]] = []
            dec: list[tuple[Ids, int, int]] = []
            d_spam = d_ham = 0
            digests = list(dict.fromkeys(digest for digest, _, _ in batch))
            records = cast(list[bytes | None], self._r.hmget(self._gen() + "msgs", digests))
            known: dict[str, tuple[bool, bytes | None]] = {}
            versions: dict[str, bytes] = {}
            for digest, record in zip(digests, records, strict=True):
                if record is None:
                    known[digest], versions[digest] = (False, None), b""
                else:
                    klass, version, _, blob = record.split(b":", 3)
                    known[digest], versions[digest] = (klass == b"s", blob), version
            final: dict[str, tuple[bytes, bytes]] = {}
            for digest, hashes, is_spam in batch:
                was_spam, old_blob = known[digest]
                if old_blob is not None and was_spam == is_spam:
                    out.append(LearnResult.ALREADY)
                    continue
                ids = self._ids(hashes)
                inc.append((ids, 1, 0) if is_spam else (ids, 0, 1))
                blob = hashes.astype("<u4").tobytes()
                if old_blob is not None:
                    old_ids = self._ids(np.frombuffer(old_blob, dtype="<u4"))
                    dec.append((old_ids, 1, 0) if was_spam else (old_ids, 0, 1))
                    d_spam -= int(was_spam)
                    d_ham -= int(not was_spam)
                    out.append(LearnResult.MOVED)
                else:
                    out.append(LearnResult.LEARNED)
                d_spam += int(is_spam)
                d_ham += int(not is_spam)
                known[digest] = (is_spam, blob)
                final[digest] = (b"s" if is_spam else b"h", blob)
            if not final:
                return out
            writes = [(digest, versions[digest], klass, blob) for digest, (klass, blob) in final.items()]
            if self._run_apply(writes, aggregate(inc), aggregate(dec), d_spam, d_ham):
                self.refresh()
                self._maybe_snapshot()
                return out
        raise StoreError(f"{self.where}: gave up learning: other clients kept changing the same messages")

    @_redis_errors
    def forget(self, msg: ParsedMessage) -> LearnResult:
        self._check_pid()
        digest = message_digest(msg)
        for _ in range(_CONFLICT_RETRIES):
            record = cast(bytes | None, self._r.hget(self._gen() + "msgs", digest))
            if record is None:
                return LearnResult.NOT_KNOWN
            klass, version, _, blob = record.split(b":", 3)
            was_spam = klass == b"s"
            ids = self._ids(np.frombuffer(blob, dtype="<u4"))
            dec = aggregate([(ids, 1, 0) if was_spam else (ids, 0, 1)])
            if self._run_apply([(digest, version, b"", b"")], EMPTY_TRIPLES, dec, -int(was_spam), -int(not was_spam)):
                self.refresh()
                self._maybe_snapshot()
                return LearnResult.FORGOTTEN
        raise StoreError(f"{self.where}: gave up forgetting: other clients kept changing the same message")

    def _maybe_snapshot(self) -> None:
        """Write a snapshot when the log since the last one has grown (module docstring)."""
        log_n, log_bytes = self._log_size
        if not (self._snapshot_due or log_n >= _SNAPSHOT_AFTER_CHANGES or log_bytes >= _SNAPSHOT_AFTER_BYTES):
            return
        if self._pid != os.getpid() or self._closed:
            return
        gen = self._gen()
        written = self._scripts["snapshot"](
            keys=[self._state_key, gen + "snap", gen + "log"],
            args=[self._epoch, self._seq, encode_counts(self._spam, self._ham)],
        )
        if written:  # else someone committed since our refresh; they or a later writer will
            self._snapshot_due = False
            self._log_size = (0, 0)

    # -- maintenance ---------------------------------------------------------------------------------

    def _flush_touches(self) -> None:
        """Write the atime of buckets scanned since the last flush (existing buckets only)."""
        self._touched_since = time.monotonic()
        ids = np.flatnonzero(self._touched)
        if ids.size == 0:
            return
        self._touched[:] = False
        gen = self._gen()
        for start in range(0, ids.size, _SCRIPT_CHUNK):
            chunk = ids[start : start + _SCRIPT_CHUNK].astype("<i4").tobytes()
            self._scripts["touch"](keys=[self._state_key], args=[self._epoch, gen + "b:", chunk])

    @_redis_errors
    def expire(self, max_tokens: int | None = None) -> int:
        limit = self.config.max_tokens if max_tokens is None else max_tokens
        self._check_pid()
        self._flush_touches()
        self.refresh()
        ids = np.flatnonzero(self._spam | self._ham)
        excess = ids.size - limit
        if excess <= 0:
            self._r.hset(self._state_key, "last_expiry", self._server_time())
            return 0
        gen, epoch = self._gen(), self._epoch
        atimes = self._atimes(gen, ids, default=0)
        oldest = np.lexsort((ids, atimes))[:excess]  # by atime, then bucket, as SQLite's ORDER BY
        pairs = np.zeros(oldest.size, dtype=[("bucket", "<i4"), ("atime", "<u4")])
        pairs["bucket"], pairs["atime"] = ids[oldest], atimes[oldest]
        dropped = 0
        for start in range(0, pairs.size, _SCRIPT_CHUNK):
            chunk = pairs[start : start + _SCRIPT_CHUNK].tobytes()
            n = int(self._scripts["expire"](keys=[self._state_key, gen + "log"], args=[epoch, gen + "b:", chunk]))
            if n < 0:
                break  # cleared or restored meanwhile: nothing of this generation is left to expire
            dropped += n
        self.refresh()
        self._snapshot_due = True  # a good moment: expiry runs rarely and just rewrote many buckets
        self._maybe_snapshot()
        return dropped

    @_redis_errors
    def expire_if_due(self) -> int | None:
        last = self._r.hget(self._state_key, "last_expiry")
        if last is not None and self._server_time() - int(cast(bytes, last)) < self.config.expiry_period:
            return None
        return self.expire()

    @_redis_errors
    def dump(self) -> dict[str, object]:
        self.refresh()
        gen = self._gen()
        state, meta = (
            {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], self._r.hgetall(key)).items()}
            for key in (self._state_key, self.prefix + "meta")
        )
        ids = np.flatnonzero(self._spam | self._ham)
        atimes = self._atimes(gen, ids, default=0)
        keys = [self._state_key, self.prefix + "meta", gen + "msgs", gen + "log", gen + "snap"]
        keys += [self._shard_key(gen, shard) for shard in np.unique(ids >> _SHARD_BITS).tolist()]
        size = 0
        for start in range(0, len(keys), _PIPE_CHUNK):
            pipe = self._r.pipeline(transaction=False)
            for key in keys[start : start + _PIPE_CHUNK]:
                pipe.memory_usage(key)
            size += sum(int(n or 0) for n in pipe.execute())
        return {
            "version": SCHEMA_VERSION,
            "tokenizer_version": int(meta["tokenizer_version"]),
            "n_features": self.n_features,
            "combiner": self._params.combiner,
            "nspam": int(state["nspam"]),
            "nham": int(state["nham"]),
            "nmessages": int(self._r.hlen(gen + "msgs")),
            "ntokens": int(ids.size),
            "oldest_atime": int(atimes.min()) if ids.size else None,
            "newest_atime": int(atimes.max()) if ids.size else None,
            "last_expiry": int(state["last_expiry"]),
            "expired_total": int(state["expired_total"]),
            "seq": int(state["seq"]),
            "epoch": int(state["epoch"]),
            "size": size,
            "path": self.where,
            "backend": self.backend,
        }

    @_redis_errors
    def backup(self, out: IO[str]) -> None:
        copy = f"{self.prefix}tmp:{uuid.uuid4().hex}"
        for _ in range(_RELOAD_TRIES):
            epoch = int(cast(bytes, self._r.hget(self._state_key, "epoch") or b"-1"))
            gen = self._gen(epoch)
            pipe = self._r.pipeline(transaction=True)
            pipe.hmget(self._state_key, _STATE_FIELDS)
            pipe.hmget(gen + "snap", ["seq", "counts"])
            pipe.xrange(gen + "log")
            pipe.copy(gen + "msgs", copy, replace=True)
            pipe.pexpire(copy, _TEMP_TTL_MS)
            raw, (snap_seq, counts), entries, _, _ = pipe.execute()
            state = self._read_state(raw)
            if state.epoch == epoch:
                break
            self._r.unlink(copy)
        else:
            raise StoreError(f"{self.where}: the store was cleared or restored again and again during the backup")
        try:
            if snap_seq is None or counts is None:
                raise StoreError(f"{self.where}: the store has no snapshot to back up from; run a refresh first")
            spam, ham = _replay(counts, self.n_features, int(snap_seq), entries, state.seq)
            ids = np.flatnonzero(spam | ham)
            atimes = self._atimes(gen, ids, default=self._server_time())
            rows = zip(ids.tolist(), atimes.tolist(), strict=True)
            buckets = ((b, int(spam[b]), int(ham[b]), int(a)) for b, a in rows)
            digests = sorted(d.decode() for d in cast(list[bytes], self._r.hkeys(copy)))
            write_backup(out, self.n_features, (state.nspam, state.nham), buckets, self._messages(copy, digests))
        finally:
            self._r.unlink(copy)

    def _messages(self, key: str, digests: list[str]) -> Iterator[MessageRow]:
        for start in range(0, len(digests), _PIPE_CHUNK):
            chunk = digests[start : start + _PIPE_CHUNK]
            for digest, record in zip(chunk, cast(list[bytes | None], self._r.hmget(key, chunk)), strict=True):
                if record is None:
                    raise StoreError(f"{self.where}: the backup's copy of the messages vanished (expired?)")
                klass, _, learnt, blob = record.split(b":", 3)
                yield digest, int(klass == b"s"), int(learnt), blob

    @_redis_errors
    def restore(self, inp: IO[str]) -> None:
        backup = read_backup(inp)
        buckets = backup.buckets
        if backup.n_features != self.n_features:
            buckets = buckets_from_messages(backup.messages, self.n_features)
        self._replace(backup.messages, buckets, backup.nspam, backup.nham)

    @_redis_errors
    def clear(self) -> None:
        self._replace([], [], 0, 0)

    def _replace(self, messages: list[MessageRow], buckets: list[BucketRow], nspam: int, nham: int) -> None:
        """Build a new generation with these contents, then make it the current one."""
        self._check_pid()
        generation = int(self._r.hincrby(self._state_key, "generations", 1))
        gen = self._gen(generation)
        try:
            pipe = self._r.pipeline(transaction=False)
            for start in range(0, len(messages), _PIPE_CHUNK):
                records = {
                    digest: b"%s:0:%d:%s" % (b"s" if is_spam else b"h", learnt, blob)
                    for digest, is_spam, learnt, blob in messages[start : start + _PIPE_CHUNK]
                }
                pipe.hset(gen + "msgs", mapping=cast(Any, records))
                pipe.execute()
            spam = np.zeros(self.n_features, dtype=np.int32)
            ham = np.zeros(self.n_features, dtype=np.int32)
            shards: dict[int, dict[str, int]] = {}
            for bucket, s, h, atime in buckets:
                spam[bucket], ham[bucket] = s, h
                slot = bucket & ((1 << _SHARD_BITS) - 1)
                shards.setdefault(bucket >> _SHARD_BITS, {}).update({f"s{slot}": s, f"h{slot}": h, f"a{slot}": atime})
            for n, (shard, fields) in enumerate(shards.items(), start=1):
                pipe.hset(self._shard_key(gen, shard), mapping=cast(Any, fields))
                if n % _PIPE_CHUNK == 0:
                    pipe.execute()
            pipe.hset(gen + "snap", "counts", encode_counts(spam, ham))
            pipe.execute()
            switched = int(
                self._scripts["switch"](keys=[self._state_key, gen + "snap"], args=[generation, nspam, nham])
            )
            if switched < 0:
                raise StoreError(f"{self.where}: another clear or restore finished first; try again")
        except BaseException:
            with contextlib.suppress(redis.exceptions.RedisError):
                self._delete_generations(lambda g: g == generation)
            raise
        self._delete_generations(lambda g: g < generation)
        self.refresh()

    def _delete_generations(self, which: Callable[[int], bool]) -> None:
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", f"{self.prefix}g".encode()) + b"*"
        doomed: list[bytes] = []
        start = len(self.prefix) + 1
        for key in self._r.scan_iter(match=pattern, count=1000):
            number = key[start:].split(b":", 1)[0]
            if number.isdigit() and which(int(number)):
                doomed.append(key)
                if len(doomed) >= _PIPE_CHUNK:
                    self._r.unlink(*doomed)
                    doomed.clear()
        if doomed:
            self._r.unlink(*doomed)


def _bucket_rows(shard: int, fields: dict[bytes, bytes]) -> Iterator[BucketRow]:
    """The non-empty buckets of one bucket hash as (bucket, spam, ham, atime)."""
    slots: dict[int, list[int]] = {}
    for name, value in fields.items():
        column = b"sha".index(name[:1])
        slots.setdefault(int(name[1:]), [0, 0, 0])[column] = int(value)
    base = shard << _SHARD_BITS
    for slot, (s, h, atime) in sorted(slots.items()):
        if s or h:
            yield base + slot, s, h, atime


def _replay(
    counts: bytes, n_features: int, snap_seq: int, entries: list[tuple[bytes, dict[bytes, bytes]]], target: int
) -> tuple[Counts, Counts]:
    """The counts as of change ``target``: a snapshot and the log entries after it."""
    spam, ham = decode_counts(counts, n_features)
    seq = snap_seq
    for _, fields in entries:
        entry_seq = int(fields[b"seq"])
        if entry_seq <= seq:
            continue  # kept behind the snapshot
        if entry_seq != seq + 1 or entry_seq > target:
            break
        apply_delta(spam, ham, *decode_delta(fields[b"delta"]))
        seq = entry_seq
    if seq != target:
        raise StoreError(f"the change log does not lead from the snapshot ({snap_seq}) to change {target}")
    return spam, ham
