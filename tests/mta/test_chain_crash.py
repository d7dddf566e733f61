"""The whole chain under crashes (issue #7): 2,000 messages sent over SMTP by a few clients while
`filterd mta` (in-process Maildir delivery) is killed with SIGKILL at random moments and
restarted on the same state directory and port, at least 10 times. A message counts as accepted
only when its client read ``250`` for it; clients retry on refused connections, lost sessions
and 4xx. After the queue drains, every accepted message is in the Maildir at least once.
Duplicates (delivered but not yet recorded when the MTA died; or queued, then the 250 lost with
the process, then sent again) are allowed, counted and reported; anything in the Maildir must
be a message that was sent."""

from __future__ import annotations

import contextlib
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from filterd.mta.queue import Queue
from tests.mta.mta_fixture import Mta
from tests.postfix_fixture import free_port

MESSAGES = 2000
CLIENTS = 4
KILLS = 10
USERS = 4
BODY = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\r\n" for i in range(24))


def _message(n: int) -> bytes:
    return (
        f"From: sender{n % 7}@example.net\r\nTo: u{n % USERS}@example.org\r\nSubject: chain crash {n}\r\n"
        f"Message-ID: <chain-{n}@example.net>\r\nX-Test-Id: {n}\r\n\r\n{BODY}"
    ).encode()


def _start(run: Path, port: int, n: int) -> Mta:
    log_path = run / f"mta{n}.log"
    cmd = [
        sys.executable, "-m", "filterd", "mta", "--config", str(run / "filterd.yaml"), "--state-dir",
        str(run / "state"), "--listen", f"127.0.0.1:{port}", "--hostname", "mx.example.org",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    mta = Mta(proc, log_path, run / "state", port=port)
    mta.wait_for_log(r"filterd mta: ready", timeout=60)
    return mta


class _Clients:
    """CLIENTS threads sending the messages in turn, each until it reads 250 for it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.todo = list(range(MESSAGES - 1, -1, -1))
        self.accepted: set[int] = set()
        self.retries = 0
        self.refusals: list[str] = []  # 5xx: must stay empty
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def _next(self) -> int | None:
        with self.lock:
            return self.todo.pop() if self.todo else None

    def _run(self) -> None:
        smtp: smtplib.SMTP | None = None
        n = self._next()
        while n is not None:
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                smtp.sendmail(f"sender{n % 7}@example.net", [f"u{n % USERS}@example.org"], _message(n))
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    self.refusals.append(f"{n}: {exc.smtp_code} {exc.smtp_error!r}")
                    return
                self._fail(smtp)
                smtp = None
            except (OSError, smtplib.SMTPException):  # refused, reset, disconnected, timed out
                self._fail(smtp)
                smtp = None
            else:
                with self.lock:
                    self.accepted.add(n)
                n = self._next()
                continue
            with self.lock:
                self.retries += 1
            time.sleep(0.05)
        if smtp is not None:
            self._fail(smtp)

    @staticmethod
    def _fail(smtp: smtplib.SMTP | None) -> None:
        if smtp is not None:
            with contextlib.suppress(OSError):
                smtp.close()


def test_sigkill_while_mail_flows_loses_no_accepted_message(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    mail = tmp_path / "mail"
    (tmp_path / "filterd.yaml").write_text(
        "network: {enabled: false}\n"
        "dns: {nameservers: ['127.0.0.1:9']}\n"
        "deliver: {filter: false}\n"
        "mta:\n"
        "  peername_lookup: false\n"  # no DNS server here: 127.0.0.1:9 answers nothing
        "  local_domains: [example.org]\n"
        "  local_delivery: maildir\n"
        f"  mailbox: '{mail}/{{user}}/'\n"
        "  min_backoff: 1s\n"
        "  max_backoff: 2s\n"
    )
    port = free_port()
    rng = random.Random(20270107)
    started = time.monotonic()
    mta = _start(tmp_path, port, 0)
    clients = _Clients(port)
    clients.start()
    kills = 0
    kills_while_sending = 0
    try:
        # Kill at random moments while the clients send, and then while the queue drains if the
        # sending ended first, until KILLS kills; one more start delivers the rest.
        while kills < KILLS:
            time.sleep(rng.uniform(0.2, 1.5))
            sending = not clients.done()
            mta.proc.send_signal(signal.SIGKILL)
            mta.proc.wait()
            kills += 1
            kills_while_sending += sending
            mta = _start(tmp_path, port, kills)
        sending_deadline = time.monotonic() + 120
        while not clients.done():
            assert time.monotonic() < sending_deadline, f"clients stuck: {len(clients.accepted)} accepted"
            time.sleep(0.1)
        sent = time.monotonic()
        queue = Queue(tmp_path / "state" / "queue")
        deadline = time.monotonic() + 120
        while any(queue.ids(s) for s in ("incoming", "active", "deferred")):
            assert time.monotonic() < deadline, mta.log()
            time.sleep(0.1)
        assert mta.stop() == 0, mta.log()
    finally:
        if mta.proc.poll() is None:
            mta.proc.kill()
            mta.proc.wait()
    elapsed = time.monotonic() - started

    assert not clients.refusals, clients.refusals[:5]
    assert clients.accepted == set(range(MESSAGES))
    found: Counter[int] = Counter()
    for path in mail.glob("*/new/*"):
        data = path.read_bytes()
        m = re.search(rb"^X-Test-Id: (\d+)$", data, re.M)
        assert m, path
        assert data.endswith(BODY.replace("\r\n", "\n").encode()), path  # whole, never truncated
        assert f"Delivered-To: u{int(m[1]) % USERS}@example.org\n".encode() in data
        found[int(m[1])] += 1
    lost = clients.accepted - set(found)
    duplicates = sum(c - 1 for c in found.values())
    record_property("kills", kills)
    record_property("accepted", len(clients.accepted))
    record_property("delivered", sum(found.values()))
    record_property("duplicates", duplicates)
    record_property("seconds", round(elapsed, 1))
    print(
        f"\nchain crash test: {kills} SIGKILLs ({kills_while_sending} while sending), {len(clients.accepted)} "
        f"accepted after {clients.retries} client retries, {sum(found.values())} delivered, {duplicates} "
        f"duplicates, {len(lost)} lost; sending took {sent - started:.1f}s, all {elapsed:.1f}s"
    )
    assert not lost, f"{len(lost)} accepted messages lost after {kills} kills: {sorted(lost)[:10]}"
    assert set(found) <= set(range(MESSAGES))  # nothing there that was not sent
    assert kills_while_sending >= KILLS // 2  # most kills hit the accept path, not only delivery
    assert not list(queue.corrupt.iterdir())
