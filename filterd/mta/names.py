"""The MTA's own name and the domains it delivers locally: one definition for the SMTP server
and the queue manager."""

from __future__ import annotations

from filterd.config import MtaConfig
from filterd.net.hostname import fqdn

__all__ = ["own_domains", "own_hostname"]


def own_hostname(config: MtaConfig) -> str:
    """The name the MTA greets with and writes in Received headers: ``mta.hostname``, else this
    host's fully qualified name."""
    return config.hostname or fqdn()


def own_domains(config: MtaConfig) -> frozenset[str]:
    """Domains delivered here: ``mta.local_domains`` and our own name, lower case, no final dot."""
    return frozenset(d.lower().rstrip(".") for d in (*config.local_domains, own_hostname(config)))
