"""The engine: loads rules and checks once, then scores messages, whole or in stages.

    engine = Engine.load(config)
    result = await engine.scan(raw_bytes, ScanContext(client_ip="192.0.2.7"))

or, for a milter or an MTA that learns things step by step:

    scan = engine.new_scan(ctx)
    await engine.run_stage(scan, Stage.CONNECT)     # e.g. reject at connect on a blocklist hit
    await engine.run_stage(scan, Stage.ENVELOPE)
    engine.set_message(scan, header_bytes); await engine.run_stage(scan, Stage.HEADERS)
    result = await engine.finish(scan, whole_message)

Order at the end: network (async) checks are launched first, local checks and regex rules run
while they are in flight, then the async results are collected within the scan deadline, then
meta rules, then POST checks (which see the score so far). Steps and local checks are timed in
`Result.timings`, each async check's wall time in `Result.async_timings` (they overlap).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from filterd.config import Config, default_config
from filterd.engine.bayes import BayesCheck, LearnResult, autolearn_decision
from filterd.engine.bayes.autolearn import autolearn_shares
from filterd.engine.bayes.base import Hashed, StoreInterrupted
from filterd.engine.checks import builtin_checks
from filterd.engine.message import ParsedMessage, parse_message
from filterd.engine.plugin import Check, CheckSetup, Hit, Scan, ScanContext, Stage
from filterd.engine.rules import load_rule_files
from filterd.engine.ruleset import CompiledRules, RuleInfo, compile_rules, header_text
from filterd.engine.uris import UriParser
from filterd.net.dns import Resolver

__all__ = ["Engine", "Result", "shipped_rules_dir"]

log = logging.getLogger(__name__)

_AUTOLEARN_BATCH = 8  # messages: autolearn writes once this many wait...
_AUTOLEARN_WAIT = 2.0  # seconds: ... or once this long has passed since it last wrote


def shipped_rules_dir() -> Path:
    """The rule set that comes with filterd: the checkout's rules/, or the installed copy."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "rules", here / "data" / "rules"):
        if candidate.is_dir():
            return candidate
    import sys

    return Path(sys.prefix) / "share" / "filterd" / "rules"


@dataclass(frozen=True, slots=True)
class Result:
    """The verdict on one message."""

    score: float
    required_score: float
    is_spam: bool
    hits: tuple[Hit, ...]  # scored rules that fired (no __sub-rules), sorted by name
    subrules: tuple[str, ...]
    message: ParsedMessage
    # Seconds per step, run one after another: parse, rules, meta, each synchronous check. They
    # add up to (nearly) the engine's own time.
    timings: dict[str, float]
    # Wall seconds of each asynchronous (network) check, from its start to its answer, its failure
    # or the scan deadline (then with a CHECK_ERROR_<NAME> hit). Kept apart from `timings`: these
    # run concurrently, with each other and with the steps above while they wait on their peers,
    # so they overlap and do not add up; a scan waits about as long as the slowest of them.
    async_timings: dict[str, float]
    scan_time: float  # seconds
    problems: tuple[str, ...]
    autolearn: str = "no"
    extra_headers: tuple[tuple[str, str], ...] = ()  # e.g. Authentication-Results, for the output
    facts: tuple[tuple[str, str], ...] = ()  # what checks concluded, e.g. ("av", "Eicar-Signature")

    @property
    def rule_names(self) -> list[str]:
        return [h.rule for h in self.hits]


class Engine:
    """Everything loaded once; `scan` is safe to call concurrently from one event loop."""

    def __init__(
        self,
        config: Config,
        rules: CompiledRules,
        checks: Sequence[Check],
        uri_parser: UriParser,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver  # for metrics: per-zone health
        self.rules = rules
        self.checks = list(checks)
        self.uri_parser = uri_parser
        self._is_async = {c.name: inspect.iscoroutinefunction(c.run) for c in checks}
        sides = {c.name: getattr(c, "autolearn_side", "") for c in checks}  # "": a plugin that says nothing
        self.autolearn_shares = autolearn_shares(
            rules.info, {rule: sides.get(check, "") for rule, check in rules.eval_rules.items()}, rules.meta_deps
        )
        self._pending_learn: list[Hashed] = []  # (digest, token hashes, is_spam)
        # Batches handed to the writer: (future, size, set once a failure of it has been counted,
        # which its done-callback does after the future is done).
        self._learning: list[tuple[Future[Counter[LearnResult]], int, threading.Event]] = []
        self._last_learn = time.monotonic()
        self._counts_lock = threading.Lock()  # the writer's thread counts failures too
        self.autolearn_failed = 0  # messages autolearn decided to learn, whose write failed
        self.autolearn_skipped = 0  # messages not learnt: a whole batch was still being written

    @classmethod
    def load(
        cls,
        config: Config | None = None,
        *,
        checks: Iterable[type] | None = None,
        extra_checks: Iterable[type] = (),
        state_dir: str = "",
    ) -> Engine:
        """Read and compile the rule set and set up every check. Raises RuleError.

        ``checks`` replaces the shipped check plugins (tests use it to load a rule set alone).
        """
        config = config or default_config()
        uri_parser = UriParser()
        resolver = Resolver(config.dns) if config.network.enabled else None
        setup = CheckSetup(config=config, uri_parser=uri_parser, state_dir=state_dir, resolver=resolver)
        classes = builtin_checks() if checks is None else list(checks)
        instances: list[Check] = [cls_(setup) for cls_ in (*classes, *extra_checks)]
        dirs = [Path(d) for d in config.rules.dirs] or [shipped_rules_dir()]
        dirs += [Path(d) for d in config.rules.extra_dirs]
        files = load_rule_files(dirs)
        compiled = compile_rules(
            files,
            emitted={c.name: c.emits for c in instances},
            score_overrides=dict(config.scoring.score_overrides),
            rule_timeout=config.rules.rule_timeout,
        )
        return cls(config, compiled, instances, uri_parser, resolver)

    # -- staged interface -------------------------------------------------------------------

    def new_scan(self, ctx: ScanContext | None = None) -> Scan:
        scan = Scan(ctx=ctx or ScanContext(), uri_parser=self.uri_parser, rules=self.rules.info)
        scan.deadline = time.monotonic() + self.config.rules.scan_deadline
        return scan

    def set_message(self, scan: Scan, raw: bytes) -> None:
        """Hand over the message (the header block alone is enough for the HEADERS stage)."""
        scan.msg = parse_message(raw, uri_parser=self.uri_parser, body_scan_size=self.config.rules.body_scan_size)

    async def run_stage(self, scan: Scan, stage: Stage) -> list[Hit]:
        """Run the checks of one stage (once); returns the hits they added."""
        if stage in scan.stages_done:
            return []
        scan.stages_done.add(stage)
        before = set(scan.hits)
        checks = [c for c in self.checks if c.stage == stage]
        await self._run_checks(scan, checks)
        return [scan.hits[n] for n in scan.hits if n not in before]

    async def _run_checks(
        self, scan: Scan, checks: Sequence[Check], meanwhile: Callable[[], None] | None = None
    ) -> None:
        """Launch the async checks, run ``meanwhile`` and the local checks, then collect."""
        pending: dict[asyncio.Task[Sequence[Hit]], str] = {}
        began: dict[str, float] = {}  # when each async check started running
        launched = time.perf_counter()
        for check in checks:
            if self._is_async[check.name]:
                pending[asyncio.ensure_future(self._timed(scan, check, began))] = check.name
        if pending:
            await asyncio.sleep(0)  # let them send their first queries before the CPU-bound part
        if meanwhile is not None:
            meanwhile()
        for check in checks:
            if not self._is_async[check.name]:
                started = time.perf_counter()
                try:
                    hits = check.run(scan)
                    for hit in hits:  # type: ignore[union-attr]
                        scan.add(hit)
                except Exception as exc:
                    self._check_failed(scan, check.name, exc)
                scan.timings[check.name] = time.perf_counter() - started
        if not pending:
            return
        remaining = max(0.0, scan.deadline - time.monotonic())
        done, not_done = await asyncio.wait(pending, timeout=remaining)
        stopped = time.perf_counter()
        for task in not_done:
            task.cancel()
            name = pending[task]
            # Recorded here: the cancellation reaches the check only after this scan has moved on.
            scan.async_timings[name] = stopped - began.get(name, launched)
            scan.problems.append(f"check {name} ran past the scan deadline")
            scan.add(Hit(f"CHECK_ERROR_{name.upper()}", "deadline", 0.0))
        for task in done:
            name = pending[task]
            error = task.exception()
            if error is not None:
                self._check_failed(scan, name, error)
                continue
            for hit in task.result():
                scan.add(hit)

    @staticmethod
    async def _timed(scan: Scan, check: Check, began: dict[str, float]) -> Sequence[Hit]:
        """Run an async check and record its wall time in ``scan.async_timings`` when it answers
        or raises; `_run_checks` records one it stops at the deadline."""
        t0 = began[check.name] = time.perf_counter()
        try:
            hits = await cast("Awaitable[Sequence[Hit]]", check.run(scan))  # quoted: no alias built per call
        except Exception:  # not CancelledError (a BaseException): the deadline's is timed there
            scan.async_timings[check.name] = time.perf_counter() - t0
            raise
        scan.async_timings[check.name] = time.perf_counter() - t0
        return hits

    def _check_failed(self, scan: Scan, name: str, exc: BaseException) -> None:
        log.warning(
            "check %s failed (qid=%s): %s: %s",
            name,
            scan.ctx.queue_id or "-",
            type(exc).__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        scan.problems.append(f"check {name} failed: {type(exc).__name__}: {exc}")
        scan.add(Hit(f"CHECK_ERROR_{name.upper()}", f"{type(exc).__name__}: {exc}"[:200], 0.0))

    async def finish(self, scan: Scan, raw: bytes | None = None, *, required_score: float | None = None) -> Result:
        """Score the whole message: remaining stages, regex rules, metas, POST checks."""
        started = time.perf_counter()
        if raw is not None:
            t0 = time.perf_counter()
            self.set_message(scan, raw)
            scan.timings["parse"] = time.perf_counter() - t0
        msg = scan.message
        for stage in (Stage.CONNECT, Stage.ENVELOPE, Stage.HEADERS):
            if stage not in scan.stages_done:
                scan.stages_done.add(stage)
                await self._run_checks(scan, [c for c in self.checks if c.stage == stage])
        scan.stages_done.add(Stage.BODY)
        body_checks = [c for c in self.checks if c.stage == Stage.BODY]

        def regex_rules() -> None:
            t0 = time.perf_counter()
            self._run_regex_rules(scan, msg)
            scan.timings["rules"] = time.perf_counter() - t0

        # Network checks (DNS, clamd) wait on peers while the regex rules use the CPU.
        await self._run_checks(scan, body_checks, meanwhile=regex_rules)
        values = {name: hit.value for name, hit in scan.hits.items()}
        t0 = time.perf_counter()
        for name in self.rules.metas(values):
            if name not in scan.hits:
                scan.hits[name] = Hit(name, value=values[name])
        scan.timings["meta"] = time.perf_counter() - t0
        scan.score_so_far = self._sum(scan)
        scan.stages_done.add(Stage.POST)
        post = [c for c in self.checks if c.stage == Stage.POST]
        if post:
            await self._run_checks(scan, post)
        self._autolearn(scan)
        return self._result(scan, required_score, time.perf_counter() - started)

    async def scan(self, raw: bytes, ctx: ScanContext | None = None, *, required_score: float | None = None) -> Result:
        """Score a whole message in one call."""
        scan = self.new_scan(ctx)
        return await self.finish(scan, raw, required_score=required_score)

    def scan_sync(self, raw: bytes, ctx: ScanContext | None = None, *, required_score: float | None = None) -> Result:
        """`scan` for callers without an event loop (CLI, scripts)."""
        return asyncio.run(self.scan(raw, ctx, required_score=required_score))

    # -- internals ----------------------------------------------------------------------------

    def _run_regex_rules(self, scan: Scan, msg: ParsedMessage) -> None:
        rules = self.rules
        timeouts: list[str] = []
        fired: set[str] = set()
        ctx = scan.ctx
        for spec, matcher in rules.header_matchers.items():
            text = header_text(msg, ctx, spec)
            unset_names = None
            if text is None:
                unset_names = [p.name for p in matcher.patterns]
                # Each rule decides alone what an absent header means (if_unset or "").
                for name in unset_names:
                    hr = rules.header_rules[name]
                    unset_value = hr.if_unset if hr.if_unset is not None else ""
                    pattern = next(p for p in matcher.patterns if p.name == name)
                    matched = pattern.rx.search(unset_value) is not None
                    if matched != hr.negate:
                        fired.add(name)
                continue
            matched_names = matcher.match(text, timeouts)
            for p in matcher.patterns:
                if (p.name in matched_names) != rules.header_rules[p.name].negate:
                    fired.add(p.name)
        for hr in rules.exists_rules:
            present = header_text(msg, ctx, hr.spec) is not None
            if present == hr.exists:
                fired.add(hr.name)
        texts = {"body": msg.body_text, "nbody": msg.normalized_body, "rawbody": msg.rawbody_text}
        for target, matcher in rules.text_matchers.items():
            text = msg.raw.decode("utf-8", "replace") if target == "full" else texts[target]
            fired |= matcher.match(text, timeouts)
        if rules.uri_matcher is not None:
            for uri in msg.uris:
                fired |= rules.uri_matcher.match(uri.url, timeouts)
        for name in timeouts:
            scan.add(
                Hit("RULE_TIMEOUT", f"rule {name} stopped after {self.config.rules.rule_timeout * 1000:.0f} ms", 0.0)
            )
        body_no_subject = None
        for name in fired:
            value = 1.0
            if name in rules.nosubject:
                if body_no_subject is None:
                    body_no_subject = msg.body_text.partition("\n")[2] if msg.subject else msg.body_text
                if rules.nosubject[name].search(body_no_subject) is None:
                    continue
            if name in rules.multiple:
                rx, maxhits, rtype = rules.multiple[name]
                counted = {"body": msg.body_text, "nbody": msg.normalized_body, "rawbody": msg.rawbody_text}.get(rtype)
                if counted is not None:
                    try:
                        count = sum(1 for _ in rx.finditer(counted, timeout=self.config.rules.rule_timeout))
                    except TimeoutError:
                        count = 1
                    value = float(min(count, maxhits) if maxhits else count) or 1.0
            scan.add(Hit(name, value=value))

    def _score_of(self, hit: Hit, bayes_active: bool) -> float:
        if hit.score is not None:
            return hit.score
        info = self.rules.info.get(hit.rule)
        return info.score_for(bayes_active) if info is not None else 0.0

    @staticmethod
    def _bayes_active(rules: Iterable[str]) -> bool:
        """Bayes gave an opinion (exactly one BAYES_xx fires then): use the scores fitted with it."""
        return any(name.startswith("BAYES_") for name in rules)

    def score(self, hits: Iterable[Hit]) -> float:
        """The points of these hits as a scan adds them up: sub-rules score nothing, and the score
        set with Bayes applies when a BAYES_xx rule is among them."""
        hits = list(hits)
        active = self._bayes_active(h.rule for h in hits)
        return sum(self._score_of(h, active) for h in hits if not h.rule.startswith("__"))

    def _sum(self, scan: Scan) -> float:
        return self.score(scan.hits.values())

    def _result(self, scan: Scan, required: float | None, elapsed: float) -> Result:
        required_score = self.config.scoring.required_score if required is None else required
        score = round(self._sum(scan), 3)
        active = self._bayes_active(scan.hits)
        shown = tuple(
            Hit(h.rule, h.detail, self._score_of(h, active), h.value)
            for n, h in sorted(scan.hits.items())
            if not n.startswith("__")
        )
        subs = tuple(sorted(n for n in scan.hits if n.startswith("__")))
        return Result(
            score=score,
            required_score=required_score,
            is_spam=score >= required_score,
            hits=shown,
            subrules=subs,
            message=scan.message,
            timings=dict(scan.timings),
            async_timings=dict(scan.async_timings),
            scan_time=elapsed,
            problems=tuple(scan.problems),
            autolearn=scan.autolearn,
            extra_headers=tuple(scan.add_headers),
            facts=tuple(scan.facts.items()),
        )

    @property
    def bayes(self) -> BayesCheck | None:
        """The Bayes check if it can learn (enabled, with a store: a state directory or Redis)."""
        check = self.check("bayes")
        return check if isinstance(check, BayesCheck) and check.active else None

    def _autolearn(self, scan: Scan) -> None:
        """Learn clear cases on the fly (SpamAssassin's autolearn), in small batches.

        The decision uses the score set without Bayes, so Bayes never trains on its own opinion.
        Learnt messages are handed to the Bayes writer (`BayesCheck.write`, a thread beside the
        loop) once 8 are waiting or 2 s have passed, one transaction each batch; the scan does
        not wait for it, and a failed write is logged and counted (`autolearn_failed`). No more
        than one batch is ever unwritten: while the writer still holds 8 messages (another
        process holds the store's lock), a further message is not learnt (autolearn=unavailable,
        SpamAssassin's word for a locked database; counted in `autolearn_skipped`). So a daemon
        killed meanwhile loses at most one batch, which only autolearn would have learnt.
        """
        cfg = self.config.bayes
        if not (cfg.enabled and cfg.autolearn) or scan.ctx.no_autolearn:
            scan.autolearn = "disabled"
            return
        check = self.bayes
        if check is None:
            scan.autolearn = "unavailable"
            return
        decision = autolearn_decision(scan.hits, self.rules.info, self.config, shares=self.autolearn_shares)
        if decision is None:
            scan.autolearn = "no"
            return
        self._learning = [entry for entry in self._learning if not entry[0].done()]
        if len(self._pending_learn) + sum(n for _, n, _ in self._learning) >= _AUTOLEARN_BATCH:
            scan.autolearn = "unavailable"
            with self._counts_lock:
                self.autolearn_skipped += 1
            return
        scan.autolearn = "spam" if decision else "ham"
        self._pending_learn.append(check.hashed(scan.message, decision))  # tokens of this scan, not again later
        now = time.monotonic()
        if len(self._pending_learn) >= _AUTOLEARN_BATCH or now - self._last_learn >= _AUTOLEARN_WAIT:
            self._last_learn = now
            if not self._hand_over_learning(check):
                scan.autolearn = "failed"

    def _hand_over_learning(self, check: BayesCheck) -> bool:
        """Hand what autolearn has queued to the writer as one batch; False if it has stopped."""
        batch, self._pending_learn = self._pending_learn, []
        if not batch:
            return True  # nothing to write: no writer thread is started for it
        try:
            future = check.write(lambda store: store.learn_hashed(batch))
        except StoreInterrupted as exc:
            self._autolearn_failed(len(batch), exc)
            return False
        accounted = threading.Event()
        self._learning.append((future, len(batch), accounted))

        def written(future: Future[Counter[LearnResult]]) -> None:  # in the writer's thread
            try:
                if future.cancelled() or (exc := future.exception()) is not None:
                    self._autolearn_failed(len(batch), "cancelled" if future.cancelled() else exc)
            finally:
                accounted.set()

        future.add_done_callback(written)
        return True

    def _autolearn_failed(self, n: int, why: object) -> None:
        # Learning is a side effect: it never fails a scan, it is logged and counted.
        log.warning("autolearn of %d messages failed: %s", n, why)
        with self._counts_lock:
            self.autolearn_failed += n

    def flush_learning(self, timeout: float | None = None) -> bool:
        """Hand what autolearn has queued to the Bayes writer and wait until all it was handed is
        written, ``timeout`` seconds at most; True if all of it was learnt. Blocking: for tools
        and tests (a worker awaits `stop_learning`)."""
        check = self.bayes
        ok = check is None or self._hand_over_learning(check)
        deadline = None if timeout is None else time.monotonic() + timeout
        for future, _, accounted in self._learning:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ok = future.exception(remaining) is None and ok
            except (TimeoutError, CancelledError):
                ok = False
            # A future is done before its callbacks run: wait for the one that counts a failure,
            # so that autolearn_failed is current when this returns.
            accounted.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._learning = [entry for entry in self._learning if not entry[0].done()]
        return ok

    async def tell(
        self, msg: ParsedMessage, *, forget: bool, learn_as: bool | None
    ) -> tuple[LearnResult | None, LearnResult | None]:
        """Learn through Bayes on request (spamd TELL): `BayesCheck.tell`, answered once written.
        What autolearn has queued is handed to the writer first, so that the writes keep the
        order they were decided in (a TELL overrides an earlier autolearn of the same message)."""
        check = self.bayes
        if check is None:
            raise RuntimeError("Bayes cannot learn here (disabled, or no store configured)")
        self._hand_over_learning(check)
        return await check.tell(msg, forget=forget, learn_as=learn_as)

    async def stop_learning(self, within: float) -> bool:
        """Hand what autolearn has queued to the Bayes writer and let it finish, ``within``
        seconds at most, after which nothing more is committed (a worker on its way out);
        True if everything handed to it was written or failed in time."""
        check = self.bayes
        if check is None:
            return True
        self._hand_over_learning(check)
        return await check.stop_writes(within)

    async def maintain_bayes(self) -> int | None:
        """Expire the Bayes store if `bayes.expiry_period` has passed since its last expiry (as
        SpamAssassin's bayes_auto_expire); the daemon's workers call this now and then. Returns
        the buckets dropped, or None when nothing ran. The expiry runs in a thread with its own
        store connection, so the loop goes on serving meanwhile; one at a time. Never raises
        (but CancelledError): upkeep must not stop a worker.

        Only a store that exists is opened: `BayesCheck.store` would create one, and a filter
        that has learnt nothing has nothing to expire.
        """
        check = self.check("bayes")
        if not self.config.bayes.enabled or not isinstance(check, BayesCheck):
            return None
        return await check.expire_if_due()

    def check(self, name: str) -> Check | None:
        """The loaded check plugin called ``name`` (e.g. "bayes"), if any."""
        return next((c for c in self.checks if c.name == name), None)

    def info(self, rule: str) -> RuleInfo | None:
        """What is known about a rule; the engine's own notices are described here."""
        found = self.rules.info.get(rule)
        if found is not None:
            return found
        if rule == "RULE_TIMEOUT":
            return RuleInfo(
                rule, "engine", "A rule ran past its time limit and was stopped", 0.0, frozenset(), "", "<engine>"
            )
        if rule.startswith("CHECK_ERROR_"):
            return RuleInfo(
                rule, "engine", f"The {rule[12:].lower()} check failed; see the log", 0.0, frozenset(), "", "<engine>"
            )
        return None
