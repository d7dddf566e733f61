"""The trust path: which relays in the Received chain count, as SpamAssassin walks it.

Received headers are written newest first, each by the host that took the message in, naming
the host that handed it over. Walking down from the top, hops whose sending IP is in
``trusted_networks`` (loopback always is) are believed; the first hop from an address outside
them, and everything below it, is untrusted: a spammer can forge any header written before the
message reached a host we trust. The *last external* relay is the first one, from the top,
whose address is outside ``internal_networks``: the host that handed the message to our own
mail system, the one DNSBLs and SPF should judge.

When the caller saw the connection itself (milter, MTA, or spamd request headers), that
connection is the newest hop and is used instead of guessing it from headers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

from filterd.engine.received import Relay

if TYPE_CHECKING:
    from filterd.config import NetworkConfig
    from filterd.engine.plugin import Scan

__all__ = ["TrustPath", "build_trust_path", "connection_trust_path", "in_networks", "names_connection", "trust_path_of"]

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class TrustPath:
    """The relays of one message sorted into believed and not."""

    trusted: tuple[Relay, ...]  # newest first: hops inside our trusted zone
    untrusted: tuple[Relay, ...]  # newest first: the first is where the untrusted part begins
    last_external: Relay | None  # handed the message to our internal network; None: all internal
    from_connection: bool  # the newest hop is the connection the caller saw, not a header

    @property
    def untrusted_ips(self) -> list[str]:
        """Addresses of untrusted relays that are routable (DNSBL candidates), newest first."""
        return [r.ip for r in self.untrusted if r.ip and not r.ip_is_private]

    @property
    def originating(self) -> Relay | None:
        """The oldest untrusted relay with a routable address: the best guess of the sender's host."""
        for relay in reversed(self.untrusted):
            if relay.ip and not relay.ip_is_private:
                return relay
        return None


def in_networks(ip: str, networks: Iterable[IPv4Network | IPv6Network]) -> bool:
    """True when ``ip`` (text) lies in one of ``networks``; False for unreadable addresses."""
    try:
        address: IPv4Address | IPv6Address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def build_trust_path(
    relays: Sequence[Relay],
    *,
    trusted_networks: Sequence[IPv4Network | IPv6Network],
    internal_networks: Sequence[IPv4Network | IPv6Network],
    client_ip: str = "",
    client_name: str = "",
    helo: str = "",
    authenticated: bool = False,
) -> TrustPath:
    """Sort ``relays`` (newest first, as parsed from Received) into a `TrustPath`."""
    # Internal hosts are trusted by definition (SpamAssassin requires internal ⊆ trusted).
    internal_nets = (*_LOOPBACK, *internal_networks)
    trusted_nets = (*internal_nets, *trusted_networks)
    hops = [r for r in relays if r.ip]  # "by host with local id" hops name no sender
    from_connection = False
    if client_ip:
        from_connection = True
        connection = Relay(ip=_normal_ip(client_ip), rdns=client_name, helo=helo, auth=authenticated, parsed=True)
        if hops and names_connection(hops[0], client_ip):
            # The MTA already wrote its own Received header for this connection: one hop, with
            # what the caller knows first and the header filling the gaps.
            top = hops.pop(0)
            connection = dataclasses.replace(
                top,
                ip=connection.ip,
                rdns=client_name or top.rdns,
                helo=helo or top.helo,
                auth=authenticated or top.auth,
            )
        hops.insert(0, connection)
    trusted: list[Relay] = []
    untrusted: list[Relay] = []
    last_external: Relay | None = None
    for relay in hops:
        # A hop's "authenticated" mark is only believed while a trusted host wrote it.
        believed = not untrusted and (relay.auth or in_networks(relay.ip, trusted_nets))
        if believed:
            trusted.append(relay)
        else:
            untrusted.append(relay)
        internal = (believed and relay.auth) or in_networks(relay.ip, internal_nets)
        if last_external is None and not internal:
            last_external = relay
    return TrustPath(tuple(trusted), tuple(untrusted), last_external, from_connection)


def names_connection(relay: Relay, client_ip: str) -> bool:
    """Whether ``relay`` is the hop of the connection the caller saw: the Received header the
    MTA wrote for the client at ``client_ip``."""
    return bool(relay.ip and client_ip) and _normal_ip(relay.ip) == _normal_ip(client_ip)


def _normal_ip(ip: str) -> str:
    """The canonical text of an address (IPv4-mapped IPv6 as IPv4); unreadable text unchanged."""
    try:
        address: IPv4Address | IPv6Address = ipaddress.ip_address(ip.strip().removeprefix("IPv6:"))
    except ValueError:
        return ip
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def trust_path_of(scan: Scan, network: NetworkConfig) -> TrustPath:
    """The scan's trust path, computed once (every network check wants it)."""
    if scan.trust is None:
        ctx = scan.ctx
        scan.trust = build_trust_path(
            scan.message.relays,
            trusted_networks=network.trusted_networks,
            internal_networks=network.internal_networks,
            client_ip=ctx.client_ip,
            client_name=ctx.client_name,
            helo=ctx.helo,
            authenticated=ctx.authenticated,
        )
    return scan.trust


def connection_trust_path(scan: Scan, network: NetworkConfig) -> TrustPath:
    """The trust path of the connecting client alone, with no Received header known yet (CONNECT
    stage): its ``last_external`` is the client unless it is internal or authenticated (the
    headers will say who is behind it), its ``untrusted`` holds the client unless it is trusted."""
    ctx = scan.ctx
    return build_trust_path(
        (),
        trusted_networks=network.trusted_networks,
        internal_networks=network.internal_networks,
        client_ip=ctx.client_ip,
        authenticated=ctx.authenticated,
    )
