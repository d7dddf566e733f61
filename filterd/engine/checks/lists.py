"""Welcome and block lists of sender addresses and client networks, global and per user.

Patterns are globs with `*` and `?` only, matched case-insensitively against the whole
address. The addresses looked at are Resent-From when present (the last hop that resent the
message speaks for it), else From and the envelope sender (Return-Path when the caller did not
say). Per-user lists come from the user's settings file.

``welcomelist_auth`` entries count only when the sender's domain is authenticated: SPF passed
for the envelope sender's domain, or a valid DKIM signature of the address's domain (or a
parent of it). That needs the auth check's results, so `AuthListsCheck` runs after it.

Network lists judge the client: the connection the caller saw when it is external, else the
last external relay of the trust path. A milter asks at connect (`ConnectListsCheck`, global
lists only: the user is not known yet); otherwise `ListsCheck` does it with the headers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

from filterd.config import Network
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.trust import connection_trust_path, in_networks, trust_path_of

__all__ = ["AuthListsCheck", "ConnectListsCheck", "ListsCheck", "compile_globs"]

# scan.facts key: the client IP the network lists were already applied to at connect.
_CONNECT_DONE = "lists_connect_ip"


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


def _network_hits(ip: str, welcome: Sequence[Network], block: Sequence[Network]) -> list[Hit]:
    hits = []
    if in_networks(ip, block):
        hits.append(Hit("CLIENT_IN_BLOCKLIST", f"client {ip}"))
    if in_networks(ip, welcome):
        hits.append(Hit("CLIENT_IN_WELCOMELIST", f"client {ip}"))
    return hits


class ListsCheck:
    """USER_IN_* and CLIENT_IN_* from the global and the user's own lists."""

    name: ClassVar[str] = "lists"
    stage: ClassVar[Stage] = Stage.HEADERS
    autolearn_side: ClassVar[AutolearnSide] = ""
    emits: ClassVar[frozenset[str]] = frozenset(
        {"USER_IN_WELCOMELIST", "USER_IN_BLOCKLIST", "CLIENT_IN_WELCOMELIST", "CLIENT_IN_BLOCKLIST"}
    )

    def __init__(self, setup: CheckSetup) -> None:
        lists = setup.config.lists
        self._network = setup.config.network
        self._welcome = tuple(lists.welcomelist_from)
        self._block = tuple(lists.blocklist_from)
        self._welcome_ip = tuple(lists.welcomelist_ip)
        self._block_ip = tuple(lists.blocklist_ip)

    def run(self, scan: Scan) -> Sequence[Hit]:
        prefs = scan.ctx.prefs
        welcome = self._welcome + (prefs.welcomelist_from if prefs else ())
        block = self._block + (prefs.blocklist_from if prefs else ())
        hits = []
        if welcome or block:
            addresses = _addresses(scan)
            found = _first_match(compile_globs(block), addresses)
            if found:
                hits.append(Hit("USER_IN_BLOCKLIST", f"sender {found}"))
            found = _first_match(compile_globs(welcome), addresses)
            if found:
                hits.append(Hit("USER_IN_WELCOMELIST", f"sender {found}"))
        user_welcome_ip = prefs.welcomelist_ip if prefs else ()
        user_block_ip = prefs.blocklist_ip if prefs else ()
        done_at_connect = scan.facts.get(_CONNECT_DONE)
        # The global network lists were applied at connect already; the user's are only known now.
        welcome_ip = (() if done_at_connect else self._welcome_ip) + user_welcome_ip
        block_ip = (() if done_at_connect else self._block_ip) + user_block_ip
        if welcome_ip or block_ip:
            relay = trust_path_of(scan, self._network).last_external
            if relay is not None:
                hits += _network_hits(relay.ip, welcome_ip, block_ip)
        return hits


class ConnectListsCheck:
    """The global network lists at connect, when a milter or MTA names an external client."""

    name: ClassVar[str] = "lists_connect"
    stage: ClassVar[Stage] = Stage.CONNECT
    autolearn_side: ClassVar[AutolearnSide] = ""
    emits: ClassVar[frozenset[str]] = frozenset({"CLIENT_IN_WELCOMELIST", "CLIENT_IN_BLOCKLIST"})

    def __init__(self, setup: CheckSetup) -> None:
        self._network = setup.config.network
        self._welcome_ip = tuple(setup.config.lists.welcomelist_ip)
        self._block_ip = tuple(setup.config.lists.blocklist_ip)

    def run(self, scan: Scan) -> Sequence[Hit]:
        ctx = scan.ctx
        # With the message already known (spamd, `filterd check`), ListsCheck does it all.
        if scan.msg is not None or not ctx.client_ip or not (self._welcome_ip or self._block_ip):
            return ()
        if connection_trust_path(scan, self._network).last_external is None:
            return ()  # an internal client relaying: the headers will say who is behind it
        scan.facts[_CONNECT_DONE] = ctx.client_ip
        return _network_hits(ctx.client_ip, self._welcome_ip, self._block_ip)


class AuthListsCheck:
    """welcomelist_auth: a listed sender whose domain SPF or DKIM vouches for."""

    name: ClassVar[str] = "lists_auth"
    stage: ClassVar[Stage] = Stage.POST  # after the auth check has left its results in scan.facts
    autolearn_side: ClassVar[AutolearnSide] = ""
    emits: ClassVar[frozenset[str]] = frozenset({"USER_IN_WELCOMELIST"})

    def __init__(self, setup: CheckSetup) -> None:
        self._globs = tuple(setup.config.lists.welcomelist_auth)

    def run(self, scan: Scan) -> Sequence[Hit]:
        prefs = scan.ctx.prefs
        globs = self._globs + (prefs.welcomelist_auth if prefs else ())
        rx = compile_globs(globs)
        if rx is None or "USER_IN_WELCOMELIST" in scan.hits:
            return ()
        facts = scan.facts
        spf_domain = facts.get("spf_domain", "").lower() if facts.get("spf") == "pass" else ""
        dkim_domains = [d.lower() for d in facts.get("dkim_domains", "").split(",") if d]
        for address in _addresses(scan):
            if not rx.match(address):
                continue
            domain = address.rpartition("@")[2]
            if spf_domain and spf_domain == domain and address == _envelope(scan):
                return [Hit("USER_IN_WELCOMELIST", f"sender {address} (SPF pass for {domain})")]
            signer = next((d for d in dkim_domains if domain == d or domain.endswith("." + d)), None)
            if signer is not None:
                return [Hit("USER_IN_WELCOMELIST", f"sender {address} (valid DKIM signature of {signer})")]
        return ()


def _envelope(scan: Scan) -> str:
    sender = scan.ctx.mail_from
    if sender is None:
        sender = scan.message.get("return-path").strip().strip("<>")
    return sender.lower()
