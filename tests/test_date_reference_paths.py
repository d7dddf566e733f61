"""The same message gets the same HDR_DATE_* verdict from `filterd daemon` as a milter, whether
the MTA in front of it is a real Postfix or `filterd mta`, and the right one: Date compared with
the time the receiving MTA took the message in.

A milter never sees the receiving MTA's own Received header (Postfix's milter8.c hides it, "for
Sendmail compatibility"), so the reference time has to be the time of the scan; a Received
header further down, written by the sending side, is no reference.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.daemon_fixture import Daemon, milter_daemon
from tests.mta.mta_fixture import Mta, start_mta
from tests.postfix_fixture import Postfix, start_postfix

DAY = 86400.0
DATE_RULES = {"HDR_DATE_PAST_4D", "HDR_DATE_PAST_1Y", "HDR_DATE_FUTURE_3H", "HDR_DATE_FUTURE_2D"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from milter_daemon(tmp_path_factory.mktemp("daemon"))


@pytest.fixture(scope="module")
def milter_port(daemon: Daemon) -> int:
    return daemon.milter_port()


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, milter_port: int) -> Iterator[Postfix]:
    pf = start_postfix(
        tmp_path_factory.mktemp("postfix"), services={"milter": {"smtpd_milters": f"inet:127.0.0.1:{milter_port}"}}
    )
    yield pf
    pf.stop()


@pytest.fixture(scope="module")
def mta(tmp_path_factory: pytest.TempPathFactory, milter_port: int) -> Iterator[Mta]:
    m = start_mta(
        tmp_path_factory.mktemp("mta"),
        "--filter",
        f"127.0.0.1:{milter_port}",
        config="mta: {local_domains: [example.org], milter_timeout: 30s}\n",
    )
    yield m
    assert m.stop() == 0, m.log()


def message(marker: str, *, age_days: float, upstream_age_days: float | None = None) -> bytes:
    """A plain message whose Date is ``age_days`` old; with ``upstream_age_days``, it carries
    the Received header of a sending-side relay stamped that long ago."""
    upstream = b""
    if upstream_age_days is not None:
        stamp = email.utils.formatdate(time.time() - upstream_age_days * DAY)
        upstream = (
            "Received: from laptop.example.net (laptop.example.net [192.0.2.20])\r\n"
            f"\tby smtp.example.net (Postfix) with ESMTP id 4AB12; {stamp}\r\n"
        ).encode()
    return (
        upstream
        + (
            f"From: Alice <alice@example.net>\r\nTo: Bob <bob@example.org>\r\nSubject: Lunch {marker}\r\n"
            f"Date: {email.utils.formatdate(time.time() - age_days * DAY)}\r\n"
            f"Message-ID: <{marker}@example.net>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Hello Bob,\r\n\r\nlunch on Friday at noon?\r\n\r\nAlice\r\n"
        ).encode()
    )


def date_rules(delivered: bytes) -> set[str]:
    """The HDR_DATE_* rules named in the X-Spam-Status header the daemon added."""
    head = delivered.replace(b"\r\n", b"\n").partition(b"\n\n")[0].decode()
    status = re.search(r"^X-Spam-Status:(.*(?:\n[ \t].*)*)", head, re.M)
    assert status, head
    tests = re.search(r"tests=(\S*)", status[1].replace("\n", " "))
    assert tests, status[1]
    return set(tests[1].split(",")) & DATE_RULES


def send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=60) as s:
        s.sendmail("alice@example.net", ["bob@example.org"], data)


def through_postfix(pf: Postfix, data: bytes, marker: str) -> set[str]:
    send(pf.ports["milter"], data)
    return date_rules(pf.wait_delivered(marker.encode()))


def through_mta(mta: Mta, data: bytes, marker: str) -> set[str]:
    send(mta.port, data)
    [queued] = [d for _, d in mta.queued() if marker.encode() in d]
    return date_rules(queued)


@pytest.mark.parametrize(
    ("age_days", "upstream_age_days", "expected"),
    [
        (2, None, set()),
        (2, 2, set()),
        (30, None, {"HDR_DATE_PAST_4D"}),
        (730, None, {"HDR_DATE_PAST_1Y"}),
        # the sending side's clock or a forged trace header: not the time we took the message in
        (730, 730, {"HDR_DATE_PAST_1Y"}),
    ],
    ids=["recent", "recent-upstream", "month", "two-years", "two-years-old-upstream"],
)
def test_postfix_and_filterd_mta_give_the_same_date_verdict(
    postfix: Postfix, mta: Mta, age_days: float, upstream_age_days: float | None, expected: set[str]
) -> None:
    marker = f"m{uuid.uuid4().hex[:12]}"
    data = message(marker, age_days=age_days, upstream_age_days=upstream_age_days)
    assert through_postfix(postfix, data, marker) == expected
    assert through_mta(mta, data, marker) == expected
