"""The trust path over Received chains as real MTAs write them: which hops are believed, and
which relay is the last external one (what DNSBLs judge)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from filterd.config import NetworkConfig
from filterd.engine.message import parse_message
from filterd.engine.plugin import Scan, ScanContext
from filterd.engine.received import Relay, parse_received
from filterd.engine.trust import TrustPath, build_trust_path, in_networks, trust_path_of
from filterd.engine.uris import UriParser

DATE = "Mon, 12 Jan 2026 10:00:05 +0000"

# Our site: MX hosts in 10.1.0.0/16 and 2001:db8:1::/48, a trusted partner relay outside them.
INTERNAL = ("10.1.0.0/16", "2001:db8:1::/48")
PARTNER = ("203.0.113.0/24",)


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def path(
    headers: Sequence[str],
    *,
    trusted: Sequence[str] = (),
    internal: Sequence[str] = (),
    **connection: object,
) -> TrustPath:
    relays = [parse_received(" ".join(h.split())) for h in headers]
    return build_trust_path(
        relays,
        trusted_networks=nets(*trusted),
        internal_networks=nets(*internal),
        **connection,  # type: ignore[arg-type]
    )


def ips(relays: Sequence[Relay]) -> list[str]:
    return [r.ip for r in relays]


POSTFIX_FROM_OUTSIDE = f"""from mail.sender.example (mail.sender.example [192.0.2.10])
    by mx1.example.net (Postfix) with ESMTPS id 4AB12 for <dana@example.net>; {DATE}"""
SENDER_SUBMISSION = f"""from laptop (dsl-198-51-100-23.isp.example [198.51.100.23])
    (Authenticated sender: alex@sender.example)
    by mail.sender.example (Postfix) with ESMTPSA id 9ZZ1; {DATE}"""
INTERNAL_HOP = f"""from mx1.example.net (mx1.example.net [10.1.0.5])
    by store.example.net (Postfix) with ESMTP id 77C; {DATE}"""
AMAVIS_REINJECT = f"""from localhost (localhost [127.0.0.1])
    by mx1.example.net (Postfix) with ESMTP id 5X1; {DATE}"""
POSTFIX_PICKUP = f"by mx1.example.net (Postfix, from userid 1000) id 1A2; {DATE}"


def test_everything_untrusted_by_default_except_loopback() -> None:
    tp = path([AMAVIS_REINJECT, POSTFIX_FROM_OUTSIDE, SENDER_SUBMISSION])
    assert ips(tp.trusted) == ["127.0.0.1"]
    assert ips(tp.untrusted) == ["192.0.2.10", "198.51.100.23"]
    assert tp.last_external is not None and tp.last_external.ip == "192.0.2.10"
    assert tp.last_external.helo == "mail.sender.example"
    # The sender's own submission hop says "authenticated", but an untrusted host wrote that.
    assert tp.untrusted[1].auth
    assert not tp.from_connection


def test_internal_relays_are_trusted_and_skipped_for_last_external() -> None:
    tp = path([INTERNAL_HOP, POSTFIX_FROM_OUTSIDE, SENDER_SUBMISSION], internal=INTERNAL)
    assert ips(tp.trusted) == ["10.1.0.5"]  # internal implies trusted, even if trusted_networks forgets it
    assert ips(tp.untrusted) == ["192.0.2.10", "198.51.100.23"]
    assert tp.last_external is not None and tp.last_external.ip == "192.0.2.10"


def test_untrusted_ips_and_originating_keep_routable_addresses_only() -> None:
    hops = [
        f"from a.example (a.example [11.22.33.44]) by mx1.example.net (Postfix) with ESMTP id 1; {DATE}",
        f"from b.example (b.example [192.168.7.7]) by a.example (Postfix) with ESMTP id 2; {DATE}",
        f"from c.example (c.example [192.0.2.9]) by b.example (Postfix) with ESMTP id 3; {DATE}",
        f"from d.example (d.example [22.33.44.55]) by c.example (Postfix) with ESMTP id 4; {DATE}",
        f"from e.example (e.example [10.9.9.9]) by d.example (Postfix) with ESMTP id 5; {DATE}",
    ]
    tp = path(hops)
    assert tp.untrusted_ips == ["11.22.33.44", "22.33.44.55"]  # no private or documentation ranges
    assert tp.originating is not None and tp.originating.ip == "22.33.44.55"


def test_trusted_partner_relay_is_believed_but_still_external() -> None:
    partner = f"""from relay.partner.example (relay.partner.example [203.0.113.9])
        by mx1.example.net (Postfix) with ESMTP id 3C; {DATE}"""
    behind = f"""from sender.example (sender.example [192.0.2.80])
        by relay.partner.example (Postfix) with ESMTP id 1B; {DATE}"""
    tp = path([INTERNAL_HOP, partner, behind], trusted=PARTNER, internal=INTERNAL)
    assert ips(tp.trusted) == ["10.1.0.5", "203.0.113.9"]
    assert ips(tp.untrusted) == ["192.0.2.80"]
    assert tp.last_external is not None and tp.last_external.ip == "203.0.113.9"


def test_exim_chain() -> None:
    exim_in = f"""from [192.0.2.44] (helo=client.example)
        by mx1.example.net with esmtp (Exim 4.96) (envelope-from <a@client.example>)
        id 1tXyZa-000AbC-2D for dana@example.net; {DATE}"""
    exim_sub = f"""from [198.51.100.9] (port=51234 helo=[192.168.1.20])
        by mail.client.example with esmtpsa (TLS1.3) (Exim 4.97) id 1tX; {DATE}"""
    tp = path([exim_in, exim_sub], internal=INTERNAL)
    assert tp.last_external is not None
    le = tp.last_external
    assert (le.ip, le.helo, le.rdns) == ("192.0.2.44", "client.example", "")  # "[ip]" is no rDNS
    assert tp.untrusted[1].helo == "192.168.1.20"


def test_sendmail_and_qmail_chains() -> None:
    sendmail = f"""from client.example (client.example [192.0.2.55])
        by mx1.example.net (8.17.1/8.17.1) with ESMTP id 3ABcd for <dana@example.net>; {DATE}"""
    qmail = f"from unknown (HELO spammer.example) (192.0.2.66) by client.example with SMTP; {DATE}"
    qmail_local = f"(qmail 12345 invoked by uid 89); {DATE}"
    tp = path([sendmail, qmail, qmail_local])
    assert ips(tp.untrusted) == ["192.0.2.55", "192.0.2.66"]  # the local qmail hop names no sender
    assert tp.untrusted[1].helo == "spammer.example"
    assert tp.last_external is not None and tp.last_external.rdns == "client.example"


def test_gmail_style_chain_with_hops_that_name_no_sender() -> None:
    google_out = f"""from mail-sor-f41.google.com (mail-sor-f41.google.com. [209.85.220.41])
        by mx1.example.net (Postfix) with ESMTPS id 77D for <dana@example.net>; {DATE}"""
    google_internal = f"by 2002:a05:6a10:8e0b:b0:5f1:1234:abcd with SMTP id x; {DATE}"
    tp = path([INTERNAL_HOP, google_out, google_internal], internal=INTERNAL)
    assert tp.last_external is not None and tp.last_external.ip == "209.85.220.41"
    assert tp.last_external.rdns == "mail-sor-f41.google.com"
    assert len(tp.untrusted) == 1


def test_authenticated_submission_is_trusted_and_internal() -> None:
    submission = f"""from laptop.home (dsl-198-51-100-23.isp.example [198.51.100.23])
        (Authenticated sender: alice@example.net)
        by smtp.example.net (Postfix) with ESMTPSA id 4Ab; {DATE}"""
    tp = path([INTERNAL_HOP, submission], internal=INTERNAL)
    assert ips(tp.trusted) == ["10.1.0.5", "198.51.100.23"]
    assert tp.untrusted == () and tp.last_external is None
    # The same told by the caller (the MTA saw the AUTH), with no header of its own yet.
    tp = path([], internal=INTERNAL, client_ip="198.51.100.23", helo="laptop.home", authenticated=True)
    assert tp.from_connection and tp.last_external is None and ips(tp.trusted) == ["198.51.100.23"]


def test_ipv6_relays() -> None:
    inside = f"""from mx2.example.net (mx2.example.net [IPv6:2001:db8:1::25])
        by store.example.net (Postfix) with ESMTP id 8Q; {DATE}"""
    outside = f"""from mail.example.org (mail.example.org [IPv6:2001:db8:5::25])
        by mx2.example.net (Postfix) with ESMTPS id 9Q; {DATE}"""
    tp = path([inside, outside], internal=INTERNAL)
    assert ips(tp.trusted) == ["2001:db8:1::25"]
    assert tp.last_external is not None and tp.last_external.ip == "2001:db8:5::25"
    assert in_networks("::ffff:10.1.2.3", nets(*INTERNAL))  # v4-mapped counts as v4
    assert not in_networks("not an address", nets(*INTERNAL))


def test_forged_headers_below_an_untrusted_hop_are_not_believed() -> None:
    spam_hop = f"""from bot.example (unknown [192.0.2.99])
        by mx1.example.net (Postfix) with ESMTP id 66F; {DATE}"""
    forged_internal = f"""from mx1.example.net (mx1.example.net [10.1.0.5])
        by mx1.example.net (Postfix) with ESMTPSA id 00F; {DATE}"""
    forged_clean = f"""from mail.bank.example (mail.bank.example [198.51.100.200])
        by mx1.example.net (Postfix) with ESMTPSA id 00E; {DATE}"""
    tp = path([AMAVIS_REINJECT, spam_hop, forged_internal, forged_clean], internal=INTERNAL)
    assert ips(tp.trusted) == ["127.0.0.1"]
    assert ips(tp.untrusted) == ["192.0.2.99", "10.1.0.5", "198.51.100.200"]
    assert tp.last_external is not None and tp.last_external.ip == "192.0.2.99"


def test_connection_known_from_the_caller_is_the_newest_hop() -> None:
    # Milter: our MTA has not written its Received header yet; the caller says who connected.
    tp = path([SENDER_SUBMISSION], client_ip="192.0.2.77", client_name="mail.other.example", helo="other.example")
    assert tp.from_connection
    assert ips(tp.untrusted) == ["192.0.2.77", "198.51.100.23"]
    le = tp.last_external
    assert le is not None and (le.ip, le.rdns, le.helo) == ("192.0.2.77", "mail.other.example", "other.example")


def test_connection_and_its_own_header_are_one_hop() -> None:
    # spamd after Postfix: the MTA wrote the header for the same connection the caller reports.
    tp = path([POSTFIX_FROM_OUTSIDE, SENDER_SUBMISSION], client_ip="::ffff:192.0.2.10")
    assert ips(tp.untrusted) == ["192.0.2.10", "198.51.100.23"]
    le = tp.last_external
    assert le is not None and (le.rdns, le.helo, le.by) == (
        "mail.sender.example",
        "mail.sender.example",
        "mx1.example.net",
    )
    # What the caller knows wins over the header.
    tp = path([POSTFIX_FROM_OUTSIDE], client_ip="192.0.2.10", helo="real.helo.example")
    assert tp.last_external is not None and tp.last_external.helo == "real.helo.example"


def test_internal_connection_from_the_caller() -> None:
    tp = path([POSTFIX_FROM_OUTSIDE], internal=INTERNAL, client_ip="10.1.0.5", helo="mx1.example.net")
    assert ips(tp.trusted) == ["10.1.0.5"]
    assert tp.last_external is not None and tp.last_external.ip == "192.0.2.10"


def test_local_pickup_only() -> None:
    tp = path([POSTFIX_PICKUP])
    assert tp.trusted == () and tp.untrusted == () and tp.last_external is None


def test_trust_path_of_uses_the_network_config_and_is_computed_once() -> None:
    raw = (
        f"Received: {INTERNAL_HOP}\nReceived: {POSTFIX_FROM_OUTSIDE}\nFrom: a@sender.example\nSubject: hi\n\nbody\n"
    ).encode()
    parser = UriParser()
    scan = Scan(ctx=ScanContext(), uri_parser=parser, msg=parse_message(raw, uri_parser=parser))
    network = NetworkConfig(internal_networks=tuple(nets(*INTERNAL)))
    first = trust_path_of(scan, network)
    assert first is trust_path_of(scan, network) and scan.trust is first
    assert ips(first.trusted) == ["10.1.0.5"] and first.last_external is not None
    assert first.last_external.ip == "192.0.2.10"
