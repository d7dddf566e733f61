"""Header checks that need more than one regex: dates compared with the time of receipt,
addresses compared with each other, and Received chains that do not add up.

Everything here reads headers only, so the check runs at the HEADERS stage (a milter can act
on it before the body arrives). Plain pattern tests on single headers live in
rules/10_header.yaml, where Hyperscan runs them all in one pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.checks._facts import (
    BIG_MAIL_PROVIDERS,
    FREEMAIL_DOMAINS,
    PROVIDER_RELAY_DOMAINS,
    private_ip,
)
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.received import Relay
from filterd.engine.trust import names_connection

__all__ = ["HeaderCheck"]

_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_ADDR_IN_TEXT = re.compile(r"[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
_HELO_WORD = re.compile(r"^\s*from\s+(\S+)", re.I)
_EXIM_HELO = re.compile(r"\bhelo=(\S+?)[)\s]", re.I)

# Every domain a big provider's own servers are named under -> that provider.
_RELAY_PROVIDER = {d: p for p, ds in PROVIDER_RELAY_DOMAINS.items() for d in ds}
_PROVIDER_DOMAINS = frozenset(_RELAY_PROVIDER)
_PROVIDER_SUFFIXES = tuple("." + d for d in _RELAY_PROVIDER)
_HOUR = 3600.0
_DAY = 86400.0
_MONTHS = {
    m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)
}
_ZONES = {
    "ut": 0,
    "utc": 0,
    "gmt": 0,
    "z": 0,
    "est": -5,
    "edt": -4,
    "cst": -6,
    "cdt": -5,
    "mst": -7,
    "mdt": -6,
    "pst": -8,
    "pdt": -7,
}
_DATE = re.compile(
    r"(\d{1,2})\s+([A-Za-z]{3})[A-Za-z]*\.?\s+(\d{2,4})\s+(\d{1,2}):(\d\d)(?::(\d\d))?"
    r"(?:\s*([+-]\d{4}|[A-Za-z]{1,5}\b))?"
)


def _epoch(text: str) -> float | None:
    """Seconds since the epoch for an RFC 5322 date (lenient: day name optional, 2-digit
    years, zone names); None when it cannot be read. A missing zone counts as UTC."""
    words = text.split(None, 6)
    if words and not words[0][:1].isdigit():
        del words[0]  # day name
    try:  # the usual layout: day month year hh:mm[:ss] [zone]
        d, mon, y = int(words[0]), words[1][:3], int(words[2])
        hms = words[3].split(":")
        h, mi = int(hms[0]), int(hms[1])
        sec = int(hms[2]) if len(hms) > 2 else 0
        year_digits = len(words[2])
        zone = words[4] if len(words) > 4 else ""
    except (ValueError, IndexError):  # anything else: let a regex find the pieces
        m = _DATE.search(text)
        if m is None:
            return None
        d, mon, y, h, mi = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])
        sec, year_digits, zone = int(m[6] or 0), len(m[3]), m[7] or ""
    month = _MONTHS.get(mon.lower())
    if year_digits == 2:
        y += 2000 if y < 50 else 1900
    elif year_digits == 3:
        y += 1900
    if month is None or not (1 <= d <= 31 and h < 24 and mi < 60):
        return None
    # Days since 1970-01-01 by the civil-calendar formula (cheaper than calendar.timegm).
    yy = y - (month <= 2)
    days = 365 * yy + yy // 4 - yy // 100 + yy // 400 + (153 * ((month + 9) % 12) + 2) // 5
    stamp = (days + d - 719469) * 86400 + h * 3600 + mi * 60 + sec
    if zone:
        if zone[0] in "+-" and zone[1:5].isdigit():
            offset = int(zone[1:3]) * 3600 + int(zone[3:5]) * 60
            stamp -= offset if zone[0] == "+" else -offset
        else:
            stamp -= _ZONES.get(zone.strip("()").lower(), 0) * 3600
    return float(stamp)


def _receipt_time(relays: Sequence[Relay], stamps: Sequence[float | None], client_ip: str, now: float) -> float | None:
    """When the receiving MTA took the message in: what the Date checks compare Date with.

    That is the date of the Received header the receiving MTA wrote (SpamAssassin's
    DATE_IN_PAST_* use the top one). A milter is never shown that header (Postfix and Sendmail
    hide their own), so when the caller saw the connection (``client_ip``) and the top header is
    not the one written for it, the MTA is taking the message in now. A header further down was
    written by the sending side: its clock, or its forgery, says nothing about our receipt.
    Without the caller's view (a stored message, spamd without an IP header) the newest readable
    Received date; and None (no Date check, as SpamAssassin) when there is none: a stored
    message without any says nothing about when it arrived, and today's clock would call every
    archived message old.
    """
    if client_ip:
        own = stamps[0] if relays and names_connection(relays[0], client_ip) else None
        return now if own is None else own
    return next((t for t in stamps if t is not None), None)


def _first_address(value: str) -> tuple[str, str]:
    """(display name, address) of the first mailbox in a header value.

    A deliberately small reading of RFC 5322 (getaddresses costs ~100 us a call): the text in
    the first <...> is the address and what precedes it the name; without brackets, the first
    word holding an @ is the address.
    """
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        address = value[lt + 1 : gt if gt > 0 else len(value)].strip()
        name = value[:lt].strip().strip('"').strip()
        return name, address
    for word in value.replace(",", " ").split():
        if "@" in word:
            return "", word.strip("()\"'")
    return "", ""


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".>") if "@" in address else ""


def _parent_in(host: str, domains: frozenset[str]) -> str:
    """The entry of ``domains`` that ``host`` is, or is a subdomain of; "" if none."""
    host = host.lower().rstrip(".")
    while host:
        if host in domains:
            return host
        _, dot, rest = host.partition(".")
        if not dot:
            return ""
        host = rest
    return ""


def _says_no_rdns(raw: str) -> bool:
    """True when the receiving MTA wrote down that the client had no reverse DNS name
    (Postfix "unknown [ip]", qmail "from unknown"). Formats that never record the name
    (fetchmail, some Exchange hops) say nothing either way."""
    head = raw[:200].lower()
    return "unknown [" in head or "(unknown)" in head or head.startswith("from unknown ")


def _helo_as_written(relay: Relay) -> str:
    """The HELO argument the way the receiving MTA recorded it (brackets kept)."""
    m = _EXIM_HELO.search(relay.raw)
    if m:
        return m.group(1)
    m = _HELO_WORD.match(relay.raw)
    return m.group(1) if m else ""


class HeaderCheck:
    """Date, address and Received-chain consistency."""

    name: ClassVar[str] = "headers"
    stage: ClassVar[Stage] = Stage.HEADERS
    autolearn_side: ClassVar[AutolearnSide] = "header"
    emits: ClassVar[frozenset[str]] = frozenset(
        {
            "HDR_DATE_UNPARSEABLE",
            "HDR_DATE_FUTURE_3H",
            "HDR_DATE_FUTURE_2D",
            "HDR_DATE_PAST_4D",
            "HDR_DATE_PAST_1Y",
            "HDR_FROM_NAME_OTHER_ADDR",
            "HDR_REPLYTO_FREEMAIL",
            "HDR_FREEMAIL_REPLYTO_SAME",
            "__HDR_REPLYTO_OTHER_DOMAIN",
            "__HDR_FROM_FREEMAIL",
            "HDR_FROM_PROVIDER_NOT_RCVD",
            "HDR_MANY_RECIPIENTS",
            "HDR_RCVD_HELO_PROVIDER_FORGED",
            "HDR_RCVD_HELO_BARE_IP",
            "HDR_RCVD_HELO_IP_MISMATCH",
            "HDR_RCVD_HELO_IS_RECEIVER",
            "HDR_RCVD_NO_RDNS",
            "HDR_RCVD_HELO_NO_DOT",
            "HDR_RCVD_HELO_LITERAL_NO_RDNS",
            "HDR_FROM_IS_TO",
            "HDR_RCVD_TIME_BACKWARDS",
            "__HDR_RCVD_NONE",
        }
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._setup = setup

    def run(self, scan: Scan) -> Sequence[Hit]:
        msg = scan.message
        hits: list[Hit] = []
        relays = msg.relays
        # Hop timestamps, newest first (None where unreadable); read once, they are costly.
        stamps = [_epoch(r.date_text) if r.date_text else None for r in relays]
        received_at = _receipt_time(relays, stamps, scan.ctx.client_ip, time.time())
        self._dates(msg.get("date"), received_at, hits)
        self._addresses(scan, hits)
        self._received(relays, stamps, hits)
        return hits

    # -- Date ---------------------------------------------------------------------------------

    @staticmethod
    def _dates(date_text: str, received_at: float | None, hits: list[Hit]) -> None:
        if not date_text:
            return  # HDR_DATE_MISSING is a header rule
        sent = _epoch(date_text)
        if sent is None:
            hits.append(Hit("HDR_DATE_UNPARSEABLE", date_text[:80]))
            return
        if received_at is None:
            return
        delta = sent - received_at
        if delta > 2 * _DAY:
            hits.append(Hit("HDR_DATE_FUTURE_2D", f"{delta / _HOUR:.0f} h ahead of receipt"))
        elif delta > 3 * _HOUR:
            hits.append(Hit("HDR_DATE_FUTURE_3H", f"{delta / _HOUR:.0f} h ahead of receipt"))
        elif -delta > 365 * _DAY:
            hits.append(Hit("HDR_DATE_PAST_1Y", f"{-delta / _DAY:.0f} days before receipt"))
        elif -delta > 4 * _DAY:
            hits.append(Hit("HDR_DATE_PAST_4D", f"{-delta / _DAY:.0f} days before receipt"))

    # -- addresses ----------------------------------------------------------------------------

    @staticmethod
    def _addresses(scan: Scan, hits: list[Hit]) -> None:
        msg = scan.message
        from_name, from_addr = _first_address(msg.get("from"))
        from_domain = _domain_of(from_addr)
        if "@" in from_name:
            m = _ADDR_IN_TEXT.search(from_name)
            if m and from_domain and m.group(1).lower().rstrip(".") != from_domain:
                hits.append(Hit("HDR_FROM_NAME_OTHER_ADDR", f"name shows {m.group(0)}"))
        from_free = from_domain in FREEMAIL_DOMAINS
        if from_free:
            hits.append(Hit("__HDR_FROM_FREEMAIL", from_domain))
        reply = msg.get("reply-to")
        if reply and from_domain:
            reply_domain = _domain_of(_first_address(reply)[1])
            if reply_domain and reply_domain != from_domain:
                hits.append(Hit("__HDR_REPLYTO_OTHER_DOMAIN", reply_domain))
                if reply_domain in FREEMAIL_DOMAINS:
                    hits.append(Hit("HDR_REPLYTO_FREEMAIL", reply_domain))
            elif reply_domain and from_free:
                # A Reply-To back into the sender's own free-mail service: bulk-mail tools write
                # one, a webmail account does not (train half: 2 ham, 131 spam).
                hits.append(Hit("HDR_FREEMAIL_REPLYTO_SAME", reply_domain))
        if from_domain in BIG_MAIL_PROVIDERS and msg.relays:
            relay_domains = PROVIDER_RELAY_DOMAINS[BIG_MAIL_PROVIDERS[from_domain]]
            if not any(_parent_in(name, relay_domains) for r in msg.relays for name in (r.by, r.rdns, r.helo) if name):
                hits.append(Hit("HDR_FROM_PROVIDER_NOT_RCVD", from_domain))
        to_addr = _first_address(msg.get("to"))[1].lower()
        if from_addr and to_addr == from_addr.lower() and msg.count("to") == 1 and "," not in msg.get("to"):
            hits.append(Hit("HDR_FROM_IS_TO", from_addr))
        n = sum(v.count("@") for v in msg.get_all("to")) + sum(v.count("@") for v in msg.get_all("cc"))
        if n >= 15:
            hits.append(Hit("HDR_MANY_RECIPIENTS", f"{n} To/Cc addresses", value=float(n)))

    # -- Received -----------------------------------------------------------------------------

    @staticmethod
    def _received(relays: Sequence[Relay], stamps: Sequence[float | None], hits: list[Hit]) -> None:
        if not relays:
            hits.append(Hit("__HDR_RCVD_NONE"))
            return
        fired: dict[str, str] = {}
        newer = 0.0
        border = True
        for relay, stamped in zip(relays, stamps, strict=True):
            if stamped is not None:
                # Each hop is older than the one above it; allow for sloppy clocks.
                if newer and stamped - newer > 6 * _HOUR:
                    fired.setdefault(
                        "HDR_RCVD_TIME_BACKWARDS", f"{(stamped - newer) / _HOUR:.0f} h later than the next hop"
                    )
                newer = stamped
            ip = relay.ip
            if not ip or relay.auth or private_ip(ip):
                continue
            helo = relay.helo.lower().rstrip(".")
            if border:
                # The first public hop is the one our own border MTA recorded: trustworthy.
                border = False
                if not relay.rdns and _says_no_rdns(relay.raw):
                    fired["HDR_RCVD_NO_RDNS"] = f"ip={ip}"
                    if helo.startswith("[") or _helo_as_written(relay).startswith("["):
                        fired["HDR_RCVD_HELO_LITERAL_NO_RDNS"] = f"helo={relay.helo} ip={ip}"
                if helo and "." not in helo and ":" not in helo and helo not in ("localhost", "unknown"):
                    fired["HDR_RCVD_HELO_NO_DOT"] = f"helo={relay.helo} ip={ip}"
            if not helo:
                continue
            if helo[0].isdigit() and _IPV4.match(helo):
                if not _helo_as_written(relay).startswith("["):
                    fired.setdefault("HDR_RCVD_HELO_BARE_IP", f"helo={helo}")
                if helo != ip:
                    fired.setdefault("HDR_RCVD_HELO_IP_MISMATCH", f"helo={helo} ip={ip}")
                continue
            by = relay.by.lower().rstrip(".")
            if (
                by
                and (helo == by or by.endswith("." + helo))
                and not (relay.rdns and (relay.rdns == helo or relay.rdns.endswith("." + helo)))
            ):
                # Greeting with the receiver's own name, or the domain it belongs to.
                fired.setdefault("HDR_RCVD_HELO_IS_RECEIVER", f"helo={helo} by={by}")
            if "." not in helo:
                continue
            if helo.endswith(_PROVIDER_SUFFIXES) or helo in _PROVIDER_DOMAINS:
                provider = _parent_in(helo, _PROVIDER_DOMAINS)
                allowed = PROVIDER_RELAY_DOMAINS[_RELAY_PROVIDER[provider]]
                if (relay.rdns and not _parent_in(relay.rdns, allowed)) or (
                    not relay.rdns and _says_no_rdns(relay.raw)
                ):
                    fired.setdefault("HDR_RCVD_HELO_PROVIDER_FORGED", f"helo={helo} rdns={relay.rdns}")
        hits.extend(Hit(rule, detail) for rule, detail in fired.items())
