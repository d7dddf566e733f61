#!/usr/bin/env python3
"""The README's main job: the whole mail chain on one machine, on embedded defaults.

1. `filterd learn` trains Bayes on the samples in corpora/ (spam/ and ham/);
2. `filterd daemon` starts with its milter on a Unix socket (network checks off: the demo
   runs offline);
3. `filterd mta` starts on a loopback port, asks the daemon before accepting each message,
   and delivers local mail into a Maildir the way `filterd deliver` does, in its own process
   (``mta.local_delivery: maildir``), where a one-line recipe files messages the milter tagged
   as spam into .Junk;
4. every sample is sent over SMTP to demo@demo.test, and once the queue is empty a table says
   where each one landed (Inbox, Junk, or refused at SMTP) beside its true label.

    python scripts/demo.py [--keep]     # --keep leaves the temporary directory for a look
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FILTERD = str(BIN / "filterd")
RECIPIENT = "demo@demo.test"

CONFIG = """\
# The demo's only settings; everything else is filterd's embedded default.
bayes: {{min_spam: 10, min_ham: 10}}      # corpora/ holds about 30 of each, not the usual 200
mta:
  hostname: mx.demo.test
  local_domains: [demo.test]
  mailboxes: {{demo: "{maildir}"}}
  # What `filterd deliver` does, inside the MTA (auto would run it as a command when root).
  local_delivery: maildir
  # Every client here is on loopback: no reverse lookups (they would ask this machine's resolver).
  peername_lookup: false
# The milter has already scored the message: the recipes file it by the headers it added.
deliver: {{filter: false, recipes: "{recipes}"}}
"""
RECIPES = """\
- {header: {X-Spam-Flag: '/^YES/'}, folder: Junk}
"""


@dataclass
class Outcome:
    name: str
    truth: str
    landed: str = "?"
    score: str = ""
    detail: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def smtp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(3) == b"220"
    except OSError:
        return False


def sender_of(raw: bytes) -> str:
    m = re.search(rb"^From:[^\n]*?<?([\w.+-]+@[\w.-]+)>?", raw, re.M | re.I)
    return m.group(1).decode() if m else "sender@example.net"


def send(port: int, path: Path, outcome: Outcome) -> bool:
    """Send one sample; True when the MTA took responsibility for it (250)."""
    raw = path.read_bytes().replace(b"\r\n", b"\n")
    tagged = f"X-Demo-Sample: {path.parent.name}/{path.name}\n".encode() + raw
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.sendmail(sender_of(raw), [RECIPIENT], tagged.replace(b"\n", b"\r\n"))
        return True
    except smtplib.SMTPResponseException as exc:
        outcome.landed = f"refused {exc.smtp_code}"
        text = exc.smtp_error.decode(errors="replace")
        m = re.search(r"scored (-?[\d.]+)", text)
        outcome.score = m.group(1) if m else ""
        outcome.detail = text[:60]
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        outcome.landed, outcome.detail = f"refused {code}", text.decode(errors="replace")[:60]
    return False


def delivered(maildir: Path) -> dict[str, tuple[str, str]]:
    """Sample name -> (folder, score) for every message in the Maildir."""
    found = {}
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    for folder, sub in (("Inbox", maildir), ("Junk", maildir / ".Junk")):
        for f in sorted((sub / "new").glob("*")) if (sub / "new").is_dir() else []:
            headers = parser.parsebytes(f.read_bytes())
            status = str(headers.get("X-Spam-Status", ""))
            m = re.search(r"score=(-?[\d.]+)", status)
            found[str(headers.get("X-Demo-Sample", "")).strip()] = (folder, m.group(1) if m else "")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, queue, Maildir)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filterd-demo-"))
    state, maildir = tmp / "state", tmp / "mail" / "demo" / "Maildir"
    config, recipes = tmp / "demo.yaml", tmp / "recipes.yaml"
    recipes.write_text(RECIPES)
    config.write_text(CONFIG.format(maildir=maildir, recipes=recipes))
    milter_sock, port = tmp / "milter.sock", free_port()
    common = ["--config", str(config), "--state-dir", str(state)]
    samples = sorted((ROOT / "corpora" / "spam").glob("*.eml")) + sorted((ROOT / "corpora" / "ham").glob("*.eml"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print("== 1. train Bayes on corpora/ (filterd learn)")
        subprocess.run([FILTERD, "learn", *common, "--spam", str(ROOT / "corpora" / "spam")], check=True)
        subprocess.run([FILTERD, "learn", *common, "--ham", str(ROOT / "corpora" / "ham")], check=True)
        print("== 2. start filterd daemon (milter on a Unix socket) and filterd mta (SMTP on 127.0.0.1)")
        daemon_log, mta_log = tmp / "daemon.log", tmp / "mta.log"
        daemon = subprocess.Popen(
            [FILTERD, "daemon", *common, "--local", "--workers", "2", "--listen", str(tmp / "spamd.sock"),
             "--milter-listen", str(milter_sock)],
            stdout=daemon_log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(daemon)
        wait_for(milter_sock.exists, "filterd daemon", daemon, daemon_log)
        mta = subprocess.Popen(
            [FILTERD, "mta", *common, "--listen", f"127.0.0.1:{port}", "--filter", str(milter_sock)],
            stdout=mta_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(mta)
        wait_for(lambda: smtp_ready(port), "filterd mta", mta, mta_log)
        print(f"== 3. send {len(samples)} samples over SMTP to {RECIPIENT}")
        outcomes = [Outcome(p.name, p.parent.name) for p in samples]
        accepted = sum(send(port, p, o) for p, o in zip(samples, outcomes, strict=True))
        deadline = time.monotonic() + 120
        while len(delivered(maildir)) < accepted and time.monotonic() < deadline:
            time.sleep(0.3)
        landed = delivered(maildir)
        for path, outcome in zip(samples, outcomes, strict=True):
            key = f"{path.parent.name}/{path.name}"
            if key in landed:
                outcome.landed, outcome.score = landed[key]
        print(f"\n{'sample':<48} {'truth':<5} {'score':>7}  where it landed")
        for o in outcomes:
            print(f"{o.name[:48]:<48} {o.truth:<5} {o.score:>7}  {o.landed}{'  ' + o.detail if o.detail else ''}")
        summary(outcomes)
        missing = [o.name for o in outcomes if o.landed == "?"]
        if missing:
            print(f"\n{len(missing)} accepted messages were not delivered in time; see {mta_log}")
            return 1
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"\n(kept: {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def summary(outcomes: list[Outcome]) -> None:
    print()
    for truth in ("spam", "ham"):
        group = [o for o in outcomes if o.truth == truth]
        inbox = sum(o.landed == "Inbox" for o in group)
        junk = sum(o.landed == "Junk" for o in group)
        refused = sum(o.landed.startswith("refused") for o in group)
        print(f"{truth:<5} {len(group):3} messages: Inbox {inbox:3}   Junk {junk:3}   refused at SMTP {refused:3}")


if __name__ == "__main__":
    sys.exit(main())
