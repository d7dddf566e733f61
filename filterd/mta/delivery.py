"""Delivery attempts: to a local user through a command, or to a remote domain over SMTP.

    local = LocalDelivery(config.mta, state_dir=..., hostname="mx.example.org")
    result = await local.deliver(qid, sender, "bob@example.org", data_path)
    remote = RemoteDelivery(config, resolver, hostname="mx.example.org")
    results = await remote.deliver(qid, sender, "example.net", ["b@example.net"], data_path, ...)

    # One attempt at all of a message's recipients (the queue manager does this): they share
    # a MessageData, so the data file is read once while they hold it, and DKIM-signed once.
    message = MessageData(data_path)
    with message.in_use():
        await local.deliver(qid, sender, "bob@example.org", message)
        await local.deliver(qid, sender, "carol@example.org", message)
    await remote.deliver(qid, sender, "example.net", ["b@example.net"], message, ...)
    await remote.deliver(qid, sender, "example.com", ["c@example.com"], message, ...)

Each attempt ends in one `DeliveryResult` per recipient: delivered, deferred (try again later)
or bounced (give up, tell the sender). `outcome_of` is the one place where a status becomes an
outcome: 2.x.x delivered, 4.x.x deferred, 5.x.x bounced.

Local delivery runs ``mta.local_delivery_command`` (an argv, no shell, like Postfix's
mailbox_command) with the message on stdin, LF line ends (the Unix convention procmail,
maildrop and ``filterd deliver`` expect), read from an unlinked temporary file rather than a
pipe so that a crash of the MTA never hands the command a truncated message. This MTA puts two
header fields on top, as Postfix's local(8) does: ``Return-Path: <sender>`` and
``Delivered-To: recipient``; the command need not add them. A message that already carries
``Delivered-To:`` for the same recipient is bounced as a mail loop (5.4.6). The environment is
the MTA's plus SENDER, RECIPIENT, USER, LOGNAME, LOCAL, EXTENSION, DOMAIN, HOME, MAILBOX and
QUEUE_ID. Exit status: 0 delivered; 75 (EX_TEMPFAIL) deferred; killed by a signal or by
``local_delivery_timeout``, deferred; a command that cannot be started, deferred (a
configuration error must not bounce mail); any other status bounced, with the status's meaning
(sysexits) and the tail of the command's stderr as the DSN's diagnostic.

With ``mta.local_delivery: maildir`` there is no command: the message, with the same two header
fields on top, goes through `filterd.mda.main.deliver_message` in a worker thread of this
process, which is what ``filterd deliver --maildir {mailbox}`` runs after its start-up (the
user's recipes, ``deliver.*``, `filterd.mda.maildir`'s tmp/ -> fsync -> link into new/ -> fsync
of new/), without a Python interpreter to start for each recipient. Its exit code is read as the
command's would be (ENOSPC, EDQUOT -> 75, deferred; a mailbox path that cannot be a Maildir -> 73,
bounced) and the warnings it logged stand in for stderr. It cannot change user: files are the
MTA's, and recipe commands (pipe, forward) run as the MTA's user, so only those of recipe files
the MTA's user owns (or root does) run (`filterd.mda.main._trust`). ``auto`` (the default) picks
this unless the MTA runs as root or ``local_delivery_command`` was changed; see `delivery_mode`.

Remote delivery looks up the domain's MX hosts (`filterd.mta.mx`), DKIM-signs the message when
its From: domain has a key in ``auth.dkim_keys``, and tries the addresses in order until one
holds a transaction (`filterd.mta.smtp_client`): a refused connection, a 4xx or 5xx greeting or
EHLO, or a lost session before MAIL FROM moves on to the next address; once a server takes the
transaction its replies decide, per recipient. A recipient whose address cannot be written in
an RCPT TO at all (`filterd.mta.smtp_client.unsendable`) fails for good at once, the others
go; a sender's that cannot be written fails them all.
"""

from __future__ import annotations

__all__ = [
    "DeliveryResult",
    "LocalDelivery",
    "MessageData",
    "Outcome",
    "RemoteDelivery",
    "delivery_mode",
    "outcome_of",
    "sysexit_status",
]

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from filterd.config import Config, DeliverConfig, MtaConfig
from filterd.dkimsign import sign_message
from filterd.errors import DeliveryError, PermanentDeliveryError
from filterd.mda.main import DeliveryRequest, deliver_message
from filterd.mta.localusers import home_directory, local_user, unknown_user_reason
from filterd.mta.mx import NextHop, next_hops
from filterd.mta.smtp_client import Reply, SessionError, SmtpOptions, TlsError, send, unsendable
from filterd.net.dns import Resolver

log = logging.getLogger(__name__)

Outcome = Literal["delivered", "deferred", "bounced"]

EX_TEMPFAIL = 75
_STDERR_TAIL = 1024

# sysexits.h: status -> (enhanced status, meaning), as Postfix's sys_exits table has it.
_SYSEXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("5.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}


def sysexit_status(code: int) -> tuple[str, str]:
    """A command's exit status as (enhanced status, meaning); unknown ones are 5.3.0."""
    return _SYSEXITS.get(code, ("5.3.0", f"unknown mail system error {code}"))


def outcome_of(status: str) -> Outcome:
    """2.x.x delivered, 4.x.x deferred (retry), 5.x.x bounced: decided here and nowhere else."""
    return {"2": "delivered", "4": "deferred"}.get(status[:1], "bounced")  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One recipient's result of one attempt."""

    recipient: str
    status: str  # RFC 3463 enhanced status: "2.0.0", "4.4.1", "5.1.1"
    detail: str  # for people and logs: "host mx.example.net[192.0.2.7] said: 550 5.1.1 ..."
    diagnostic: str = ""  # the DSN's Diagnostic-Code: "smtp; 550 5.1.1 ...", "x-unix; ..."
    remote_mta: str = ""  # the host that answered, for the DSN's Remote-MTA
    relay: str = ""  # where it went: "local", "mx.example.net[192.0.2.7]:25"
    # The SMTP reply a server gave: its code and the enhanced status as written ("" if none);
    # 0 and "" when no server replied (local delivery, no MX, no connection, a reply we made up).
    reply_code: int = 0
    reply_status: str = ""

    @property
    def outcome(self) -> Outcome:
        return outcome_of(self.status)


class MessageData:
    """A queued message's data file, shared by the deliveries of one attempt at its recipients
    (the queue manager makes one per attempt): read once on first use, in a worker thread, and
    kept while any delivery of the message holds it (`in_use`), so that deliveries running at
    the same time share one copy, and a message whose other destinations still wait for a
    delivery slot holds none. DKIM-signed at most once per signing key: only the signature
    (a few hundred bytes) is kept, for the whole attempt. A failed read or signing is not kept:
    the next delivery tries again, as it would on its own."""

    __slots__ = ("_data", "_lock", "_signatures", "_users", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: bytes | None = None
        self._lock = asyncio.Lock()
        self._signatures: dict[tuple[str, str, bytes], bytes] = {}
        self._users = 0

    @classmethod
    def of(cls, data: Path | MessageData) -> MessageData:
        """``data`` itself, or a new one for a data file's path (a delivery on its own)."""
        return data if isinstance(data, MessageData) else cls(data)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Keep the data read within this block; it is dropped when no block holds it."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                self._data = None

    async def read(self) -> bytes:
        """The whole message (OSError if the file cannot be read)."""
        data = self._data
        if data is None:
            async with self._lock:
                data = self._data
                if data is None:
                    data = await asyncio.to_thread(self.path.read_bytes)
                    if self._users:
                        self._data = data
        return data

    async def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes: from memory while the message is held, else from the file."""
        if self._data is not None:
            return self._data[:limit]
        return await asyncio.to_thread(_read_head, self.path, limit)

    async def dkim_signed(self, domain: str, selector: str, key_pem: bytes) -> bytes:
        """The message with a DKIM-Signature for ``domain`` on top (`sign_message`; ValueError
        if that fails). The signature covers the message, not the envelope: every destination
        of the attempt gets the same one."""
        data = await self.read()
        key = (domain, selector, key_pem)
        async with self._lock:
            signature = self._signatures.get(key)
            if signature is None:
                signed = await asyncio.to_thread(sign_message, data, domain, selector, key_pem)
                if not signed.endswith(data):  # sign_message puts the field on top; else keep nothing
                    return signed
                signature = self._signatures[key] = signed[: len(signed) - len(data)]
        return signature + data


def _read_head(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def _header_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 2


def _header_fields(data: bytes, name: bytes) -> list[bytes]:
    """The unfolded values of every header field called ``name`` (lower case, no colon)."""
    block = data[: _header_end(data)].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    prefix = name + b":"
    return [line[len(prefix) :].strip() for line in block.split(b"\r\n") if line.lower().startswith(prefix)]


def _from_domain(data: bytes) -> str:
    """The domain of the (first) From: header's address, lower case; "" if none."""
    for value in _header_fields(data, b"from"):
        addresses: list[bytes] = re.findall(rb"[^\s<>\",;:@]+@([A-Za-z0-9.-]+)", value)
        if addresses:
            return addresses[-1].decode("ascii").lower().rstrip(".")
    return ""


def delivery_mode(config: MtaConfig, euid: int) -> Literal["maildir", "command"]:
    """How local mail is delivered: ``mta.local_delivery``, with ``auto`` decided here. A
    command someone configured (procmail, maildrop) is run, and so is the default `filterd
    deliver` when we are root: it becomes each user before it touches their files or runs
    their recipes. Otherwise in-process Maildir delivery does the same work without a process."""
    if config.local_delivery != "auto":
        return config.local_delivery
    default = MtaConfig().local_delivery_command
    return "command" if euid == 0 or config.local_delivery_command != default else "maildir"


class LocalDelivery:
    """Delivers to local users by running the configured command, or in-process (`delivery_mode`)."""

    def __init__(
        self,
        config: MtaConfig,
        *,
        state_dir: str,
        hostname: str,
        lookup_user: Callable[[str], str | None] | None = None,
        tmp_dir: str | None = None,
        deliver: DeliverConfig | None = None,
        euid: int | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.hostname = hostname
        self.tmp_dir = tmp_dir
        self.deliver_config = deliver or DeliverConfig()
        self._home_of = lookup_user or home_directory
        euid = os.geteuid() if euid is None else euid
        self.mode = delivery_mode(config, euid)
        # Worker threads of their own, so that mailbox fsyncs never queue up before the
        # enqueue fsyncs an SMTP client waits for (those use the loop's default executor).
        self._threads: ThreadPoolExecutor | None = None
        if self.mode == "maildir":
            self._threads = ThreadPoolExecutor(config.per_destination_concurrency, thread_name_prefix="deliver")
            if euid == 0:
                log.warning(
                    "in-process local delivery as root: root writes the mailboxes and runs root-owned recipes' commands"
                )

    def _fields(self, queue_id: str, sender: str, recipient: str) -> dict[str, str] | DeliveryResult:
        local, domain = _split_address(recipient)
        # The SMTP server refused unknown users at RCPT with the same test; mail can still get
        # here for one (queued before the user was removed, or by a milter's ADDRCPT).
        if (reason := unknown_user_reason(self.config, local, self._home_of)) is not None:
            return self._bounce(recipient, "5.1.1", reason)
        user, extension = local_user(self.config, local)
        fields = {
            "user": user, "extension": extension, "domain": domain.lower(), "recipient": recipient,
            "sender": sender, "home": "", "queue_id": queue_id, "state_dir": self.state_dir,
        }  # fmt: skip
        template = self.config.mailboxes.get(user, self.config.mailbox)
        home = self._home_of(user)
        fields["home"] = home or ""
        fields["mailbox"] = template.format(**fields)
        return fields

    def _bounce(self, recipient: str, status: str, text: str) -> DeliveryResult:
        return DeliveryResult(recipient, status, text, f"x-unix; {text}", relay="local")

    async def deliver(self, queue_id: str, sender: str, recipient: str, data: Path | MessageData) -> DeliveryResult:
        """One attempt for ``recipient``; ``data`` is the data file's path, or the attempt's
        `MessageData` that the message's other recipients share."""
        fields = self._fields(queue_id, sender, recipient)
        if isinstance(fields, DeliveryResult):
            return fields
        message = await MessageData.of(data).read()
        lowered = recipient.lower().encode("utf-8", "replace")
        if any(v.lower() == lowered for v in _header_fields(message, b"delivered-to")):
            return self._bounce(recipient, "5.4.6", f"mail forwarding loop for {recipient}")
        top = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
        if self._threads is not None:
            request = DeliveryRequest(
                user=fields["user"], maildir=Path(fields["mailbox"]), sender=sender, recipient=recipient,
                home=Path(fields["home"]) if fields["home"] else None,
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, self._deliver_here, top + message, request)
        spooled = await asyncio.to_thread(self._spool, (top + message).replace(b"\r\n", b"\n"))
        # {filter}: --no-filter when the MTA's milter scored the message already (see QueueManager)
        flag = "--filter" if self.deliver_config.filter else "--no-filter"
        argv = [arg.format(filter=flag, **fields) for arg in self.config.local_delivery_command]
        env = dict(os.environ)
        env.update(
            SENDER=sender, RECIPIENT=recipient, USER=fields["user"], LOGNAME=fields["user"],
            LOCAL=_split_address(recipient)[0].lower(), EXTENSION=fields["extension"], DOMAIN=fields["domain"],
            HOME=fields["home"], MAILBOX=fields["mailbox"], QUEUE_ID=queue_id,
        )  # fmt: skip
        with spooled:
            return await self._run(argv, env, spooled, recipient)

    def _deliver_here(self, message: bytes, request: DeliveryRequest) -> DeliveryResult:
        """`filterd deliver`'s work for one recipient, in this thread; its exit code as a result."""
        recipient = request.recipient or request.user
        if self.deliver_config.system_users_only and self._home_of(request.user) is None:
            code, problems = 67, [f"no such user: {request.user}"]
        else:
            with _problems_logged() as problems:
                try:
                    code = deliver_message(message, request, self.deliver_config)
                except Exception as exc:  # a bug must not bounce mail, as in `filterd deliver`
                    log.exception("in-process delivery to %s failed", recipient)
                    code = EX_TEMPFAIL
                    problems.append(f"internal error: {type(exc).__name__}: {exc}")
        if code == 0:
            return DeliveryResult(recipient, "2.0.0", f"delivered to maildir {request.maildir}", relay="local")
        error = " ".join(" ".join(problems).split())[-_STDERR_TAIL:]
        status, meaning = sysexit_status(code)
        text = f"maildir delivery failed: {meaning}" + (f": {error}" if error else "")
        return DeliveryResult(recipient, status, text, f"x-unix; {error or meaning}", relay="local")

    def _spool(self, message: bytes) -> BinaryIO:
        """The message in an unlinked temporary file, read from the start. The command reads it
        as its stdin: if this process dies meanwhile, the command still sees the whole message
        (a pipe would end early, and a delivery agent would store a truncated message)."""
        f = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115 (returned open; the caller closes it)
        try:
            f.write(message)
            f.flush()
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    async def _run(self, argv: list[str], env: dict[str, str], message: BinaryIO, recipient: str) -> DeliveryResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=message,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                process_group=0,  # its own process group, so that a timeout kills its children too (keeps vfork)
            )
        except OSError as exc:
            text = f"cannot run {argv[0]}: {exc.strerror or exc}"
            log.error("local delivery: %s", text)
            return DeliveryResult(recipient, "4.3.5", text, f"x-unix; {text}", relay="local")
        assert proc.stderr is not None

        async def tail() -> bytes:
            assert proc.stderr is not None
            kept = b""
            while chunk := await proc.stderr.read(65536):
                kept = (kept + chunk)[-_STDERR_TAIL:]
            return kept

        try:
            async with asyncio.timeout(self.config.local_delivery_timeout):
                stderr, code = await asyncio.gather(tail(), proc.wait())
        except TimeoutError:
            _kill(proc.pid)
            await proc.wait()
            text = f"command timed out after {self.config.local_delivery_timeout:g}s: {argv[0]}"
            return DeliveryResult(recipient, "4.3.0", text, f"x-unix; {text}", relay="local")
        except BaseException:  # cancelled (shutdown): the child must not outlive the attempt
            _kill(proc.pid)
            raise
        error = " ".join(stderr.decode("utf-8", "replace").split())
        if code == 0:
            return DeliveryResult(recipient, "2.0.0", "delivered via command", relay="local")
        if code < 0:
            text = f"command killed by signal {-code}: {argv[0]}"
            return DeliveryResult(recipient, "4.3.0", text, f"x-unix; {text}", relay="local")
        status, meaning = sysexit_status(code)
        text = f"command exited {code} ({meaning})" + (f": {error}" if error else "")
        return DeliveryResult(recipient, status, text, f"x-unix; {error or meaning}", relay="local")


class _ThreadProblems(logging.Handler):
    """Warnings and errors logged by this thread: what `filterd deliver` would print on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


@contextlib.contextmanager
def _problems_logged() -> Iterator[list[str]]:
    handler = _ThreadProblems()
    logger = logging.getLogger("filterd.mda")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class RemoteDelivery:
    """Relays to a domain's MX hosts over SMTP."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        hostname: str,
        rng: random.Random | None = None,
    ) -> None:
        mta = config.mta
        self.config = config
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.options = SmtpOptions(
            helo_name=mta.smtp_helo_name or hostname,
            port=mta.smtp_port,
            bind_address=mta.smtp_bind_address,
            starttls=mta.smtp_starttls,
            connect_timeout=mta.smtp_connect_timeout,
            timeout=mta.smtp_timeout,
            data_timeout=mta.smtp_data_timeout,
        )
        self._keys: dict[str, tuple[float, bytes]] = {}  # key path -> (mtime, PEM)

    async def _signed(self, message: MessageData) -> bytes:
        """The message, DKIM-signed if its From: domain has a key; raises DeliveryError (4.7.0)
        when signing fails: unsigned mail from a domain that signs may be refused by DMARC."""
        data = await message.read()
        domain = _from_domain(data)
        spec = self.config.auth.dkim_keys.get(domain)
        if not spec:
            return data
        selector, _, path = spec.partition(":")
        try:
            pem = await asyncio.to_thread(self._key, path)
            return await message.dkim_signed(domain, selector, pem)
        except (OSError, ValueError) as exc:
            log.error("DKIM signing for %s failed: %s", domain, exc)
            raise DeliveryError(f"DKIM signing for {domain} failed: {exc}", "4.7.0") from None

    def _key(self, path: str) -> bytes:
        mtime = os.stat(path).st_mtime
        cached = self._keys.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, Path(path).read_bytes())
            self._keys[path] = cached
        return cached[1]

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        domain: str,
        recipients: Sequence[str],
        data: Path | MessageData,
        *,
        eight_bit: bool = False,
        smtputf8: bool = False,
    ) -> list[DeliveryResult]:
        """One attempt for ``recipients`` (all at ``domain``); a result for each. ``data`` is the
        data file's path, or the attempt's `MessageData` that the message's other destinations
        share (then the message is read and signed once for all of them)."""
        if refused := unsendable(sender, recipients):
            # Addresses no server can be sent fail alone and for good, before any lookup or
            # connection: retrying could never help, and they must not hold up the others.
            rest = [r for r in recipients if r not in refused]
            sent = iter(
                await self.deliver(queue_id, sender, domain, rest, data, eight_bit=eight_bit, smtputf8=smtputf8)
                if rest
                else []
            )
            return [
                DeliveryResult(r, refused[r].status, str(refused[r]), f"x-filterd; {refused[r]}", relay=domain)
                if r in refused
                else next(sent)
                for r in recipients
            ]

        def everyone(status: str, detail: str, reply: Reply | None = None) -> list[DeliveryResult]:
            diag = f"smtp; {reply}" if reply is not None else f"x-filterd; {detail}"
            code, enhanced = (reply.code, reply.enhanced) if reply is not None else (0, "")
            return [DeliveryResult(r, status, detail, diag, relay=domain, reply_code=code, reply_status=enhanced)
                    for r in recipients]  # fmt: skip

        try:
            hops = await next_hops(self.resolver, domain, rng=self.rng)
            shared = MessageData.of(data)
            with shared.in_use():  # one read for the signature and the message
                message = await self._signed(shared)
        except DeliveryError as exc:
            status = exc.status or ("5.0.0" if isinstance(exc, PermanentDeliveryError) else "4.0.0")
            return everyone(status, str(exc))
        failures: list[str] = []
        refusals: list[Reply] = []
        for hop in hops:
            result = await self._try(hop, sender, recipients, message, eight_bit, smtputf8, failures, refusals)
            if result is not None:
                return result
        detail = "; ".join(failures[-3:])
        if refusals and len(refusals) == len(hops) and all(r.permanent for r in refusals):
            last = refusals[-1]
            return everyone(last.status, detail, last)
        return everyone("4.4.1", detail)

    async def _try(
        self,
        hop: NextHop,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        eight_bit: bool,
        smtputf8: bool,
        failures: list[str],
        refusals: list[Reply],
    ) -> list[DeliveryResult] | None:
        started = time.monotonic()
        use_tls: bool | None = None
        for _ in range(2):  # the second round only after a failed STARTTLS, in the clear
            try:
                result = await send(
                    hop.address, self.options, sender=sender, recipients=recipients, data=data,
                    eight_bit=eight_bit, smtputf8=smtputf8, server_name=hop.host, use_tls=use_tls,
                )  # fmt: skip
            except TlsError as exc:
                log.warning("%s; trying again without TLS", exc)
                use_tls = False
                continue
            except SessionError as exc:
                failures.append(str(exc))
                if exc.reply is not None:
                    refusals.append(exc.reply)
                log.info("%s (%.1fs)", exc, time.monotonic() - started)
                return None
            relay = f"{hop}:{self.options.port}"
            out = []
            for rcpt in recipients:
                reply = result.replies[rcpt]
                if reply.local:
                    out.append(DeliveryResult(rcpt, reply.status, str(reply), f"x-filterd; {reply}", hop.host, relay))
                    continue
                said = f"host {result.server} said: {reply}"
                out.append(DeliveryResult(
                    rcpt, reply.status, said, f"smtp; {reply}", hop.host, relay, reply.code, reply.enhanced
                ))  # fmt: skip
            return out
        return None
