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

import hashlib
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


# One table for both engines, so a rule flag can never mean different things in each.
_FLAGS = {
    "i": (regex.IGNORECASE, hyperscan.HS_FLAG_CASELESS),
    "m": (regex.MULTILINE, hyperscan.HS_FLAG_MULTILINE),
    "s": (regex.DOTALL, hyperscan.HS_FLAG_DOTALL),
}


def compile_fallback(source: str, flags: str) -> regex.Pattern[str]:
    """Compile with the `regex` module (V0 = Perl-ish semantics); raises regex.error."""
    f = regex.ASCII | regex.V0
    for flag in flags:
        f |= _FLAGS[flag][0]
    return regex.compile(source, f)


def _hs_flags(flags: str) -> int:
    f = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8
    for flag in flags:
        f |= _FLAGS[flag][1]
    return int(f)


def hyperscan_accepts(source: str, flags: str) -> bool:
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=[source.encode("utf-8")], ids=[0], flags=[_hs_flags(flags)])
    except hyperscan.error:
        return False
    return True


def _cache_dir() -> Path | None:
    base = os.environ.get("FILTERD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "filterd"
    )
    path = Path(base) / "hyperscan"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def _compile_db(patterns: Sequence[CompiledPattern]) -> object | None:
    """Compile a Hyperscan database, or load it from the cache of earlier compilations.

    Compiling a large rule group takes a second or more; a reload or a test run that brings
    the same patterns again loads the serialised database in milliseconds. The key covers the
    patterns, their flags, the library version and the machine.
    """
    if not patterns:
        return None
    expressions = [p.source.encode("utf-8") for p in patterns]
    flags = [_hs_flags(p.flags) for p in patterns]
    key = hashlib.sha256(
        repr(
            (
                expressions,
                flags,
                hyperscan.__version__ if hasattr(hyperscan, "__version__") else "",
                platform.machine(),
                platform.python_version(),
            )
        ).encode()
    ).hexdigest()
    cache = _cache_dir()
    if cache is not None:
        try:
            db = hyperscan.loadb((cache / key).read_bytes(), hyperscan.HS_MODE_BLOCK)
            db.scratch = hyperscan.Scratch(db)
            return db
        except (OSError, hyperscan.error):
            pass
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    try:
        db.compile(expressions=expressions, ids=list(range(len(patterns))), flags=flags)
    except hyperscan.error:
        return None
    if cache is not None:
        try:
            tmp = cache / f"{key}.{os.getpid()}.tmp"
            tmp.write_bytes(hyperscan.dumpb(db))
            os.replace(tmp, cache / key)
        except OSError:
            pass
    return db


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
        accepted = list(patterns)
        db = _compile_db(accepted)
        if db is None:  # some pattern is refused: find which, one by one (slow, but only then)
            accepted = [p for p in patterns if hyperscan_accepts(p.source, p.flags)]
            self._fallback = [p for p in patterns if p not in accepted]
            db = _compile_db(accepted) if accepted else None
        self._db = db
        self._hs_names = [p.name for p in accepted] if db is not None else []
        if db is None:
            self._fallback = list(patterns)
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
