"""The shared state store: Redis, for several filterd machines (or one that already runs Redis).

A record is a Redis hash under ``key_prefix + key``; expiry is Redis's own (``PEXPIRE``), so
nothing needs sweeping. Writes are ``HSET`` and ``PEXPIRE`` in one ``MULTI``/``EXEC``
transaction. Increments are a Lua script (atomic in Redis): it checks every field is a number
before ``HINCRBYFLOAT``-ing any, since a transaction would apply the other commands of a
``MULTI`` when one fails; two increments never lose one another.

The client (and its connection pool) is made on first use, inside the event loop that uses
it and after the daemon has forked; it belongs to that loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Literal, TypeVar, cast

import redis.asyncio
import redis.exceptions
from redis.commands.core import AsyncScript

from filterd.errors import StateError
from filterd.state.base import FieldValue, text_fields

__all__ = ["RedisStateStore"]

T = TypeVar("T")

# KEYS[1]: the record; ARGV[1]: ttl in ms (0 = leave the expiry); ARGV[2], ARGV[3], ...: field, delta.
_INCR_SCRIPT = """
for i = 2, #ARGV, 2 do
    local value = redis.call('HGET', KEYS[1], ARGV[i])
    if value and not tonumber(value) then
        return redis.error_reply('field ' .. ARGV[i] .. ' is not a number: ' .. value)
    end
end
local out = {}
for i = 2, #ARGV, 2 do
    out[#out + 1] = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return out
"""
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_SCAN_COUNT = 500
_MAX_CONNECTIONS = 16  # per store, i.e. per worker process


class RedisStateStore:
    """`filterd.state.StateStore` on a Redis server; see the module docstring."""

    def __init__(self, url: str, *, key_prefix: str = "filterd:", timeout: float = 2.0) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.timeout = timeout
        self._client: redis.asyncio.Redis | None = None
        self._incr: AsyncScript | None = None
        self._pid = 0
        self._closed = False

    @property
    def backend(self) -> Literal["redis"]:
        return "redis"

    def _redis(self) -> redis.asyncio.Redis:
        if self._closed:
            raise StateError(f"state store {self._where} is closed")
        if self._client is None or self._pid != os.getpid():
            # A client inherited over fork shares its sockets with the parent: never used here.
            # A bounded pool that makes callers wait their turn (up to the timeout) rather than
            # fail when a burst of scans wants more connections than it holds.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url,
                max_connections=_MAX_CONNECTIONS,
                timeout=self.timeout,
                decode_responses=True,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
            self._client = redis.asyncio.Redis.from_pool(pool)
            self._incr = self._client.register_script(_INCR_SCRIPT)
            self._pid = os.getpid()
        return self._client

    @property
    def _where(self) -> str:
        return re.sub(r"//[^@/]*@", "//***@", self.url)  # no password in messages

    async def _do(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            if isinstance(exc, redis.exceptions.ResponseError) and "is not a number" in str(exc):
                raise ValueError(str(exc)) from exc
            raise StateError(f"state store {self._where}: {type(exc).__name__}: {exc}") from exc

    # -- the interface --------------------------------------------------------------------------

    async def get_fields(self, key: str) -> dict[str, str] | None:
        found = await self._do(self._redis().hgetall(self.key_prefix + key))
        return cast(dict[str, str], found) or None

    async def set_fields(self, key: str, fields: Mapping[str, FieldValue], *, ttl: float | None = None) -> None:
        values = text_fields(fields)
        name = self.key_prefix + key
        pipe = self._redis().pipeline(transaction=True)
        pipe.hset(name, mapping=cast(Mapping[Any, Any], values))
        if ttl is not None:
            pipe.pexpire(name, _milliseconds(ttl))
        await self._do(pipe.execute())

    async def incr_fields(self, key: str, deltas: Mapping[str, float], *, ttl: float | None = None) -> dict[str, float]:
        if not deltas:
            raise ValueError("expected at least one field")
        self._redis()
        assert self._incr is not None
        args: list[str | int | float] = [_milliseconds(ttl) if ttl is not None else 0]
        for field_name, delta in deltas.items():
            args += [field_name, delta]
        replies = await self._do(self._incr(keys=[self.key_prefix + key], args=args))
        return {field_name: float(value) for field_name, value in zip(deltas, replies, strict=False)}

    async def delete(self, key: str) -> bool:
        removed: int = await self._do(self._redis().delete(self.key_prefix + key))
        return removed > 0

    async def scan(self, prefix: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
        client = self._redis()
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self.key_prefix + prefix) + "*"
        cursor: int = 0
        while True:
            cursor, names = await self._do(client.scan(cursor, match=pattern, count=_SCAN_COUNT))
            if names:
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(name)
                records = await self._do(pipe.execute())
                for name, fields in zip(names, records, strict=True):
                    if fields:  # expired or deleted since SCAN saw it
                        yield cast(str, name)[len(self.key_prefix) :], cast(dict[str, str], fields)
            if cursor == 0:
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            await client.aclose()


def _milliseconds(ttl: float) -> int:
    if ttl <= 0:
        raise ValueError(f"expected a positive ttl, got {ttl!r}")
    return max(1, round(ttl * 1000))
