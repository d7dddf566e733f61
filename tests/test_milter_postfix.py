"""The milter and the policy service behind a real Postfix (Debian's), mail sent with swaks and
smtplib: what an SMTP client sees, and what reaches the next hop.

One Postfix and one `filterd daemon` serve the whole module. Postfix has one smtpd per case:

* ``milter``: smtpd_milters = the daemon's milter socket;
* ``policy``: check_policy_service = the daemon's policy socket, no milter;
* ``down_tempfail`` / ``down_accept``: a milter on a port where a daemon of the test's own
  runs and then stops, with milter_default_action tempfail / accept.

Greylisting exempts loopback clients, so the greylisting tests speak as another client with
XCLIENT (which Postfix allows from 127.0.0.0/8 here).
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import cast

import pytest

from tests.clamd_fixture import EICAR, Clamd
from tests.daemon_fixture import Daemon, need_binary, start_daemon
from tests.postfix_fixture import Postfix, free_port, start_postfix

pytest_plugins = ["tests.clamd_fixture"]

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
DELAY = 1.0  # greylist.delay in this module


def message(
    marker: str,
    body: bytes = b"Hello Bob,\r\n\r\nlunch on Friday at noon?\r\n\r\nAlice\r\n",
    *,
    subject: str = "Lunch",
    extra: bytes = b"",
    sender: str = "alice@example.net",
) -> bytes:
    return (
        (
            f"From: Alice <{sender}>\r\nTo: Bob <bob@example.org>\r\nSubject: {subject} {marker}\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: <{marker}@example.net>\r\n"  # now: no date rule fires
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def milter_port(daemon: Daemon) -> int:
    return daemon.milter_port()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, clamd: Clamd) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("milterd")
    prefs = tmp / "prefs"
    prefs.mkdir()
    (prefs / "lowbar.yaml").write_text("required_score: -50\n")  # everything is spam, below reject_score
    config = (
        f"greylist: {{enabled: true, delay: {DELAY}s}}\n"
        "scoring: {rewrite_subject: '[SPAM]'}\n"
        "lists: {welcomelist_from: ['*@friends.example']}\n"
        f"antivirus: {{enabled: true, clamd: '{clamd.unix_spec}'}}\n"
    )
    d = start_daemon(
        tmp,
        "--milter-listen",
        "127.0.0.1:0",
        "--policy-listen",
        "127.0.0.1:0",
        "--user-prefs",
        str(prefs),
        config=config,
    )
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def down_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, daemon: Daemon, down_port: int) -> Iterator[Postfix]:
    tmp = tmp_path_factory.mktemp("postfix")
    policy_port = int(daemon.wait_for_log(r"listening for policy on 127\.0\.0\.1:(\d+)").group(1))
    pf = start_postfix(
        tmp,
        services={
            "milter": {"smtpd_milters": f"inet:127.0.0.1:{milter_port(daemon)}"},
            "policy": {
                "smtpd_recipient_restrictions": f"reject_unauth_destination, "
                f"check_policy_service inet:127.0.0.1:{policy_port}, permit",
            },
            "down_tempfail": {"smtpd_milters": f"inet:127.0.0.1:{down_port}", "milter_default_action": "tempfail"},
            "down_accept": {"smtpd_milters": f"inet:127.0.0.1:{down_port}", "milter_default_action": "accept"},
        },
    )
    yield pf
    pf.stop()


def smtp(pf: Postfix, service: str, *, client: str = "") -> smtplib.SMTP:
    """A session with the given smtpd; as ``client`` (an IP address) through XCLIENT if given."""
    s = smtplib.SMTP("127.0.0.1", pf.ports[service], local_hostname="client.example.net", timeout=60)
    s.ehlo()
    if client:
        code, text = s.docmd("XCLIENT", f"ADDR={client} NAME=[UNAVAILABLE]")
        assert code == 220, (code, text)
        s.ehlo()
    return s


def headers_of(delivered: bytes) -> bytes:
    return delivered.partition(b"\n\n")[0]


# -- scoring at end of message ------------------------------------------------------------------


def test_clean_message_is_delivered_with_spam_status_no(postfix: Postfix, daemon: Daemon) -> None:
    swaks = need_binary("swaks")
    m = marker()
    data = message(
        m,
        extra=b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, forged by the sender\r\n"
        b"X-Filterd-Skipped: forged by the sender too\r\n",
    )
    proc = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{postfix.ports['milter']}", "--from", "alice@example.net",
         "--to", "bob@example.org", "--helo", "client.example.net", "--data", "-", "--silent", "2"],
        input=data, capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode() + postfix.log()
    head = headers_of(postfix.wait_delivered(m.encode()))
    assert b"X-Spam-Status: No, score=" in head
    assert b"X-Spam-Checker-Version: filterd" in head
    # What the sender claimed is gone; network checks are off, so no Authentication-Results.
    assert b"forged by the sender" not in head and b"X-Spam-Flag" not in head
    assert b"X-Filterd-Skipped" not in head  # it was scanned
    assert head.count(b"X-Spam-Status") == 1 and b"Authentication-Results" not in head
    daemon.wait_for_log(r"milter qid=\w+ client=127\.0\.0\.1 .*verdict=accepted")


def test_authentication_results_claiming_our_id_are_not_delivered(postfix: Postfix) -> None:
    # The daemon's authserv-id is this host's name (auth.authserv_id unset); its auth checks are
    # off (no network), and what claims its id must go all the same.
    ours = socket.getfqdn().encode()
    m = marker()
    forged = (
        b"Authentication-Results: " + ours + b"; dkim=pass header.d=bank.example; dmarc=pass\r\n"
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=alice@example.net\r\n"
        b"authentication-results: (see) " + ours.upper() + b" 1;\r\n\tdmarc=pass header.from=bank.example\r\n"
    )
    proc = subprocess.run(
        [need_binary("swaks"), "--server", f"127.0.0.1:{postfix.ports['milter']}", "--from", "alice@example.net",
         "--to", "bob@example.org", "--helo", "client.example.net", "--data", "-", "--silent", "2"],
        input=message(m, extra=forged), capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode() + postfix.log()
    head = headers_of(postfix.wait_delivered(m.encode()))
    fields = re.findall(rb"^authentication-results:.*(?:\n[ \t].*)*", head, re.I | re.M)
    assert fields == [b"Authentication-Results: other.example; spf=pass smtp.mailfrom=alice@example.net"], head
    assert b"bank.example" not in head
    assert b"X-Spam-Status: No, score=" in head


def test_gtube_is_refused_with_its_score(postfix: Postfix, daemon: Daemon) -> None:
    m = marker()
    with smtp(postfix, "milter") as s, pytest.raises(smtplib.SMTPDataError) as refused:
        s.sendmail("alice@example.net", ["bob@example.org"], message(m, GTUBE + b"\r\n"))
    assert refused.value.smtp_code == 550
    text = cast(bytes, refused.value.smtp_error).decode()
    assert text.startswith("5.7.1 Message scored 10") and text.endswith(", rejected as spam"), text
    time.sleep(0.5)
    assert not postfix.was_delivered(m.encode())
    assert "milter-reject: END-OF-MESSAGE" in postfix.log()
    # The verdict is counted (workers report to the master about once a second).
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        if 'filterd_verdicts_total{service="milter",verdict="rejected"}' in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 'filterd_verdicts_total{service="milter",verdict="rejected"}' in metrics


def test_spam_below_reject_score_is_tagged(postfix: Postfix) -> None:
    # lowbar's required_score (-50) makes anything spam, far below reject_score (15).
    m = marker()
    with smtp(postfix, "milter") as s:
        s.sendmail("alice@example.net", ["lowbar@example.org"], message(m))
    head = headers_of(postfix.wait_delivered(m.encode()))
    assert b"X-Spam-Flag: YES" in head and b"X-Spam-Status: Yes, score=" in head and b"required=-50.0" in head
    assert b"X-Spam-Report:" in head
    assert f"Subject: [SPAM] Lunch {m}".encode() in head


def test_a_virus_is_refused(postfix: Postfix) -> None:
    m = marker()
    with smtp(postfix, "milter") as s, pytest.raises(smtplib.SMTPDataError) as refused:
        s.sendmail("alice@example.net", ["bob@example.org"], message(m, EICAR + b"\r\n"))
    assert refused.value.smtp_code == 550
    assert cast(bytes, refused.value.smtp_error).startswith(b"5.7.1 Message contains a virus (Eicar-Test-")


# -- greylisting ----------------------------------------------------------------------------------


def test_greylisting_through_the_milter(postfix: Postfix, daemon: Daemon) -> None:
    m = marker()
    with smtp(postfix, "milter", client="192.0.2.20") as s:
        s.mail("carol@example.net")
        code, text = s.rcpt("bob@example.org")
        assert (code, text) == (451, b"4.7.1 Greylisted, please try again later")
        s.rset()
    time.sleep(DELAY + 0.2)
    with smtp(postfix, "milter", client="192.0.2.20") as s:
        s.sendmail("carol@example.net", ["bob@example.org"], message(m, sender="carol@example.net"))
    head = headers_of(postfix.wait_delivered(m.encode()))
    assert b"X-Greylist: delayed 1 seconds by filterd" in head and b"X-Spam-Status: No" in head
    daemon.wait_for_log(r"milter greylisted client=192\.0\.2\.20 from=<carol@example\.net>")


def test_welcome_listed_senders_are_not_greylisted(postfix: Postfix) -> None:
    m = marker()
    with smtp(postfix, "milter", client="192.0.2.30") as s:
        s.sendmail("dan@friends.example", ["bob@example.org"], message(m, sender="dan@friends.example"))
    assert b"X-Greylist" not in headers_of(postfix.wait_delivered(m.encode()))


def test_greylisting_through_the_policy_service(postfix: Postfix, daemon: Daemon) -> None:
    m = marker()
    with smtp(postfix, "policy", client="198.51.100.7") as s:
        s.mail("erin@example.net")
        code, text = s.rcpt("bob@example.org")
        # DEFER_IF_PERMIT: Postfix's defer code (450) with our enhanced status and text.
        assert code == 450 and text.startswith(b"4.7.1 <bob@example.org>: Recipient address rejected: Greylisted")
        s.rset()
    time.sleep(DELAY + 0.2)
    with smtp(postfix, "policy", client="198.51.100.7") as s:
        s.sendmail("erin@example.net", ["bob@example.org"], message(m, sender="erin@example.net"))
    head = headers_of(postfix.wait_delivered(m.encode()))
    assert b"X-Greylist: delayed 1 seconds by filterd at " in head
    assert b"X-Spam-Status" not in head  # no milter on this smtpd
    daemon.wait_for_log(r"policy greylisted client=198\.51\.100\.7 from=<erin@example\.net>")


# -- when the filter fails ---------------------------------------------------------------------


def test_clamd_down_tempfails_and_daemon_down_uses_milter_default_action(
    postfix: Postfix, down_port: int, tmp_path: Path
) -> None:
    # A daemon whose clamd is gone: antivirus.on_error tempfail says 451 4.7.0.
    d = start_daemon(
        tmp_path,
        "--milter-listen",
        f"127.0.0.1:{down_port}",
        workers=1,
        metrics=False,
        config=f"antivirus: {{enabled: true, clamd: '{tmp_path}/no-clamd.sock'}}\n",
    )
    try:
        with smtp(postfix, "down_accept") as s, pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("alice@example.net", ["bob@example.org"], message(marker()))
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error == b"4.7.0 Virus scan unavailable, try again later"
    finally:
        assert d.stop() == 0, d.log()
    # The daemon is down: Postfix applies milter_default_action (from MAIL FROM on).
    with smtp(postfix, "down_tempfail") as s:
        assert s.mail("alice@example.net") == (451, b"4.7.1 Service unavailable - try again later")
    m = marker()
    with smtp(postfix, "down_accept") as s:
        s.sendmail("alice@example.net", ["bob@example.org"], message(m))
    assert b"X-Spam-Status" not in headers_of(postfix.wait_delivered(m.encode()))
