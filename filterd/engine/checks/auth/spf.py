"""SPF (RFC 7208) with pyspf, its DNS answered by the shared resolver.

pyspf is synchronous and does its own lookups. `ResolverSpfQuery` overrides its one DNS method
so that every lookup goes through `Resolver.query_from_thread` (our nameservers, cache and time
limits, never the system resolver), and `check_spf` runs a whole evaluation in a worker thread
so the event loop never waits on it. pyspf's RFC 7208 §4.6.4 limits stay in force: 10 lookups
by DNS mechanisms and 10 MX or PTR names (its own code), 2 void lookups (re-applied here, since
pyspf counts them in the method we replace).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import spf

from filterd.net.dns import DnsAnswer

__all__ = ["RESULTS", "ResolverSpfQuery", "SpfResult", "check_spf"]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# A domain name SPF can be evaluated for: two labels or more, the last not numeric (RFC 7208 §4.3
# says a malformed domain gives "none"; an address literal HELO is not checked, §2.3).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z)(?:{_LABEL}\.)+[A-Za-z][A-Za-z0-9-]{{0,62}}\Z")

Lookup = Callable[[str, str, float], DnsAnswer]
"""(name, rdtype, seconds allowed) -> answer; called from the worker thread."""


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One SPF evaluation: ``result`` is one of `RESULTS`."""

    identity: Literal["mailfrom", "helo"]
    result: str
    sender: str  # the address checked: the envelope sender, or postmaster@HELO
    domain: str  # the domain whose policy was evaluated
    ip: str
    explanation: str = ""


class ResolverSpfQuery(spf.query):  # type: ignore[misc]  # pyspf has no type hints
    """A pyspf query whose DNS lookups go through ``lookup`` and stop at ``deadline``."""

    def __init__(
        self,
        ip: str,
        sender: str,
        helo: str,
        *,
        lookup: Lookup,
        deadline: float,
        timeout: float,
        receiver: str = "",
        cancelled: threading.Event | None = None,
    ) -> None:
        super().__init__(ip, sender, helo, receiver=receiver or None, strict=True)
        self._lookup = lookup
        self._deadline = deadline  # time.monotonic()
        self._timeout = timeout
        self._cancelled = cancelled or threading.Event()

    def dns(self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False) -> list[Any]:
        """Records of ``name`` in the shapes pyspf expects: A/AAAA and PTR as text, MX as
        (preference, exchange), TXT as a list of byte strings per record. CNAMEs are followed
        by the resolver. Failures raise `spf.TempError`; too many empty answers `spf.PermError`."""
        name = str(name).rstrip(".").lower()
        labels = name.split(".")
        if not name or not all(0 < len(label) < 64 for label in labels):
            return []  # not a valid DNS name: pyspf treats it as no data
        remaining = self._deadline - time.monotonic()
        if self._cancelled.is_set() or remaining <= 0:
            raise spf.TempError("DNS: no time left for SPF lookups")
        try:
            answer = self._lookup(name, qtype, min(self._timeout, remaining))
        except (TimeoutError, RuntimeError) as exc:  # the loop did not answer in time, or is gone
            raise spf.TempError(f"DNS {name} {qtype}: {type(exc).__name__}") from exc
        if answer.temporary:
            raise spf.TempError(f"DNS {name} {qtype}: {answer.status} {answer.detail}".rstrip())
        result = [_shape(qtype, record) for record in answer.records] if answer.ok else []
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _shape(qtype: str, record: str) -> Any:
    if qtype in ("TXT", "SPF"):
        return [record.encode("utf-8")]  # one record's strings, already joined
    if qtype == "MX":
        preference, _, exchange = record.partition(" ")
        return (int(preference), exchange.rstrip("."))
    if qtype == "PTR":
        return record.rstrip(".")
    return record


def check_spf(
    ip: str,
    sender: str,
    helo: str,
    *,
    lookup: Lookup,
    deadline: float,
    timeout: float,
    receiver: str = "",
    cancelled: threading.Event | None = None,
) -> SpfResult:
    """Evaluate SPF for ``sender`` ("" = the null sender: the HELO identity, RFC 7208 §2.4)
    connecting from ``ip``. Blocking: run it in a worker thread."""
    domain = (sender.rpartition("@")[2] if sender else helo).rstrip(".")
    if not _DOMAIN.match(domain):
        kind: Literal["mailfrom", "helo"] = "mailfrom" if sender else "helo"
        return SpfResult(kind, "none", sender or f"postmaster@{helo}", domain, ip, "not a domain name")
    try:
        query = ResolverSpfQuery(
            ip, sender, helo, lookup=lookup, deadline=deadline, timeout=timeout, receiver=receiver, cancelled=cancelled
        )
    except spf.PermError as exc:  # an unreadable client address
        return SpfResult("helo" if not sender else "mailfrom", "permerror", sender, "", ip, str(exc))
    identity: Literal["mailfrom", "helo"] = "helo" if query.ident == "helo" else "mailfrom"
    result, _code, explanation = query.check()
    if result not in RESULTS:  # "ambiguous" exists only in pyspf's harsh mode, not used here
        result = "permerror"
    return SpfResult(identity, str(result), str(query.s), str(query.o), ip, str(explanation))
