"""Matching many regexes against one text in one pass.

Every pattern that Hyperscan accepts goes into one Hyperscan database per target text (body,
URIs, the Subject header, ...): one scan reports every rule that matches, in linear time, so
those rules cannot backtrack catastrophically. The few patterns Hyperscan refuses
(back-references, look-arounds) run on the `regex` module with a per-rule time limit: a rule
that runs over it is stopped and reported, never allowed to hang the scan.

Both engines see the same flags (i, m, s) and ASCII-only \\w, \\b, \\d, \\s, so a pattern means
the same thing whichever engine runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import hyperscan
import regex

__all__ = ["CompiledPattern", "MultiMatcher", "PatternTimeout"]

log = logging.getLogger(__name__)


class PatternTimeout(Exception):
    """A fallback pattern ran past its time limit."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    """A rule pattern with its fallback-engine compilation (used for counts and verification)."""

    name: str
    source: str
    flags: str
    rx: regex.Pattern[str]


def compile_fallback(source: str, flags: str) -> regex.Pattern[str]:
    """Compile with the `regex` module (V0 = Perl-ish semantics); raises regex.error."""
    f = regex.ASCII | regex.V0
    if "i" in flags:
        f |= regex.IGNORECASE
    if "m" in flags:
        f |= regex.MULTILINE
    if "s" in flags:
        f |= regex.DOTALL
    return regex.compile(source, f)


def _hs_flags(flags: str) -> int:
    f = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8
    if "i" in flags:
        f |= hyperscan.HS_FLAG_CASELESS
    if "m" in flags:
        f |= hyperscan.HS_FLAG_MULTILINE
    if "s" in flags:
        f |= hyperscan.HS_FLAG_DOTALL
    return f


def hyperscan_accepts(source: str, flags: str) -> bool:
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=[source.encode("utf-8")], ids=[0], flags=[_hs_flags(flags)])
    except hyperscan.error:
        return False
    return True


@dataclass(slots=True)
class MultiMatcher:
    """All the patterns of one target text. ``match`` returns the names that matched."""

    patterns: list[CompiledPattern]
    timeout: float
    _db: object | None = None
    _hs_names: list[str] = field(default_factory=list)
    _fallback: list[CompiledPattern] = field(default_factory=list)

    @classmethod
    def build(cls, patterns: Sequence[CompiledPattern], timeout: float) -> MultiMatcher:
        self = cls(list(patterns), timeout)
        accepted: list[CompiledPattern] = []
        for p in patterns:
            if hyperscan_accepts(p.source, p.flags):
                accepted.append(p)
            else:
                self._fallback.append(p)
        if accepted:
            db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            db.compile(
                expressions=[p.source.encode("utf-8") for p in accepted],
                ids=list(range(len(accepted))),
                flags=[_hs_flags(p.flags) for p in accepted],
            )
            self._db = db
            self._hs_names = [p.name for p in accepted]
        return self

    @property
    def fallback_names(self) -> list[str]:
        return [p.name for p in self._fallback]

    def match(self, text: str, timeouts: list[str] | None = None) -> set[str]:
        """Names of the patterns that match ``text``. Timed-out fallback patterns are
        appended to ``timeouts`` (and count as not matching)."""
        found: set[str] = set()
        if not text:
            # Hyperscan rejects empty input in some builds; the fallback engine decides.
            for p in self.patterns:
                if p.rx.search(text) is not None:
                    found.add(p.name)
            return found
        if self._db is not None:
            names = self._hs_names

            def on_match(pid: int, start: int, end: int, flags: int, ctx: object) -> None:
                found.add(names[pid])

            self._db.scan(text.encode("utf-8", "replace"), match_event_handler=on_match)  # type: ignore[attr-defined]
        for p in self._fallback:
            try:
                if p.rx.search(text, timeout=self.timeout) is not None:
                    found.add(p.name)
            except TimeoutError:
                log.warning("rule %s stopped after %.0f ms", p.name, self.timeout * 1000)
                if timeouts is not None:
                    timeouts.append(p.name)
        return found
