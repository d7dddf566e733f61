"""Postfix policy delegation (``check_policy_service``): greylisting, as postgrey does it.

One `PolicyServerConnection` per Postfix connection; Postfix keeps it open and sends one request
per SMTP step it was told to ask about. Only RCPT requests from smtpd are judged:

* greylisted (first sight, or a retry before ``greylist.delay``): ``DEFER_IF_PERMIT 4.7.1 ...``
  (``milter.policy_defer: defer_if_permit``, postgrey's answer: a later restriction that
  rejects outright still wins), or ``greylist.message`` as an SMTP reply (``reply``: ``451
  4.7.1 ...``);
* the first pass after a delay: ``PREPEND X-Greylist: delayed N seconds by filterd at HOST;
  DATE``, once per message (Postfix's ``instance``);
* everything else, and every other kind of request: ``DUNNO`` (no opinion).

Exempt: SASL-authenticated clients (``sasl_username``), trusted and exempt networks (in
`Greylist`), senders on the global or the recipient's welcome list. When the state store fails
the recipient passes (DUNNO), logged: greylisting is not worth refusing mail over.

When the worker stops, a connection between requests is closed: Postfix reconnects by itself
(to a live worker) at its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging

from filterd.config import Config
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.milter_service import recipient_prefs, sender_welcomelisted
from filterd.engine.prefs import UserPrefsStore
from filterd.errors import RemoteProtocolError
from filterd.greylist import Greylist
from filterd.net.hostname import fqdn
from filterd.protocols.policy import ConnectionClosed, NeedData, PolicyReply, PolicyRequest, PolicyServerConnection
from filterd.streams import drain

__all__ = ["PolicyService"]

log = logging.getLogger("filterd.daemon")


class PolicyService:
    """Answers Postfix policy requests for one worker."""

    def __init__(
        self, config: Config, metrics: WorkerMetrics, *, greylist: Greylist | None, prefs: UserPrefsStore
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.greylist = greylist if greylist is not None and greylist.config.enabled else None
        self.prefs = prefs
        self.hostname = config.scoring.report_hostname or fqdn()  # as in the X-Spam-* headers

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, stopping: asyncio.Event
    ) -> None:
        """Answer requests until Postfix closes, goes quiet for too long, or the worker stops."""
        conn = PolicyServerConnection()
        last_prepended = ""  # the instance (message) that already got its X-Greylist header
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, NeedData):
                    read = asyncio.ensure_future(reader.read(65536))
                    done, _ = await asyncio.wait(
                        {read, stop}, timeout=self.config.milter.idle_timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    if read not in done:  # idle too long, or the worker is stopping
                        read.cancel()
                        with contextlib.suppress(asyncio.CancelledError, OSError):
                            await read
                        return
                    conn.receive_data(read.result())
                    continue
                if isinstance(event, ConnectionClosed):
                    return
                reply, verdict = await self.decide(event, last_prepended)
                if verdict == "delayed":
                    last_prepended = event.instance or ""
                self.metrics.verdicts[f"policy:{verdict}"] += 1
                writer.write(conn.send(reply))
                await drain(writer, self.config.daemon.read_timeout)
        except RemoteProtocolError as exc:  # closing without an answer makes Postfix retry
            self.metrics.errors["policy_protocol"] += 1
            log.warning("policy protocol error from %s: %s", peer, exc)
        finally:
            stop.cancel()

    async def decide(self, request: PolicyRequest, last_prepended: str = "") -> tuple[PolicyReply, str]:
        """The reply to one request, and the verdict name counted in the metrics."""
        greylist = self.greylist
        if request.request != "smtpd_access_policy" or request.protocol_state != "RCPT" or greylist is None:
            return PolicyReply.dunno(), "dunno"
        client = request.client_address or ""
        sender = request.sender or ""
        recipient = request.recipient or ""
        _, prefs = recipient_prefs(self.config, self.prefs, recipient)
        try:
            decision = await greylist.decide(
                client,
                sender,
                recipient,
                authenticated=bool(request.sasl_username),
                welcomelisted=sender_welcomelisted(self.config, prefs, sender),
            )
        except Exception as exc:  # the store is down: let the mail through
            self.metrics.errors["greylist_failed"] += 1
            log.warning("policy: greylisting failed, recipient passes: %s: %s", type(exc).__name__, exc)
            return PolicyReply.dunno(), "error"
        if decision.deferred:
            log.info("policy greylisted client=%s from=<%s> rcpt=<%s>: %s", client, sender, recipient, decision.reason)
            code, status, text = decision.reply.split(" ", 2)
            if self.config.milter.policy_defer == "defer_if_permit":
                return PolicyReply.defer_if_permit(f"{status} {text}"), "greylisted"
            return PolicyReply.smtp(int(code), text, status), "greylisted"
        if decision.delayed and (not request.instance or request.instance != last_prepended):
            date = email.utils.formatdate(localtime=True)
            value = f"delayed {decision.delayed:.0f} seconds by filterd at {self.hostname}; {date}"
            return PolicyReply.prepend("X-Greylist", value), "delayed"
        return PolicyReply.dunno(), "exempt" if decision.action == "exempt" else "passed"
