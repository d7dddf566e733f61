"""Welcome and block lists of sender addresses, global and per user.

Patterns are globs with `*` and `?` only, matched case-insensitively against the whole
address. The addresses looked at are Resent-From when present (the last hop that resent the
message speaks for it), else From and the envelope sender (Return-Path when the caller did not
say). Per-user lists come from the user's settings file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

from filterd.engine.plugin import CheckSetup, Hit, Scan, Stage

__all__ = ["ListsCheck", "compile_globs"]


@functools.lru_cache(maxsize=1024)
def compile_globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for a list of address globs (None for an empty list)."""
    parts = []
    for glob in patterns:
        glob = glob.strip().lower()
        if glob:
            parts.append("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob))
    return re.compile("(?:" + "|".join(parts) + r")\Z") if parts else None


def _addresses(scan: Scan) -> list[str]:
    msg = scan.message
    resent = [a for _, a in msg.addresses("resent-from") if a]
    if resent:
        return [a.lower() for a in resent]
    found = [a.lower() for _, a in msg.addresses("from") if a]
    envelope = scan.ctx.mail_from
    if envelope is None:
        envelope = msg.get("return-path").strip().strip("<>")
    if envelope:
        found.append(envelope.lower())
    return found


def _first_match(rx: re.Pattern[str] | None, addresses: Iterable[str]) -> str | None:
    if rx is None:
        return None
    return next((a for a in addresses if rx.match(a)), None)


class ListsCheck:
    """USER_IN_WELCOMELIST / USER_IN_BLOCKLIST from the global and the user's own lists."""

    name: ClassVar[str] = "lists"
    stage: ClassVar[Stage] = Stage.HEADERS
    emits: ClassVar[frozenset[str]] = frozenset({"USER_IN_WELCOMELIST", "USER_IN_BLOCKLIST"})

    def __init__(self, setup: CheckSetup) -> None:
        self._welcome = tuple(setup.config.lists.welcomelist_from)
        self._block = tuple(setup.config.lists.blocklist_from)

    def run(self, scan: Scan) -> Sequence[Hit]:
        prefs = scan.ctx.prefs
        welcome = self._welcome + (prefs.welcomelist_from if prefs else ())
        block = self._block + (prefs.blocklist_from if prefs else ())
        if not welcome and not block:
            return ()
        addresses = _addresses(scan)
        hits = []
        found = _first_match(compile_globs(block), addresses)
        if found:
            hits.append(Hit("USER_IN_BLOCKLIST", f"sender {found}"))
        found = _first_match(compile_globs(welcome), addresses)
        if found:
            hits.append(Hit("USER_IN_WELCOMELIST", f"sender {found}"))
        return hits
