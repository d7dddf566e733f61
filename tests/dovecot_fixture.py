"""Start a real Dovecot IMAP server (Debian's dovecot-imapd) on loopback, for tests.

``start_dovecot(tmp_path, users={"alice": "secret"})`` writes a configuration of its own under
``tmp_path/dovecot`` (base_dir, state_dir and logs there; nothing of /etc/dovecot is read),
starts ``dovecot -F -c CONF`` and waits for the IMAP greeting. Users are virtual: they log in
with plaintext passwords from a passwd-file, and their mail is a Maildir++ at
``Dovecot.maildir(user)`` (folder ``Junk`` is ``.Junk``) owned by one mail account,
``mail_user`` (as vmail is in virtual setups). That is whoever runs the tests, except root:
Dovecot's imap refuses uid 0 ("userdb returned 0 as uid"), so root's tests store mail as
``nobody``, under a world-traversable directory outside pytest's private tmp tree. Deliver with
``filterd deliver --user MAIL_USER``, which (started as root) becomes that account.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests._servers import free_port, greeting, read_log, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary

__all__ = ["Dovecot", "start_dovecot"]


@dataclass
class Dovecot:
    proc: subprocess.Popen[bytes]
    root: Path  # configuration, state, logs
    mail_root: Path  # mail/USER/Maildir below it
    mail_user: str  # the account owning every user's mail
    host: str
    port: int
    passwords: dict[str, str]

    def maildir(self, user: str) -> Path:
        """Where ``user``'s mail lives (Dovecot's mail_location)."""
        return self.mail_root / "mail" / user / "Maildir"

    def imap(self, user: str) -> imaplib.IMAP4:
        """A logged-in IMAP connection (close it with ``logout()``)."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=30)
        conn.login(user, self.passwords[user])
        return conn

    def log(self) -> str:
        """Dovecot's log and what it printed."""
        return read_log(self.root / "dovecot.log", self.root / "dovecot.out")

    def stop(self, timeout: float = 30) -> None:
        stop_process(self.proc, timeout)
        if self.mail_root != self.root:
            shutil.rmtree(self.mail_root, ignore_errors=True)


def _config(root: Path, mail_root: Path, uid: int, gid: int, port: int) -> str:
    me = pwd.getpwuid(os.getuid()).pw_name
    return f"""\
# written by tests/dovecot_fixture.py
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{mail_root}/mail/%u/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {min(uid, 500)}
first_valid_gid = {min(gid, 500)}
last_valid_uid = 0
# the packaged login/internal users are only needed for privilege separation of logins
default_login_user = {"dovenull" if os.getuid() == 0 else me}
default_internal_user = {"dovecot" if os.getuid() == 0 else me}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail_root}/mail/%u
}}
# auth reads the passwd-file, which lies in the test's private tmp directory
service auth {{
  user = {me}
}}
service auth-worker {{
  user = {me}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
"""


def start_dovecot(tmp_path: Path, users: dict[str, str] | None = None, *, timeout: float = 30) -> Dovecot:
    """Start Dovecot with its own configuration under ``tmp_path``; wait until IMAP answers."""
    binary = need_binary("dovecot")
    users = users or {"alice": "secret"}
    root = tmp_path / "dovecot"
    for sub in ("run", "state"):
        (root / sub).mkdir(parents=True)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        mail_root = Path(tempfile.mkdtemp(prefix="filterd-dovecot-"))
        mail_root.chmod(0o755)
    else:
        uid, gid, mail_root = os.getuid(), os.getgid(), root
    (mail_root / "mail").mkdir()
    os.chown(mail_root / "mail", uid, gid)
    (root / "passwd").write_text("".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in users.items()))
    conf = root / "dovecot.conf"
    port = free_port()
    conf.write_text(_config(root, mail_root, uid, gid, port))
    proc = spawn([binary, "-F", "-c", str(conf)], root / "dovecot.out")
    server = Dovecot(proc, root, mail_root, pwd.getpwuid(uid).pw_name, "127.0.0.1", port, dict(users))
    try:
        wait_until(
            lambda: greeting(server.host, port, timeout=2).startswith(b"* OK"), proc, name="dovecot",
            waiting_for=f"answer on port {port}", log=server.log, timeout=timeout,
        )  # fmt: skip
    except BaseException:
        server.stop()
        raise
    return server
