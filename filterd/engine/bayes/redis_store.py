"""The Bayes store on Redis, for several filterd machines: the same data, operations and
guarantees as the SQLite store (`filterd.engine.bayes.base` says what they share), so that every
daemon on every machine learns into, and scores from, one store.

Keys (P = ``state.redis_key_prefix`` + ``bayes:``; ``gE`` = generation E, see clear/restore)::

    P meta         hash: schema_version, tokenizer_version, n_features, created
    P state        hash: epoch (the current generation), generations (the last one allocated),
                   seq (the last change), last_id (the log entry of change seq), nspam, nham,
                   last_expiry, expired_total
    P gE:msgs      hash: message digest -> "<s|h>:<seq of the change that wrote it>:<learnt>:"
                   followed by its token hashes (uint32 little-endian)
    P gE:s:<n>     string: the spam counts of buckets 4094n .. 4094n+4093, big-endian uint32
    P gE:h:<n>     the same for ham counts
    P gE:a:<n>     the same for atimes (last learnt or seen, Unix seconds)
    P gE:log       stream, one entry per change: seq, delta (the SQLite change-log format)

The counts are the arrays every process mirrors, cut in 16 KB strings that BITFIELD updates in
place: 12 bytes per bucket of n_features (50 MB at 2**22) however many tokens are known, where a
hash field or sorted-set member per token costs 50 to 150 bytes. A bucket is empty when both
its counts are 0; missing strings read as 0.

Every change is one Lua script, which Redis runs atomically:

* Learning: the client reads the batch's message records (HMGET), works out the delta as the
  SQLite store does, and sends it with the version (the seq in the record, or none) of every
  message it read. The script changes nothing if one version moved (another client learnt or
  forgot that message meanwhile); the client then reads again and retries, so two daemons
  learning the same message at once count it once. Otherwise it takes the next seq, writes the
  records, applies the delta (BITFIELD INCRBY, one call per 16 KB string touched; decrements
  with OVERFLOW SAT, which stops unsigned counts at 0 exactly as SQLite's max(n - d, 0)), adds
  to nspam/nham and appends the delta to the log (XADD, trimmed to ~256 entries). A script of
  50 messages (~12k buckets) holds Redis ~40 ms on a busy 2-core machine; `filterd learn` sends
  one after another, a daemon's TELL or autolearn one of 1 to 8 messages.
* A write-only handle (`BayesStoreBase`: a daemon worker's writer, an expiry) reads no counts:
  learning needs only the message records and the epoch, which its `refresh` reads (one HGET).
* `refresh` is one MULTI (the state and the log entries after the last one applied): usually
  "nothing new", one round trip. Entries are applied in order and their seq must follow on; a
  gap (the log was trimmed past this process) or a new epoch makes the process reload: one MULTI
  reading the state and every count string, a consistent copy of the counts as of one change
  (0.2 s at 2**22). The count strings are thus an always-current snapshot, so the log can be
  trimmed at any length: it is only the fast path for processes that keep up.
* Clear and restore build a new generation's keys beside the current ones, then switch
  ``epoch`` to it in one script: readers reload, writers' scripts refuse the old epoch and are
  retried on the new one. The old generation is then deleted. A restore that fails before the
  switch leaves the store as it was; what it wrote is deleted by the next clear or restore.
* Expiry reads every count and atime string in one MULTI, picks the least recently seen
  non-empty buckets beyond max_tokens, and zeroes them in a script that skips any bucket learnt
  or seen since it was read, logging the zeroing as a change (a few seconds at 2**22; the daemon
  runs it in a thread with a handle of its own). Scanning marks buckets as seen as with SQLite;
  the marks are written every 10 minutes, those of buckets without counts left out (their
  count strings are not made for an atime).
* `backup` reads the state and every count and atime string and COPYs the message hash to a
  temporary key in one MULTI: counts and messages as of one change, while others go on learning.

Times (atime, learnt, last expiry) come from the Redis server's clock, one for every machine.
It needs Redis 6.2 or newer (COPY, exclusive XRANGE), one primary (not Cluster: the scripts
address count strings they derive from bucket ids), and an eviction policy that keeps these
keys (``noeviction``, or a volatile-* one).

The client is redis-py's synchronous one, as the store's API is: scoring reads memory; `refresh`
costs one round trip a second per worker, bounded by ``state.timeout``; writes come in batches
(TELL, autolearn, `filterd learn`), which a daemon worker makes in a thread beside its loop with
a handle of its own (`filterd.engine.bayes.writer`), as it does with the SQLite store.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
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
    Hashed,
    LearnPlan,
    LearnResult,
    MessageRow,
    StoreError,
    StoreInterrupted,
    Triples,
    aggregate,
    buckets_from_messages,
    decode_delta,
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
# Buckets per count string: 4094 x 4 bytes and Redis's 6 bytes of string header fit the
# allocator's 16 KB size class exactly (4096 would take 20 KB).
_CHUNK = 4094
_BATCH = 50  # messages per learning script
_LOG_MAX = 256  # log entries kept (approximately): a reader further behind reloads the counts
_READ_CHUNK = 64  # log entries per XRANGE
_PIPE_CHUNK = 500  # commands or hash fields per round trip
_SCRIPT_CHUNK = 20_000  # buckets per touch script
_EXPIRE_CHUNK = 2_000  # buckets per expiry script (~4 checks each): Redis is held ~10-40 ms
_CONFLICT_RETRIES = 50
_RELOAD_TRIES = 5
_TEMP_TTL_MS = 3_600_000  # a backup's copy of the messages, should the backup die
_STATE_FIELDS = ("epoch", "seq", "last_id", "nspam", "nham")

# Shared by the scripts that write counts, which go through bucket ids in ascending order: one
# BITFIELD call per count string (at most 800 operations: Lua's unpack() takes some 8000
# values). A string is made at its full size before its first BITFIELD, which would otherwise
# grow it to twice what it needs.
_BITFIELDS = """
local made = {}
local function bitfield(key, args, n)
    if n == 0 or (n == 2 and args[1] == 'OVERFLOW') then return end
    if not made[key] then
        if redis.call('EXISTS', key) == 0 then redis.call('SET', key, string.rep('\\0', @CHUNK@ * 4)) end
        made[key] = true
    end
    redis.call('BITFIELD', key, unpack(args, 1, n))
end
-- Adds to (op INCRBY), saturates at 0 (op SAT) or sets (op SET) the spam, ham and atime fields
-- of buckets given in ascending order; done() writes what is left.
local function writer(gen, op)
    local chunk, s, h, a = -1, {}, {}, {}
    local first = (op == 'SAT') and 2 or 0
    local ns, nh, na = first, first, 0
    if op == 'SAT' then s[1], s[2], h[1], h[2] = 'OVERFLOW', 'SAT', 'OVERFLOW', 'SAT' end
    local verb = (op == 'SET') and 'SET' or 'INCRBY'
    local function flush()
        if chunk >= 0 then
            bitfield(gen .. 's:' .. chunk, s, ns)
            bitfield(gen .. 'h:' .. chunk, h, nh)
            bitfield(gen .. 'a:' .. chunk, a, na)
        end
        ns, nh, na = first, first, 0
    end
    local function add(b, ds, dh, atime)
        local n = math.floor(b / @CHUNK@)
        if n ~= chunk or ns > 3200 or nh > 3200 or na > 3200 then
            flush()
            chunk = n
        end
        local slot = '#' .. (b - n * @CHUNK@)
        if ds then s[ns + 1], s[ns + 2], s[ns + 3], s[ns + 4] = verb, 'u32', slot, ds; ns = ns + 4 end
        if dh then h[nh + 1], h[nh + 2], h[nh + 3], h[nh + 4] = verb, 'u32', slot, dh; nh = nh + 4 end
        if atime then a[na + 1], a[na + 2], a[na + 3], a[na + 4] = 'SET', 'u32', slot, atime; na = na + 4 end
    end
    return add, flush
end
"""

_INIT = """
-- KEYS: meta, state; ARGV: schema version, tokenizer version, n_features
if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')[1]
    if redis.call('EXISTS', KEYS[1]) == 0 then
        redis.call('HSET', KEYS[1], 'schema_version', ARGV[1], 'tokenizer_version', ARGV[2],
                   'n_features', ARGV[3], 'created', now)
    end
    redis.call('HSET', KEYS[2], 'epoch', 1, 'generations', 1, 'seq', 0, 'last_id', '0-0',
               'nspam', 0, 'nham', 0, 'last_expiry', now, 'expired_total', 0)
end
return redis.call('HGETALL', KEYS[1])
"""

_APPLY = (
    _BITFIELDS
    + """
-- KEYS: state, messages, log. ARGV: epoch, key prefix of the generation, number of messages,
-- d_spam, d_ham, delta; then per message: digest, version read ('' = absent), class to write
-- ('' = delete), token hashes.
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
local delta, gen = ARGV[6], ARGV[2]
local n_inc, n_dec, _, pos = struct.unpack('<i4i4i4', delta)
local b, ds, dh
local add, done = writer(gen, 'INCRBY')
for _ = 1, n_inc do
    b, ds, dh, pos = struct.unpack('<i4i4i4', delta, pos)
    add(b, ds ~= 0 and ds or nil, dh ~= 0 and dh or nil, now)
end
done()  -- increments before decrements, as every backend applies a delta
add, done = writer(gen, 'SAT')
for _ = 1, n_dec do
    b, ds, dh, pos = struct.unpack('<i4i4i4', delta, pos)
    add(b, ds ~= 0 and -ds or nil, dh ~= 0 and -dh or nil, nil)
end
done()
redis.call('HINCRBY', state, 'nspam', ARGV[4])
redis.call('HINCRBY', state, 'nham', ARGV[5])
local id = redis.call('XADD', log, 'MAXLEN', '~', @LOG_MAX@, '*', 'seq', seq, 'delta', delta)
redis.call('HSET', state, 'last_id', id)
return {'ok', seq}
"""
)

_TOUCH = (
    _BITFIELDS
    + """
-- KEYS: state; ARGV: epoch, key prefix of the generation, bucket ids (int32 little-endian)
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local now = redis.call('TIME')[1]
local ids, gen = ARGV[3], ARGV[2]
local add, done = writer(gen, 'SET')
local pos, b = 1, 0
local counted = {}  -- per count string: whether it holds any counts (else no atime is written)
for _ = 1, #ids / 4 do
    b, pos = struct.unpack('<i4', ids, pos)
    local n = math.floor(b / @CHUNK@)
    if counted[n] == nil then counted[n] = redis.call('EXISTS', gen .. 's:' .. n, gen .. 'h:' .. n) > 0 end
    if counted[n] then add(b, nil, nil, now) end
end
done()
return #ids / 4
"""
)

_EXPIRE = """
-- KEYS: state, log; ARGV: epoch, key prefix of the generation, (bucket int32, atime read uint32)
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local pairs, gen = ARGV[3], ARGV[2]
local zero = {}
local pos, b, seen = 1, 0, 0
for _ = 1, #pairs / 8 do
    b, seen, pos = struct.unpack('<i4I4', pairs, pos)
    local n, slot = math.floor(b / @CHUNK@), '#' .. (b % @CHUNK@)
    local atime = redis.call('BITFIELD', gen .. 'a:' .. n, 'GET', 'u32', slot)[1]
    if atime <= seen then  -- else learnt or seen since it was read: kept
        local s = redis.call('BITFIELD', gen .. 's:' .. n, 'GET', 'u32', slot)[1]
        local h = redis.call('BITFIELD', gen .. 'h:' .. n, 'GET', 'u32', slot)[1]
        -- (a GET of a missing string reads 0 and makes nothing; a SET would make it)
        if s > 0 then redis.call('BITFIELD', gen .. 's:' .. n, 'SET', 'u32', slot, 0) end
        if h > 0 then redis.call('BITFIELD', gen .. 'h:' .. n, 'SET', 'u32', slot, 0) end
        if s > 0 or h > 0 then zero[#zero + 1] = struct.pack('<i4', b) end
    end
end
redis.call('HSET', KEYS[1], 'last_expiry', redis.call('TIME')[1])
if #zero == 0 then return 0 end
local delta = struct.pack('<i4i4i4', 0, 0, #zero) .. table.concat(zero)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', @LOG_MAX@, '*', 'seq', seq, 'delta', delta)
redis.call('HSET', KEYS[1], 'last_id', id)
redis.call('HINCRBY', KEYS[1], 'expired_total', #zero)
return #zero
"""

_SWITCH = """
-- KEYS: state; ARGV: generation, nspam, nham
if tonumber(ARGV[1]) <= tonumber(redis.call('HGET', KEYS[1], 'epoch')) then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'last_id', '0-0', 'nspam', ARGV[2], 'nham', ARGV[3])
return seq
"""


def _lua(text: str) -> str:
    return text.replace("@CHUNK@", str(_CHUNK)).replace("@LOG_MAX@", str(_LOG_MAX))


_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")

S = TypeVar("S", bound="RedisBayesStore")
P = ParamSpec("P")
R = TypeVar("R")
LogEntries = list[tuple[bytes, dict[bytes, bytes]]]


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


def _n_chunks(n_features: int) -> int:
    return -(-n_features // _CHUNK)


def _join_chunks(blobs: list[bytes | None], n_features: int) -> npt.NDArray[np.uint32]:
    """Count strings (GET replies, None for a missing key) as one array."""
    out = np.zeros(n_features, dtype=np.uint32)
    for n, blob in enumerate(blobs):
        if blob:
            values = np.frombuffer(blob[: 4 * min(_CHUNK, n_features - n * _CHUNK)], dtype=">u4")
            out[n * _CHUNK : n * _CHUNK + values.size] = values
    return out


class _State(NamedTuple):
    epoch: int
    seq: int
    last_id: str
    nspam: int
    nham: int


class RedisBayesStore(BayesStoreBase):
    """One process's handle on the Bayes store in Redis; see the module docstring. Not
    thread-safe; open one per process."""

    _batch_size = _BATCH

    def __init__(
        self,
        client: redis.Redis,
        url: str,
        prefix: str,
        config: BayesConfig,
        n_features: int,
        *,
        write_only: bool = False,
    ) -> None:
        super().__init__(config, n_features, write_only=write_only)
        self._r = client
        self.url = url
        self.prefix = prefix
        self._seq = -1
        self._epoch = -1
        self._last_id = "0-0"
        self._closed = False
        self._scripts: dict[str, Script] = {
            name: client.register_script(_lua(text))
            for name, text in (("apply", _APPLY), ("touch", _TOUCH), ("expire", _EXPIRE), ("switch", _SWITCH))
        }

    @property
    def backend(self) -> Literal["redis"]:
        return "redis"

    @property
    def where(self) -> str:
        return f"{_hidden_password(self.url)} {self.prefix}"

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, url: str, prefix: str, config: BayesConfig, *, timeout: float = 2.0, write_only: bool = False
    ) -> RedisBayesStore:
        """Open the store under ``prefix`` at ``url``, creating it if missing. Raises StateError
        when Redis cannot be reached, StoreError when the keys are not a store of this layout.
        ``write_only``: no counts are read or kept (`BayesStoreBase`).

        A store keeps the n_features it was created with, as the SQLite one does."""
        store = cls._open(url, prefix, config, timeout=timeout, create=True, write_only=write_only)
        assert store is not None
        return store

    @classmethod
    def open_existing(
        cls, url: str, prefix: str, config: BayesConfig, *, timeout: float = 2.0, write_only: bool = False
    ) -> RedisBayesStore | None:
        """`open`, or None (creating nothing) when nothing was ever learnt under ``prefix``."""
        return cls._open(url, prefix, config, timeout=timeout, create=False, write_only=write_only)

    @classmethod
    def _open(
        cls, url: str, prefix: str, config: BayesConfig, *, timeout: float, create: bool, write_only: bool
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
                        _INIT, 2, prefix + "meta", prefix + "state", SCHEMA_VERSION, TOKENIZER_VERSION,
                        config.n_features,
                    ),
                )  # fmt: skip
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
                store = cls(client, url, prefix, config, n_features, write_only=write_only)
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
            if self.upkeep:
                with contextlib.suppress(StateError, StoreInterrupted):
                    self._flush_touches()
            self._r.close()

    # -- keys and reading many of them -------------------------------------------------------------

    @property
    def _state_key(self) -> str:
        return self.prefix + "state"

    def _gen(self, epoch: int | None = None) -> str:
        """The key prefix of a generation (by default the current one)."""
        return f"{self.prefix}g{self._epoch if epoch is None else epoch}:"

    def _chunk_keys(self, gen: str, kind: str) -> list[str]:
        return [f"{gen}{kind}:{n}" for n in range(_n_chunks(self.n_features))]

    def _read_state(self, raw: list[bytes | None]) -> _State:
        if None in raw:
            raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
        epoch, seq, last_id, nspam, nham = cast(list[bytes], raw)
        return _State(int(epoch), int(seq), last_id.decode(), int(nspam), int(nham))

    def _current_epoch(self) -> int:
        epoch = self._r.hget(self._state_key, "epoch")
        if epoch is None:
            raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
        return int(cast(bytes, epoch))

    def _read_arrays(
        self, kinds: str, *, extra: Callable[[Any, str], None] | None = None
    ) -> tuple[_State, list[npt.NDArray[np.uint32]], list[Any]]:
        """The state and the count strings of ``kinds`` ("sh", "sha", ...) as of one change (one
        MULTI); ``extra(pipe, generation key prefix)`` queues more commands into it, whose
        replies come back last."""
        for _ in range(_RELOAD_TRIES):
            epoch = self._current_epoch()
            gen = self._gen(epoch)
            pipe = self._r.pipeline(transaction=True)
            pipe.hmget(self._state_key, _STATE_FIELDS)
            for kind in kinds:
                for key in self._chunk_keys(gen, kind):
                    pipe.get(key)
            if extra is not None:
                extra(pipe, gen)
            replies = pipe.execute()
            state = self._read_state(replies[0])
            if state.epoch != epoch:
                continue  # cleared or restored just now
            n = _n_chunks(self.n_features)
            arrays = [_join_chunks(replies[1 + i * n : 1 + (i + 1) * n], self.n_features) for i in range(len(kinds))]
            return state, arrays, replies[1 + len(kinds) * n :]
        raise StoreError(f"{self.where}: the store was cleared or restored again and again while being read")

    def _server_time(self) -> int:
        return int(self._r.time()[0])

    # -- the mirror ----------------------------------------------------------------------------------

    @_redis_errors
    def counts(self) -> tuple[int, int]:
        nspam, nham = cast(list[bytes | None], self._r.hmget(self._state_key, ["nspam", "nham"]))
        if nspam is None or nham is None:
            raise StoreError(f"{self.where}: the store's state is gone (were its keys deleted?)")
        return int(nspam), int(nham)

    @_redis_errors
    def refresh(self) -> None:
        self._check_pid()
        if self.write_only:
            self._epoch = self._current_epoch()  # the generation its writes go to
        else:
            self._catch_up_with_log()
        if self.upkeep and self._touch_flush_due():
            self._flush_touches()

    def _catch_up_with_log(self) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hmget(self._state_key, _STATE_FIELDS)
        pipe.xrange(self._gen() + "log", min="(" + self._last_id, count=_READ_CHUNK)
        raw, entries = pipe.execute()
        state = self._read_state(raw)
        if state.epoch != self._epoch or state.seq < self._seq or not self._catch_up(entries, state.seq):
            self._reload()
        else:
            self._nspam, self._nham = state.nspam, state.nham

    def _catch_up(self, entries: LogEntries, target: int) -> bool:
        """Apply log entries up to change ``target``; False on a gap (the log was trimmed past
        this process's position)."""
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
            entries = cast(LogEntries, self._r.xrange(self._gen() + "log", min="(" + self._last_id, count=_READ_CHUNK))
        return self._seq == target

    def _reload(self) -> None:
        """All counts as of the current change, from the count strings."""
        state, (spam, ham), _ = self._read_arrays("sh")
        self._spam, self._ham = spam.view(np.int32), ham.view(np.int32)
        self._totals()
        self._epoch, self._seq, self._last_id = state.epoch, state.seq, state.last_id
        self._nspam, self._nham = state.nspam, state.nham

    # -- writing -----------------------------------------------------------------------------------

    def _run_apply(
        self, writes: list[tuple[str, bytes, bytes, bytes]], inc: Triples, dec: Triples, d_spam: int, d_ham: int
    ) -> bool:
        """One learning/forgetting script; False when it must be planned again (a message changed
        since it was read, or the store was cleared or restored)."""
        gen = self._gen()
        args: list[Any] = [self._epoch, gen, len(writes), d_spam, d_ham, encode_delta(inc, dec, EMPTY_IDS)]
        for digest, version, klass, blob in writes:
            args += [digest, version, klass, blob]
        keys = [self._state_key, gen + "msgs", gen + "log"]
        with self.commit_guard:
            reply = cast(list[Any], self._scripts["apply"](keys=keys, args=args))
        if reply[0] == b"ok":
            return True
        if reply[0] == b"epoch":
            self.refresh()
        return False

    @_redis_errors
    def _learn_batch(self, batch: list[Hashed]) -> list[LearnResult]:
        self._check_pid()
        for _ in range(_CONFLICT_RETRIES):
            out: list[LearnResult] = []
            plan = LearnPlan(self.n_features)
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
                result, new_blob = plan.learn(hashes, is_spam, known[digest])
                out.append(result)
                if new_blob is None:
                    continue
                known[digest] = (is_spam, new_blob)
                final[digest] = (b"s" if is_spam else b"h", new_blob)
            if not final:
                return out
            writes = [(digest, versions[digest], klass, blob) for digest, (klass, blob) in final.items()]
            if self._run_apply(writes, aggregate(plan.inc), aggregate(plan.dec), plan.d_spam, plan.d_ham):
                self.refresh()
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
            plan = LearnPlan(self.n_features)
            plan.forget(klass == b"s", blob)
            forgotten = [(digest, version, b"", b"")]
            if self._run_apply(forgotten, EMPTY_TRIPLES, aggregate(plan.dec), plan.d_spam, plan.d_ham):
                self.refresh()
                return LearnResult.FORGOTTEN
        raise StoreError(f"{self.where}: gave up forgetting: other clients kept changing the same message")

    # -- maintenance ---------------------------------------------------------------------------------

    @_redis_errors
    def _flush_touches(self) -> None:
        """Write the atime of buckets scanned since the last flush (non-empty ones only)."""
        self._touched_since = time.monotonic()
        ids = self.take_seen_marks()
        for start in range(0, ids.size, _SCRIPT_CHUNK):
            chunk = ids[start : start + _SCRIPT_CHUNK].astype("<i4").tobytes()
            with self.commit_guard:
                self._scripts["touch"](keys=[self._state_key], args=[self._epoch, self._gen(), chunk])

    @_redis_errors
    def expire(self, max_tokens: int | None = None) -> int:
        limit = self.config.max_tokens if max_tokens is None else max_tokens
        self._check_pid()
        self._flush_touches()
        state, (spam, ham, atimes), _ = self._read_arrays("sha")
        ids = np.flatnonzero(spam | ham)
        excess = ids.size - limit
        if excess <= 0:
            self._r.hset(self._state_key, "last_expiry", self._server_time())
            return 0
        gen = self._gen(state.epoch)
        oldest = np.lexsort((ids, atimes[ids]))[:excess]  # by atime, then bucket, as SQLite's ORDER BY
        pairs = np.zeros(oldest.size, dtype=[("bucket", "<i4"), ("atime", "<u4")])
        pairs["bucket"], pairs["atime"] = ids[oldest], atimes[ids[oldest]]
        dropped = 0
        for start in range(0, pairs.size, _EXPIRE_CHUNK):
            self._raise_if_interrupted()
            chunk = pairs[start : start + _EXPIRE_CHUNK].tobytes()
            keys = [self._state_key, gen + "log"]
            n = int(self._scripts["expire"](keys=keys, args=[state.epoch, gen, chunk]))
            if n < 0:
                break  # cleared or restored meanwhile: nothing of this generation is left to expire
            dropped += n
        self.refresh()
        return dropped

    @_redis_errors
    def expiry_due(self) -> bool:
        last = self._r.hget(self._state_key, "last_expiry")
        return last is None or self._server_time() - int(cast(bytes, last)) >= self.config.expiry_period

    @_redis_errors
    def dump(self) -> dict[str, object]:
        self.refresh()
        state, (spam, ham, atimes), _ = self._read_arrays("sha")
        gen = self._gen(state.epoch)
        facts, meta = (
            {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], self._r.hgetall(key)).items()}
            for key in (self._state_key, self.prefix + "meta")
        )
        seen = atimes[(spam | ham) != 0]
        keys = [self._state_key, self.prefix + "meta", gen + "msgs", gen + "log"]
        keys += [key for kind in "sha" for key in self._chunk_keys(gen, kind)]
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
            "nspam": state.nspam,
            "nham": state.nham,
            "nmessages": int(self._r.hlen(gen + "msgs")),
            "ntokens": int(seen.size),
            "oldest_atime": int(seen.min()) if seen.size else None,
            "newest_atime": int(seen.max()) if seen.size else None,
            "last_expiry": int(facts["last_expiry"]),
            "expired_total": int(facts["expired_total"]),
            "seq": state.seq,
            "epoch": state.epoch,
            "size": size,
            "path": self.where,
            "backend": self.backend,
        }

    @_redis_errors
    def backup(self, out: IO[str]) -> None:
        copy = f"{self.prefix}tmp:{uuid.uuid4().hex}"

        def copy_messages(pipe: Any, gen: str) -> None:
            pipe.copy(gen + "msgs", copy, replace=True)
            pipe.pexpire(copy, _TEMP_TTL_MS)

        try:
            state, (spam, ham, atimes), _ = self._read_arrays("sha", extra=copy_messages)
            ids = np.flatnonzero(spam | ham).tolist()
            buckets = ((b, int(spam[b]), int(ham[b]), int(atimes[b])) for b in ids)
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
            rows = np.array(buckets, dtype=np.int64).reshape(-1, 4)
            columns = {kind: np.zeros(self.n_features, dtype=">u4") for kind in "sha"}
            for column, kind in enumerate("sha", start=1):
                columns[kind][rows[:, 0]] = rows[:, column]
            for n in range(_n_chunks(self.n_features)):
                part = slice(n * _CHUNK, (n + 1) * _CHUNK)
                if columns["s"][part].any() or columns["h"][part].any():
                    for kind in "sha":
                        pipe.set(f"{gen}{kind}:{n}", columns[kind][part].tobytes())
                if len(pipe) >= _PIPE_CHUNK:
                    pipe.execute()
            pipe.execute()
            switched = int(self._scripts["switch"](keys=[self._state_key], args=[generation, nspam, nham]))
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
