"""The MTA's SMTP server: sessions over `filterd.protocols.smtp_server`, relay control, the
pre-queue milter, and the durable queue.

One asyncio task per connection owns one `SmtpServerConnection`. Before the greeting, the
client's name is looked up as Postfix does (`filterd.mta.peername`: PTR, then forward-confirmed,
within ``mta.peername_timeout``; "unknown" when that fails), for the log, our Received header and
the milter's macros. A resolver found dead (``mta.dns_breaker_failures`` timeouts in a row, and
no answer to a ping) is not waited for: its breaker (`Resolver.guard_resolver`) skips the
lookups for ``mta.dns_breaker_cooldown``. What each command meets:

* RCPT: mail for ``mta.local_domains`` (and our hostname, and a bare ``postmaster``) from
  anyone; any other domain only from ``mta.mynetworks`` or an authenticated client, else
  ``554 5.7.1 <addr>: Relay access denied``. Then the milter, if any.
* AUTH (PLAIN, LOGIN): offered only under TLS unless ``require_tls_for_auth`` is off, checked
  against ``mta.auth_users_file`` (scrypt, in a thread).
* End of data: our Received header goes on top (RFC 5321 §4.4; ``with`` ESMTP/ESMTPS/ESMTPA/
  ESMTPSA per RFC 3848; the queue id); more than ``mta.max_hops`` Received headers is a loop,
  ``554 5.4.6``. Then the milter's end of message, its edits applied, and
  `Queue.enqueue`, which returns only once the message is on disk: only then ``250 2.0.0 Ok:
  queued as ID``.

The milter is driven as Postfix's smtpd drives its smtpd_milters: one milter connection per SMTP
session, opened at connect, each SMTP step sent as it happens, the filter's reply deciding that
step (reject/tempfail at RCPT refuse that recipient only). Accept at connect or HELO turns the
filter off for the session; accept later, for the message. Discard: 250, nothing queued.
Quarantine: queued in hold/. When the filter fails (down, timeout, protocol error)
``mta.milter_default_action`` applies for the rest of the session: ``tempfail`` answers 451
4.7.1 to every MAIL, RCPT, DATA and final dot; ``accept`` carries on without the filter. Each
use is logged.
"""

from __future__ import annotations

__all__ = ["SmtpServer", "received_header"]

import asyncio
import contextlib
import datetime
import email.utils
import ipaddress
import itertools
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from filterd import __version__
from filterd.config.schema import MtaConfig
from filterd.errors import QueueError
from filterd.mta.auth import check_user
from filterd.mta.localusers import home_directory, unknown_user_reason
from filterd.mta.milter_client import (
    HeaderSplit,
    MessageEdits,
    MilterSession,
    Verdict,
    apply_edits,
    field_on_top,
    split_headers,
)
from filterd.mta.names import own_domains, own_hostname
from filterd.mta.peername import PeerName, lookup_peername
from filterd.mta.queue import Envelope, Queue, QueueState, Recipient
from filterd.net.dns import Resolver
from filterd.protocols import ConnectionClosed, NeedData
from filterd.protocols.milter import ProtocolFlag, ReplyCode
from filterd.protocols.smtp_server import (
    AuthCredentials,
    DataCommand,
    Helo,
    MailFrom,
    Message,
    MessageRefused,
    Quit,
    RcptTo,
    Reply,
    Reset,
    SmtpServerConnection,
    StartTls,
)
from filterd.streams import WriteTimeout, close, drain

log = logging.getLogger(__name__)

_TEMPFAIL = Reply(451, "Service unavailable - try again later", "4.7.1")
_REJECT = Reply(550, "Command rejected", "5.7.1")
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


def _mailbox_line_to_header(data: bytes) -> bytes:
    """A leading mbox ``From sender date`` line (a client piping a mailbox file) as a header.

    Left in place it would end the header block before it starts, so the filter and the reader
    would see a message without headers. Postfix's cleanup keeps it as X-Mailbox-Line; so do we.
    """
    if not data.startswith(b"From "):  # a From: header has no space before its colon
        return data
    line, sep, rest = data.partition(b"\r\n")
    return b"X-Mailbox-Line: " + line + sep + rest


def received_header(
    *,
    helo: str,
    client_ip: str,
    client_name: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: str = "",
    when: float | None = None,
) -> bytes:
    """Our trace header (RFC 5321 §4.4), folded, with CRLF; ``tls`` goes in as a comment."""
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [f"Received: from {helo} ({client_name or 'unknown'} [{literal}])"]
    if tls:
        lines.append(f"\t({tls})")
    lines.append(f"\tby {hostname} (filterd {__version__}) with {protocol} id {queue_id}")
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when).astimezone()
    date = email.utils.format_datetime(moment)
    lines.append(f"\tfor <{recipient}>; {date}" if recipient else f"\t; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass
class _Transaction:
    """One MAIL ... final dot."""

    queue_id: str
    sender: str
    params: dict[str, str]
    rcpts: list[str] = field(default_factory=list)
    milter_done: bool = False  # the filter accepted the message: no more steps to it
    discard: bool = False
    refusal: Reply | None = None  # the filter refused DATA: so is any retry in this transaction


class SmtpServer:
    """Serves SMTP on the given sockets and puts accepted mail in ``queue``."""

    def __init__(
        self,
        config: MtaConfig,
        queue: Queue,
        *,
        users: dict[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_queued: Callable[[], None] | None = None,
        resolver: Resolver | None = None,
        home_of: Callable[[str], str | None] = home_directory,
    ) -> None:
        self.config = config
        self._home_of = home_of
        # None: no client name lookups (every client is "unknown"), as peername_lookup false
        self.resolver = resolver if config.peername_lookup else None
        if self.resolver is not None:  # a dead resolver is not waited for (the queue manager shares it)
            self.resolver.guard_resolver(failures=config.dns_breaker_failures, cooldown=config.dns_breaker_cooldown)
        self.on_queued = on_queued  # the queue manager's wake()
        self.queue = queue
        self.hostname = own_hostname(config)
        self.milter = config.milter
        self.users = users or {}
        self.tls_context = tls_context
        self.local_domains = own_domains(config)
        self._connections = 0
        self._ids = itertools.count(1)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # messages queued, for tests and benchmarks

    def unknown_local_user(self, address: str) -> str | None:
        """Why local mail for ``address`` has no mailbox here (refused at RCPT), or None. The
        postmaster is always accepted (RFC 5321 4.5.1), whatever becomes of it at delivery."""
        local_part = address.rpartition("@")[0] if "@" in address else address
        if local_part.lower() == "postmaster":
            return None
        return unknown_user_reason(self.config, local_part, self._home_of)

    # -- listening ------------------------------------------------------------------------

    async def start(self, listen: Iterable[str], tls_listen: Iterable[str] = ()) -> list[tuple[str, int]]:
        """Open the listeners; returns the bound (host, port) pairs, plain ones first."""
        bound = []
        for addresses, implicit in ((listen, False), (tls_listen, True)):
            for address in addresses:
                host, _, port = address.rpartition(":")
                host = host.strip("[]")

                async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, tls: bool = implicit) -> None:
                    await self._handle(r, w, implicit_tls=tls)

                server = await asyncio.start_server(
                    handle,
                    host,
                    int(port),
                    ssl=self.tls_context if implicit else None,
                    reuse_address=True,
                    limit=1 << 20,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    bound.append((name[0], name[1]))
                    log.info("smtpd: listening on %s:%d%s", name[0], name[1], " (TLS)" if implicit else "")
        return bound

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; sessions get ``grace`` seconds to finish, then are cut."""
        for server in self._servers:
            server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, implicit_tls: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections += 1
        try:
            if self._connections > self.config.max_connections:
                writer.write(Reply(421, f"{self.hostname} Error: too many connections", "4.7.0").render())
                log.warning("smtpd: too many connections (%d); refused one", self._connections - 1)
                return
            await _Session(self, reader, writer, implicit_tls).run()
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.info("smtpd: connection lost: %s", exc or type(exc).__name__)
        except Exception:  # a bug must cost one session, not the server
            log.exception("smtpd: session failed")
            with contextlib.suppress(Exception):
                writer.write(Reply(421, f"{self.hostname} Error: internal error", "4.3.0").render())
        finally:
            self._connections -= 1
            self._tasks.discard(task)
            await close(writer, self.config.smtpd_timeout)  # a client that reads nothing gets it cut


class _Session:
    """One SMTP connection: the state that lives between its commands."""

    def __init__(
        self, server: SmtpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, implicit_tls: bool
    ) -> None:
        self.server, self.config = server, server.config
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername") or ("", 0)
        self.client_ip = str(peer[0]).removeprefix("::ffff:")
        self.client_port = int(peer[1]) if len(peer) > 1 else 0
        self.peer = PeerName()  # until `_look_up_client`: "unknown", as without DNS
        self.prefix = f"conn={next(server._ids)} "
        self.smtp = SmtpServerConnection(
            server.hostname,
            max_message_size=self.config.max_message_size,
            tls_available=server.tls_context is not None and not implicit_tls,
            tls_active=implicit_tls,
            auth_mechanisms=("PLAIN", "LOGIN") if server.users else (),
            auth_requires_tls=self.config.require_tls_for_auth,
        )
        self.helo = ""
        self.esmtp = False
        self.auth_user = ""
        self.tls = self._tls_description() if implicit_tls else ""
        self.txn: _Transaction | None = None
        self.milter: MilterSession | None = None
        self.milter_tempfail = False  # default action tempfail is in force for this session
        self.refusal: Reply | None = None  # the filter refused the client at connect or HELO
        self.closing = False  # a 421 went out: close after it
        self.mynetworks = any(self._in(net) for net in self.config.mynetworks)

    def _in(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        try:
            return ipaddress.ip_address(self.client_ip) in network
        except ValueError:
            return False

    def _tls_description(self) -> str:
        obj = self.writer.get_extra_info("ssl_object")
        cipher = self.writer.get_extra_info("cipher")
        if obj is None or cipher is None:
            return ""
        return f"using {obj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"

    # -- the loop ---------------------------------------------------------------------------

    @property
    def client_name(self) -> str:
        """The forward-confirmed name, or "unknown" (Postfix client_name)."""
        return self.peer.name

    async def _look_up_client(self) -> None:
        resolver = self.server.resolver
        if resolver is None:
            return
        self.peer = peer = await lookup_peername(resolver, self.client_ip, budget=self.config.peername_timeout)
        if peer.status == "FORGED":  # Postfix's words
            log.warning("%shostname %s does not resolve to address %s", self.prefix, peer.reverse_name, self.client_ip)
        elif peer.detail:
            log.info("%sclient name unknown (%s): %s", self.prefix, peer.status, peer.detail)

    async def run(self) -> None:
        await self._look_up_client()
        log.info("%sconnect from %s[%s]", self.prefix, self.client_name, self.client_ip)
        if self.server.milter:
            self.milter = MilterSession(
                self.server.milter,
                connect_timeout=self.config.milter_connect_timeout,
                timeout=self.config.milter_timeout,
                log_prefix=self.prefix,
            )
            verdict = await self.milter.connect(self.client_ip, self.client_port, self.client_name, self._macros())
            self._session_verdict(verdict, "connect")
            if verdict.kind == "shutdown":
                self.writer.write(Reply(421, f"{self.server.hostname} Service not available", "4.7.0").render())
                return
        self.writer.write(self.smtp.data_to_send())
        try:
            while not self.smtp.closed:
                try:
                    async with asyncio.timeout(self.config.smtpd_timeout):
                        data = await self.reader.read(65536)
                except TimeoutError:
                    self.writer.write(Reply(421, f"{self.server.hostname} Error: timeout exceeded", "4.4.2").render())
                    log.info("%stimeout after %s", self.prefix, self.smtp.state.value)
                    return
                self.smtp.receive_data(data)
                if await self._events():
                    return
                if not await self._send():
                    return
        finally:
            with contextlib.suppress(Exception):
                self.writer.write(self.smtp.data_to_send())
            if self.milter is not None:
                await self.milter.close()
            log.info("%sdisconnect from %s[%s]", self.prefix, self.client_name, self.client_ip)

    async def _send(self) -> bool:
        """Write the replies due; False when the client has not read them within smtpd_timeout
        (the connection is then dropped). A client that pipelines commands and never reads the
        replies would otherwise hold its connection slot for as long as TCP keeps it open."""
        self.writer.write(self.smtp.data_to_send())
        try:
            await drain(self.writer, self.config.smtpd_timeout)
        except WriteTimeout:
            log.info("%stimeout writing to the client after %s; dropped", self.prefix, self.smtp.state.value)
            return False
        return True

    async def _events(self) -> bool:
        """Handle every event buffered; True when the connection is to be closed."""
        smtp = self.smtp
        while not isinstance(event := smtp.next_event(), NeedData):
            if isinstance(event, ConnectionClosed | Quit):
                return True
            if isinstance(event, Helo):
                await self._on_helo(event)
            elif isinstance(event, StartTls):
                if await self._on_starttls():
                    return True
            elif isinstance(event, AuthCredentials):
                await self._on_auth(event)
            elif isinstance(event, MailFrom):
                await self._on_mail(event)
            elif isinstance(event, RcptTo):
                await self._on_rcpt(event)
            elif isinstance(event, DataCommand):
                await self._on_data()
            elif isinstance(event, Message):
                await self._on_message(event.data)
            elif isinstance(event, Reset | MessageRefused):
                if isinstance(event, MessageRefused):
                    log.info("%s%s: %s", self.prefix, self.txn.queue_id if self.txn else "-", event.reply.text)
                await self._end_transaction()
            if self.closing:  # a 421 from the filter
                return True
        return False

    # -- the filter ---------------------------------------------------------------------------

    def _macros(self, **more: str) -> dict[str, str]:
        macros = {
            "j": self.server.hostname,
            "daemon_name": "filterd-mta",
            "v": f"filterd {__version__}",
            "_": self._underscore_macro(),
            "client_addr": self.client_ip,
            "client_port": str(self.client_port),
            "client_name": self.client_name,
            "client_ptr": self.peer.reverse_name,
            "client_resolve": self.peer.status,
        }
        if self.txn is not None:
            macros["i"] = self.txn.queue_id
        if self.auth_user:
            macros.update(auth_type="PLAIN", auth_authen=self.auth_user)
        obj = self.writer.get_extra_info("ssl_object")
        if obj is not None:
            cipher = self.writer.get_extra_info("cipher") or ("", "", 0)
            macros.update(tls_version=str(obj.version()), cipher=str(cipher[0]), cipher_bits=str(cipher[2]))
        macros.update(more)
        return macros

    def _underscore_macro(self) -> str:
        """Postfix's ``_``: the PTR name and the address, flagged when the name did not confirm."""
        peer = self.peer
        forged = " (may be forged)" if peer.name.lower() != peer.reverse_name.lower() else ""
        return f"{peer.reverse_name} [{self.client_ip}]{forged}"

    def _filter_failed(self, verdict: Verdict, where: str) -> None:
        action = self.config.milter_default_action
        log.warning("%smilter failed at %s (%s): milter_default_action=%s", self.prefix, where, verdict.reason, action)
        self.milter = None
        self.milter_tempfail = action == "tempfail"

    def _session_verdict(self, verdict: Verdict, where: str) -> None:
        """A verdict at connect or HELO, which holds for the whole session."""
        if verdict.kind == "failed":
            self._filter_failed(verdict, where)
        elif verdict.kind == "accept":
            self.milter = None
        elif verdict.kind in ("reject", "tempfail"):
            self.refusal = _smtp_reply(verdict)
            log.info("%smilter refused the client at %s: %s", self.prefix, where, self.refusal.text)

    def _filter_reply(self, verdict: Verdict, where: str) -> Reply | None:
        """What a message-step verdict means to the SMTP reply; None = go on."""
        txn = self.txn
        if verdict.kind == "failed":
            self._filter_failed(verdict, where)
            return _TEMPFAIL if self.milter_tempfail else None
        if verdict.kind == "accept" and txn is not None:
            txn.milter_done = True
        elif verdict.kind == "discard" and txn is not None:
            txn.discard = txn.milter_done = True
        elif verdict.kind in ("reject", "tempfail"):
            return _smtp_reply(verdict)
        elif verdict.kind == "shutdown":
            self.closing = True
            return Reply(421, f"{self.server.hostname} Service not available", "4.7.0")
        return None

    def _milter_wanted(self) -> bool:
        return self.milter is not None and not (self.txn is not None and self.txn.milter_done)

    # -- commands -----------------------------------------------------------------------------

    async def _on_helo(self, event: Helo) -> None:
        await self._end_transaction()
        self.helo, self.esmtp = event.name, event.extended
        if self.milter is not None:
            self._session_verdict(await self.milter.helo(event.name, self._macros()), "helo")
        self.smtp.send(Reply(250, self.server.hostname))

    async def _on_starttls(self) -> bool:
        context = self.server.tls_context
        assert context is not None
        self.smtp.send(Reply(220, "Ready to start TLS", "2.0.0"))
        if not await self._send():
            return True
        # bytes the client sent after STARTTLS and before the handshake are plaintext that must
        # not count as part of the TLS session (CVE-2011-0411); asyncio has no public way to
        # drop what its StreamReader has buffered, so reach in
        buffered = getattr(self.reader, "_buffer", None)
        if buffered:
            log.warning("%s%d bytes pipelined after STARTTLS dropped", self.prefix, len(buffered))
            buffered.clear()
        try:
            async with asyncio.timeout(self.config.smtpd_timeout):
                await self.writer.start_tls(context)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("%sTLS handshake failed: %s", self.prefix, exc)
            return True
        self.smtp.tls_started()
        self.tls = self._tls_description()
        self.helo = ""
        log.info("%sTLS started: %s", self.prefix, self.tls)
        return False

    async def _on_auth(self, event: AuthCredentials) -> None:
        # an unknown user costs the same scrypt run as a wrong password (no timing oracle)
        ok = await asyncio.to_thread(check_user, self.server.users, event.username, event.password)
        if ok and event.authzid not in ("", event.username):
            ok = False  # we do not let one user act as another
        if ok:
            self.auth_user = event.username
            log.info("%sauthenticated as %s (%s)", self.prefix, event.username, event.mechanism)
            self.smtp.send(Reply(235, "Authentication successful", "2.7.0"))
        else:
            log.warning("%s%s authentication failed for %r", self.prefix, event.mechanism, event.username)
            self.smtp.send(Reply(535, "Authentication credentials invalid", "5.7.8"))

    async def _on_mail(self, event: MailFrom) -> None:
        if self.refusal is not None:
            self.smtp.send(self.refusal)
            return
        if self.milter_tempfail:
            self.smtp.send(_TEMPFAIL)
            return
        self.txn = _Transaction(self.server.queue.new_id(), event.address, event.params)
        if self._milter_wanted():
            assert self.milter is not None
            args = [f"{k}={v}" if v else k for k, v in event.params.items()]
            macros = self._macros(mail_addr=event.address, mail_mailer="smtp", mail_host=_domain(event.address))
            reply = self._filter_reply(await self.milter.mail(event.address, args, macros), "mail")
            if reply is not None:
                self.txn = None
                self.smtp.send(reply)
                return
        self.smtp.send(Reply(250, "Ok", "2.1.0"))

    def _standing_refusal(self) -> Reply | None:
        """What refuses every further step of this transaction: the filter's default action
        tempfail, or a refusal the filter gave earlier (None: go on)."""
        assert self.txn is not None
        return _TEMPFAIL if self.milter_tempfail else self.txn.refusal

    async def _on_rcpt(self, event: RcptTo) -> None:
        txn = self.txn
        assert txn is not None
        if (refusal := self._standing_refusal()) is not None:
            self.smtp.send(refusal)
            return
        address = event.address
        if address.lower() in {r.lower() for r in txn.rcpts}:
            # a repeated recipient is accepted but kept once (Postfix duplicate elimination)
            self.smtp.send(Reply(250, "Ok", "2.1.5"))
            return
        if len(txn.rcpts) >= self.config.max_recipients:
            self.smtp.send(Reply(452, "Error: too many recipients", "4.5.3"))
            return
        local = "@" not in address or _domain(address) in self.server.local_domains
        if not (local or self.mynetworks or self.auth_user):
            log.info("%sreject RCPT from %s: <%s>: relay access denied", self.prefix, self.client_ip, address)
            self.smtp.send(Reply(554, f"<{address}>: Relay access denied", "5.7.1"))
            return
        if local and (reason := self.server.unknown_local_user(address)) is not None:
            log.info("%sreject RCPT from %s: <%s>: %s", self.prefix, self.client_ip, address, reason)
            self.smtp.send(
                Reply(550, f"<{address}>: Recipient address rejected: User unknown in local recipient table", "5.1.1")
            )
            return
        if self._milter_wanted():
            assert self.milter is not None
            macros = self._macros(
                rcpt_addr=address, rcpt_host=_domain(address), rcpt_mailer="local" if local else "smtp"
            )
            reply = self._filter_reply(await self.milter.rcpt(address, [], macros), "rcpt")
            if reply is not None:
                self.smtp.send(reply)
                return
        txn.rcpts.append(address)
        self.smtp.send(Reply(250, "Ok", "2.1.5"))

    async def _on_data(self) -> None:
        txn = self.txn
        assert txn is not None
        if (refusal := self._standing_refusal()) is not None:
            self.smtp.send(refusal)
            return
        if self._milter_wanted():
            assert self.milter is not None
            reply = self._filter_reply(await self.milter.data(self._macros()), "data")
            if reply is not None:
                txn.refusal = reply  # the filter has ended this message on its side
                self.smtp.send(reply)
                return
        self.smtp.send(Reply(354, "End data with <CR><LF>.<CR><LF>"))

    async def _on_message(self, data: bytes) -> None:
        txn = self.txn
        assert txn is not None
        reply = await self._message(txn, data)
        self.txn = None
        self.smtp.send(reply)

    async def _message(self, txn: _Transaction, data: bytes) -> Reply:
        data = _mailbox_line_to_header(data)
        split = split_headers(data)  # the one split of the header block: the milter's and the edits' too
        hops = 1 + sum(1 for _, _, raw in split[0] if _RECEIVED.match(raw))
        if hops > self.config.max_hops:
            log.info("%s%s: too many hops (%d Received headers): mail loop", self.prefix, txn.queue_id, hops - 1)
            await self._end_transaction()
            return Reply(554, "Error: too many hops (mail loop?)", "5.4.6")
        if self.auth_user:  # RFC 3848 names
            protocol = "ESMTPSA" if self.tls else "ESMTPA"
        else:
            protocol = "ESMTPS" if self.tls else "ESMTP" if self.esmtp else "SMTP"
        received = received_header(
            helo=self.helo or self.client_ip,
            client_ip=self.client_ip,
            client_name=self.client_name,
            hostname=self.server.hostname,
            protocol=protocol,
            queue_id=txn.queue_id,
            recipient=txn.rcpts[0] if len(txn.rcpts) == 1 else None,
            tls=self.tls,
        )
        message = received + data
        message_split = field_on_top(received, split)
        sender, rcpts = txn.sender, list(txn.rcpts)
        state: QueueState = "incoming"
        hold_reason = ""
        verdict_note = "none"
        if self.milter_tempfail:
            await self._end_transaction()
            return _TEMPFAIL
        if self._milter_wanted():
            assert self.milter is not None
            # Our Received header stays hidden, as Postfix hides its own: the filter reads the
            # message as the client sent it.
            verdict, edits = await self.milter.message(message, self._macros(), own_headers=1, split=message_split)
            verdict_note = verdict.kind
            reply = self._filter_reply(verdict, "end of message")
            if reply is not None:
                log.info("%s%s: milter %s: %s", self.prefix, txn.queue_id, verdict.kind, reply.text)
                return reply
            if verdict.kind != "failed":
                message, sender, rcpts = self._apply(message, message_split, edits, sender, rcpts)
                if edits.quarantine is not None:
                    state, hold_reason = "hold", edits.quarantine
        if txn.discard:
            log.info("%s%s: discarded by the milter", self.prefix, txn.queue_id)
            return Reply(250, f"Ok: queued as {txn.queue_id}", "2.0.0")
        if not rcpts:
            return Reply(550, "Error: no recipients left after filtering", "5.7.1")
        envelope = Envelope(
            mail_from=sender,
            rcpts=[Recipient(r) for r in rcpts],
            received_at=time.time(),
            client_ip=self.client_ip,
            client_name=self.client_name,
            client_helo=self.helo,
            auth_user=self.auth_user,
            hops=hops,
            body_type="8BITMIME" if txn.params.get("BODY", "").upper() == "8BITMIME" else "7BIT",
            hold_reason=hold_reason,
        )
        try:
            await asyncio.to_thread(self.server.queue.enqueue, envelope, message, qid=txn.queue_id, state=state)
        except (OSError, QueueError) as exc:
            log.error("%s%s: cannot queue the message: %s", self.prefix, txn.queue_id, exc)
            return Reply(451, "Error: queue file write error", "4.3.0")
        self.server.accepted += 1
        if self.server.on_queued is not None:
            self.server.on_queued()
        log.info(
            "%s%s: queued%s from=<%s> to=%s size=%d milter=%s",
            self.prefix,
            txn.queue_id,
            " on hold" if state == "hold" else "",
            sender,
            ",".join(f"<{r}>" for r in rcpts),
            len(message),
            verdict_note,
        )
        return Reply(250, f"Ok: queued as {txn.queue_id}", "2.0.0")

    def _apply(
        self, message: bytes, split: HeaderSplit, edits: MessageEdits, sender: str, rcpts: list[str]
    ) -> tuple[bytes, str, list[str]]:
        leadspc = bool(self.milter and self.milter.protocol & ProtocolFlag.HDR_LEADSPC)
        message = apply_edits(message, edits, leadspc=leadspc, split=split)
        if edits.new_sender is not None:
            sender = edits.new_sender.strip("<>")
        gone = {r.strip("<>").lower() for r in edits.del_rcpts}
        rcpts = [r for r in rcpts if r.lower() not in gone]
        seen = {r.lower() for r in rcpts}
        for added in edits.add_rcpts:
            address = added.strip("<>")
            if address.lower() not in seen:  # duplicates (in any case) are delivered once
                seen.add(address.lower())
                rcpts.append(address)
        return message, sender, rcpts

    async def _end_transaction(self) -> None:
        if self.txn is not None and self.milter is not None and not self.txn.milter_done:
            await self.milter.abort()
        self.txn = None


def _smtp_reply(verdict: Verdict) -> Reply:
    code: ReplyCode | None = verdict.reply
    if code is not None:
        return Reply(code.code, code.text, code.status or f"{str(code.code)[0]}.7.1")
    return _TEMPFAIL if verdict.kind == "tempfail" else _REJECT
