"""Two `filterd daemon` processes sharing one real redis-server (``state.backend: redis``), each
with a state directory of its own: what is learnt, greylisted or scored through one is seen by
the other, as on two machines behind one Redis."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.engine.bayes.check import BANDS
from tests.daemon_fixture import Daemon, start_daemon
from tests.engine.bayes_helpers import make_raw
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]

DELAY = 1.0  # greylist.delay
LEARN = 8  # spam and ham messages learnt; min_spam and min_ham are 5


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[tuple[Daemon, Daemon]]:
    """Daemons A and B on one Redis, under a key prefix of their own."""
    tmp = tmp_path_factory.mktemp("shared")
    config = (
        f"state: {{backend: redis, redis_url: '{redis_server.url}', "
        f"redis_key_prefix: '{redis_server.unique_prefix()}'}}\n"
        "bayes: {min_spam: 5, min_ham: 5, autolearn: false}\n"
        f"greylist: {{enabled: true, delay: {DELAY}s}}\n"
        "reputation: {enabled: true}\n"
    )
    args = ("--allow-tell", "--policy-listen", "127.0.0.1:0")
    a = start_daemon(tmp, *args, config=config, workers=2, metrics=False)
    try:
        b = start_daemon(tmp, *args, config=config, workers=2, metrics=False)
    except BaseException:
        a.stop()
        raise
    assert a.log_path.parent != b.log_path.parent  # two state directories: nothing shared on disk
    yield a, b
    for d in (a, b):
        assert d.stop() == 0, d.log()


def tell(daemon: Daemon, raw: bytes, message_class: str) -> bytes:
    """spamc -L: learn ``raw`` through the daemon's spamd TELL."""
    head = f"TELL SPAMC/1.5\r\nContent-length: {len(raw)}\r\nMessage-class: {message_class}\r\nSet: local\r\n\r\n"
    return daemon.request(head.encode() + raw)


def symbols(daemon: Daemon, raw: bytes, **headers: str) -> set[str]:
    """The rules a SYMBOLS request reports (rspamd-style headers, e.g. IP, pass connection facts)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    reply = daemon.request(f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(raw)}\r\n{extra}\r\n".encode() + raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert re.match(rb"SPAMD/1\.\d 0 EX_OK", head), reply
    return set(body.decode().split(",")) - {""}


def bayes_band(rules: set[str]) -> int:
    """The index in BANDS of the BAYES_xx rule that fired (the lower one with BAYES_999); -1: none."""
    found = [i for i, (name, _, _) in enumerate(BANDS) if name in rules]
    return min(found) if found else -1


def every_worker(daemon: Daemon, raw: bytes, times: int = 12) -> list[set[str]]:
    """The rules of ``raw`` from several connections, so that both workers answer."""
    return [symbols(daemon, raw) for _ in range(times)]


def learn_through(daemon: Daemon, n: int, *, first: int = 0) -> None:
    """Learn ``n`` generated spam and ``n`` generated ham messages through the daemon."""
    for i in range(first, first + n):
        for is_spam in (True, False):
            reply = tell(daemon, make_raw(i, is_spam), "spam" if is_spam else "ham")
            assert re.match(rb"SPAMD/1\.\d 0 EX_OK", reply) and b"DidSet: local" in reply, reply


def policy_port(daemon: Daemon) -> int:
    return int(daemon.wait_for_log(r"listening for policy on 127\.0\.0\.1:(\d+)").group(1))


def ask(port: int, **attributes: str) -> str:
    """One Postfix policy delegation request on a new connection; the action answered."""
    request = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
               "client_name": "unknown", "helo_name": "mx.sender.example", **attributes}  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("".join(f"{k}={v}\n" for k, v in request.items()).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    assert answer.startswith(b"action="), answer
    return answer[len(b"action=") : -2].decode()


def test_a_message_learnt_through_one_daemon_changes_the_bayes_verdict_of_the_other(
    daemons: tuple[Daemon, Daemon],
) -> None:
    a, b = daemons
    spam_probe, ham_probe = make_raw(1000, True), make_raw(1000, False)
    assert all(bayes_band(rules) == -1 for rules in every_worker(b, spam_probe, 4))  # nothing learnt yet
    learn_through(a, LEARN)
    learnt_at = time.monotonic()
    while True:
        spam_rules, ham_rules = every_worker(b, spam_probe), every_worker(b, ham_probe)
        if all(bayes_band(r) >= 0 for r in spam_rules + ham_rules):
            break
        assert time.monotonic() - learnt_at < 5.0, f"B never saw A's learning: {spam_rules} {ham_rules}"
        time.sleep(0.1)
    assert all(bayes_band(r) >= bayes_band({"BAYES_95"}) for r in spam_rules), spam_rules
    assert all(bayes_band(r) <= bayes_band({"BAYES_05"}) for r in ham_rules), ham_rules
    # And back: B learns a word A has never seen, and A's verdict on a message of it changes.
    novel = (b"From: someone@unseen.example\nTo: dana@example.net\nSubject: quuxfrobnitz\n"
             b"Message-ID: <novel@unseen.example>\n\nquuxfrobnitz quuxfrobnitz\n")  # fmt: skip
    assert bayes_band(symbols(a, novel)) == -1  # no known token: no opinion
    for i in range(LEARN):
        assert b"DidSet: local" in tell(b, make_raw(3000 + i, True, extra="quuxfrobnitz"), "spam")
    deadline = time.monotonic() + 5.0
    while not all(bayes_band(r) >= bayes_band({"BAYES_60"}) for r in every_worker(a, novel)):  # p > 0.6
        assert time.monotonic() < deadline, f"A never saw B's learning: {every_worker(a, novel, 2)}"
        time.sleep(0.1)
    assert re.search(r"tell user=- class=spam .* did_set=local", b.log())


def test_a_greylist_retry_through_the_other_daemon_passes(daemons: tuple[Daemon, Daemon]) -> None:
    a, b = daemons
    port_a, port_b = policy_port(a), policy_port(b)
    triplet = {"client_address": "198.51.100.7", "sender": "news@list.example", "recipient": "alice@example.org"}
    fresh = {**triplet, "recipient": "bob@example.org"}
    assert ask(port_a, instance="m.1", **triplet).startswith("DEFER_IF_PERMIT 4.7.1")  # first sight, on A
    assert ask(port_b, instance="m.2", **triplet).startswith("DEFER_IF_PERMIT 4.7.1")  # too early, on B
    time.sleep(DELAY + 0.2)
    action = ask(port_b, instance="m.3", **triplet)
    assert action.startswith("PREPEND X-Greylist: delayed "), action  # B knew when A first saw it
    assert ask(port_a, instance="m.4", **triplet) == "DUNNO"  # and A knows it passed
    assert ask(port_b, instance="m.5", **fresh).startswith("DEFER_IF_PERMIT 4.7.1")  # a new one still waits


def test_a_reputation_recorded_through_one_daemon_is_applied_by_the_other(daemons: tuple[Daemon, Daemon]) -> None:
    a, b = daemons
    ip = {"IP": "203.0.113.5"}

    def message(sender: str, body: str) -> bytes:
        return (f"From: Rep Tester <{sender}>\r\nTo: dana@example.net\r\nSubject: hello\r\n"
                f"Message-ID: <{abs(hash(body))}@rep.example>\r\nDate: Mon, 12 Jan 2026 10:00:00 +0000\r\n"
                f"\r\n{body}\r\n").encode()  # fmt: skip

    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    first = symbols(a, message("rep@sender.example", gtube), **ip)
    assert "GTUBE" in first and "REPUTATION" not in first  # no history yet: only recorded
    assert "REPUTATION" in symbols(b, message("rep@sender.example", "an ordinary note"), **ip)
    assert "REPUTATION" not in symbols(b, message("other@sender.example", "an ordinary note"), **ip)
    # From another network the history does not apply (AWL's /16 per sender).
    assert "REPUTATION" not in symbols(b, message("rep@sender.example", "another note"), IP="192.0.2.9")


def test_each_daemon_keeps_nothing_on_its_own_disk(daemons: tuple[Daemon, Daemon]) -> None:
    for daemon in daemons:
        state = daemon.log_path.parent / "state"
        assert not (state / "bayes.sqlite").exists() and not (state / "state.sqlite").exists()


def test_scanning_creates_no_bayes_store(redis_server: RedisServer, tmp_path: Path) -> None:
    """Scanning through a daemon on an empty Redis prefix creates no Bayes keys (as scanning
    never creates a SQLite store)."""
    import redis

    prefix = redis_server.unique_prefix()
    config = f"state: {{backend: redis, redis_url: '{redis_server.url}', redis_key_prefix: '{prefix}'}}\n"
    config += "bayes: {autolearn: false}\n"  # autolearning would create it, as it creates the SQLite file
    d = start_daemon(tmp_path, config=config, workers=1, metrics=False)
    try:
        for _ in range(3):
            assert bayes_band(symbols(d, make_raw(1, True))) == -1
            time.sleep(0.5)
        with redis.Redis.from_url(redis_server.url) as r:
            assert not r.keys(prefix + "bayes:*")
    finally:
        assert d.stop() == 0, d.log()
