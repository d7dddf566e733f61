"""Greylisting: unknown mail is asked to come back later, as postgrey does for Postfix.

Protocol-free: the milter (at RCPT) and the Postfix policy service call `Greylist.decide` with
what they know and turn the `GreylistDecision` into a reply.

* A *triplet* is (client network, envelope sender, recipient): the client address masked to
  ``ipv4_prefix`` / ``ipv6_prefix`` (/24, /64: big senders retry from another host of the same
  farm), the sender normalised (below), the recipient lowercased.
* First sight: defer (``message``, 451 4.7.1) and remember when. A retry before ``delay`` has
  passed is deferred again, with the time left. A retry after it passes, and so does every later
  message of the triplet until it goes unseen for ``expiry``. A triplet whose retry does not come
  within ``retry_window`` of its first sight starts over.
* A client network whose retries have passed ``auto_whitelist_after`` times (each triplet
  counts once) is no longer greylisted while it keeps sending within ``expiry``
  (postgrey's --auto-whitelist-clients).
* Never greylisted: clients in ``exempt_networks``, in ``network.trusted_networks`` or on
  loopback; authenticated senders; senders the caller found on a welcome list; clients whose
  address is unknown.
* The null sender (bounces, DSNs) is greylisted like any other, with sender "": a real MTA
  retries its bounces; postgrey does the same.

Sender normalisation (``normalize_sender``) folds the parts of an address that change with
every message into one, so that a mailing list or a BATV-signing server is not greylisted
anew each time: lowercase; a BATV tag (``prvs=TAG=user``) dropped; the hash and timestamp of an
SRS address dropped; a ``+tag`` (subaddress, VERP) dropped; each run of digits replaced by ``#``.

Records (in the state store): ``grey:triplet:<net> <sender> <recipient>`` with ``first``,
``last`` (Unix times) and ``passed`` (0/1); ``grey:client:<net>`` with ``passes`` and ``last``.
Times are the caller's ``now``; store TTLs only clean up.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from filterd.engine.trust import in_networks
from filterd.state import StateStore, ip_block

if TYPE_CHECKING:
    from filterd.config import Config, GreylistConfig, Network

__all__ = ["Greylist", "GreylistDecision", "GreylistEntry", "normalize_sender"]

TRIPLET_PREFIX = "grey:triplet:"
CLIENT_PREFIX = "grey:client:"
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

_BATV = re.compile(r"(?:prvs|msprvs1|btv1)=[^=@]+=(.+)")
_SRS0 = re.compile(r"srs0=[^=]+=[^=]+=([^=]+)=(.+)")  # SRS0=hash=tt=domain=user
_SRS1 = re.compile(r"srs1=[^=]+=([^=]+)==[^=]+=[^=]+=([^=]+)=(.+)")  # SRS1=hash=fwd==hash=tt=domain=user
_DIGITS = re.compile(r"\d+")


def normalize_sender(address: str) -> str:
    """The sender as greylisting keys it; see the module docstring."""
    address = address.strip().strip("<>").lower()
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    if m := _BATV.fullmatch(local):
        local = m[1]
    srs = ""
    if m := _SRS0.fullmatch(local):
        srs, local = f"srs0={m[1]}=", m[2]
    elif m := _SRS1.fullmatch(local):
        srs, local = f"srs1={m[1]}=={m[2]}=", m[3]
    local = local.partition("+")[0] or local
    return f"{srs}{_DIGITS.sub('#', local)}@{domain}"


@dataclass(frozen=True, slots=True)
class GreylistDecision:
    """What to do with one recipient: pass it, defer it (answer ``reply``), or it is exempt."""

    action: Literal["pass", "defer", "exempt"]
    reason: str
    delay_left: float = 0.0  # defer: seconds until a retry would pass
    reply: str = ""  # defer: the SMTP reply, "451 4.7.1 ..."
    delayed: float = 0.0  # pass: seconds the triplet was held back, on its first pass only (X-Greylist)

    @property
    def deferred(self) -> bool:
        return self.action == "defer"


@dataclass(frozen=True, slots=True)
class GreylistEntry:
    """One remembered triplet, for listings."""

    client: str  # the client network, "192.0.2.0/24"
    sender: str  # normalised
    recipient: str
    first: float
    last: float
    passed: bool

    @property
    def key(self) -> str:
        return f"{TRIPLET_PREFIX}{self.client} {self.sender} {self.recipient}"


class Greylist:
    """Greylisting decisions over a state store; see the module docstring."""

    def __init__(self, config: GreylistConfig, store: StateStore, *, trusted_networks: Sequence[Network] = ()) -> None:
        self.config = config
        self.store = store
        self._exempt = (*_LOOPBACK, *trusted_networks, *config.exempt_networks)

    @classmethod
    def from_config(cls, config: Config, store: StateStore) -> Greylist:
        return cls(config.greylist, store, trusted_networks=config.network.trusted_networks)

    def triplet_key(self, client_ip: str, sender: str, recipient: str) -> str | None:
        """The store key of a triplet; None when the client address is not an IP address."""
        block = ip_block(client_ip, self.config.ipv4_prefix, self.config.ipv6_prefix)
        if block is None:
            return None
        sender = normalize_sender(sender) if self.config.normalize_sender else sender.strip().strip("<>").lower()
        return f"{TRIPLET_PREFIX}{block} {sender} {recipient.strip().strip('<>').lower()}"

    async def decide(
        self,
        client_ip: str,
        sender: str,
        recipient: str,
        *,
        now: float | None = None,
        authenticated: bool = False,
        welcomelisted: bool = False,
    ) -> GreylistDecision:
        """Decide for one RCPT. ``now`` (Unix time) defaults to the clock. Raises StateError when
        the store fails (the caller chooses: most sites let mail through then)."""
        cfg = self.config
        if not cfg.enabled:
            return GreylistDecision("exempt", "greylisting is off")
        if authenticated:
            return GreylistDecision("exempt", "authenticated sender")
        if welcomelisted:
            return GreylistDecision("exempt", "sender is welcome-listed")
        key = self.triplet_key(client_ip, sender, recipient)
        if key is None:
            return GreylistDecision("exempt", f"client address {client_ip!r} unknown")
        if in_networks(client_ip, self._exempt):
            return GreylistDecision("exempt", f"client {client_ip} is in an exempt or trusted network")
        now = time.time() if now is None else now
        block = key[len(TRIPLET_PREFIX) :].partition(" ")[0]
        client_key = CLIENT_PREFIX + block
        if cfg.auto_whitelist_after:
            client = await self.store.get_fields(client_key)
            if client is not None:
                passes = float(client.get("passes", "0"))
                if passes >= cfg.auto_whitelist_after and now - float(client.get("last", "0")) <= cfg.expiry:
                    await self.store.set_fields(client_key, {"last": now}, ttl=cfg.expiry)
                    return GreylistDecision("pass", f"client {block} auto-whitelisted after {passes:.0f} retries")

        record = await self.store.get_fields(key)
        if record is not None:
            first, last = float(record["first"]), float(record["last"])
            passed = record.get("passed") == "1"
            if passed and now - last <= cfg.expiry:
                await self.store.set_fields(key, {"last": now}, ttl=cfg.expiry)
                return GreylistDecision("pass", "triplet known")
            if not passed and now - first <= cfg.retry_window:
                waited = now - first
                if waited < cfg.delay:
                    await self.store.set_fields(key, {"last": now})
                    left = cfg.delay - waited
                    return GreylistDecision("defer", f"retried too early, {left:.0f}s left", left, cfg.message)
                await self.store.set_fields(key, {"last": now, "passed": 1}, ttl=cfg.expiry)
                if cfg.auto_whitelist_after:
                    await self.store.incr_fields(client_key, {"passes": 1}, ttl=cfg.expiry)
                    await self.store.set_fields(client_key, {"last": now})
                return GreylistDecision("pass", f"retried after {waited:.0f}s", delayed=waited)
        # First sight (or forgotten: not seen within expiry, or no retry within retry_window).
        await self.store.set_fields(key, {"first": now, "last": now, "passed": 0}, ttl=cfg.retry_window)
        return GreylistDecision("defer", "first seen", cfg.delay, cfg.message)

    async def entries(self) -> AsyncIterator[GreylistEntry]:
        """Every remembered triplet, in no particular order."""
        async for key, fields in self.store.scan(TRIPLET_PREFIX):
            client, _, rest = key[len(TRIPLET_PREFIX) :].partition(" ")
            sender, _, recipient = rest.rpartition(" ")
            yield GreylistEntry(
                client, sender, recipient, float(fields.get("first", "0")), float(fields.get("last", "0")),
                fields.get("passed") == "1",
            )  # fmt: skip

    async def remove(self, client_ip_or_net: str) -> int:
        """Forget every triplet (and the auto-whitelist count) of a client network; returns how many
        records went. ``client_ip_or_net`` is an address (masked as configured) or a network."""
        block = ip_block(client_ip_or_net.partition("/")[0], self.config.ipv4_prefix, self.config.ipv6_prefix)
        if "/" in client_ip_or_net:
            block = str(ipaddress.ip_network(client_ip_or_net, strict=False))
        if block is None:
            raise ValueError(f"not an IP address or network: {client_ip_or_net!r}")
        keys = [key async for key, _ in self.store.scan(f"{TRIPLET_PREFIX}{block} ")]
        removed = 0
        for key in [*keys, CLIENT_PREFIX + block]:
            removed += await self.store.delete(key)
        return removed
