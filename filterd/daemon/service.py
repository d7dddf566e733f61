"""From a spamd request to the bytes of the answer: user settings, the scan, markup, logging.

No sockets here: the worker's connection loop hands over a parsed `SpamdRequest` and writes
back what `SpamdService.handle` returns.
"""

from __future__ import annotations

import asyncio
import logging
import time

from filterd.config import Config
from filterd.daemon.metrics import WorkerMetrics
from filterd.engine.engine import Engine, Result
from filterd.engine.markup import MarkupOptions, build_report, process_message
from filterd.engine.plugin import ScanContext
from filterd.engine.prefs import BadUserName, UserPrefs, UserPrefsStore
from filterd.protocols.spamd import (
    EX_NOUSER,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    SpamdRequest,
    render_error,
    render_pong,
    render_response,
)

__all__ = ["SpamdService"]

log = logging.getLogger("filterd.daemon")
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

    async def handle(self, request: SpamdRequest) -> bytes:
        method = request.method
        self.metrics.requests[method] += 1
        if method == "PING":
            return render_pong()
        if method == "SKIP":
            return b""
        if method == "TELL":
            if not self.config.daemon.allow_tell:
                return render_error(
                    EX_UNAVAILABLE, "Service Unavailable: TELL commands are not enabled, set the --allow-tell switch."
                )
            return render_error(
                EX_UNAVAILABLE, "Service Unavailable: learning needs the Bayes store, which this filterd lacks yet"
            )
        if method not in _SCANNING:  # the protocol layer only lets known verbs through
            return render_error(EX_SOFTWARE, f"Internal error: unhandled method {method}")
        try:
            prefs = self.prefs.get(request.user)
        except BadUserName as exc:
            self.metrics.errors["bad_user"] += 1
            log.warning("refused request: %s", exc)
            return render_error(EX_NOUSER, f"No such user: {exc}")
        return await self._scan(request, prefs)

    async def _scan(self, request: SpamdRequest, prefs: UserPrefs) -> bytes:
        required = prefs.required_score if prefs.required_score is not None else self.config.scoring.required_score
        body = request.body
        if len(body) > self.config.rules.max_scan_size:
            # Like spamd behind spamc's size limit: too big to scan, handed back untouched.
            self.metrics.errors["too_big"] += 1
            log.info("user=%s size=%d not scanned: larger than rules.max_scan_size", request.user or "-", len(body))
            return render_response(
                request,
                is_spam=False,
                score=0.0,
                threshold=required,
                body=body if request.method in ("PROCESS", "HEADERS") else b"",
            )
        started = time.perf_counter()
        ctx = ScanContext(user=request.user or "", prefs=prefs)
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
        reply_body = self._body(request.method, result, options)
        names = [h.rule for h in result.hits]
        self.metrics.observe_scan("spam" if result.is_spam else "ham", elapsed, names, len(body))
        log.info(
            "msgid=%s user=%s score=%.1f/%.1f verdict=%s hits=%s time=%.1fms size=%d",
            (result.message.get("message-id") or "-").strip()[:200],
            request.user or "-",
            result.score,
            required,
            "spam" if result.is_spam else "ham",
            ",".join(names) or "-",
            elapsed * 1000,
            len(body),
        )
        return render_response(request, is_spam=result.is_spam, score=result.score, threshold=required, body=reply_body)

    def _body(self, method: str, result: Result, options: MarkupOptions) -> bytes:
        if method == "CHECK":
            return b""
        if method == "SYMBOLS":
            return ",".join(h.rule for h in result.hits).encode()
        if method in ("REPORT", "REPORT_IFSPAM"):
            return build_report(self.engine, result, options).encode("utf-8")
        return process_message(self.engine, result, options)
