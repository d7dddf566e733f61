"""The auth check: SPF, DKIM (with ARC) and DMARC for one message, as one network check.

SPF (for the MAIL FROM and the HELO identities), the DKIM key lookups and the DMARC policy
lookup start together; DMARC's verdict, which needs the other two, is computed once they are
in. A scan therefore waits about as long as the slowest lookup chain, not the sum of them.

Who is checked: the SPF client is the last external relay of the trust path (the connection
the caller saw, else the first Received hop from outside ``internal_networks``), with its
HELO. The envelope sender is the caller's MAIL FROM, else the Return-Path header. A message
with no external relay (all internal or authenticated) gets DKIM only: SPF and DMARC judge
mail from outside. Every lookup has the DNS time limit and ends before the scan deadline;
what did not finish counts as a temporary error.

Rules (rules/46_auth.yaml):

- exactly one ``SPF_<RESULT>`` and one ``SPF_HELO_<RESULT>`` for PASS, FAIL, SOFTFAIL,
  NEUTRAL, NONE, TEMPERROR, PERMERROR. For the null sender the MAIL FROM check is the HELO
  check (RFC 7208 §2.4), so both fire with the same result.
- ``DKIM_SIGNED`` (any signature), ``DKIM_VALID`` (one verifies), ``DKIM_VALID_AU`` (one from
  the author's From domain), ``DKIM_VALID_EF`` (one from the envelope sender's domain),
  ``DKIM_INVALID`` (signed, none valid, at least one failed for good: key lookups that merely
  timed out do not count against the sender). An unsigned message fires none of them.
- ``ARC_PASS`` / ``ARC_FAIL`` when the message carries an ARC chain.
- ``DMARC_PASS``; on failure the disposition: ``DMARC_REJECT``, ``DMARC_QUARANTINE`` or
  ``DMARC_NONE`` (p=none, a sampled-out quarantine, or no single author domain to check);
  ``DMARC_MISSING`` when the author domain publishes no policy.

Facts for later stages and the caller (`Scan.facts`): spf, spf_domain, spf_helo, dkim,
dkim_domains (valid signing domains, comma-separated), arc, dmarc, dmarc_domain, dmarc_policy
(the published policy that applies) and dmarc_disposition (what to do with this message:
none, quarantine or reject — what a milter acts on).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parseaddr
from typing import Any, ClassVar, TypeVar

from filterd.engine.checks.auth.authserv import effective_authserv_id
from filterd.engine.checks.auth.dkim import DkimResult, Signed, read_signatures, verify_signed
from filterd.engine.checks.auth.dmarc import DmarcResult, PolicyLookup, evaluate, lookup_policy
from filterd.engine.checks.auth.results import authentication_results
from filterd.engine.checks.auth.spf import RESULTS, SpfResult, check_spf
from filterd.engine.message import ParsedMessage
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.trust import trust_path_of
from filterd.net.dns import DnsAnswer

__all__ = ["AuthCheck", "author_domain", "envelope_sender"]

T = TypeVar("T")

THREADS = 16  # SPF evaluations (mostly waiting on DNS) and big-message DKIM at once, per worker
MARGIN = 0.05  # seconds: finish this long before the scan deadline, so partial results still count
_DMARC_RULES = {"reject": "DMARC_REJECT", "quarantine": "DMARC_QUARANTINE", "none": "DMARC_NONE"}


def envelope_sender(scan: Scan) -> str | None:
    """The envelope sender: the caller's MAIL FROM, else Return-Path; "" null, None unknown."""
    if scan.ctx.mail_from is not None:
        return scan.ctx.mail_from.strip().strip("<>")
    values = scan.message.get_all("return-path")
    if not values:
        return None
    return parseaddr(values[0])[1]


def author_domain(msg: ParsedMessage) -> tuple[str, str]:
    """(domain, "") for a message with exactly one From address, else ("", the reason)."""
    if msg.count("from") != 1:
        return "", f"{msg.count('from')} From fields"
    addresses = [a for _, a in msg.addresses("from") if a]
    if len(addresses) != 1:
        return "", f"{len(addresses)} From addresses"
    local, at, domain = addresses[0].rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or "." not in domain:
        return "", f"no domain in From address {addresses[0][:60]!r}"
    return domain, ""


class AuthCheck:
    """SPF, DKIM, ARC and DMARC; adds an Authentication-Results header when configured."""

    name: ClassVar[str] = "auth"
    stage: ClassVar[Stage] = Stage.BODY  # DKIM needs the body; DMARC needs DKIM
    autolearn_side: ClassVar[AutolearnSide] = "header"  # who sent it, though DKIM needs the body to tell
    emits: ClassVar[frozenset[str]] = frozenset(
        {f"SPF_{r.upper()}" for r in RESULTS}
        | {f"SPF_HELO_{r.upper()}" for r in RESULTS}
        | {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU", "DKIM_VALID_EF", "DKIM_INVALID"}
        | {"ARC_PASS", "ARC_FAIL"}
        | {"DMARC_PASS", "DMARC_REJECT", "DMARC_QUARANTINE", "DMARC_NONE", "DMARC_MISSING"}
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._cfg = setup.config.auth
        self._network = setup.config.network
        self._resolver = setup.resolver
        self._org_domain = setup.uri_parser.registered_domain
        self._authserv_id = effective_authserv_id(self._cfg)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0

    def _threads(self) -> ThreadPoolExecutor:
        """The worker threads, made on first use in this process (a forked worker makes its own)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="filterd-auth")
            self._executor_pid = os.getpid()
        return self._executor

    async def run(self, scan: Scan) -> Sequence[Hit]:
        cfg = self._cfg
        resolver = self._resolver
        if resolver is None or scan.ctx.local_only or not (cfg.spf or cfg.dkim or cfg.arc or cfg.dmarc):
            return ()
        resolver.bind_loop()
        msg = scan.message
        deadline = (scan.deadline or time.monotonic() + 30.0) - MARGIN
        relay = trust_path_of(scan, self._network).last_external
        sender = envelope_sender(scan)
        author, author_problem = author_domain(msg)
        cancelled = threading.Event()

        spf_jobs: dict[str, asyncio.Task[SpfResult]] = {}
        if cfg.spf and relay is not None:
            if sender is not None:
                spf_jobs["mailfrom"] = self._spawn(self._spf(relay.ip, sender, relay.helo, deadline, cancelled))
            if relay.helo and sender != "":  # for the null sender the MAIL FROM check is this one
                spf_jobs["helo"] = self._spawn(self._spf(relay.ip, "", relay.helo, deadline, cancelled))
        dkim_job = None
        signed: Signed | None = None
        if cfg.dkim or cfg.arc:
            signed = read_signatures(msg.raw, max_signatures=cfg.max_signatures if cfg.dkim else 0, arc=cfg.arc)
            dkim_job = self._spawn(verify_signed(signed, resolver, deadline=deadline, executor=self._threads()))
        policy_job = None
        if cfg.dmarc and relay is not None and author:
            limit = max(0.01, min(resolver.config.timeout, deadline - time.monotonic()))
            policy_job = self._spawn(lookup_policy(author, self._org_domain(author), resolver, limit=limit))

        jobs: list[asyncio.Task[Any]] = [*spf_jobs.values(), *(j for j in (dkim_job, policy_job) if j)]
        try:
            if jobs:
                await asyncio.wait(jobs, timeout=max(0.0, deadline - time.monotonic()))
        finally:
            cancelled.set()  # SPF threads stop at their next lookup
            for job in jobs:
                job.cancel()

        hits: list[Hit] = []
        spf_results: dict[str, SpfResult] = {}
        for identity, job in spf_jobs.items():
            spf_results[identity] = _done(job) or SpfResult(
                "helo" if identity == "helo" or sender == "" else "mailfrom", "temperror",
                sender or "", relay.helo if relay else "", relay.ip if relay else "", "out of time",
            )  # fmt: skip
        if "mailfrom" in spf_results and sender == "":
            spf_results["helo"] = spf_results["mailfrom"]
        for identity, result in spf_results.items():
            prefix = "SPF_HELO_" if identity == "helo" else "SPF_"
            hits.append(Hit(prefix + result.result.upper(), f"{result.result} for {result.sender} from {result.ip}"))
        mailfrom = spf_results.get("mailfrom")  # DMARC's SPF identity (the HELO one for the null sender)
        if mailfrom is not None:
            scan.facts["spf"] = mailfrom.result
            scan.facts["spf_domain"] = mailfrom.domain
        if "helo" in spf_results:
            scan.facts["spf_helo"] = spf_results["helo"].result

        dkim: DkimResult | None = None
        if dkim_job is not None and signed is not None:
            dkim = _done(dkim_job) or signed.unfinished()
            hits += self._dkim_hits(dkim, author, sender)
            scan.facts["dkim"] = dkim.summary
            scan.facts["dkim_domains"] = ",".join(dkim.valid_domains)
            if cfg.arc:
                scan.facts["arc"] = dkim.arc

        dmarc: DmarcResult | None = None
        if cfg.dmarc and relay is not None:
            if not author:
                dmarc = DmarcResult("permerror", detail=author_problem)
            else:
                policy = _done(policy_job) if policy_job else None
                dmarc = evaluate(
                    author,
                    policy or PolicyLookup("temperror", detail="out of time"),
                    org_of=self._org_domain,
                    spf_result=mailfrom.result if mailfrom else "none",
                    spf_domain=mailfrom.domain if mailfrom else "",
                    dkim_pass=dkim.valid_domains if dkim else [],
                    dkim_temperror=[s.domain for s in dkim.signatures if s.result == "temperror"] if dkim else [],
                    message_id=msg.get("message-id"),
                )
            hits += _dmarc_hits(dmarc)
            scan.facts["dmarc"] = dmarc.result
            if dmarc.domain:
                scan.facts["dmarc_domain"] = dmarc.domain
            if dmarc.policy:
                scan.facts["dmarc_policy"] = dmarc.policy
            scan.facts["dmarc_disposition"] = dmarc.disposition

        if cfg.add_header and (spf_results or dkim is not None or dmarc is not None):
            spf_shown = mailfrom or spf_results.get("helo")  # the HELO result when the sender is unknown
            shown = [spf_shown] if spf_shown is not None else []
            value = authentication_results(
                self._authserv_id, spf=shown, dkim=dkim, dmarc=dmarc, signatures=cfg.dkim, arc=cfg.arc
            )
            scan.add_headers.append(("Authentication-Results", value))
        return hits

    @staticmethod
    def _spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return asyncio.get_running_loop().create_task(coro)

    async def _spf(self, ip: str, sender: str, helo: str, deadline: float, cancelled: threading.Event) -> SpfResult:
        resolver = self._resolver
        assert resolver is not None

        def lookup(name: str, rdtype: str, limit: float) -> DnsAnswer:
            return resolver.query_from_thread(name, rdtype, limit=limit)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads(),
            lambda: check_spf(
                ip, sender, helo, lookup=lookup, deadline=deadline, timeout=resolver.config.timeout,
                receiver=self._authserv_id, cancelled=cancelled,
            ),
        )  # fmt: skip

    def _dkim_hits(self, dkim: DkimResult, author: str, sender: str | None) -> list[Hit]:
        hits: list[Hit] = []
        if dkim.arc == "pass":
            hits.append(Hit("ARC_PASS"))
        elif dkim.arc == "fail":
            hits.append(Hit("ARC_FAIL", dkim.arc_reason))
        if not dkim.signatures:
            return hits
        hits.append(Hit("DKIM_SIGNED", ", ".join(f"d={s.domain} {s.result}" for s in dkim.signatures)))
        valid = dkim.valid_domains
        if valid:
            hits.append(Hit("DKIM_VALID", f"d={','.join(valid)}"))
            if author in valid:
                hits.append(Hit("DKIM_VALID_AU", f"d={author}"))
            envelope_domain = (sender or "").rpartition("@")[2].lower()
            if envelope_domain and envelope_domain in valid:
                hits.append(Hit("DKIM_VALID_EF", f"d={envelope_domain}"))
        elif any(s.result in ("fail", "permerror") for s in dkim.signatures):
            bad = next(s for s in dkim.signatures if s.result in ("fail", "permerror"))
            hits.append(Hit("DKIM_INVALID", f"d={bad.domain} {bad.result}: {bad.reason}"[:200]))
        return hits


def _dmarc_hits(dmarc: DmarcResult) -> list[Hit]:
    if dmarc.result == "pass":
        return [Hit("DMARC_PASS", f"{dmarc.domain}: {dmarc.detail}")]
    if dmarc.result == "fail":
        return [Hit(_DMARC_RULES[dmarc.disposition], f"{dmarc.domain} p={dmarc.policy}: {dmarc.detail}")]
    if dmarc.result == "none":
        return [Hit("DMARC_MISSING", dmarc.detail)]
    if dmarc.result == "permerror":
        return [Hit("DMARC_NONE", dmarc.detail)]
    return []  # temperror: nothing is known


def _done(task: asyncio.Task[T] | None) -> T | None:
    """A finished task's result; None when it did not finish. Errors propagate (CHECK_ERROR_AUTH)."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.result()
