"""The Authentication-Results header (RFC 8601) for what the auth check found.

    mx.example.org; spf=pass smtp.mailfrom=alice@example.com; dkim=pass header.d=example.com
        header.s=sel header.b=AbCdEfGh; dmarc=pass (p=reject) header.from=example.com; arc=none

One ``dkim=`` per signature verified (``dkim=none`` when unsigned). SPF reports the MAIL FROM
identity, or the HELO identity when the sender was null or unknown. Values that are not plain
tokens are quoted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from filterd.engine.checks.auth.dkim import DkimResult
from filterd.engine.checks.auth.dmarc import DmarcResult
from filterd.engine.checks.auth.spf import SpfResult

__all__ = ["authentication_results", "pvalue"]

# RFC 2045 token characters, plus "@" for the local-part@domain form RFC 8601 §2.2 allows.
_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+(?:@[A-Za-z0-9.-]+)?|@[A-Za-z0-9.-]+")


def pvalue(text: str) -> str:
    """A property value: as it is when it is a token or an address, else a quoted string."""
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = re.sub(r"[()\\\r\n]", " ", text).strip()
    return f" ({text[:80]})" if text else ""


def authentication_results(
    authserv_id: str,
    *,
    spf: Sequence[SpfResult] = (),
    dkim: DkimResult | None = None,
    dmarc: DmarcResult | None = None,
    signatures: bool = True,
    arc: bool = False,
) -> str:
    """The header's value (without the name); ``authserv_id; none`` when nothing was checked.
    ``signatures`` and ``arc`` say whether ``dkim`` holds DKIM and ARC results (either may be off)."""
    parts: list[str] = []
    for result in spf:
        if result.identity == "mailfrom":
            parts.append(f"spf={result.result} smtp.mailfrom={pvalue(result.sender)}")
        else:
            parts.append(f"spf={result.result} smtp.helo={pvalue(result.domain)}")
    if dkim is not None and signatures:
        for sig in dkim.signatures:
            reason = _comment(sig.reason) if sig.result != "pass" else ""
            props = f" header.d={pvalue(sig.domain)}" if sig.domain else ""
            props += f" header.s={pvalue(sig.selector)}" if sig.selector else ""
            props += f" header.b={pvalue(sig.b)}" if sig.b else ""
            parts.append(f"dkim={sig.result}{reason}{props}")
        if not dkim.signatures:
            parts.append("dkim=none")
    if dmarc is not None:
        comment = ""
        if dmarc.policy:
            comment = f"p={dmarc.policy}"
            if dmarc.result == "fail" and dmarc.disposition != dmarc.policy:
                comment += f" dis={dmarc.disposition}"
        elif dmarc.result == "permerror":
            comment = dmarc.detail
        domain = f" header.from={pvalue(dmarc.domain)}" if dmarc.domain else ""
        parts.append(f"dmarc={dmarc.result}{_comment(comment)}{domain}")
    if arc and dkim is not None:
        parts.append(f"arc={dkim.arc}")
    return f"{authserv_id}; " + ("; ".join(parts) if parts else "none")
