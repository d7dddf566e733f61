"""DMARC (RFC 7489): the author domain's policy, and whether SPF or DKIM vouch for that domain.

The author domain is the domain of the one address in the one From field. Its policy is the
TXT record at ``_dmarc.<author domain>``, else at ``_dmarc.<organisational domain>`` (the
registered domain by the public-suffix list), where ``sp`` (when given) replaces ``p``. The
message passes when SPF passed for a domain aligned with the author domain (the MAIL FROM
domain, or the HELO name for the null sender) or a valid DKIM signature has an aligned ``d=``.
Relaxed alignment compares organisational domains, strict compares the names themselves.

``pct`` sampling is deterministic: a message is in the sample when the first four bytes of
SHA-256(Message-ID) taken modulo 100 are below ``pct``, so the same message always gets the
same answer. A failing message outside the sample is treated one step more gently (RFC 7489
§6.6.4): reject becomes quarantine, quarantine becomes none.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from filterd.net.dns import Resolver

__all__ = [
    "DmarcRecord",
    "DmarcResult",
    "PolicyLookup",
    "aligned",
    "evaluate",
    "in_sample",
    "lookup_policy",
    "parse_record",
]

_POLICIES = ("none", "quarantine", "reject")
_GENTLER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(?:;|$)")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The tags of a DMARC record that decide a message's fate."""

    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"  # r relaxed, s strict
    aspf: str = "r"


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """The outcome of policy discovery: a record and where it was found, or why there is none."""

    status: str  # "found", "missing" (no usable record), "temperror"
    record: DmarcRecord | None = None
    found_at: str = ""  # the domain whose _dmarc record it is
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """One message's DMARC verdict."""

    result: str  # pass, fail, none (no policy), temperror, permerror (no single author domain)
    domain: str = ""  # the author domain
    policy: str = ""  # the published policy that applies (p, or sp for a subdomain); "" without one
    disposition: str = "none"  # what the receiver should do: none, quarantine, reject
    detail: str = ""


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record from TXT text; None when it is not one (no ``v=DMARC1`` first) or has
    neither a valid ``p`` nor a ``rua`` (RFC 7489 §6.6.3: with ``rua``, a bad ``p`` means none).
    Unknown tags and bad values of optional tags are ignored."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
        elif part.strip():
            tags.setdefault(part.strip().lower(), "")
    if not _VERSION.match(text):
        return None
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(
        p=p,
        sp=sp if sp in _POLICIES else p,
        pct=pct,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
    )


async def lookup_policy(domain: str, org_domain: str, resolver: Resolver, *, limit: float) -> PolicyLookup:
    """RFC 7489 §6.6.3 policy discovery: the author domain first, then its organisational domain."""
    for where in dict.fromkeys((domain, org_domain)):
        answer = await resolver.query(f"_dmarc.{where}", "TXT", limit=limit)
        if answer.temporary:
            return PolicyLookup("temperror", detail=f"_dmarc.{where}: {answer.status}")
        texts = [r for r in answer.records if _VERSION.match(r)] if answer.ok else []
        if len(texts) > 1:
            return PolicyLookup("missing", detail=f"{len(texts)} DMARC records at _dmarc.{where}")
        record = parse_record(texts[0]) if texts else None
        if record is not None:
            return PolicyLookup("found", record, where)
    return PolicyLookup("missing", detail=f"no DMARC record for {domain}")


def aligned(domain: str, author: str, mode: str, org_of: Callable[[str], str]) -> bool:
    """Identifier alignment: the same name (strict) or the same organisational domain (relaxed)."""
    domain, author = domain.lower().rstrip("."), author.lower().rstrip(".")
    if not domain:
        return False
    return domain == author if mode == "s" else org_of(domain) == org_of(author)


def in_sample(message_id: str, pct: int) -> bool:
    """Whether this message is among the ``pct`` percent the policy applies to (deterministic)."""
    if pct >= 100:
        return True
    if pct <= 0:
        return False
    digest = hashlib.sha256(message_id.strip().encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < pct


def evaluate(
    author: str,
    policy: PolicyLookup,
    *,
    org_of: Callable[[str], str],
    spf_result: str,
    spf_domain: str,
    dkim_pass: Sequence[str],
    dkim_temperror: Sequence[str] = (),
    message_id: str = "",
) -> DmarcResult:
    """The DMARC result for a message whose author domain is ``author``.

    ``spf_result``/``spf_domain``: the SPF result and the domain it was for ("" if SPF did not
    run); ``dkim_pass``: signing domains of valid signatures; ``dkim_temperror``: domains whose
    key could not be fetched (an aligned one makes a failure a temperror instead)."""
    if policy.status == "temperror":
        return DmarcResult("temperror", author, detail=policy.detail)
    record = policy.record
    if policy.status != "found" or record is None:
        return DmarcResult("none", author, detail=policy.detail)
    applies = record.p if policy.found_at == author else record.sp
    spf_ok = spf_result == "pass" and aligned(spf_domain, author, record.aspf, org_of)
    dkim_ok = next((d for d in dkim_pass if aligned(d, author, record.adkim, org_of)), "")
    if spf_ok or dkim_ok:
        how = f"dkim d={dkim_ok}" if dkim_ok else f"spf {spf_domain}"
        return DmarcResult("pass", author, applies, "none", f"aligned {how}")
    if spf_result == "temperror" or any(aligned(d, author, record.adkim, org_of) for d in dkim_temperror):
        return DmarcResult("temperror", author, applies, "none", "SPF or DKIM could not be checked")
    disposition = applies
    detail = f"no aligned SPF or DKIM pass (policy at _dmarc.{policy.found_at})"
    if not in_sample(message_id, record.pct):
        disposition = _GENTLER[applies]
        detail += f"; outside pct={record.pct}"
    return DmarcResult("fail", author, applies, disposition, detail)
