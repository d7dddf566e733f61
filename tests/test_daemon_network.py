"""The daemon with network checks on, against the local DNS server: what a spamd client says
about the SMTP connection (rspamd's IP/Helo/From request headers) decides what is looked up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_fixture import start_daemon
from tests.dns_fixture import MakeDnsServer

pytest_plugins = ["tests.dns_fixture"]

MESSAGE = (
    b"Received: from mail.sender.test (mail.sender.test [11.22.33.45])\r\n"
    b"\tby mx.local.test (Postfix) with ESMTP id 4F00D; Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"From: a@sender.test\r\nTo: b@local.test\r\nSubject: hello\r\n"
    b"Message-ID: <1@sender.test>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nHi there.\r\n"
)


def _request(extra: bytes = b"") -> bytes:
    return b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n%s\r\n" % (len(MESSAGE), extra) + MESSAGE


def _dnsbl_only(nameserver: str) -> str:
    """Network checks on, asking ``nameserver``; the auth checks off (only the lists matter here)."""
    return (
        "network: {enabled: true}\n"
        f"dns: {{nameservers: ['{nameserver}']}}\n"
        "auth: {spf: false, dkim: false, dmarc: false, arc: false}\n"
    )


def test_client_named_connection_is_what_the_dnsbl_judges(tmp_path: Path, make_dns_server: MakeDnsServer) -> None:
    # 11.22.33.44 is listed; 11.22.33.45 (the relay in the Received header) is not.
    server = make_dns_server({".": [], "zen.spamhaus.org": ["44.33.22.11 A 127.0.0.2"]})
    config = _dnsbl_only(server.spec)
    daemon = start_daemon(tmp_path, config=config, workers=1, metrics=False)
    try:
        from_headers = daemon.request(_request(), unix=False)
        assert b"SPAMD/1.1 0 EX_OK" in from_headers
        assert b"RCVD_IN_SBL" not in from_headers
        named = daemon.request(_request(b"IP: 11.22.33.44\r\nHelo: mail.sender.test\r\nFrom: <a@sender.test>\r\n"))
        assert b"RCVD_IN_SBL" in named, named
        # A malformed address is ignored: the Received header decides again.
        bogus = daemon.request(_request(b"IP: 11.22.33.4477\r\n"))
        assert b"RCVD_IN_SBL" not in bogus
    finally:
        daemon.stop()


def test_shipped_dnswl_zone_lowers_the_score_of_an_allowlisted_relay(
    tmp_path: Path, make_dns_server: MakeDnsServer
) -> None:
    # The relay of the Received header, 11.22.33.45, has medium trust in the default allowlist.
    server = make_dns_server({".": [], "zen.spamhaus.org": [], "list.dnswl.org": ["45.33.22.11 A 127.0.15.2"]})
    config = _dnsbl_only(server.spec)
    daemon = start_daemon(tmp_path, config=config, workers=1, metrics=False)
    try:
        listed = daemon.request(_request())
        assert b"RCVD_IN_DNSWL_MED" in listed and b"RCVD_IN_SBL" not in listed, listed
        other = daemon.request(_request(b"IP: 11.22.33.46\r\n"))  # a client the list does not know
        assert b"RCVD_IN_DNSWL" not in other, other

        def score(reply: bytes) -> float:
            return float(reply.split(b"Spam: False ; ")[1].split(b" /")[0])

        assert score(listed) == pytest.approx(score(other) - 2.3)  # RCVD_IN_DNSWL_MED's -2.3
    finally:
        daemon.stop()
