"""`filterd deliver`: deliver one message (standard input) for one user, filtered and sorted.

    filterd deliver --user NAME (--maildir PATH | --mbox PATH) [--recipes FILE] [--daemon ADDR]
                    [--[no-]filter] [--sender ADDR] [--recipient ADDR] [--config FILE]

Steps:

1. Started as root for a user in passwd (``deliver.drop_privileges``), become that user first:
   files are created as theirs, and their recipes and commands never run as root.
2. Read the message. A leading mbox ``From `` line is dropped (its address is the sender when
   ``--sender`` is not given); CRLF line ends become LF, the local convention of Maildir and mbox
   files. ``Return-Path: <sender>`` and ``Delivered-To: recipient`` are prepended, as local
   delivery agents do, unless the lines the MTA prepended already carry them.
3. Ask the daemon (``--daemon``, else ``deliver.daemon``) with spamc's own request code
   (`filterd.client.spamd_request`), PROCESS or HEADERS as the ``spamd`` user NAME, with
   spamc's connection retries (a refused TCP connection is tried 3 times, 1 s apart). Messages
   over ``deliver.max_size`` are not sent (spamc's ``-s``). When the daemon is down, slow or
   answers badly, the message is delivered as it came, like spamc's safe fallback, with an
   ``X-Filterd-Skipped`` header saying why (``deliver.mark_unfiltered``), or, with
   ``deliver.on_daemon_error: tempfail``, deferred (exit 75). Whenever the daemon is to be
   asked, scanned or not, an ``X-Filterd-Skipped`` header the message came with goes first
   (forged, or left by a hop that did not scan it; ours alone may say so); with ``--no-filter``
   the message is left as it came.
4. Run the user's recipes (`filterd.mda.recipes`; ``--recipes``, else ``deliver.recipes``). A
   recipe file with problems is ignored as a whole: each problem goes to stderr with its
   file:line and the message goes to INBOX.
5. Carry out the actions. Exit 0 only once the message is fsync'd where it belongs or a recipe
   discarded it on purpose. A forward is skipped when ``Delivered-To: recipient`` already sits
   below the lines the MTA prepended (the message came round again: a loop).

Exit codes (sysexits; an MTA retries on 75 and bounces on the others):

  0  delivered, or discarded by a recipe
  65 EX_DATAERR     empty input
  67 EX_NOUSER      a --user that cannot be a user name (or not in passwd, system_users_only)
  69 EX_UNAVAILABLE a pipe/forward command failed with a status outside sysexits
  73 EX_CANTCREAT   the mailbox cannot be created: not a directory/file, bad path
  77 EX_NOPERM      permission denied on the mailbox
  75 EX_TEMPFAIL    everything that may pass: disk full or quota (ENOSPC, EDQUOT, EFBIG), I/O
                    errors, lock timeout, the daemon failing when so configured, a command
                    killed or timed out; and what an admin must fix but that should not bounce
                    mail meanwhile: a configuration that does not load, a bad command line, an
                    internal error
  64-78             a pipe/forward command's own sysexits status is passed on as is

A folder action that fails for a permanent reason delivers to INBOX instead (with a warning),
as procmail falls through to its default; a failing copy is skipped. Actions already carried
out are not undone when a later one defers: the retry may store a second copy (duplicates,
never loss, as everywhere in filterd).
"""

from __future__ import annotations

__all__ = [
    "DeliveryRequest",
    "add_deliver_command",
    "deliver_message",
    "exit_code_for",
    "main",
    "run_deliver",
]

import argparse
import contextlib
import errno
import logging
import os
import pwd
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from filterd.client import SpamdError, spamd_request
from filterd.config import DeliverConfig, format_size, load_config
from filterd.config.schema import clamd_address
from filterd.durable import fsync_dir, make_dirs
from filterd.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from filterd.headerblock import mbox_from_end, split_header_fields, without_fields
from filterd.mda.headers import split_fields
from filterd.mda.maildir import Maildir, folder_dirname
from filterd.mda.mbox import deliver_mbox
from filterd.mda.recipes import Action, Recipes, Step, Verdict, evaluate, facts_from_message, parse_recipes
from filterd.mda.users import is_user_name

log = logging.getLogger(__name__)

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77

_NOPERM = frozenset({errno.EACCES, errno.EPERM})
_CANTCREAT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST})
_LEAD_FIELDS = (b"return-path", b"delivered-to", b"x-original-to")  # what MTAs prepend for delivery
_SYSEXITS = range(64, 79)
_SKIPPED = b"X-Filterd-Skipped"  # on a message delivered unscanned, saying why
_MAX_RECIPES = 1024 * 1024  # bytes: a recipe file is a few rules
# how spamc's failure codes read in logs and in X-Filterd-Skipped
_SPAMC_FAILURES = {
    65: "message refused (EX_DATAERR)",
    68: "host unknown (EX_NOHOST)",
    69: "unavailable (EX_UNAVAILABLE)",
    70: "cannot connect (EX_SOFTWARE)",
    71: "out of resources (EX_OSERR)",
    74: "no answer in time or connection lost (EX_IOERR)",
    75: "temporary failure (EX_TEMPFAIL)",
    76: "bad answer (EX_PROTOCOL)",
    77: "permission denied (EX_NOPERM)",
    98: "answer too big (EX_TOOBIG)",
}


def exit_code_for(exc: BaseException) -> int:
    """The sysexits code for an error met while storing a message (anything unknown: 75)."""
    if isinstance(exc, PermanentDeliveryError):
        return EX_CANTCREAT
    if isinstance(exc, OSError):
        if exc.errno in _NOPERM:
            return EX_NOPERM
        if exc.errno in _CANTCREAT:
            return EX_CANTCREAT
    return EX_TEMPFAIL  # ENOSPC, EDQUOT, EFBIG, EIO, lock timeouts, ...: the MTA retries


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    """One delivery, as the command line describes it."""

    user: str
    maildir: Path | None = None
    mbox: Path | None = None
    recipes: Path | None = None  # None: deliver.recipes
    daemon: str | None = None  # None: deliver.daemon
    filter: bool = True
    sender: str | None = None  # None: from the message; "" is the null sender
    recipient: str | None = None  # None: the user name
    home: Path | None = None  # the user's home (for ~), when known


# ---------------------------------------------------------------------------------- CLI


_HELP = "deliver one message (stdin) into a Maildir or mbox: filtered by the daemon, sorted by recipes"
_DESCRIPTION = "Exit codes follow sysexits: 0 delivered, 75 try again later (also a bad command line), others bounce."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A bad command line is the MTA's configuration: defer, so mail waits for a fix instead of bouncing.
        self.print_usage(sys.stderr)
        self.exit(EX_TEMPFAIL, f"{self.prog}: error: {message}\n")


def add_deliver_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `deliver` entry of `filterd --help` (the command itself runs through `main`)."""
    _add_arguments(sub.add_parser("deliver", help=_HELP, description=_DESCRIPTION))


def main(argv: list[str]) -> int:
    """`filterd deliver ARGS`. The CLI sends it here before building its own parser: an MDA
    runs once per message, and the other commands' imports cost more than a second."""
    parser = _Parser(prog="filterd deliver", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("filterd deliver: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not args.verbose else logging.INFO if args.verbose == 1 else logging.DEBUG)
    return run_deliver(args)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (default: embedded defaults)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="say where the message went (-vv: debug)")
    p.add_argument("--user", required=True, help="whose mail this is (spamd user, recipes owner)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--maildir", metavar="PATH", type=Path, help="the user's Maildir (created if missing)")
    where.add_argument("--mbox", metavar="PATH", type=Path, help="the user's mbox file (created if missing)")
    p.add_argument("--recipes", metavar="FILE", type=Path, help="recipe file (default: deliver.recipes)")
    p.add_argument("--daemon", metavar="ADDR", help="spamd socket path or HOST:PORT (default: deliver.daemon)")
    p.add_argument(
        "--filter", action=argparse.BooleanOptionalAction, default=True,
        help="ask the daemon first (the default, if deliver.filter allows); --no-filter: do not",
    )  # fmt: skip
    p.add_argument("-f", "--sender", metavar="ADDR", help="envelope sender ('' or <> for none)")
    p.add_argument("--recipient", metavar="ADDR", help="envelope recipient, for Delivered-To (default: the user)")


def run_deliver(args: argparse.Namespace) -> int:
    """`filterd deliver`: returns the exit code; never raises (a bug defers the message)."""
    try:
        return _run(args)
    except Exception as exc:  # a bug must not bounce mail: the MTA keeps it and retries
        log.exception("internal error, delivery deferred: %s", exc)
        return EX_TEMPFAIL


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).deliver
    except ConfigError as exc:
        log.error("configuration error, delivery deferred:\n%s", exc)
        return EX_TEMPFAIL
    user = args.user
    if not is_user_name(user):
        log.error("%r is not a user name", user)
        return EX_NOUSER
    try:
        entry: pwd.struct_passwd | None = pwd.getpwnam(user)
    except KeyError:
        entry = None
    if entry is None and config.system_users_only:
        log.error("no such user: %s", user)
        return EX_NOUSER
    if entry is not None and os.geteuid() == 0 and entry.pw_uid != 0 and config.drop_privileges:
        if args.mbox is not None:
            _create_spool_mbox(Path(args.mbox), entry)
        try:
            os.setgid(entry.pw_gid)
            os.initgroups(entry.pw_name, entry.pw_gid)
            os.setuid(entry.pw_uid)
        except OSError as exc:
            log.error("cannot become %s: %s; delivery deferred", user, exc.strerror or exc)
            return EX_TEMPFAIL
    try:
        data = sys.stdin.buffer.read()
    except OSError as exc:
        log.error("cannot read the message: %s; delivery deferred", exc.strerror or exc)
        return EX_TEMPFAIL
    request = DeliveryRequest(
        user=user,
        maildir=args.maildir,
        mbox=args.mbox,
        recipes=args.recipes,
        daemon=args.daemon,
        filter=args.filter,
        sender=args.sender,
        recipient=args.recipient,
        home=Path(entry.pw_dir) if entry is not None and entry.pw_dir else None,
    )
    return deliver_message(data, request, config)


def _create_spool_mbox(path: Path, entry: pwd.struct_passwd) -> None:
    """Create the user's mbox (0600, theirs) while still root, as Postfix's local does: a mail
    spool such as /var/mail (root:mail 2775) lets no user create a file of their own, and the
    first delivery would be refused (77). An mbox that exists, or a directory that does not, is
    left to the delivery to judge."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.fchown(fd, entry.pw_uid, entry.pw_gid)
        os.fsync(fd)
    except OSError as exc:
        log.warning("cannot give the new mbox %s to %s: %s", path, entry.pw_name, exc.strerror or exc)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)


# ------------------------------------------------------------------------------ delivery


def deliver_message(data: bytes, request: DeliveryRequest, config: DeliverConfig) -> int:
    """Deliver ``data`` as ``request`` says; returns the exit code (see the module doc)."""
    if not data:
        log.error("empty input: no message to deliver")
        return EX_DATAERR
    message, from_sender = _strip_from_line(data.replace(b"\r\n", b"\n"))
    sender = _clean_sender(request.sender) if request.sender is not None else from_sender
    recipient = request.recipient or request.user
    lead, loop = _lead(message, recipient)
    if sender is None and b"return-path" in lead:
        sender = _clean_sender(lead[b"return-path"][0])
    prefix = b""
    if sender is not None and b"return-path" not in lead:
        prefix += b"Return-Path: <%s>\n" % sender.encode("utf-8", "surrogateescape")
    if recipient.lower() not in (v.lower() for v in lead.get(b"delivered-to", [])):
        prefix += b"Delivered-To: %s\n" % recipient.encode("utf-8", "surrogateescape")
    message = prefix + message

    verdict: Verdict = "unfiltered"
    score: float | None = None
    daemon = request.daemon if request.daemon is not None else config.daemon
    if request.filter and config.filter:
        skipped = ""
        if len(message) > config.max_size:
            skipped = f"larger than deliver.max_size ({format_size(config.max_size)})"
        else:
            try:
                answer = spamd_request(
                    message,
                    address=clamd_address(daemon),
                    user=request.user,
                    method=config.method.upper(),
                    timeout=config.timeout,
                    max_size=config.max_size,
                    prog="filterd deliver",
                )
            except (SpamdError, ValueError, OSError) as exc:
                if isinstance(exc, SpamdError):
                    code = _SPAMC_FAILURES.get(exc.code & 0xFF, f"exit code {exc.code}")
                else:
                    code = str(exc)
                if config.on_daemon_error == "tempfail":
                    log.error("daemon %s failed (%s); delivery deferred", daemon, code)
                    return EX_TEMPFAIL
                log.warning("daemon %s failed (%s); delivering unfiltered", daemon, code)
                skipped = f"daemon {daemon} failed ({code})"
            else:
                if not _has_header(answer.message):  # a broken or foreign daemon: never store that
                    log.warning("daemon %s returned no message (%d bytes); delivering unfiltered", daemon,
                                len(answer.message))  # fmt: skip
                    skipped = f"daemon {daemon} returned no message"
                else:
                    # The daemon puts its X-Spam-* fields at the top (ours no longer lead), and a
                    # report_safe wrapper has ours inside only: take them out of its header block,
                    # once each, and put them back in front.
                    message = _ours_in_front(answer.message, prefix)
                    score = answer.score
                    if answer.is_spam is not None:
                        verdict = "spam" if answer.is_spam else "ham"
        message = without_fields(message, _SKIPPED.lower())
        if skipped and config.mark_unfiltered:
            message = prefix + b"%s: %s\n" % (_SKIPPED, skipped.encode()) + message[len(prefix) :]
    log.info("user %s: %s, score %s", request.user, verdict, score)

    recipes, commands = _load_recipes(request, config)
    facts = facts_from_message(message, score=score, verdict=verdict, size=len(data), sender=sender)
    steps = evaluate(recipes, facts)
    return _carry_out(steps, message, request, config, sender=sender, loop=loop, commands=commands)


def _strip_from_line(data: bytes) -> tuple[bytes, str | None]:
    """Drop an mbox ``From sender date`` line; returns the rest and its sender."""
    if not data.startswith(b"From "):
        return data, None
    line, _, rest = data.partition(b"\n")
    words = line.split()
    who = words[1].decode("utf-8", "surrogateescape") if len(words) > 1 else ""
    return rest, (None if who == "MAILER-DAEMON" else _clean_sender(who))


def _clean_sender(text: str) -> str:
    """``<a@b>`` -> ``a@b``; ``<>`` or empty -> "" (the null sender)."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _lead(message: bytes, recipient: str) -> tuple[dict[bytes, list[str]], bool]:
    """The Return-Path/Delivered-To/X-Original-To lines an MTA prepended (the leading run of
    them), and whether ``Delivered-To: recipient`` also appears further down: a mail loop."""
    lead: dict[bytes, list[str]] = {}
    in_lead = True
    loop = False
    fields, _ = split_fields(message)
    for f in fields:
        key = f.key
        text = f.value.decode("utf-8", "surrogateescape")
        if in_lead and key in _LEAD_FIELDS:
            lead.setdefault(key, []).append(text)
            continue
        in_lead = False
        if key == b"delivered-to" and text.lower() == recipient.lower():
            loop = True
    return lead, loop


def _has_header(message: bytes) -> bool:
    """Whether ``message`` (after an mbox From_ line) starts with a header field, as any answer
    to PROCESS or HEADERS does: the daemon adds its own fields even to a message that had none."""
    fields = split_header_fields(message[mbox_from_end(message) :], 1).fields
    return bool(fields) and bool(fields[0][0])


def _ours_in_front(message: bytes, prefix: bytes) -> bytes:
    """``message`` with the fields of ``prefix`` (ours: whole lines) leading it: taken out of
    its header block (`filterd.mda.headers.split_fields`), each once where it is a whole field,
    and put in front; the body is not read."""
    ours = prefix.splitlines(keepends=True)
    fields, end = split_fields(message)
    kept = []
    for f in fields:
        if f.raw in ours:
            ours.remove(f.raw)
        else:
            kept.append(f.raw)
    return prefix + b"".join(kept) + message[end:]


def _expand_home(template: str, home: Path | None) -> Path | None:
    """``~`` or ``~/x`` under the user's home; None when the home is unknown."""
    if template == "~" or template.startswith("~/"):
        return None if home is None else home / template[2:]
    return Path(template)


def _load_recipes(request: DeliveryRequest, config: DeliverConfig) -> tuple[Recipes | None, bool]:
    """The recipient's recipes (None: everything goes to INBOX), and whether their pipe and
    forward rules may run here (`_trust`)."""
    path = request.recipes
    named = path is not None  # --recipes: a file that must be there
    if path is None:
        path = _expand_home(config.recipes, request.home) if config.recipes else None
        if path is None:
            return None, False
    # One open: the checks judge the very file that is read, which its owner cannot swap
    # (e.g. through a symlink in their home) between the check and the read. O_NONBLOCK: a
    # FIFO put there opens at once (and is refused) instead of holding the delivery.
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            distrust, commands = _trust(st, request.user)
            text = f.read(_MAX_RECIPES + 1) if distrust is None else b""
    except FileNotFoundError as exc:
        if named:
            log.warning("recipe error: %s: cannot read: %s", path, exc.strerror or exc)
            log.warning("recipes in %s ignored: delivering to INBOX", path)
        return None, False  # the user has no recipes of their own: everything goes to INBOX
    except OSError as exc:
        log.warning("recipe error: %s: cannot read: %s", path, exc.strerror or exc)
        log.warning("recipes in %s ignored: delivering to INBOX", path)
        return None, False
    if distrust is None and len(text) > _MAX_RECIPES:
        distrust = f"larger than {_MAX_RECIPES // 1024} KiB"
    if distrust is not None:
        log.warning("recipes in %s ignored (%s): delivering to INBOX", path, distrust)
        return None, False
    check = _check_maildir_folder if request.maildir is not None else _check_mbox_folder
    try:
        return parse_recipes(text, str(path), check_folder=check), commands
    except ConfigError as exc:
        for problem in exc.problems:
            log.warning("recipe error: %s", problem)
        log.warning("recipes in %s ignored: delivering to INBOX", path)
        return None, False


def _trust(st: os.stat_result, user: str) -> tuple[str | None, bool]:
    """Why a recipe file (its ``fstat``) must not be followed at all (or None), and whether its
    pipe and forward rules may run commands in this process.

    As procmail with its rcfiles: the file must be a regular file belonging to the recipient (or
    root, or whoever runs the delivery) and writable by no one else. Its commands run with this
    process's rights, so they run only if the file's owner is who we are (deliver became the
    recipient) or root: a shell user's recipe file read by in-process delivery (``mta.
    local_delivery: maildir``) or by a deliver that kept root's rights must not run their
    commands as the MTA's account or as root."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", False
    euid = os.geteuid()
    owners = {0, euid}
    with contextlib.suppress(KeyError):
        owners.add(pwd.getpwnam(user).pw_uid)
    if st.st_uid not in owners:
        return f"owned by uid {st.st_uid}, not by {user}", False
    if st.st_mode & 0o022:
        return f"writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {st.st_mode & 0o777:o})", False
    return None, st.st_uid in (0, euid)


def _check_maildir_folder(name: str) -> str | None:
    try:
        folder_dirname(name)
    except ValueError as exc:
        return str(exc)
    return None


def _check_mbox_folder(name: str) -> str | None:
    if "\0" in name or "\n" in name or name.endswith("/"):
        return f"{name!r} is not an mbox file name"
    return None


def _carry_out(
    steps: list[Step],
    message: bytes,
    request: DeliveryRequest,
    config: DeliverConfig,
    *,
    sender: str | None,
    loop: bool,
    commands: bool,
) -> int:
    for step in steps:
        action = step.action
        if action.kind in ("forward", "pipe") and not commands:
            log.warning("%s (%s) not run: the recipe file's owner is not the account this delivery runs as%s",
                        action.kind, step.where, "; delivering to INBOX" if action.stop else "")  # fmt: skip
            if action.stop:
                return _store(message, "INBOX", request, config, sender=sender, where="fallback")
            continue
        if action.kind == "discard":
            log.info("discarded by %s", step.where)
            return EX_OK
        if action.kind == "forward" and loop:
            log.warning("not forwarding (%s): Delivered-To %s is already in the message, a mail loop",
                        step.where, request.recipient or request.user)  # fmt: skip
            if action.stop:
                return _store(message, "INBOX", request, config, sender=sender, where="loop fallback")
            continue
        if action.kind in ("forward", "pipe"):
            code = _run_command(action, message, request, config, sender=sender, where=step.where)
            if action.stop:
                return code
            if code != EX_OK:  # a side copy (procmail's c flag): its failure is not the message's
                log.warning("%s (%s) failed with exit %d; delivery goes on with the next rule",
                            action.kind, step.where, code)  # fmt: skip
            continue
        assert isinstance(action.target, str)
        code = _store(message, action.target, request, config, sender=sender, where=step.where)
        if code == EX_TEMPFAIL:
            return code
        if code != EX_OK:
            if not action.stop:
                log.warning("copy to %s (%s) skipped", action.target, step.where)
                continue
            if action.target.upper() == "INBOX":
                return code
            log.warning("delivering to INBOX instead of %s (%s)", action.target, step.where)
            return _store(message, "INBOX", request, config, sender=sender, where="fallback")
        if action.stop:
            return EX_OK
    return EX_OK  # not reached: the last step always stops


def _store(
    message: bytes, folder: str, request: DeliveryRequest, config: DeliverConfig, *, sender: str | None, where: str
) -> int:
    """Store in a folder; returns 0 or the exit code of the failure (logged)."""
    try:
        if request.maildir is not None:
            path = Maildir(request.maildir, sizes=config.maildir_sizes).deliver(message, folder)
        else:
            assert request.mbox is not None
            path = _mbox_path(folder, request, config)
            if path != request.mbox:
                make_dirs(path.parent)  # e.g. ~/mail on first use, durable before we say delivered
            for warning in deliver_mbox(
                path, message, sender=sender, lock_timeout=config.lock_timeout, stale_lock=config.stale_lock
            ):
                log.warning("%s", warning)
    except (OSError, TemporaryDeliveryError, PermanentDeliveryError, ValueError) as exc:
        code = EX_CANTCREAT if isinstance(exc, ValueError) else exit_code_for(exc)
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        name = getattr(exc, "filename", None) or folder
        log.error("cannot deliver to %s (%s): %s%s", name, where, text,
                  "; delivery deferred" if code == EX_TEMPFAIL else "")  # fmt: skip
        return code
    log.info("delivered to %s (%s): %s", folder, where, path)
    return EX_OK


def _mbox_path(folder: str, request: DeliveryRequest, config: DeliverConfig) -> Path:
    assert request.mbox is not None
    if folder.upper() == "INBOX":
        return request.mbox
    if folder.startswith("/"):
        return Path(folder)
    base = _expand_home(config.mbox_folders, request.home)
    if base is None:
        raise PermanentDeliveryError(f"no home directory for {request.user}, so no {config.mbox_folders}")
    return base / folder


def _run_command(
    action: Action, message: bytes, request: DeliveryRequest, config: DeliverConfig, *, sender: str | None, where: str
) -> int:
    """Run a pipe or forward command; returns 0 or the exit code it stands for."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "TZ", "LANG", "LC_ALL")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    recipient = request.recipient or request.user
    env.update(USER=request.user, LOGNAME=request.user, SENDER=sender or "", RECIPIENT=recipient)
    if request.home is not None:
        env["HOME"] = str(request.home)
    argv: list[str] | str
    if action.kind == "forward":
        assert isinstance(action.target, tuple)
        argv = [*config.sendmail, "-f", sender or "<>", "--", *action.target]
        # the copy sent on does not carry our Return-Path; Delivered-To stays, to catch loops
        if message.startswith(b"Return-Path:"):
            message = message.split(b"\n", 1)[1]
    else:
        argv = list(action.target) if isinstance(action.target, tuple) else ["/bin/sh", "-c", action.target]
    cwd = str(request.home) if request.home is not None and request.home.is_dir() else "/"
    try:
        proc = subprocess.run(
            argv, input=message, env=env, cwd=cwd, timeout=config.command_timeout,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        log.error("%s (%s) ran longer than %ss and was killed; delivery deferred", action.kind, where,
                  config.command_timeout)  # fmt: skip
        return EX_TEMPFAIL
    except OSError as exc:
        log.error("cannot run %s (%s): %s; delivery deferred", argv[0], where, exc.strerror or exc)
        return EX_TEMPFAIL
    errors = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode == 0:
        if errors:
            log.info("%s (%s) said: %s", action.kind, where, errors)
        log.info("%s done (%s)", action.kind, where)
        return EX_OK
    if proc.returncode < 0:
        code = EX_TEMPFAIL  # killed by a signal: may well pass next time
    elif proc.returncode in _SYSEXITS:
        code = proc.returncode
    else:
        code = EX_UNAVAILABLE  # a status outside sysexits: Postfix's "unknown mail system error", 5.3.0
    log.error("%s (%s) exited %s%s", action.kind, where, proc.returncode, f": {errors}" if errors else "")
    return code
