"""Sender reputation, SpamAssassin's AWL/TxRep idea: rule REPUTATION pulls a message's score
toward the mean score of earlier mail from the same sender and network.

The history is kept per (sender address, originating network): the From address (the
envelope sender when From has none), lowercased, because that is what a recipient trusts and
what stays the same across a correspondent's messages (the envelope sender of list mail changes
with each); and the network of the last external relay (the client the MTA saw, else the
trust path's), masked to ``ipv4_prefix``/``ipv6_prefix`` (/16, /48), so that a forger using a
known address from elsewhere does not inherit its reputation. "none" when no relay is known.

For a message scoring *s* whose history holds *n* > 0 messages of mean *m*, REPUTATION scores
``(m - s) * factor``; then *s* (without that delta) joins the history, in one atomic increment.
No history: no hit, only the record. Skipped when a welcome or block list decided
(USER_IN_WELCOMELIST, USER_IN_BLOCKLIST), when a rule flagged ``noawl`` fired, or without a
sender. Scans marked ``no_autolearn`` (one-off `filterd check`, evaluations) read the history
but do not add to it.

The store (`filterd.state`) is opened on first use, in the worker that scans (never before the
daemon forks); with the SQLite backend and no state directory the check stays silent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from filterd.config import Config
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.trust import trust_path_of
from filterd.state import StateStore, ip_block, open_state_store

__all__ = [
    "ReputationCheck",
    "ReputationEntry",
    "forget_reputation",
    "reputation_key",
    "reputation_of",
]

KEY_PREFIX = "rep:"
DECIDED_BY_LISTS = frozenset({"USER_IN_WELCOMELIST", "USER_IN_BLOCKLIST"})


def reputation_key(address: str, block: str) -> str:
    """The store key of one history: ``rep:<address> <network>``."""
    return f"{KEY_PREFIX}{address.strip().lower()} {block}"


@dataclass(frozen=True, slots=True)
class ReputationEntry:
    """One sender's history from one network."""

    address: str
    block: str  # "192.0.2.0/16", or "none"
    count: int
    total: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


async def reputation_of(store: StateStore, address: str) -> list[ReputationEntry]:
    """Every history of ``address`` (one per network), sorted by network."""
    prefix = reputation_key(address, "")
    found = []
    async for key, fields in store.scan(prefix):
        found.append(
            ReputationEntry(
                key[len(KEY_PREFIX) :].rpartition(" ")[0],
                key[len(prefix) :],
                round(float(fields.get("count", "0"))),
                float(fields.get("total", "0")),
            )
        )
    return sorted(found, key=lambda e: e.block)


async def forget_reputation(store: StateStore, address: str) -> int:
    """Delete every history of ``address``; returns how many there were."""
    keys = [key async for key, _ in store.scan(reputation_key(address, ""))]
    removed = 0
    for key in keys:
        removed += await store.delete(key)
    return removed


def _sender(scan: Scan) -> str:
    found = next((addr for _, addr in scan.message.addresses("from") if addr), "")
    if not found:
        found = scan.ctx.mail_from if scan.ctx.mail_from is not None else scan.message.get("return-path")
    return found.strip().strip("<>").strip().lower()


class ReputationCheck:
    """REPUTATION from the sender's history; see the module docstring."""

    name: ClassVar[str] = "reputation"
    stage: ClassVar[Stage] = Stage.POST
    autolearn_side: ClassVar[AutolearnSide] = ""
    emits: ClassVar[frozenset[str]] = frozenset({"REPUTATION"})

    def __init__(self, setup: CheckSetup) -> None:
        self.config: Config = setup.config
        self.settings = setup.config.reputation
        self.state_dir = setup.state_dir or setup.config.state_dir
        self.active = self.settings.enabled and (self.config.state.backend == "redis" or bool(self.state_dir))
        self._store: StateStore | None = None
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def store(self) -> StateStore:
        """The store, opened on first use in this process (and, for Redis, this event loop)."""
        loop = asyncio.get_running_loop()
        stale = self._pid != os.getpid() or (self._store is not None and self._store.backend == "redis"
                                             and self._loop is not loop)  # fmt: skip
        if self._store is None or stale:
            # A store left behind by the parent process or a finished loop is not ours to close.
            self._store = open_state_store(self.config, self.state_dir)
            self._pid = os.getpid()
            self._loop = loop
        return self._store

    def originating_block(self, scan: Scan) -> str:
        relay = trust_path_of(scan, self.config.network).last_external
        ip = relay.ip if relay is not None else scan.ctx.client_ip
        return ip_block(ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix) or "none"

    async def run(self, scan: Scan) -> Sequence[Hit]:
        if not self.active or DECIDED_BY_LISTS.intersection(scan.hits):
            return ()
        if any("noawl" in info.tflags for name in scan.hits if (info := scan.rules.get(name)) is not None):
            return ()
        address = _sender(scan)
        if not address:
            return ()
        block = self.originating_block(scan)
        key = reputation_key(address, block)
        score = scan.score_so_far
        store = self.store()
        if scan.ctx.no_autolearn:
            fields = await store.get_fields(key) or {}
            count, total = float(fields.get("count", "0")), float(fields.get("total", "0"))
        else:
            after = await store.incr_fields(key, {"count": 1, "total": score}, ttl=self.settings.expiry)
            count, total = after["count"] - 1, after["total"] - score
        if count < 1:
            return ()
        mean = total / count
        delta = round((mean - score) * self.settings.factor, 3) + 0.0  # + 0.0: no "-0.0" in reports
        messages = "message" if count == 1 else "messages"
        detail = f"mean {mean:.1f} over {count:.0f} {messages} from {address} / {block}"
        return [Hit("REPUTATION", detail, score=delta)]

    async def aclose(self) -> None:
        """Close the store (a worker on its way out; tests)."""
        store, self._store = self._store, None
        if store is not None and self._pid == os.getpid():
            await store.close()
