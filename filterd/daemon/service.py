"""From a spamd request to the bytes of the answer: user settings, the scan, markup, logging.

No sockets here: the worker's connection loop hands over a parsed `SpamdRequest` and writes
back what `SpamdService.handle` returns. A failure of ours, in the scan, in building the answer or
anywhere else, is answered with an EX_SOFTWARE status line (and nothing after it), logged once
with its traceback and counted in the error metrics, never a connection dropped in silence.
Clients that read the code see it (aiospamc raises InternalSoftwareException); spamc takes any
failed answer as it takes a lost daemon, and hands the message back unmarked unless run with -x.

Any user name is scanned, as spamd scans a user it does not know: with the global settings when
the name has no settings file, or cannot name one (`UserPrefsStore.get`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Mapping

from filterd.config import Config
from filterd.daemon.metrics import WorkerMetrics
from filterd.engine.bayes import LearnResult
from filterd.engine.checks.auth.authserv import effective_authserv_id, message_without_claims, without_claims
from filterd.engine.engine import Engine, Result
from filterd.engine.markup import MarkupOptions, build_report, original_message, process_message
from filterd.engine.message import parse_message
from filterd.engine.plugin import ScanContext
from filterd.engine.prefs import UserPrefs, UserPrefsStore
from filterd.headerblock import without_fields
from filterd.protocols.spamd import (
    EX_DATAERR,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    SpamdRequest,
    render_error,
    render_pong,
    render_response,
    render_tell,
)

__all__ = ["SpamdService"]

log = logging.getLogger("filterd.daemon")
_SKIPPED = "x-filterd-skipped"  # what the milter and `filterd deliver` add to mail they let through unscanned
_SCANNING = ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS")


class SpamdService:
    """Answers spamd requests with one engine generation."""

    def __init__(self, engine: Engine, config: Config, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.prefs = UserPrefsStore(config.daemon.user_prefs_dir)
        self.scans = asyncio.Semaphore(config.daemon.max_concurrent_scans)
        self._options = MarkupOptions.from_engine(engine)
        self._authserv_id = effective_authserv_id(config.auth)

    async def handle(self, request: SpamdRequest) -> bytes:
        """The answer to ``request``. A failed scan, or a failure to render its answer, is answered
        here (EX_SOFTWARE, logged with what is known of the message, counted by kind); any other
        failure propagates to the worker, which answers EX_SOFTWARE for the connection."""
        self.metrics.requests[request.method] += 1
        method = request.method
        if method == "PING":
            return render_pong()
        if method == "SKIP":
            return b""
        if method == "TELL":
            if not self.config.daemon.allow_tell:
                return render_error(
                    EX_UNAVAILABLE, "Service Unavailable: TELL commands are not enabled, set the --allow-tell switch."
                )
            return await self._tell(request)
        if method not in _SCANNING:  # the protocol layer only lets known verbs through
            return render_error(EX_SOFTWARE, f"Internal error: unhandled method {method}")
        return await self._scan(request, self.prefs.get(request.user))

    async def _tell(self, request: SpamdRequest) -> bytes:
        """Learn or forget through Bayes (spamc -L). "remote" (Razor/Pyzor reporting) is not
        offered, so it never appears in DidSet/DidRemove and spamc -C says it was not done.

        The store is written by the worker's Bayes writer, beside the loop (`Engine.tell`); the
        answer waits for the commit, the loop's other connections do not."""
        if self.engine.bayes is None or not self.config.bayes.enabled:
            return render_error(EX_UNAVAILABLE, "Service Unavailable: Bayes is disabled (bayes.enabled)")
        if len(request.body) > self.config.rules.max_scan_size:
            return render_error(EX_DATAERR, "Data error: message larger than rules.max_scan_size, not learnt")
        msg = parse_message(
            original_message(request.body),
            uri_parser=self.engine.uri_parser,
            body_scan_size=self.config.rules.body_scan_size,
        )
        learn_as = request.message_class if "local" in request.set_targets else None
        did_set: list[str] = []
        did_remove: list[str] = []
        try:
            forgotten, learnt = await self.engine.tell(
                msg,
                forget="local" in request.remove_targets,
                learn_as=learn_as == "spam" if learn_as in ("spam", "ham") else None,
            )
            if forgotten is LearnResult.FORGOTTEN:
                did_remove.append("local")
            if learnt in (LearnResult.LEARNED, LearnResult.MOVED):
                did_set.append("local")
        except Exception:
            self.metrics.errors["learn_failed"] += 1
            log.exception("TELL failed (user=%s)", request.user or "-")
            return render_error(EX_SOFTWARE, "Internal error: learning failed, see the daemon log")
        self.metrics.requests["learn"] += 1
        log.info(
            "tell user=%s class=%s set=%s remove=%s did_set=%s did_remove=%s msgid=%s",
            request.user or "-",
            request.message_class or "-",
            ",".join(sorted(request.set_targets)) or "-",
            ",".join(sorted(request.remove_targets)) or "-",
            ",".join(did_set) or "-",
            ",".join(did_remove) or "-",
            msg.get("message-id").strip()[:200] or "-",
        )
        return render_tell(did_set, did_remove)

    async def _scan(self, request: SpamdRequest, prefs: UserPrefs) -> bytes:
        required = prefs.required_score if prefs.required_score is not None else self.config.scoring.required_score
        body = request.body
        if len(body) > self.config.rules.max_scan_size:
            # Like spamd behind spamc's size limit: too big to scan, handed back as it came, less
            # the Authentication-Results fields that claim our authserv-id (as for a scanned one).
            self.metrics.errors["too_big"] += 1
            log.info("user=%s size=%d not scanned: larger than rules.max_scan_size", request.user or "-", len(body))
            returned = b""
            if request.method in ("PROCESS", "HEADERS"):
                returned = message_without_claims(body, self._authserv_id)
            return render_response(request, is_spam=False, score=0.0, threshold=required, body=returned)
        started = time.perf_counter()
        ctx = _connection_context(request.headers, user=request.user or "", prefs=prefs)
        try:
            async with self.scans:
                result = await self.engine.scan(body, ctx, required_score=required)
        except Exception:
            self.metrics.errors["scan_failed"] += 1
            log.exception("scan failed (user=%s size=%d)", request.user or "-", len(body))
            return render_error(EX_SOFTWARE, "Internal error: the scan failed, see the daemon log")
        elapsed = time.perf_counter() - started
        options = self._options
        if prefs.report_safe is not None:
            options = MarkupOptions(prefs.report_safe, options.rewrite_subject, options.hostname, options.contact)
        msgid = (result.message.get("message-id") or "-").strip()[:200]
        verdict = (
            f"msgid={msgid} user={request.user or '-'} score={result.score:.1f}/{required:.1f} "
            f"verdict={'spam' if result.is_spam else 'ham'}"
        )
        try:
            reply = render_response(
                request,
                is_spam=result.is_spam,
                score=result.score,
                threshold=required,
                body=self._body(request.method, result, options),
            )
        except Exception:
            # The verdict is in the log line; the message is counted as an error, not a verdict.
            self.metrics.errors["reply_failed"] += 1
            log.exception("%s: building the %s answer failed", verdict, request.method)
            return render_error(EX_SOFTWARE, "Internal error: building the answer failed, see the daemon log")
        names = [h.rule for h in result.hits]
        self.metrics.observe_scan("spam" if result.is_spam else "ham", elapsed, names, len(body))
        self.metrics.observe_async_checks(result.async_timings)
        log.info("%s hits=%s time=%.1fms size=%d", verdict, ",".join(names) or "-", elapsed * 1000, len(body))
        return reply

    def _body(self, method: str, result: Result, options: MarkupOptions) -> bytes:
        if method == "CHECK":
            return b""
        if method == "SYMBOLS":
            return ",".join(h.rule for h in result.hits).encode()
        if method in ("REPORT", "REPORT_IFSPAM"):
            return build_report(self.engine, result, options).encode("utf-8")
        return process_message(self.engine, _without_forged_results(result, self._authserv_id), options)


def _without_forged_results(result: Result, authserv_id: str) -> Result:
    """The result, its message's header block without the Authentication-Results fields that
    claim our authserv-id: the output may carry ours, which downstream trusts (RFC 8601 §5);
    and without X-Filterd-Skipped fields: the message was scanned, and whoever reads that name
    (rules, `filterd deliver`) takes it for ours. The scan has read them as they came (DKIM
    signatures may cover them). (X-Spam-* the parser has dropped already.)"""
    message = result.message
    block = _without_fields(without_claims(message.header_block, authserv_id), _SKIPPED)
    if block == message.header_block:
        return result
    return dataclasses.replace(result, message=dataclasses.replace(message, header_block=block))


def _without_fields(header_block: str, name: str) -> str:
    """``header_block`` (the parser's text, whole fields) without the fields called ``name``
    (lower case; `filterd.headerblock.without_fields`)."""
    if name not in header_block.lower():
        return header_block
    data = header_block.encode("utf-8", "surrogateescape")  # the parser's text: its bytes back
    return without_fields(data, name.encode()).decode("utf-8", "surrogateescape")


def _connection_context(headers: Mapping[str, str], *, user: str, prefs: UserPrefs) -> ScanContext:
    """What the client says about the SMTP connection, in rspamd's request header names.

    spamd has no such headers; an MTA glue script that knows the client (IP, Hostname, Helo,
    From = envelope sender, Rcpt) may send them, and the network checks then use them instead
    of guessing the sending relay from Received headers. A malformed IP is ignored.
    """
    folded = {name.lower(): value.strip() for name, value in headers.items()}
    ip = folded.get("ip", "")
    try:
        ip = str(ipaddress.ip_address(ip)) if ip else ""
    except ValueError:
        ip = ""
    mail_from = folded.get("from")
    rcpt = folded.get("rcpt", "")
    return ScanContext(
        client_ip=ip,
        client_name=folded.get("hostname", "") if ip else "",
        helo=folded.get("helo", ""),
        mail_from=mail_from.strip("<>") if mail_from is not None else None,
        rcpts=(rcpt.strip("<>"),) if rcpt else (),
        user=user,
        prefs=prefs,
    )
