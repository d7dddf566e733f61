"""URI checks: hosts that hide who they are (IP literals, user@host tricks, encodings,
shorteners, punycode, brand names in someone else's domain) and messages that link to many
unrelated sites.

Reads `msg.uris` (found and canonicalised once by the parser). Patterns over the canonical
URI text live in rules/50_uri.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.checks._facts import IMPERSONATED_BRANDS, URL_SHORTENERS, private_ip
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage

__all__ = ["UriCheck"]

_USUAL_PORTS = frozenset({80, 443, 21})
_MANY_DOMAINS = 8
_MAX_URIS = 200


def _global_ip(host: str) -> bool:
    return not private_ip(host)


class UriCheck:
    """One pass over the message's URIs."""

    name: ClassVar[str] = "uri"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = "body"
    emits: ClassVar[frozenset[str]] = frozenset(
        {
            "URI_IP_HOST",
            "URI_IP_ENCODED",
            "URI_USERINFO",
            "URI_OBFUSCATED",
            "URI_SHORTENER",
            "__URI_MANY_DOMAINS",
            "URI_ODD_PORT",
            "URI_PUNYCODE_HOST",
            "URI_BRAND_IN_HOST",
            "URI_DEEP_SUBDOMAIN",
            "__URI_ANY",
            "__URI_ONE_DOMAIN",
        }
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._setup = setup

    def run(self, scan: Scan) -> Sequence[Hit]:
        uris = scan.message.uris
        if not uris:
            return []
        found: dict[str, str] = {"__URI_ANY": ""}
        domains: set[str] = set()
        for uri in uris[:_MAX_URIS]:
            host = uri.host
            domains.add(uri.domain)
            if uri.ip_literal:
                if _global_ip(host):
                    found.setdefault("URI_IP_HOST", host)
                    if uri.obfuscated:
                        found.setdefault("URI_IP_ENCODED", uri.url[:100])
            elif uri.obfuscated:
                found.setdefault("URI_OBFUSCATED", uri.url[:100])
            if uri.userinfo:
                found.setdefault("URI_USERINFO", uri.url[:100])
            if uri.domain in URL_SHORTENERS:
                found.setdefault("URI_SHORTENER", host)
            if uri.port is not None and uri.port not in _USUAL_PORTS:
                found.setdefault("URI_ODD_PORT", f"{host}:{uri.port}")
            if "xn--" in host:
                found.setdefault("URI_PUNYCODE_HOST", host)
            if uri.ip_literal:
                continue
            if "-" in uri.domain and "URI_BRAND_IN_HOST" not in found:
                label = uri.domain.partition(".")[0]
                for brand in IMPERSONATED_BRANDS:
                    if brand in label and (f"{brand}-" in label or f"-{brand}" in label):
                        found["URI_BRAND_IN_HOST"] = host
                        break
            if len(host) <= len(uri.domain):
                continue
            sub = host[: len(host) - len(uri.domain)]
            if sub.count(".") >= 4:
                found.setdefault("URI_DEEP_SUBDOMAIN", host)
            if "URI_BRAND_IN_HOST" not in found:
                for brand in IMPERSONATED_BRANDS:
                    if brand in sub and brand not in uri.domain:
                        found["URI_BRAND_IN_HOST"] = host
                        break
        if len(domains) >= _MANY_DOMAINS:
            found["__URI_MANY_DOMAINS"] = f"{len(domains)} domains"
        elif len(domains) == 1:
            found["__URI_ONE_DOMAIN"] = next(iter(domains))
        return [Hit(rule, detail) for rule, detail in found.items()]
