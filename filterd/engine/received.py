"""Parsing Received headers into relays.

Each MTA writes Received in its own dialect; the common ones (Postfix, Sendmail, Exim, qmail,
Exchange, Gmail) agree on the RFC 5321 skeleton `from X (Y [IP]) by Z with P id I for <R>; date`
and differ inside the parentheses. The parser takes what it can find and marks the rest.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

__all__ = ["Relay", "parse_received"]


@dataclass(frozen=True, slots=True)
class Relay:
    """One hop: the host that connected (ip, rdns, helo) to the host that wrote the header (by)."""

    ip: str = ""
    rdns: str = ""
    helo: str = ""
    by: str = ""
    id: str = ""
    with_: str = ""
    envfor: str = ""
    auth: bool = False
    date_text: str = ""
    parsed: bool = True
    raw: str = ""

    @property
    def date(self) -> datetime | None:
        """When this hop received the message (parsed on demand; None if unreadable)."""
        return _parse_date(self.date_text)

    @property
    def ip_is_private(self) -> bool:
        """True for RFC 1918, loopback, link-local, CGNAT and other non-routable sources."""
        if not self.ip:
            return False
        try:
            address = ipaddress.ip_address(self.ip)
        except ValueError:
            return False
        return not address.is_global


_IP4 = r"(?:\d{1,3}\.){3}\d{1,3}"
_IP6 = r"(?:IPv6:)?[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?:%\w+)?"
_IP_IN_BRACKETS = re.compile(rf"\[(?:IPv6:)?({_IP4}|{_IP6})\]")
_BARE_IP = re.compile(rf"(?<![\w.])({_IP4})(?![\w.])")
_FROM = re.compile(r"^\s*from\s+(\S+)", re.I)
# Matched at a position found with str.find: a leading literal is much cheaper than \b scans.
_BY = re.compile(r"by\s+([^\s;()]+)", re.I)
_WITH = re.compile(r"with\s+([A-Za-z0-9/_-]+)", re.I)
_ID = re.compile(r"id\s+<?([^\s;<>()]+)>?", re.I)
_FOR = re.compile(r"\bfor\s+<?([^\s;<>]+@[^\s;<>]+)>?", re.I)
_HELO_EQ = re.compile(r"\bhelo[= ]+([^\s)\]]+)", re.I)
_PAREN = re.compile(r"\(([^()]*)\)")
# RFC 3848 "with" keywords for authenticated submission, and what Sendmail/Exim/Postfix write.
_AUTH_MARKERS = ("esmtpa", "esmtpsa", "lmtpa", "lmtpsa", "authenticated sender", "auth=", "(authenticated")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+\.?$")


@functools.lru_cache(maxsize=4096)
def _parse_date(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)  # a third of the parse; the same relays recur message after message
def _clean_ip(text: str) -> str:
    text = text.removeprefix("IPv6:").split("%")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return ""


def _keyword(pattern: re.Pattern[str], head: str, lowered: str, word: str) -> re.Match[str] | None:
    if lowered.startswith(word + " "):
        return pattern.match(head, 0)
    i = lowered.find(" " + word + " ")
    while i >= 0:
        m = pattern.match(head, i + 1)
        if m:
            return m
        i = lowered.find(" " + word + " ", i + 1)
    return None


def parse_received(value: str) -> Relay:
    """Parse one unfolded Received value. Never raises; unknown shapes give parsed=False."""
    raw = value
    head, _, date_text = value.rpartition(";")
    if not head:
        head, date_text = value, ""
    date_text = date_text.strip()
    lowered = head.lower()
    m_from = _FROM.match(head)
    m_by = _keyword(_BY, head, lowered, "by")
    if not m_from:
        # "by host with local id X" (hops inside one machine) carry no client.
        return Relay(by=m_by.group(1).lower() if m_by else "", date_text=date_text, parsed=bool(m_by), raw=raw)
    helo = m_from.group(1).strip("()[]")
    ip = ""
    rdns = ""
    from_part = head[m_from.start() : m_by.start() if m_by else len(head)]
    m_ip = _IP_IN_BRACKETS.search(from_part) if "[" in from_part else None
    if m_ip:
        ip = _clean_ip(m_ip.group(1))
    else:
        m_bare = _BARE_IP.search(from_part)
        if m_bare:
            ip = _clean_ip(m_bare.group(1))
    for paren in _PAREN.findall(from_part) if "(" in from_part else ():
        words = paren.replace("[", " [").split()
        if not words:
            continue
        first = words[0].rstrip(".")
        if _HOSTNAME.match(first) and not _BARE_IP.fullmatch(first) and not first.startswith("["):
            rdns = first.lower()
            break
    m_helo = _HELO_EQ.search(from_part) if "helo" in lowered else None
    if m_helo:  # Exim: "from rdns ([ip] helo=HELO)": the word after "from" is the rDNS
        # ...unless it is "[ip]" itself: Exim writes that when the client has no rDNS.
        rdns = helo.lower() if _HOSTNAME.match(helo) and not _BARE_IP.fullmatch(helo) else rdns
        helo = m_helo.group(1).strip("[]")  # "helo=[192.0.2.1]": brackets off, as for "from [ip]"
    m_with = _keyword(_WITH, head, lowered, "with")
    m_id = _keyword(_ID, head, lowered, "id")
    m_for = _FOR.search(head) if "for " in lowered else None
    return Relay(
        ip=ip,
        rdns=rdns,
        helo=helo,
        by=m_by.group(1).lower() if m_by else "",
        id=m_id.group(1) if m_id else "",
        with_=m_with.group(1) if m_with else "",
        envfor=m_for.group(1) if m_for else "",
        auth=any(marker in lowered for marker in _AUTH_MARKERS),
        date_text=date_text,
        parsed=bool(ip or rdns),
        raw=raw,
    )
