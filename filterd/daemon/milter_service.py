"""The milter: one `MilterServerConnection` per MTA connection, driven over asyncio streams.

Postfix (smtpd_milters) or Sendmail opens one connection per SMTP session and reports each
step; this module decides what to answer. Everything byte-level is in
`filterd.protocols.milter`; the verdict itself comes from the engine.

What is negotiated, and why (ask for little, answer little):

* Steps: no DATA, no unknown commands (NODATA, NOUNKNOWN). CONNECT, HELO, MAIL, headers and
  end of headers are only collected, so they are not answered (NR_CONN unless
  ``milter.reject_at_connect``, NR_HELO, NR_MAIL, NR_HDR, NR_EOH; end of headers is not switched
  off with NOEOH because Debian's miltertest 2.11 then stops dead at its ``mt.eoh()``). RCPT is answered only when
  greylisting is on (else NR_RCPT). Body chunks are answered when the MTA offers SKIP, so that
  past ``milter.max_size`` we can say Skip and the MTA stops sending; otherwise NR_BODY and the
  rest is read and dropped.
* Actions: ADDHDRS (X-Spam-*, Authentication-Results), CHGHDRS (delete the X-Spam-* headers a
  message arrives with and the Authentication-Results fields that claim our authserv-id, rewrite
  the Subject of spam), QUARANTINE.
* Macros: ``j {daemon_name} {client_addr} {client_name}`` at CONNECT, ``i {auth_type}
  {auth_authen} {mail_addr}`` at MAIL, ``i {rcpt_addr}`` at RCPT, ``i`` at end of message.

Per stage:

* CONNECT: with ``milter.reject_at_connect``, the engine's CONNECT checks run and a client whose
  hits alone reach ``reject_score`` is refused (550 5.7.1). What they found (hits, and the facts
  that tell the later checks the client was looked up) goes into the scan of every message of
  the connection, RSET or not, so its DNSBL lookups are made once per connection; except for
  an authenticated sender's message, whose scan does not judge the client's address.
* RCPT: greylisting (``greylist``), except for authenticated senders ({auth_authen}), trusted
  and exempt networks, and senders on the global or the recipient's welcome list; a deferred
  recipient gets ``greylist.message`` (451 4.7.1) and the others go on.
* Headers and body are collected up to ``milter.max_size``. Past it, with ``oversize: scan`` the
  part collected is scanned (most spam shows itself in its headers and first text part); with
  ``oversize: accept`` the message is accepted unscanned with an ``X-Filterd-Skipped`` header.
* End of message: the scan, as the first recipient's user (``milter.user``: local part or
  address, whose settings come from ``daemon.user_prefs_dir``, as spamd's User header), then in
  this order: a virus (antivirus.action reject|quarantine|tag); score >= ``reject_score`` (550
  5.7.1 ``reject_message``); clamd unavailable with antivirus.on_error tempfail (451 4.7.0); a
  DMARC p=reject failure with ``dmarc_reject``; spam (score >= required_score) gets
  ``spam_action``; and everything that is kept gets its X-Spam-* headers.
* Every message that is kept (also unscanned: oversize, overload or ``on_error: accept``)
  loses the X-Spam-* and X-Filterd-Skipped headers it arrived with (forged, or another hop's:
  delivery rules believe them, so only our verdict may carry those names, and an unscanned
  message carries none but our own X-Filterd-Skipped) and the Authentication-Results fields
  that claim our authserv-id
  (``auth.authserv_id``, else this host's name), whether or not the auth checks run:
  downstream trusts that id, so only we may write it (RFC 8601 §5). Those of other
  authserv-ids stay. Both are counted past ``max_size`` too, so none hides behind padding.
  The scan itself still reads the message as it arrived, so that DKIM signatures covering
  such a field verify.
* A scan that fails or outlives ``scan_timeout`` gets ``on_error`` (451 4.3.0, or accept with an
  X-Filterd-Skipped header), logged; so does a worker whose scan slots are all taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from filterd.config import Config
from filterd.daemon.metrics import WorkerMetrics
from filterd.engine.checks.auth.authserv import HEADER as AUTH_RESULTS
from filterd.engine.checks.auth.authserv import claims_authserv_id, effective_authserv_id
from filterd.engine.checks.lists import compile_globs
from filterd.engine.engine import Engine, Result
from filterd.engine.markup import MarkupOptions, rewritten_subject, spam_headers
from filterd.engine.plugin import Hit, Scan, ScanContext, Stage
from filterd.engine.prefs import UserPrefs, UserPrefsStore
from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.greylist import Greylist
from filterd.protocols.milter import (
    TEMPFAIL_PACKET,
    Abort,
    Action,
    AddHeader,
    AddressFamily,
    BodyChunk,
    ChangeHeader,
    Connect,
    ConnectionClosed,
    Continue,
    Discard,
    EndOfMessage,
    Event,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    MailFrom,
    MilterServerConnection,
    NeedData,
    Negotiate,
    OptionNegotiation,
    ProtocolFlag,
    Quarantine,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reply,
    ReplyCode,
    Skip,
)
from filterd.streams import drain

__all__ = ["MilterService", "header_fields", "user_for"]

log = logging.getLogger("filterd.daemon")

_ACTIONS = Action.ADDHDRS | Action.CHGHDRS | Action.QUARANTINE
_MACROS = {
    MacroStage.CONNECT: ("j", "{daemon_name}", "{client_addr}", "{client_name}"),
    MacroStage.MAIL: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
    MacroStage.RCPT: ("i", "{rcpt_addr}"),
    MacroStage.EOM: ("i",),
}
_SKIPPED = "X-Filterd-Skipped"  # on a message we let through unscanned, saying why
_NEEDS: dict[type, Action] = {
    AddHeader: Action.ADDHDRS,
    InsertHeader: Action.ADDHDRS,
    ChangeHeader: Action.CHGHDRS,
    Quarantine: Action.QUARANTINE,
}


def header_fields(text: str) -> list[tuple[str, str]]:
    """``Name: value`` lines (folded with LF + whitespace) back into (name, value) pairs."""
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\n{line}")
        else:
            name, _, value = line.partition(":")
            fields.append((name, value.removeprefix(" ")))
    return fields


def user_for(recipient: str, how: str) -> str:
    """Whose settings apply to a message for ``recipient`` (``milter.user``)."""
    if how == "none" or not recipient:
        return ""
    return recipient.rpartition("@")[0] or recipient if how == "local_part" else recipient


@dataclass(slots=True)
class _Message:
    """What one transaction has told us so far."""

    sender: str
    authenticated: str  # {auth_authen}: the SASL login name, "" when not authenticated
    queue_id: str
    rcpts: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    truncated: bool = False
    greylist_delay: float = 0.0  # a recipient passed greylisting just now, after this long
    # Authentication-Results fields, counted past max_size too: how the MTA spells the name,
    # how many there are, and the 1-based indexes of those claiming our authserv-id.
    auth_results_name: str = ""
    auth_results: int = 0
    forged_results: list[int] = field(default_factory=list)
    # X-Spam-* and X-Filterd-Skipped fields as they arrived (names only we may write), counted
    # past max_size too: lowercased name -> (the first spelling, occurrences).
    own_names: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _ConnectStage:
    """What the CONNECT checks found for this connection's client, for each message's scan."""

    client_ip: str
    hits: tuple[Hit, ...]
    facts: tuple[tuple[str, str], ...]  # e.g. "this client was looked up in the DNSBLs already"
    problems: tuple[str, ...]

    def carry_into(self, scan: Scan) -> None:
        """Give ``scan`` (a new one, same client) these results: the engine runs no CONNECT
        check for it again, and the later ones skip what was asked at connect."""
        scan.stages_done.add(Stage.CONNECT)
        for hit in self.hits:
            scan.hits[hit.rule] = hit
        scan.facts.update(self.facts)
        scan.problems.extend(self.problems)


@dataclass(frozen=True, slots=True)
class _Verdict:
    name: str  # accepted, tagged, rejected, tempfailed, quarantined, discarded, skipped
    replies: Sequence[Reply]


class MilterService:
    """Serves milter connections for one worker (one engine generation)."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        metrics: WorkerMetrics,
        *,
        greylist: Greylist | None,
        prefs: UserPrefsStore,
        scans: asyncio.Semaphore,
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.greylist = greylist if greylist is not None and greylist.config.enabled else None
        self.prefs = prefs
        self.scans = scans
        self.options = MarkupOptions.from_engine(engine, report_safe=0)  # a milter only adds headers
        self.authserv_id = effective_authserv_id(config.auth)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """Run one MTA connection to its end."""
        await _Session(self, peer).run(reader, writer)

    def user_prefs(self, recipient: str) -> tuple[str, UserPrefs]:
        return recipient_prefs(self.config, self.prefs, recipient)

    def welcomelisted(self, sender: str, prefs: UserPrefs) -> bool:
        return sender_welcomelisted(self.config, prefs, sender)


def recipient_prefs(config: Config, prefs: UserPrefsStore, recipient: str) -> tuple[str, UserPrefs]:
    """The user a recipient maps to (``milter.user``) and their settings (`UserPrefsStore.get`:
    the global ones for a name that cannot name a settings file). The milter and the policy
    service share it."""
    user = user_for(recipient, config.milter.user)
    return user, prefs.get(user)


def sender_welcomelisted(config: Config, prefs: UserPrefs, sender: str) -> bool:
    """Whether ``sender`` is on the global or the user's welcomelist_from (never the null sender)."""
    rx = compile_globs(tuple(config.lists.welcomelist_from) + prefs.welcomelist_from)
    return bool(sender) and rx is not None and rx.match(sender.lower()) is not None


class _Session:
    """One MTA connection: connection facts, the message in progress, the replies."""

    def __init__(self, service: MilterService, peer: str) -> None:
        self.service = service
        self.cfg = service.config.milter
        self.peer = peer
        self.conn = MilterServerConnection()
        self.client_ip = ""
        self.client_name = ""
        self.helo = ""
        self.connect_stage: _ConnectStage | None = None  # with reject_at_connect
        self.message: _Message | None = None

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.conn
        write_timeout = self.service.config.daemon.read_timeout
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.idle_timeout):
                        data = await reader.read(65536)
                except TimeoutError:
                    log.info("milter connection from %s idle for %.0fs, closing", self.peer, self.cfg.idle_timeout)
                    return
                conn.receive_data(data)
                while not isinstance(event := conn.next_event(), NeedData):
                    if isinstance(event, ConnectionClosed):
                        return
                    out = await self._answer(event)
                    if out:
                        writer.write(out)
                    if isinstance(event, Quit):  # QUIT ends the connection (QUIT_NC keeps it for another CONNECT)
                        await drain(writer, write_timeout)
                        return
                await drain(writer, write_timeout)
                if not data:
                    return
        except RemoteProtocolError as exc:
            self.service.metrics.errors["milter_protocol"] += 1
            log.warning("milter protocol error from %s: %s", self.peer, exc)
            if exc.reply:
                writer.write(exc.reply)
        except LocalProtocolError:  # a bug of ours that _answer could not turn into a reply
            self.service.metrics.errors["milter_internal"] += 1
            log.exception("milter: protocol layer refused to go on (%s); tempfail and close", self.peer)
            writer.write(TEMPFAIL_PACKET)

    async def _answer(self, event: Event) -> bytes:
        """The packets answering ``event``. A failure of ours (a reply the protocol layer refuses,
        an exception while deciding) becomes a tempfail, framed like every packet: anything else
        would desynchronise the MTA, which then applies its default action to the rest of the
        session, unscanned."""
        conn = self.conn
        try:
            replies = await self._handle(event)
            if conn.pending is not None and not replies:
                replies = [Continue()]
            return b"".join(conn.send(reply) for reply in self._granted(replies))
        except Exception as exc:
            self.service.metrics.errors["milter_internal"] += 1
            log.error(
                "milter: internal error answering %s from %s, tempfail: %s: %s",
                type(event).__name__,
                self.peer,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, LocalProtocolError),
            )
            if conn.pending is None:  # the MTA waits for nothing; the replies are dropped
                return b""
            # Raises again when even this is refused (at negotiation): then run() sends a TEMPFAIL
            # packet and closes.
            return conn.send(ReplyCode(451, "Internal error in the mail filter, try again later", "4.3.0"))

    def _granted(self, replies: Sequence[Reply]) -> list[Reply]:
        """Drop edits the MTA did not allow (an MTA may offer fewer actions than we ask for)."""
        actions = self.conn.actions
        kept = [r for r in replies if (_NEEDS.get(type(r), Action(0)) & actions) == _NEEDS.get(type(r), Action(0))]
        if len(kept) != len(replies):
            log.warning("milter: the MTA did not allow some edits (actions 0x%x); dropped", int(actions))
        return kept

    # -- steps -------------------------------------------------------------------------------

    async def _handle(self, event: Event) -> list[Reply]:
        if isinstance(event, OptionNegotiation):
            return [self._negotiate(event)]
        if isinstance(event, Connect):
            return await self._connect(event)
        if isinstance(event, Helo):
            self.helo = event.name
        elif isinstance(event, MailFrom):
            self.message = _Message(
                sender=event.address or event.macros.get("mail_addr", ""),
                authenticated=event.macros.get("auth_authen", ""),
                queue_id=event.macros.get("i", ""),
            )
        elif isinstance(event, RcptTo):
            return await self._rcpt(event)
        elif isinstance(event, Header):
            self._header(event)
        elif isinstance(event, BodyChunk):
            return self._body(event)
        elif isinstance(event, EndOfMessage):
            return [*await self._end_of_message(event)]
        elif isinstance(event, Abort | Quit):
            self.message = None  # after ABORT the connection, and what is known of its client, goes on
        elif isinstance(event, QuitNewConnection):  # another CONNECT follows: another client
            self.message = None
            self.client_ip = self.client_name = self.helo = ""
            self.connect_stage = None
        return []

    def _negotiate(self, offer: OptionNegotiation) -> Negotiate:
        p = ProtocolFlag
        protocol = p.NODATA | p.NR_EOH | p.NOUNKNOWN | p.NR_HELO | p.NR_MAIL | p.NR_HDR
        if not self.cfg.reject_at_connect:
            protocol |= p.NR_CONN
        if self.service.greylist is None:
            protocol |= p.NR_RCPT
        protocol |= p.SKIP if offer.protocol & p.SKIP else p.NR_BODY
        return Negotiate(actions=_ACTIONS, protocol=protocol, macros=_MACROS)

    async def _connect(self, event: Connect) -> list[Reply]:
        self.connect_stage = None
        self.client_ip = ""
        if event.family in (AddressFamily.INET, AddressFamily.INET6):
            self.client_ip = event.address or event.macros.get("client_addr", "")
        name = event.macros.get("client_name") or event.hostname
        self.client_name = "" if name.startswith("[") or name == "unknown" else name
        if not (self.cfg.reject_at_connect and self.client_ip):
            return []
        engine = self.service.engine
        scan = engine.new_scan(ScanContext(client_ip=self.client_ip, client_name=self.client_name))
        try:
            hits = await engine.run_stage(scan, Stage.CONNECT)
        except Exception:
            log.exception("milter: CONNECT checks failed for %s", self.client_ip)
            return []
        # Each message's scan reuses these results and runs no CONNECT check: count their times here.
        self.service.metrics.observe_async_checks(scan.async_timings)
        self.connect_stage = _ConnectStage(self.client_ip, tuple(hits), tuple(scan.facts.items()),
                                           tuple(scan.problems))  # fmt: skip
        score = engine.score(hits)
        if score < self.cfg.reject_score:
            return []
        rules = ",".join(h.rule for h in hits)
        self.service.metrics.verdicts["milter:rejected_connect"] += 1
        log.info(
            "milter client=%s [%s] refused at connect: score=%.1f hits=%s",
            self.client_name or "-",
            self.client_ip,
            score,
            rules,
        )
        return [ReplyCode(550, f"Connection refused: {rules}", "5.7.1")]

    async def _rcpt(self, event: RcptTo) -> list[Reply]:
        message = self.message
        rcpt = event.address or event.macros.get("rcpt_addr", "")
        if message is None:  # an MTA that skipped MAIL; nothing to greylist against
            return []
        message.queue_id = event.macros.get("i", message.queue_id)
        greylist = self.service.greylist
        if greylist is not None:
            _, prefs = self.service.user_prefs(rcpt)
            try:
                decision = await greylist.decide(
                    self.client_ip,
                    message.sender,
                    rcpt,
                    authenticated=bool(message.authenticated),
                    welcomelisted=self.service.welcomelisted(message.sender, prefs),
                )
            except Exception as exc:  # the store is down: greylisting must never stop mail
                self.service.metrics.errors["greylist_failed"] += 1
                log.warning("milter: greylisting failed, recipient passes: %s: %s", type(exc).__name__, exc)
            else:
                if decision.deferred:
                    self.service.metrics.verdicts["milter:greylisted"] += 1
                    log.info(
                        "milter greylisted client=%s from=<%s> rcpt=<%s>: %s",
                        self.client_ip,
                        message.sender,
                        rcpt,
                        decision.reason,
                    )
                    code, status, text = decision.reply.split(" ", 2)
                    return [ReplyCode(int(code), text, status)]
                message.greylist_delay = max(message.greylist_delay, decision.delayed)
        message.rcpts.append(rcpt)
        return []

    def _header(self, event: Header) -> None:
        message = self.message
        if message is None:
            return
        name = event.name.lower()
        if name == AUTH_RESULTS:  # also past max_size: a forgery must not hide there
            message.auth_results_name = message.auth_results_name or event.name
            message.auth_results += 1
            if claims_authserv_id(event.value, self.service.authserv_id):
                message.forged_results.append(message.auth_results)
        elif name.startswith("x-spam-") or name == _SKIPPED.lower():  # the same
            spelling, count = message.own_names.get(name, (event.name, 0))
            message.own_names[name] = (spelling, count + 1)
        if message.truncated:
            return
        message.size += len(event.name) + len(event.value) + 4
        message.headers.append((event.name, event.value))
        if message.size > self.cfg.max_size:
            message.truncated = True

    def _body(self, event: BodyChunk) -> list[Reply]:
        message = self.message
        if message is None:
            return []
        if not message.truncated:
            room = self.cfg.max_size - message.size
            message.body += event.data[:room]
            message.size += min(len(event.data), max(room, 0))
            if len(event.data) > room:
                message.truncated = True
        # With SKIP, the MTA stops sending the body (Postfix then goes to end of message).
        if message.truncated and self.conn.pending is not None:
            return [Skip()]
        return []

    # -- the verdict -------------------------------------------------------------------------

    async def _end_of_message(self, event: EndOfMessage) -> Sequence[Reply]:
        service = self.service
        message = self.message or _Message("", "", "")
        self.message = None
        started = time.perf_counter()
        queue_id = event.macros.get("i") or message.queue_id
        if message.truncated and self.cfg.oversize == "accept":
            reason = f"message larger than {self.cfg.max_size} bytes, not scanned"
            return self._done(
                "skipped",
                message,
                queue_id,
                started,
                None,
                [*_inbound_deleted(message), AddHeader(_SKIPPED, reason), Continue()],
            )
        raw = self._raw(message)
        user, prefs = service.user_prefs(message.rcpts[0] if message.rcpts else "")
        required = prefs.required_score if prefs.required_score is not None else service.config.scoring.required_score
        ctx = ScanContext(
            client_ip=self.client_ip,
            client_name=self.client_name,
            helo=self.helo,
            mail_from=message.sender,
            rcpts=tuple(message.rcpts),
            user=user,
            queue_id=queue_id,
            authenticated=bool(message.authenticated),
            prefs=prefs,
        )
        if service.scans.locked():  # shed load rather than queue scans without bound
            service.metrics.errors["milter_busy"] += 1
            return self._failed("all scan slots busy", message, queue_id, started)
        scan = service.engine.new_scan(ctx)
        # The client's CONNECT-stage results, unless the sender has logged in: then the client is
        # not the external relay, and the scan judges the message without its address.
        connect_stage = self.connect_stage
        if connect_stage is not None and connect_stage.client_ip == ctx.client_ip and not ctx.authenticated:
            connect_stage.carry_into(scan)
        try:
            async with service.scans, asyncio.timeout(self.cfg.scan_timeout):
                result = await service.engine.finish(scan, raw, required_score=required)
        except Exception as exc:  # TimeoutError included
            service.metrics.errors["scan_failed"] += 1
            log.error(
                "milter scan failed (qid=%s): %s: %s",
                queue_id or "-",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, TimeoutError),
            )
            return self._failed(f"scan failed: {type(exc).__name__}", message, queue_id, started)
        verdict = self._verdict(result, message, max(self.cfg.reject_score, required))
        service.metrics.observe_scan(
            "spam" if result.is_spam else "ham", time.perf_counter() - started, result.rule_names, len(raw)
        )
        service.metrics.observe_async_checks(result.async_timings)
        return self._done(verdict.name, message, queue_id, started, result, verdict.replies)

    def _failed(self, why: str, message: _Message, queue_id: str, started: float) -> Sequence[Reply]:
        if self.cfg.on_error == "tempfail":
            log.warning("milter on_error=tempfail (qid=%s): %s", queue_id or "-", why)
            reply: list[Reply] = [ReplyCode(451, "Temporary failure in the mail filter, try again later", "4.3.0")]
            return self._done("tempfailed", message, queue_id, started, None, reply)
        log.warning("milter on_error=accept (qid=%s): %s; accepted unscanned", queue_id or "-", why)
        return self._done(
            "accepted",
            message,
            queue_id,
            started,
            None,
            [*_inbound_deleted(message), AddHeader(_SKIPPED, why), Continue()],
        )

    def _verdict(self, result: Result, message: _Message, reject_at: float) -> _Verdict:
        cfg = self.cfg
        facts = dict(result.facts)
        virus = facts.get("av")
        av_action = facts.get("av_action", "reject")
        if virus and av_action == "reject":
            return _Verdict("rejected", [ReplyCode(550, f"Message contains a virus ({virus})", "5.7.1")])
        if result.score >= reject_at:
            text = cfg.reject_message.format(score=result.score, required=result.required_score)
            return _Verdict("rejected", [ReplyCode(550, text, "5.7.1")])
        if facts.get("av_error") and facts.get("av_on_error") == "tempfail":
            return _Verdict("tempfailed", [ReplyCode(451, "Virus scan unavailable, try again later", "4.7.0")])
        if cfg.dmarc_reject and facts.get("dmarc") == "fail" and facts.get("dmarc_disposition") == "reject":
            domain = facts.get("dmarc_domain", "the sender's domain")
            return _Verdict("rejected", [ReplyCode(550, f"Rejected by the DMARC policy of {domain}", "5.7.1")])
        edits = self._header_edits(result, message)
        if virus and av_action == "quarantine":
            return _Verdict("quarantined", [*edits, Quarantine(f"virus: {virus}"), Continue()])
        if not result.is_spam:
            return _Verdict("accepted", [*edits, Continue()])
        action = cfg.spam_action
        if action == "quarantine":
            return _Verdict("quarantined", [*edits, Quarantine(f"spam, score {result.score:.1f}"), Continue()])
        if action == "discard":
            return _Verdict("discarded", [Discard()])
        if action == "tempfail":
            return _Verdict("tempfailed", [ReplyCode(451, "Message deferred as likely spam, try again later", "4.7.1")])
        if action == "reject":
            text = cfg.reject_message.format(score=result.score, required=result.required_score)
            return _Verdict("rejected", [ReplyCode(550, text, "5.7.1")])
        return _Verdict("tagged", [*edits, Continue()])

    def _header_edits(self, result: Result, message: _Message) -> list[Reply]:
        edits = _inbound_deleted(message)
        edits += [
            AddHeader(name, value)
            for name, value in header_fields(spam_headers(self.service.engine, result, self.service.options))
        ]
        prefix = self.service.options.rewrite_subject
        if result.is_spam and prefix:
            subject = next((value for name, value in message.headers if name.lower() == "subject"), None)
            rewritten = rewritten_subject(subject, prefix)
            if rewritten is not None:
                new, old = rewritten
                if old is None:
                    edits.append(AddHeader("Subject", new))
                else:
                    edits += [ChangeHeader(1, "Subject", new), AddHeader("X-Spam-Prev-Subject", old)]
        if message.greylist_delay:
            edits.append(AddHeader("X-Greylist", f"delayed {message.greylist_delay:.0f} seconds by filterd"))
        return edits

    @staticmethod
    def _raw(message: _Message) -> bytes:
        """The message as the engine reads it: the MTA strips one space after each colon and joins
        folded lines with LF; both are put back."""
        head = "".join(f"{name}: {value}".replace("\n", "\r\n") + "\r\n" for name, value in message.headers)
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + bytes(message.body)

    def _done(
        self,
        verdict: str,
        message: _Message,
        queue_id: str,
        started: float,
        result: Result | None,
        replies: Sequence[Reply],
    ) -> Sequence[Reply]:
        self.service.metrics.verdicts[f"milter:{verdict}"] += 1
        log.info(
            "milter qid=%s client=%s from=<%s> rcpt=%s score=%s verdict=%s hits=%s time=%.1fms size=%d%s",
            queue_id or "-",
            self.client_ip or "-",
            message.sender,
            ",".join(f"<{r}>" for r in message.rcpts) or "-",
            f"{result.score:.1f}/{result.required_score:.1f}" if result is not None else "-",
            verdict,
            ",".join(result.rule_names) if result is not None and result.hits else "-",
            (time.perf_counter() - started) * 1000,
            message.size,
            " truncated" if message.truncated else "",
        )
        return replies


def _inbound_deleted(message: _Message) -> list[Reply]:
    """Delete what only we may write, as the message arrived with it: every X-Spam-* and
    X-Filterd-Skipped header and the Authentication-Results fields that claim our authserv-id. Every path that keeps the
    message sends these, scanned or not. Last occurrence first, so that the indexes of the
    earlier ones stay right (they count every field of that name)."""
    edits: list[Reply] = []
    for name, count in message.own_names.values():
        edits += [ChangeHeader(index, name, "") for index in range(count, 0, -1)]
    edits += [ChangeHeader(index, message.auth_results_name, "") for index in reversed(message.forged_results)]
    return edits
