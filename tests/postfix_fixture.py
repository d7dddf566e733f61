"""A real Postfix (Debian's package) for tests: its own configuration, queue and data directories
under a temporary directory, smtpd services on high loopback ports, and Postfix's own
smtp-sink as the next hop, writing every delivered message to a file.

    pf = start_postfix(tmp, services={"milter": {"smtpd_milters": "inet:127.0.0.1:PORT"}})
    with smtplib.SMTP("127.0.0.1", pf.ports["milter"]) as s: ...
    message = pf.wait_delivered(b"Subject: marker")
    pf.stop()

Each service is one smtpd line in master.cf with its own port and ``-o`` overrides, so one
Postfix (about a second to start) serves every case of a test module. Mail to example.org and
example.net is relayed to the sink; clients on 127.0.0.0/8 may send XCLIENT, so a test can
speak as a client from anywhere (greylisting exempts loopback). Postfix logs to ``maillog``
in the temporary directory (``Postfix.log()``), and failures quote it.

Postfix runs as root with ``mail_owner = postfix`` (the user the package creates), without
chroot; ``postfix start-fg`` keeps its master process a child of the test, stopped at teardown.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests._servers import free_port, greeting, spawn, stop_process, wait_until
from tests.daemon_fixture import need_binary

__all__ = ["Postfix", "free_port", "start_postfix"]

# The services Postfix needs besides smtpd: the queue manager and its helpers, the smtp
# client towards the sink, error/discard for refused transports, postlog for maillog_file;
# virtual for callers that deliver into Maildirs (virtual_mailbox_domains, scripts/bench-mta).
_MASTER_CF = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
virtual    unix  -       n       n       -       -       virtual
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30) -> None:
    wait_until(
        lambda: greeting("127.0.0.1", port, timeout=5).startswith(b"220"), proc, name=what,
        waiting_for=f"answer on port {port}", log=lambda: _tail(log), timeout=timeout,
    )  # fmt: skip


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


@dataclass
class Postfix:
    root: Path
    confdir: Path
    maillog: Path
    sink_dir: Path
    ports: dict[str, int]
    sink_port: int
    master: subprocess.Popen[bytes]
    sink: subprocess.Popen[bytes]
    keep_logs_in: Path

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def postconf(self, *args: str) -> str:
        return subprocess.run(
            ["postconf", "-c", str(self.confdir), *args], check=True, capture_output=True, text=True
        ).stdout

    def delivered(self) -> list[bytes]:
        """Every message the sink has written so far (smtp-sink's own X-* lines first)."""
        return [p.read_bytes() for p in sorted(self.sink_dir.rglob("*")) if p.is_file()]

    def wait_delivered(self, marker: bytes, timeout: float = 30) -> bytes:
        """The delivered message containing ``marker``, once the sink has written all of it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.delivered():
                # smtp-sink ends each dump with an empty line once the transaction is over.
                if marker in message and message.endswith(b"\n\n"):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no delivered message contains {marker!r} after {timeout}s; maillog:\n{self.log()}")

    def was_delivered(self, marker: bytes) -> bool:
        return any(marker in m for m in self.delivered())

    def stop(self) -> None:
        # start-fg's master is a child of the postfix-script shell, not of us: `postfix stop`
        # is what reaches it (it kills master's process group).
        if self.master.poll() is None:
            subprocess.run(["postfix", "-c", str(self.confdir), "stop"], capture_output=True, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.master.wait(20)
        for proc in (self.master, self.sink):
            stop_process(proc, 20)
        if self.root.exists():
            for name in ("maillog", "sink.log", "master.out"):
                with contextlib.suppress(OSError):
                    shutil.copy(self.root / name, self.keep_logs_in / f"postfix-{name}")
            shutil.rmtree(self.root, ignore_errors=True)


def _make_queue(queue: Path, uid: int, gid: int) -> None:
    """The queue directories as postfix-files lays them out, so that start can skip its 2 s
    integrity check (postfix-script honours a ``quick-start`` file)."""
    postdrop = grp.getgrnam("postdrop").gr_gid
    for name in (
        "active",
        "bounce",
        "corrupt",
        "defer",
        "deferred",
        "flush",
        "hold",
        "incoming",
        "private",
        "saved",
        "trace",
    ):
        (queue / name).mkdir(mode=0o700)
        os.chown(queue / name, uid, gid)
    (queue / "pid").mkdir(mode=0o755)
    for name, mode in (("maildrop", 0o730), ("public", 0o710)):
        (queue / name).mkdir()
        os.chown(queue / name, uid, postdrop)
        (queue / name).chmod(mode)
    (queue / "quick-start").touch()


def _service(port: int, overrides: Mapping[str, str]) -> str:
    # Values with spaces or commas need Postfix >= 3.0's "{ name = value }" form.
    opts = "".join(f"\n  -o {{ {name} = {value} }}" for name, value in overrides.items())
    return f"127.0.0.1:{port} inet n - n - - smtpd{opts}\n"


def start_postfix(
    tmp: Path,
    *,
    services: Mapping[str, Mapping[str, str]],
    main: Mapping[str, str] | None = None,
) -> Postfix:
    """Start Postfix with one smtpd per entry of ``services`` (name -> ``-o`` overrides) and
    ``main`` added to main.cf; returns once every smtpd and the sink answer."""
    postfix = need_binary("postfix")
    sink_binary = need_binary("smtp-sink")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        raise AssertionError("the postfix user is missing; reinstall Debian's postfix package") from None
    # Postfix's processes run as the postfix user, which cannot enter pytest's 0700 temporary
    # directories: everything Postfix touches lives in a directory of its own, removed at
    # teardown after its logs are copied to ``tmp``.
    root = Path(tempfile.mkdtemp(prefix="filterd-postfix-"))
    root.chmod(0o711)
    confdir, queue, data, sink_dir = root / "etc", root / "queue", root / "data", root / "sink"
    for directory in (confdir, queue, data, sink_dir):
        directory.mkdir()
    owner = pwd.getpwnam("postfix")
    os.chown(data, owner.pw_uid, owner.pw_gid)
    os.chown(sink_dir, owner.pw_uid, owner.pw_gid)
    maillog = root / "maillog"
    sink_port = free_port()
    ports = {name: free_port() for name in services}
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "command_directory": "/usr/sbin",
        "daemon_directory": "/usr/lib/postfix/sbin",
        "meta_directory": "/etc/postfix",
        "shlib_directory": "/usr/lib/postfix",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "mx.test",
        "mydomain": "test",
        "myorigin": "mx.test",
        "mydestination": "",
        "relay_domains": "example.org, example.net",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        # Everything goes to the sink; never DNS, never a local mailbox.
        "default_transport": f"smtp:[127.0.0.1]:{sink_port}",
        "relay_transport": f"smtp:[127.0.0.1]:{sink_port}",
        "local_transport": "error:local delivery is off",
        "smtp_dns_support_level": "disabled",
        "smtpd_peername_lookup": "no",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtputf8_enable": "no",
        "biff": "no",
        "maillog_file": str(maillog),
        "maillog_file_prefixes": str(root),
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "smtpd_milters": "",
        "milter_default_action": "tempfail",
        "in_flow_delay": "0",
        "smtpd_error_sleep_time": "0",
        "smtpd_soft_error_limit": "1000",
        "smtpd_hard_error_limit": "1000",
        "smtpd_client_connection_rate_limit": "0",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
    }
    settings.update(main or {})
    (confdir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    master_cf = _MASTER_CF + "".join(_service(ports[name], o) for name, o in services.items())
    (confdir / "master.cf").write_text(master_cf)
    # dynamicmaps.cf lists the map types of optional packages; Postfix reads it from the config dir.
    if Path("/etc/postfix/dynamicmaps.cf").exists():
        shutil.copy("/etc/postfix/dynamicmaps.cf", confdir / "dynamicmaps.cf")
    env = {**os.environ, "MAIL_CONFIG": str(confdir)}
    _make_queue(queue, owner.pw_uid, owner.pw_gid)
    sink_log = root / "sink.log"
    sink = spawn([sink_binary, "-u", "postfix", "-d", f"{sink_dir}/%H%M%S.", f"127.0.0.1:{sink_port}", "64"], sink_log)
    master = spawn([postfix, "-c", str(confdir), "start-fg"], root / "master.out", env=env)
    pf = Postfix(root, confdir, maillog, sink_dir, ports, sink_port, master, sink, tmp)
    try:
        _wait_port(sink_port, sink, "smtp-sink", sink_log)
        for port in ports.values():
            _wait_port(port, master, "postfix", maillog)
    except BaseException:
        pf.stop()
        raise AssertionError(f"postfix did not start:\n{_tail(root / 'master.out')}\n{_tail(maillog)}") from None
    return pf
