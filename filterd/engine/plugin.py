"""The check-plugin interface: one check family = one plugin that reads a Scan and returns hits.

A check never adds to a score, edits the message or calls another check; the runner merges
hits and `scoring` turns them into a verdict. Checks run at a stage (what the caller knows so
far: the connection, the envelope, the headers, the whole message, or the score itself), may be
async (network lookups), and are given a deadline. One that raises is logged and recorded as a
zero-score `CHECK_ERROR_<NAME>` hit; the scan goes on.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from filterd.config import Config
    from filterd.engine.message import ParsedMessage
    from filterd.engine.prefs import UserPrefs
    from filterd.engine.ruleset import RuleInfo
    from filterd.engine.trust import TrustPath
    from filterd.engine.uris import UriParser
    from filterd.net.dns import Resolver

__all__ = ["AutolearnSide", "Check", "CheckSetup", "Hit", "Scan", "ScanContext", "Stage"]

# Where a check's rules count towards autolearn's header and body minimums (SpamAssassin counts
# an eval rule by the kind of test it is): "" for neither (lists, reputation, Bayes itself).
AutolearnSide = Literal["header", "body", ""]


class Stage(enum.IntEnum):
    """When a check can run: what the caller must have handed over first."""

    CONNECT = 1  # client IP, rDNS, HELO
    ENVELOPE = 2  # MAIL FROM, RCPT TO
    HEADERS = 3  # the header block
    BODY = 4  # the whole message
    POST = 5  # after rules and metas: sees the score so far (reputation, autolearn)


@dataclass(frozen=True, slots=True)
class Hit:
    """A rule that fired. ``score`` None means: take the rule's configured score."""

    rule: str
    detail: str = ""
    score: float | None = None
    value: float = 1.0  # what meta rules see: 1, a hit count, or a check's number


@dataclass(frozen=True, slots=True)
class ScanContext:
    """What the caller knows about how the message arrived (milter, MTA, spamd headers)."""

    client_ip: str = ""
    client_name: str = ""  # verified reverse DNS of the client, "" if none / unknown
    helo: str = ""
    mail_from: str | None = None  # envelope sender; "" is the null sender, None unknown
    rcpts: tuple[str, ...] = ()
    user: str = ""
    queue_id: str = ""
    authenticated: bool = False
    local_only: bool = False  # skip network tests
    no_autolearn: bool = False  # do not learn from this scan (tests, evaluations)
    prefs: UserPrefs | None = None  # the user's own settings (welcome/block lists, ...)


@dataclass(slots=True)
class Scan:
    """Per-message state: the context, the message once known, the hits so far."""

    ctx: ScanContext
    uri_parser: UriParser
    msg: ParsedMessage | None = None
    hits: dict[str, Hit] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step, one after another
    # Wall seconds of each async check, start to answer, failure or deadline; they overlap (see Result)
    async_timings: dict[str, float] = field(default_factory=dict)
    stages_done: set[Stage] = field(default_factory=set)
    score_so_far: float = 0.0
    deadline: float = 0.0  # loop.time() / monotonic at which the scan must wrap up
    problems: list[str] = field(default_factory=list)  # rule timeouts, check errors (for logs)
    rules: Mapping[str, RuleInfo] = field(default_factory=dict)  # what every rule is (scores, tflags)
    # what autolearn did: "ham", "spam" (handed to the Bayes writer), "no", "disabled", "failed",
    # "unavailable" (no store, or a whole batch still being written)
    autolearn: str = "no"
    trust: TrustPath | None = None  # computed once by filterd.engine.trust.trust_path_of
    # Headers the output should carry, beyond X-Spam-* (e.g. Authentication-Results), in order.
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    # Facts checks share with later stages and with the caller (e.g. "spf" -> "pass", "av" -> name).
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def message(self) -> ParsedMessage:
        """The parsed message; only valid for HEADERS (headers only) and later stages."""
        if self.msg is None:
            raise RuntimeError("the message is not known at this stage")
        return self.msg

    def add(self, hit: Hit) -> None:
        """Record a hit; a rule that fires twice keeps its first detail and counts up."""
        old = self.hits.get(hit.rule)
        if old is None:
            self.hits[hit.rule] = hit
        else:
            self.hits[hit.rule] = Hit(old.rule, old.detail, old.score, old.value + hit.value)


@dataclass(frozen=True, slots=True)
class CheckSetup:
    """What a check gets when the engine loads: the configuration and shared helpers."""

    config: Config
    uri_parser: UriParser
    state_dir: str = ""
    resolver: Resolver | None = None  # shared DNS client; None when network checks are off


@runtime_checkable
class Check(Protocol):
    """One check family. ``run`` returns hits, or an awaitable of hits for network checks."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    emits: ClassVar[frozenset[str]]
    autolearn_side: ClassVar[AutolearnSide]  # a rule's tflags autolearn_header/_body override it

    def run(self, scan: Scan) -> Sequence[Hit] | Awaitable[Sequence[Hit]]: ...
