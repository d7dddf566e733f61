"""Every setting filterd has, declared once: type, default, bounds and a one-line doc.

A section is a frozen, slotted dataclass deriving from `Section` whose fields are made with
`setting()`; `Config` holds one field per section, made with `section()`. Adding a section is
writing its dataclass and adding one field to `Config`: the loader, the dump and
`describe_settings()` find it by introspection.

A setting's annotation is its type, one of: ``bool``, ``int``, ``float``, ``str``,
`Duration`, `Size`, ``Literal[...]``, ``tuple[str, ...]``, ``tuple[Network, ...]`` and
``FrozenMap[str, float]``. ``min``/``max`` bound numbers, durations (seconds) and sizes (bytes).

A section may override `Section.check` for rules that involve several of its settings.
To change a loaded config use ``dataclasses.replace`` (nested for a section:
``replace(cfg, scoring=replace(cfg.scoring, required_score=3.0))``); note it does not validate.
"""

from __future__ import annotations

__all__ = [
    "N_FEATURES_MAX",
    "N_FEATURES_MIN",
    "AntivirusConfig",
    "AuthConfig",
    "BayesConfig",
    "Config",
    "DaemonConfig",
    "DeliverConfig",
    "DnsConfig",
    "DnsblConfig",
    "DnsblZone",
    "FrozenMap",
    "GreylistConfig",
    "ListsConfig",
    "MilterConfig",
    "MtaConfig",
    "Network",
    "NetworkConfig",
    "ReputationConfig",
    "RulesConfig",
    "SchemaField",
    "ScoringConfig",
    "Section",
    "SettingInfo",
    "StateConfig",
    "clamd_address",
    "n_features_problem",
    "schema_fields",
    "section",
    "setting",
]

import dataclasses
import ipaddress
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Generic, Literal, TypeAlias, TypeVar, cast, get_type_hints

from filterd.config.units import Duration, Size, format_duration, parse_duration, parse_size

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
S = TypeVar("S", bound="Section")

Network: TypeAlias = IPv4Network | IPv6Network
"""An entry of a CIDR list setting; written ``192.0.2.0/24``, ``2001:db8::/32`` or one address."""

_META = "filterd.setting"


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """An immutable, hashable mapping (the type of mapping-valued settings)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data) if data is not None else {}

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """What `setting()` stores in a field's metadata."""

    doc: str
    min: float | None = None
    max: float | None = None


def setting(default: T, *, min: float | None = None, max: float | None = None, doc: str) -> T:
    """Declare a setting: its default, optional inclusive bounds, and a one-line doc."""
    if not doc:
        raise TypeError("every setting needs a doc line")
    return field(default=default, metadata={_META: SettingInfo(doc, min, max)})


def section(cls: type[S]) -> S:
    """Declare a section field of `Config` (or of another section)."""
    return field(default_factory=cls)


class Section:
    """Base of every section dataclass."""

    __slots__ = ()

    def check(self) -> Sequence[tuple[str, str]]:
        """Problems involving several settings, as (setting name, message); none by default."""
        return ()


@dataclass(frozen=True, slots=True)
class SchemaField:
    """One field of a section: a setting (``info`` set) or a nested section (``info`` None)."""

    name: str
    type: Any
    info: SettingInfo | None
    default: Any

    @property
    def is_section(self) -> bool:
        return self.info is None


def schema_fields(cls: type[Section]) -> tuple[SchemaField, ...]:
    """The fields of a section class with their resolved types, in declaration order."""
    hints = get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        info = f.metadata.get(_META)
        tp = hints[f.name]
        if info is None and not (isinstance(tp, type) and issubclass(tp, Section)):
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting() or section()")
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = cast(Callable[[], Any], f.default_factory)()
        result.append(SchemaField(f.name, tp, info, default))
    return tuple(result)


@dataclass(frozen=True, slots=True)
class ScoringConfig(Section):
    """How hits become a verdict and how spam is marked."""

    required_score: float = setting(5.0, min=-1000, max=1000, doc="Score at or above which a message is spam.")
    report_safe: int = setting(
        1, min=0, max=2,
        doc="0: add headers only; 1: attach the original as message/rfc822; 2: as text/plain.",
    )  # fmt: skip
    rewrite_subject: str = setting(
        "", doc="Prefix added to the Subject of spam, e.g. '[SPAM]'; empty = leave it alone."
    )
    report_hostname: str = setting("", doc="Host name shown in reports and headers; empty = this machine's FQDN.")
    report_contact: str = setting("the administrator of that system", doc="Who to contact, as shown in spam reports.")
    score_overrides: FrozenMap[str, float] = setting(
        FrozenMap[str, float](),
        doc="Rule name -> score, replacing the shipped score in both score sets. 0 takes the rule's points "
        "away; unlike SpamAssassin it still runs, feeds meta rules and is listed in reports (filterd's "
        "informational rules, such as DNSBL_BLOCKED, score 0).",
    )


@dataclass(frozen=True, slots=True)
class RulesConfig(Section):
    """Where rules come from and how much time and text they get."""

    dirs: tuple[str, ...] = setting(
        (), doc="Rule directories to load instead of the shipped set; empty = the shipped set."
    )
    extra_dirs: tuple[str, ...] = setting((), doc="Rule directories loaded after `dirs`, for local rules.")
    rule_timeout: Duration = setting(
        parse_duration("50ms"), min=parse_duration("1ms"), max=parse_duration("10s"),
        doc="Time limit per rule in the fallback regex engine.",
    )  # fmt: skip
    scan_deadline: Duration = setting(
        parse_duration("10s"), min=parse_duration("100ms"), max=parse_duration("600s"),
        doc="Time limit for scanning one message; later checks are skipped.",
    )  # fmt: skip
    body_scan_size: Size = setting(
        parse_size("200K"), min=parse_size("1K"), max=parse_size("64M"),
        doc="How much of the rendered text body the body rules see.",
    )  # fmt: skip
    max_scan_size: Size = setting(
        parse_size("10M"), min=parse_size("1K"), max=parse_size("1G"),
        doc="Messages larger than this are not scanned.",
    )  # fmt: skip

    def check(self) -> Sequence[tuple[str, str]]:
        if self.rule_timeout > self.scan_deadline:
            return [
                (
                    "rule_timeout",
                    f"expected a duration <= scan_deadline ({format_duration(self.scan_deadline)})"
                    f", got {format_duration(self.rule_timeout)!r}",
                )
            ]
        return ()


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class NetworkConfig(Section):
    """Which relays are ours, and whether checks that ask the network run at all."""

    enabled: bool = setting(True, doc="Run network checks (DNSBL, URIBL, SPF, DKIM, DMARC); false = local tests only.")
    trusted_networks: tuple[Network, ...] = setting(
        _LOOPBACK, doc="Relays whose Received headers are believed (ours and those we trust); loopback always is."
    )
    internal_networks: tuple[Network, ...] = setting(
        _LOOPBACK, doc="Relays that are part of our own mail system (a subset of the trusted ones)."
    )


@dataclass(frozen=True, slots=True)
class DnsConfig(Section):
    """How network checks ask DNS: servers, time limits, cache, and when to give up on a zone."""

    nameservers: tuple[str, ...] = setting(
        (), doc="Resolvers to ask: ADDR or ADDR:PORT ([v6]:PORT); empty = those in /etc/resolv.conf."
    )
    timeout: Duration = setting(
        parse_duration("2s"), min=parse_duration("10ms"), max=parse_duration("60s"),
        doc="How long one lookup may take (all nameservers and retries included).",
    )  # fmt: skip
    cache_entries: int = setting(
        50_000, min=0, max=10_000_000, doc="Answers cached per worker (TTL honoured); 0 = no cache."
    )
    min_ttl: Duration = setting(
        parse_duration("0s"), min=0, max=parse_duration("1d"), doc="Cache answers at least this long."
    )
    max_ttl: Duration = setting(
        parse_duration("1d"), min=0, max=parse_duration("30d"), doc="Cache answers at most this long."
    )
    negative_ttl: Duration = setting(
        parse_duration("5m"), min=0, max=parse_duration("1d"),
        doc="Cache NXDOMAIN / no-answer this long when the zone's SOA does not say.",
    )  # fmt: skip
    breaker_failures: int = setting(
        5, min=1, max=10_000, doc="Consecutive timeouts or server failures of a zone before it is skipped."
    )
    breaker_cooldown: Duration = setting(
        parse_duration("1m"), min=parse_duration("1s"), max=parse_duration("1d"),
        doc="How long a tripped zone is skipped before one lookup tries it again.",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DnsblZone(Section):
    """One DNS blocklist (or allowlist): what is looked up in it and what its answers mean."""

    enabled: bool = setting(True, doc="Use this list (set false to turn off a shipped one).")
    zone: str = setting("", doc="The list's DNS zone, e.g. zen.spamhaus.org.")
    type: Literal["ip", "domain"] = setting("ip", doc="ip: relay addresses (reversed); domain: domain names.")
    relays: Literal["last_external", "first_untrusted", "all_untrusted"] = setting(
        "last_external",
        doc="ip lists: check the last external relay (the one that handed the message to our internal "
        "network, a trusted partner's relay included), the first untrusted relay (the one that handed it to "
        "the trusted ones: what an allowlist should vouch for, as SpamAssassin's -firsttrusted), or every "
        "untrusted one.",
    )
    sources: tuple[str, ...] = setting(
        ("uri",), doc="domain lists: which domains to check, any of uri, helo, sender, from."
    )
    answers: FrozenMap[str, str] = setting(FrozenMap(), doc="Answer address (127.0.0.x) -> rule name that fires.")
    last_octet: FrozenMap[str, str] = setting(
        FrozenMap(), doc="Value of the last octet (0..255) -> rule name (DNSWL style: 127.0.<category>.<trust>)."
    )
    bitmask: FrozenMap[str, str] = setting(
        FrozenMap(), doc="Bit value of the last octet (e.g. 2, 4, 8) -> rule name (URIBL/SURBL style)."
    )
    any_answer: str = setting("", doc="Rule that fires on any listing not mapped above; empty = none.")
    blocked_answers: tuple[str, ...] = setting(
        ("127.255.255.252", "127.255.255.254", "127.255.255.255", "127.0.1.255"),
        doc="Answers meaning the list refused this resolver: never a listing; the zone is reported unusable.",
    )
    blocked_rule: str = setting(
        "DNSBL_BLOCKED", doc="Rule (score 0 or near it) that a blocked answer fires instead of a listing rule."
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems = []
        if not self.zone:
            problems.append(("zone", "expected the list's DNS zone, e.g. zen.spamhaus.org"))
        if not (self.answers or self.last_octet or self.bitmask or self.any_answer):
            problems.append(("answers", "expected at least one of answers, last_octet, bitmask or any_answer"))
        if not self.blocked_rule:
            problems.append(("blocked_rule", "expected a rule name, e.g. DNSBL_BLOCKED"))
        for key, values in (("answers", tuple(self.answers)), ("blocked_answers", self.blocked_answers)):
            for value in values:
                try:
                    ipaddress.IPv4Address(value)
                except ValueError:
                    problems.append((key, f"expected IPv4 answer addresses such as 127.0.0.2, got {value!r}"))
        for octet in self.last_octet:
            if not (octet.isdigit() and 0 <= int(octet) < 256):
                problems.append(("last_octet", f"expected last-octet values 0..255, got {octet!r}"))
        for bit in self.bitmask:
            if not (bit.isdigit() and 0 < int(bit) < 256):
                problems.append(("bitmask", f"expected last-octet bit values 1..255 (2, 4, 8, ...), got {bit!r}"))
        return problems


def _shipped_zones() -> FrozenMap[str, DnsblZone]:
    """The public lists SpamAssassin also uses by default (block lists, and the DNSWL allowlist);
    their rules and scores are in rules/."""
    m = FrozenMap
    return m({
        "zen": DnsblZone(
            zone="zen.spamhaus.org", type="ip", relays="last_external",
            answers=m({
                "127.0.0.2": "RCVD_IN_SBL", "127.0.0.3": "RCVD_IN_SBL_CSS", "127.0.0.9": "RCVD_IN_SBL",
                "127.0.0.4": "RCVD_IN_XBL", "127.0.0.5": "RCVD_IN_XBL", "127.0.0.6": "RCVD_IN_XBL",
                "127.0.0.7": "RCVD_IN_XBL", "127.0.0.10": "RCVD_IN_PBL", "127.0.0.11": "RCVD_IN_PBL",
            }),
        ),
        # An allowlist: its rules are nice (negative scores). 127.0.0.255 means "over the free
        # query limit / public resolver", never a listing.
        "dnswl": DnsblZone(
            zone="list.dnswl.org", type="ip", relays="first_untrusted",
            last_octet=m({"0": "RCVD_IN_DNSWL_NONE", "1": "RCVD_IN_DNSWL_LOW", "2": "RCVD_IN_DNSWL_MED",
                          "3": "RCVD_IN_DNSWL_HI"}),
            blocked_answers=("127.0.0.255",), blocked_rule="RCVD_IN_DNSWL_BLOCKED",
        ),
        "dbl": DnsblZone(
            zone="dbl.spamhaus.org", type="domain", sources=("uri", "helo", "sender"),
            answers=m({
                "127.0.1.2": "URIBL_DBL_SPAM", "127.0.1.4": "URIBL_DBL_PHISH", "127.0.1.5": "URIBL_DBL_MALWARE",
                "127.0.1.6": "URIBL_DBL_BOTNETCC", "127.0.1.102": "URIBL_DBL_ABUSE_SPAM",
                "127.0.1.103": "URIBL_DBL_ABUSE_REDIR", "127.0.1.104": "URIBL_DBL_ABUSE_PHISH",
                "127.0.1.105": "URIBL_DBL_ABUSE_MALW", "127.0.1.106": "URIBL_DBL_ABUSE_BOTCC",
            }),
        ),
        "uribl": DnsblZone(
            zone="multi.uribl.com", type="domain", sources=("uri",),
            bitmask=m({"2": "URIBL_BLACK", "4": "URIBL_GREY", "8": "URIBL_RED"}),
            blocked_answers=("127.0.0.1",),
        ),
        "surbl": DnsblZone(
            zone="multi.surbl.org", type="domain", sources=("uri",),
            bitmask=m({"8": "URIBL_PH_SURBL", "16": "URIBL_MW_SURBL", "64": "URIBL_ABUSE_SURBL",
                       "128": "URIBL_CR_SURBL"}),
            blocked_answers=("127.0.0.1",),
        ),
    })  # fmt: skip


@dataclass(frozen=True, slots=True)
class DnsblConfig(Section):
    """IP and domain blocklists (and IP allowlists) looked up in DNS (rules say their scores, in rules/)."""

    enabled: bool = setting(True, doc="Look up relays and domains in the zones below.")
    zones: FrozenMap[str, DnsblZone] = setting(
        _shipped_zones(), doc="Blocklists by a short name; the shipped ones are in the default config."
    )
    max_domains: int = setting(
        20, min=0, max=1000, doc="Registered domains of a message looked up per domain list, most frequent first."
    )


@dataclass(frozen=True, slots=True)
class AuthConfig(Section):
    """Sender authentication: SPF, DKIM, ARC and DMARC, and the Authentication-Results header."""

    spf: bool = setting(True, doc="Check SPF for the envelope sender and the HELO name (pyspf).")
    dkim: bool = setting(True, doc="Verify every DKIM signature (dkimpy).")
    arc: bool = setting(True, doc="Verify the ARC chain when a message has one.")
    dmarc: bool = setting(True, doc="Look up the author domain's DMARC policy and check alignment.")
    authserv_id: str = setting("", doc="The name in Authentication-Results headers; empty = this host's name.")
    add_header: bool = setting(True, doc="Add an RFC 8601 Authentication-Results header to the message.")
    max_signatures: int = setting(5, min=0, max=100, doc="DKIM signatures verified per message at most.")
    dkim_keys: FrozenMap[str, str] = setting(
        FrozenMap(), doc="Signing keys for outgoing mail: domain -> 'selector:/path/to/key.pem'."
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems = []
        # Written into Authentication-Results as is: a host name, no spaces or ";".
        if self.authserv_id and not all(c.isalnum() or c in "-._" for c in self.authserv_id):
            problems.append(("authserv_id", f"expected a host name such as mx.example.org, got {self.authserv_id!r}"))
        for domain, spec in self.dkim_keys.items():
            selector, sep, path = spec.partition(":")
            if not (sep and selector and path.startswith("/")):
                problems.append(("dkim_keys", f"{domain}: expected 'selector:/absolute/path/key.pem', got {spec!r}"))
        return problems


def clamd_address(spec: str) -> str | tuple[str, int]:
    """`antivirus.clamd` as a socket address: a Unix socket path (has a slash) or (host, port).

    ``[::1]:3310`` for IPv6. Raises ValueError for anything else."""
    spec = spec.strip()
    if "/" in spec:
        if not spec.startswith("/"):
            raise ValueError(f"expected an absolute socket path or HOST:PORT, got {spec!r}")
        return spec
    host, sep, port = spec.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"expected a socket path or HOST:PORT, got {spec!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class AntivirusConfig(Section):
    """Virus scanning with clamd (rules AV_VIRUS and AV_ERROR; facts for the milter and MTA)."""

    enabled: bool = setting(False, doc="Scan messages with clamd.")
    clamd: str = setting("/run/clamav/clamd.ctl", doc="clamd's socket: a Unix socket path or HOST:PORT.")
    timeout: Duration = setting(
        parse_duration("10s"), min=parse_duration("100ms"), max=parse_duration("10m"),
        doc="How long clamd may take over one message, its attachments included (capped by the scan deadline).",
    )  # fmt: skip
    max_size: Size = setting(
        parse_size("25M"), min=parse_size("1K"), max=parse_size("1G"),
        doc="Largest message sent to clamd; a bigger one is not scanned and AV_ERROR fires. At most clamd's "
        "StreamMaxLength, at least the MTA's message size limit.",
    )  # fmt: skip
    scan_attachments: bool = setting(True, doc="Also scan each decoded attachment, not only the raw message.")
    action: Literal["reject", "quarantine", "tag"] = setting(
        "reject", doc="What a milter or MTA does with a virus: refuse it, quarantine it, or only tag it."
    )
    on_error: Literal["tempfail", "continue"] = setting(
        "tempfail", doc="clamd unreachable or failing: ask the sender to retry later, or go on (AV_ERROR fires)."
    )

    def check(self) -> Sequence[tuple[str, str]]:
        try:
            clamd_address(self.clamd)
        except ValueError as exc:
            return [("clamd", str(exc))]
        return ()


@dataclass(frozen=True, slots=True)
class DaemonConfig(Section):
    """The scoring daemon: where it listens, how many workers, its limits."""

    listen: tuple[str, ...] = setting(
        (), doc="Addresses to serve spamd on: HOST:PORT or a Unix socket path (--listen adds to these)."
    )
    workers: int = setting(0, min=0, max=256, doc="Worker processes; 0 = one per CPU core.")
    socket_mode: str = setting("0660", doc="Permissions of Unix sockets, in octal.")
    socket_owner: str = setting("", doc="Owner of Unix sockets (user name); empty = the daemon's user.")
    socket_group: str = setting("", doc="Group of Unix sockets; empty = the daemon's group.")
    allowed_ips: tuple[Network, ...] = setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        doc="TCP clients allowed to connect; others are refused and logged.",
    )
    max_request_size: Size = setting(
        parse_size("64M"), min=parse_size("1K"), max=parse_size("1G"),
        doc="Largest request accepted at all; bigger ones get an error (rules.max_scan_size decides what is scanned).",
    )  # fmt: skip
    read_timeout: Duration = setting(
        parse_duration("30s"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Time a client has to send its whole request, and to take each answer (past it the "
        "connection is dropped: a client that never reads cannot hold a slot).",
    )  # fmt: skip
    idle_timeout: Duration = setting(
        parse_duration("10s"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Time a client may stay silent while sending.",
    )  # fmt: skip
    max_connections: int = setting(
        256,
        min=1,
        max=100_000,
        doc="Open connections per worker and protocol (spamd, milter, policy); a worker at the limit accepts "
        "no more until one closes, so the next client goes to another worker or waits in the listen backlog, "
        "as with spamd.",
    )
    max_concurrent_scans: int = setting(
        64, min=1, max=10_000, doc="Scans in progress per worker; further requests wait their turn."
    )
    grace_period: Duration = setting(
        parse_duration("30s"), min=parse_duration("0s"), max=parse_duration("1h"),
        doc="On SIGTERM or reload, how long in-flight requests get to finish.",
    )  # fmt: skip
    pid_file: str = setting("", doc="Write the master's PID here; empty = no PID file.")
    user_prefs_dir: str = setting(
        "", doc="Directory of per-user settings, <user>.yaml, chosen by the spamd User header."
    )
    allow_tell: bool = setting(False, doc="Accept spamd TELL (learning) requests, like spamd --allow-tell.")
    metrics_listen: str = setting("", doc="HOST:PORT serving /metrics (Prometheus) and /healthz; empty = off.")


@dataclass(frozen=True, slots=True)
class ListsConfig(Section):
    """Welcome and block lists that apply to everyone (per-user ones live in user_prefs_dir)."""

    welcomelist_from: tuple[str, ...] = setting(
        (), doc="Sender address globs (*, ?) whose mail is welcome: USER_IN_WELCOMELIST."
    )
    blocklist_from: tuple[str, ...] = setting((), doc="Sender address globs whose mail is spam: USER_IN_BLOCKLIST.")
    welcomelist_auth: tuple[str, ...] = setting(
        (), doc="Sender address globs welcome only when SPF or DKIM authenticates the sender's domain."
    )
    welcomelist_ip: tuple[Network, ...] = setting(
        (), doc="Client networks whose mail is welcome: CLIENT_IN_WELCOMELIST (the connecting or last external relay)."
    )
    blocklist_ip: tuple[Network, ...] = setting(
        (), doc="Client networks whose mail is spam: CLIENT_IN_BLOCKLIST (a milter can refuse them at connect)."
    )


N_FEATURES_MIN, N_FEATURES_MAX = 1 << 12, 1 << 26


def n_features_problem(n: int) -> str | None:
    """Why ``n`` cannot be ``bayes.n_features`` (nor a Bayes backup's): a power of two in range."""
    if n & (n - 1) or not N_FEATURES_MIN <= n <= N_FEATURES_MAX:
        return f"expected a power of two from {N_FEATURES_MIN} to {N_FEATURES_MAX}, got {n}"
    return None


@dataclass(frozen=True, slots=True)
class BayesConfig(Section):
    """The Bayesian classifier: its store, when it may speak, and how it learns by itself."""

    enabled: bool = setting(True, doc="Score messages with the Bayes classifier (the BAYES_xx rules).")
    min_spam: int = setting(
        200, min=1, max=1_000_000, doc="Spam messages that must be learnt before BAYES_xx rules fire."
    )
    min_ham: int = setting(
        200, min=1, max=1_000_000, doc="Ham messages that must be learnt before BAYES_xx rules fire."
    )
    max_tokens: int = setting(
        1_000_000, min=10_000, max=50_000_000,
        doc="Token buckets kept in the store; expiry drops the least recently seen beyond this.",
    )  # fmt: skip
    expiry_period: Duration = setting(
        parse_duration("12h"), min=parse_duration("1m"), max=parse_duration("30d"),
        doc="Time between expiries of old tokens, which the daemon and `filterd learn` run by themselves.",
    )  # fmt: skip
    n_features: int = setting(
        1 << 22, min=N_FEATURES_MIN, max=N_FEATURES_MAX,
        doc="Hash buckets (a power of two); each process keeps two int32 arrays of them (32 MB at 2**22), "
        "a daemon worker that learns (TELL, autolearn) a second pair in its writer thread.",
    )  # fmt: skip
    combiner: Literal["robinson_fisher", "naive_bayes", "complement_nb"] = setting(
        "robinson_fisher",
        doc="How token counts become a probability; robinson_fisher measured best (scripts/bayes-experiment).",
    )
    views: Literal["pooled", "single"] = setting(
        "pooled",
        doc="pooled: score the text, links and headers tokens apart and pool the three (measured better, "
        "scripts/tune-bayes); single: one classifier over all tokens, as SpamAssassin.",
    )
    robinson_s: float = setting(
        0.03, min=0.0001, max=100.0, doc="Robinson's s: weight of the prior x against a token's own counts."
    )
    robinson_x: float = setting(
        0.538, min=0.01, max=0.99, doc="Robinson's x: the probability assumed for a token never seen."
    )
    min_prob_strength: float = setting(
        0.346, min=0.0, max=0.49, doc="Tokens whose probability is closer than this to 0.5 are ignored."
    )
    text_min_prob_strength: float = setting(
        0.25, min=0.0, max=0.49,
        doc="With views: pooled, min_prob_strength for the text view (words, Subject); the text keeps "
        "more of its weaker tokens than links and headers (measured best, scripts/tune-bayes).",
    )  # fmt: skip
    max_interesting: int = setting(
        150, min=0, max=100_000, doc="At most this many of the most extreme tokens are combined; 0 = all."
    )
    alpha: float = setting(
        0.1, min=1e-6, max=10.0, doc="Lidstone smoothing of the naive_bayes and complement_nb combiners."
    )
    autolearn: bool = setting(True, doc="Learn from messages whose score without Bayes is clear enough.")
    autolearn_ham_below: float = setting(0.1, min=-1000, max=1000, doc="Learn as ham below this many autolearn points.")
    autolearn_spam_at: float = setting(
        12.0, min=-1000, max=1000, doc="Learn as spam at or above this many autolearn points."
    )
    autolearn_min_header_points: float = setting(
        3.0, min=0, max=1000, doc="Autolearning spam needs at least this many points from header rules."
    )
    autolearn_min_body_points: float = setting(
        3.0, min=0, max=1000, doc="Autolearning spam needs at least this many points from body rules."
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems = []
        if (problem := n_features_problem(self.n_features)) is not None:
            problems.append(("n_features", problem))
        if self.autolearn_ham_below > self.autolearn_spam_at:
            problems.append(
                ("autolearn_ham_below", f"expected a value <= autolearn_spam_at ({self.autolearn_spam_at})")
            )
        return problems


@dataclass(frozen=True, slots=True)
class StateConfig(Section):
    """Where learnt state shared by the workers lives: greylist triplets, sender reputation, Bayes."""

    backend: Literal["sqlite", "redis"] = setting(
        "sqlite", doc="sqlite: one file in the state directory (one machine); redis: shared by several machines."
    )
    sqlite_path: str = setting("", doc="The SQLite file; empty = state.sqlite in the state directory.")
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", doc="The Redis server: redis://[:password@]host:port/db or unix:///path.sock."
    )
    redis_key_prefix: str = setting(
        "filterd:", doc="Prefix of every key filterd writes in Redis, so a server can be shared with others."
    )
    timeout: Duration = setting(
        parse_duration("2s"), min=parse_duration("10ms"), max=parse_duration("60s"),
        doc="How long one store operation may take (a Redis reply, a wait for SQLite's write lock), for greylisting, "
        "reputation and Bayes alike (`filterd learn` waits up to 120s).",
    )  # fmt: skip
    sweep_period: Duration = setting(
        parse_duration("10m"), min=parse_duration("1s"), max=parse_duration("1d"),
        doc="How often the SQLite store deletes expired entries (Redis expires them itself).",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class GreylistConfig(Section):
    """Greylisting at RCPT (milter and policy service): unknown (client, sender, recipient) triplets
    are told to retry later; real MTAs do, most spamware does not."""

    # Off by default: it delays the first mail of every new correspondent by at least `delay`.
    enabled: bool = setting(False, doc="Greylist at RCPT time (milter and Postfix policy service).")
    delay: Duration = setting(
        parse_duration("5m"), min=parse_duration("0s"), max=parse_duration("1d"),
        doc="How long a new triplet must wait before its retry is accepted.",
    )  # fmt: skip
    retry_window: Duration = setting(
        parse_duration("2d"), min=parse_duration("1m"), max=parse_duration("30d"),
        doc="How long after first sight a retry still counts; later, the triplet starts over (postgrey's 2 days).",
    )  # fmt: skip
    expiry: Duration = setting(
        parse_duration("35d"), min=parse_duration("1d"), max=parse_duration("1000d"),
        doc="A triplet (or auto-whitelisted client) not seen for this long is forgotten.",
    )  # fmt: skip
    ipv4_prefix: int = setting(24, min=8, max=32, doc="Client IPv4 addresses are grouped by this prefix length.")
    ipv6_prefix: int = setting(64, min=16, max=128, doc="Client IPv6 addresses are grouped by this prefix length.")
    auto_whitelist_after: int = setting(
        5, min=0, max=1_000_000,
        doc="A client network whose retries passed this many times is no longer greylisted; 0 = never.",
    )  # fmt: skip
    normalize_sender: bool = setting(
        True, doc="Fold per-message sender variants (+tags, BATV, SRS hashes, VERP numbers) into one triplet."
    )
    exempt_networks: tuple[Network, ...] = setting(
        (), doc="Clients never greylisted (network.trusted_networks never are either)."
    )
    message: str = setting(
        "451 4.7.1 Greylisted, please try again later",
        doc="The reply to a greylisted RCPT: 4xx code, 4.x.x status, text.",
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems = []
        code, _, rest = self.message.partition(" ")
        status, _, text = rest.partition(" ")
        status_parts = status.split(".")
        if not (
            len(code) == 3 and code.isdigit() and code[0] == "4" and text.strip() and len(status_parts) == 3
            and status_parts[0] == "4" and all(p.isdigit() for p in status_parts)
        ):  # fmt: skip
            problems.append(("message", f"expected '4xx 4.x.x text', got {self.message!r}"))
        elif not (self.message.isascii() and self.message.isprintable() and len(self.message) <= 510):
            # It goes out as an SMTP reply (milter, policy service): one line of ASCII, 512 bytes with CRLF.
            problems.append(("message", f"expected one line of printable ASCII (510 at most), got {self.message!r}"))
        if self.retry_window < self.delay:
            problems.append(("retry_window", f"expected a duration >= delay ({format_duration(self.delay)})"))
        return problems


@dataclass(frozen=True, slots=True)
class ReputationConfig(Section):
    """Sender reputation (SpamAssassin's AWL/TxRep idea): the mean score of earlier mail from the
    same address and network pulls a new message's score toward it (rule REPUTATION)."""

    # Off by default, as SpamAssassin ships AWL and TxRep: it softens a hacked correspondent's
    # spam and makes a message's score depend on what came before it.
    enabled: bool = setting(False, doc="Adjust scores by the sender's history and record each message's score.")
    factor: float = setting(
        0.5, min=0.0, max=1.0,
        doc="How far the score moves toward the sender's mean: 0 = not at all, 1 = all the way (AWL's 0.5).",
    )  # fmt: skip
    ipv4_prefix: int = setting(
        16, min=0, max=32, doc="Originating IPv4 addresses are grouped by this prefix (AWL's /16)."
    )
    ipv6_prefix: int = setting(48, min=0, max=128, doc="Originating IPv6 addresses are grouped by this prefix.")
    expiry: Duration = setting(
        parse_duration("180d"), min=parse_duration("1d"), max=parse_duration("10000d"),
        doc="A history not updated for this long is forgotten.",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class MilterConfig(Section):
    """The milter (Postfix smtpd_milters, Sendmail) and the Postfix policy service: where they
    listen and what a score, a virus or a failure does to the SMTP conversation."""

    listen: tuple[str, ...] = setting(
        (), doc="Addresses to serve the milter protocol on: HOST:PORT or a Unix socket path (--milter-listen)."
    )
    policy_listen: tuple[str, ...] = setting(
        (), doc="Addresses to serve Postfix policy delegation (greylisting) on (--policy-listen)."
    )
    reject_score: float = setting(
        15.0, min=-1000, max=1000,
        doc="Score at or above which the milter refuses a message (at least scoring.required_score).",
    )  # fmt: skip
    reject_message: str = setting(
        "Message scored {score:.1f}, rejected as spam",
        doc="Text of the 550 5.7.1 reply to a rejected message; {score} and {required} are filled in.",
    )
    spam_action: Literal["tag", "quarantine", "discard", "tempfail", "reject"] = setting(
        "tag", doc="What the milter does with spam scoring below reject_score; headers are added in every case."
    )
    reject_at_connect: bool = setting(
        False, doc="Refuse a connection whose CONNECT-stage hits alone reach reject_score (IP block lists)."
    )
    dmarc_reject: bool = setting(
        False, doc="Refuse (550 5.7.1) mail that fails DMARC when the domain's policy says p=reject."
    )
    on_error: Literal["tempfail", "accept"] = setting(
        "tempfail", doc="A scan that fails or runs out of time: ask the sender to retry (451 4.3.0), or accept."
    )
    max_size: Size = setting(
        parse_size("10M"), min=parse_size("1K"), max=parse_size("1G"),
        doc="Bytes of a message the milter collects; the rest is skipped (see oversize).",
    )  # fmt: skip
    oversize: Literal["scan", "accept"] = setting(
        "scan", doc="Past max_size: scan the part collected, or accept unscanned with an X-Filterd-Skipped header."
    )
    user: Literal["local_part", "address", "none"] = setting(
        "local_part", doc="Whose settings apply (daemon.user_prefs_dir): the first recipient's local part or address."
    )
    scan_timeout: Duration = setting(
        parse_duration("60s"), min=parse_duration("1s"), max=parse_duration("10m"),
        doc="Longest a scan may hold the MTA at end of message before on_error applies.",
    )  # fmt: skip
    idle_timeout: Duration = setting(
        parse_duration("10m"), min=parse_duration("1s"), max=parse_duration("1h"),
        doc="A milter or policy connection silent this long is closed (MTAs hold them for a whole SMTP session).",
    )  # fmt: skip
    policy_defer: Literal["defer_if_permit", "reply"] = setting(
        "defer_if_permit",
        doc="Policy service answer to a greylisted RCPT: DEFER_IF_PERMIT (postgrey's), or greylist.message as is.",
    )

    def check(self) -> Sequence[tuple[str, str]]:
        try:
            text = self.reject_message.format(score=15.0, required=5.0)
        except (KeyError, IndexError, ValueError) as exc:
            return [("reject_message", f"expected a template using only {{score}} and {{required}}: {exc}")]
        if not text.strip() or not text.isascii() or not text.isprintable():
            return [("reject_message", f"expected one line of printable ASCII, got {self.reject_message!r}")]
        return ()


_DELIVERY_FIELDS = frozenset({"user", "extension", "domain", "recipient", "sender", "home", "queue_id", "state_dir"})


def _template_problem(template: str, allowed: frozenset[str]) -> str:
    """Why ``template`` is not a valid ``str.format`` template over ``allowed`` names; "" if it is."""
    try:
        for _, name, spec, _ in string.Formatter().parse(template):
            if name is not None and (name not in allowed or spec):
                return f"unknown placeholder {{{name}}} (known: {', '.join(sorted(allowed))})"
    except ValueError as exc:
        return str(exc)
    return ""


@dataclass(frozen=True, slots=True)
class MtaConfig(Section):
    """The relay MTA (`filterd mta`): queue manager, retries and bounces, local and remote delivery."""

    min_backoff: Duration = setting(
        parse_duration("5m"), min=parse_duration("1s"), max=parse_duration("1d"),
        doc="Wait after a recipient's first failed attempt; doubles with each failure (Postfix minimal_backoff_time).",
    )  # fmt: skip
    max_backoff: Duration = setting(
        parse_duration("4000s"), min=parse_duration("1s"), max=parse_duration("7d"),
        doc="Longest wait between two attempts (Postfix maximal_backoff_time).",
    )  # fmt: skip
    max_lifetime: Duration = setting(
        parse_duration("5d"), min=parse_duration("0s"), max=parse_duration("100d"),
        doc="A recipient still failing this long after arrival is bounced (Postfix maximal_queue_lifetime).",
    )  # fmt: skip
    bounce_lifetime: Duration = setting(
        parse_duration("5d"), min=parse_duration("0s"), max=parse_duration("100d"),
        doc="The same for mail from the null sender (bounces), which is then dropped: a bounce is never bounced.",
    )  # fmt: skip
    delay_warning: Duration = setting(
        parse_duration("0s"), min=parse_duration("0s"), max=parse_duration("100d"),
        doc="Tell the sender once that a message is still undelivered after this long; 0 = never.",
    )  # fmt: skip
    max_concurrency: int = setting(
        100, min=1, max=10000, doc="Delivery attempts in progress at once, local and remote together."
    )
    per_destination_concurrency: int = setting(
        20, min=1, max=1000,
        doc="Attempts in progress at once per destination (a recipient domain, or all local delivery).",
    )  # fmt: skip
    destination_recipient_limit: int = setting(
        50, min=1, max=1000, doc="Recipients per outgoing SMTP transaction (Postfix smtp_destination_recipient_limit)."
    )
    max_hops: int = setting(
        50, min=1, max=1000, doc="A message with more Received headers than this is bounced as a mail loop."
    )
    local_delivery: Literal["auto", "maildir", "command"] = setting(
        "auto",
        doc="maildir: deliver in the MTA's process, into the recipient's mailbox (a Maildir) with the user's "
        "recipes and the deliver.* settings, as `filterd deliver` would but without starting a process per "
        "message, and as the MTA's own user (so the pipe and forward rules of a recipe file it does not own are "
        "skipped); command: run local_delivery_command per recipient, which drops to each "
        "user's privileges when started as root; auto: command when filterd mta runs as root or "
        "local_delivery_command is not the default, else maildir.",
    )
    local_delivery_command: tuple[str, ...] = setting(
        ("filterd", "deliver", "--user", "{user}", "--recipient", "{recipient}", "--maildir", "{mailbox}", "{filter}"),
        doc="Command (argv, no shell) delivering to a local recipient, message on stdin; placeholders "
        "{user} {extension} {domain} {recipient} {sender} {home} {mailbox} {queue_id} {state_dir}, and {filter}: "
        "--no-filter when the MTA's milter scored the message already, else --filter (filterd deliver's flags).",
    )
    local_delivery_timeout: Duration = setting(
        parse_duration("10m"), min=parse_duration("1s"), max=parse_duration("1d"),
        doc="A local delivery command running longer is killed and the recipient retried later.",
    )  # fmt: skip
    mailbox: str = setting(
        "{home}/Maildir/",
        doc="A local user's mailbox ({mailbox}); {home} is the user's home directory (unknown user: bounced).",
    )
    mailboxes: FrozenMap[str, str] = setting(
        FrozenMap[str, str](), doc="Local user -> mailbox path, taking precedence over `mailbox`."
    )
    recipient_delimiter: str = setting(
        "+", doc="Separates a local part's user from its extension (user+ext -> {user}, {extension}); empty = none."
    )
    smtp_port: int = setting(25, min=1, max=65535, doc="Port of the next hop's SMTP server when relaying.")
    smtp_bind_address: str = setting(
        "", doc="Source address of outgoing SMTP connections; empty = chosen by the system."
    )
    smtp_helo_name: str = setting("", doc="Name sent in EHLO when relaying; empty = this host's name.")
    smtp_starttls: bool = setting(
        True, doc="Use STARTTLS when the next hop offers it, without verifying its certificate (Postfix 'may')."
    )
    smtp_connect_timeout: Duration = setting(
        parse_duration("30s"), min=parse_duration("100ms"), max=parse_duration("10m"),
        doc="Time to connect to a next hop and read its greeting.",
    )  # fmt: skip
    smtp_timeout: Duration = setting(
        parse_duration("5m"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Time for each reply of a next hop (RFC 5321 4.5.3.2).",
    )  # fmt: skip
    smtp_data_timeout: Duration = setting(
        parse_duration("10m"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Time to send the message and read the reply to its final dot.",
    )  # fmt: skip
    # -- the SMTP server (filterd.mta.smtpd) --
    listen: tuple[str, ...] = setting(
        (), doc="HOST:PORT addresses the SMTP server listens on (--listen adds to these)."
    )
    tls_listen: tuple[str, ...] = setting(
        (), doc="HOST:PORT addresses speaking TLS from the first byte (submissions, port 465); needs tls_cert."
    )
    hostname: str = setting(
        "", doc="Our name in the greeting, EHLO reply and Received headers; empty = this host's FQDN."
    )
    local_domains: tuple[str, ...] = setting(
        ("localhost",),
        doc="Domains we take mail for from anyone (hostname always is one); others only from mynetworks or "
        "authenticated clients.",
    )
    mynetworks: tuple[Network, ...] = setting(
        _LOOPBACK, doc="Clients that may relay to any domain without authenticating (Postfix mynetworks)."
    )
    max_message_size: Size = setting(
        parse_size("10M"), min=parse_size("1K"), max=parse_size("1G"),
        doc="Largest message accepted (EHLO SIZE; larger ones get 552 5.3.4).",
    )  # fmt: skip
    max_recipients: int = setting(100, min=1, max=10000, doc="Recipients per message (more get 452 4.5.3).")
    max_connections: int = setting(
        200, min=1, max=100000, doc="SMTP connections served at once; more are answered 421 4.7.0 and closed."
    )
    smtpd_timeout: Duration = setting(
        parse_duration("5m"), min=parse_duration("1s"), max=parse_duration("1h"),
        doc="A client silent this long in the middle of a command or of DATA is dropped with 421 (RFC 5321 4.5.3.2).",
    )  # fmt: skip
    peername_lookup: bool = setting(
        True,
        doc="Look the client's name up in DNS before the greeting, as Postfix does (smtpd_peername_lookup): its "
        "PTR name, kept only if it resolves back (A/AAAA) to the client's address, else 'unknown'; for the log, "
        "the Received header and the milter's {client_name}, {client_ptr} and _. Every client, loopback and "
        "mynetworks included. Asks the dns.* servers; false = every client is 'unknown'.",
    )
    peername_timeout: Duration = setting(
        parse_duration("5s"), min=parse_duration("100ms"), max=parse_duration("60s"),
        doc="Time for the client name lookups together (PTR, then A/AAAA; each also within dns.timeout); "
        "past it the client is 'unknown' and the session goes on.",
    )  # fmt: skip
    dns_breaker_failures: int = setting(
        5, min=0, max=10_000,
        doc="DNS lookups in a row (client names, MX, addresses) that get no answer at all (timeouts; NXDOMAIN "
        "and SERVFAIL are answers) before the resolver is asked for the root zone's NS records (1 s at most); "
        "if that gets no answer either, the resolver counts as dead: for dns_breaker_cooldown only cached "
        "answers are used (other clients are 'unknown' at once, other remote deliveries deferred with 4.4.3), "
        "then one lookup tries it again. If it answers, the timeouts were slow or lame zones (spam bots' "
        "reverse DNS, dead domains) and lookups go on. 0 = always wait.",
    )  # fmt: skip
    dns_breaker_cooldown: Duration = setting(
        parse_duration("30s"), min=parse_duration("1s"), max=parse_duration("1h"),
        doc="How long a DNS resolver found dead is not waited for before one lookup tries it again.",
    )  # fmt: skip
    tls_cert: str = setting("", doc="PEM certificate chain for STARTTLS and tls_listen; empty = no TLS.")
    tls_key: str = setting("", doc="PEM private key of tls_cert.")
    auth_users_file: str = setting(
        "",
        doc="Users allowed to AUTH (PLAIN, LOGIN), one 'name:scrypt-hash' a line (filterd mta passwd); "
        "empty = no AUTH.",
    )
    require_tls_for_auth: bool = setting(
        True, doc="Offer AUTH only over TLS (STARTTLS or tls_listen), so passwords never cross in clear."
    )
    milter: str = setting(
        "", doc="The filter to ask before accepting a message, HOST:PORT or a Unix socket path (--filter)."
    )
    milter_connect_timeout: Duration = setting(
        parse_duration("10s"), min=parse_duration("100ms"), max=parse_duration("10m"),
        doc="Time to connect to the milter and negotiate.",
    )  # fmt: skip
    milter_timeout: Duration = setting(
        parse_duration("90s"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Time for each milter reply (longer than the daemon's milter.scan_timeout, so its on_error applies first).",
    )  # fmt: skip
    milter_default_action: Literal["tempfail", "accept"] = setting(
        "tempfail",
        doc="Milter down, timed out or confused: 451 4.7.1 the message, or accept it unfiltered "
        "(Postfix milter_default_action).",
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name in ("listen", "tls_listen"):
            for address in getattr(self, name):
                host, sep, port = address.rpartition(":")
                if not (sep and host and port.isdigit() and int(port) < 65536):  # port 0: any free one
                    problems.append((name, f"expected HOST:PORT, got {address!r}"))
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append(("tls_key", "tls_cert and tls_key go together"))
        if self.tls_listen and not self.tls_cert:
            problems.append(("tls_listen", "needs tls_cert and tls_key"))
        if self.milter:
            try:
                clamd_address(self.milter)
            except ValueError as exc:
                problems.append(("milter", str(exc)))
        if self.max_backoff < self.min_backoff:
            problems.append(
                ("max_backoff", f"expected a duration >= min_backoff ({format_duration(self.min_backoff)})")
            )
        if not self.local_delivery_command:
            problems.append(("local_delivery_command", "expected a command (a list of arguments)"))
        for arg in self.local_delivery_command:
            if problem := _template_problem(arg, _DELIVERY_FIELDS | {"mailbox", "filter"}):
                problems.append(("local_delivery_command", f"{arg!r}: {problem}"))
        for name, template in (("mailbox", self.mailbox), *(("mailboxes", v) for v in self.mailboxes.values())):
            if problem := _template_problem(template, _DELIVERY_FIELDS):
                problems.append((name, f"{template!r}: {problem}"))
        if self.smtp_bind_address:
            try:
                ipaddress.ip_address(self.smtp_bind_address)
            except ValueError:
                problems.append(("smtp_bind_address", f"expected an IP address, got {self.smtp_bind_address!r}"))
        return problems


@dataclass(frozen=True, slots=True)
class DeliverConfig(Section):
    """`filterd deliver`, the local delivery agent: the daemon it asks, and how it stores mail."""

    filter: bool = setting(True, doc="Ask the daemon about each message before the recipes run (--no-filter: not).")
    daemon: str = setting("127.0.0.1:783", doc="The spamd-protocol daemon: a Unix socket path or HOST:PORT (--daemon).")
    method: Literal["process", "headers"] = setting(
        "process", doc="process: store the message as the daemon rewrote it (spamc); headers: its new headers only."
    )
    timeout: Duration = setting(
        parse_duration("30s"), min=parse_duration("100ms"), max=parse_duration("1h"),
        doc="Longest wait for connecting to the daemon and for each read or write (spamc -t).",
    )  # fmt: skip
    max_size: Size = setting(
        parse_size("500K"), min=parse_size("1K"), max=parse_size("256M"),
        doc="Larger messages are not sent to the daemon (spamc -s and its default).",
    )  # fmt: skip
    on_daemon_error: Literal["deliver", "tempfail"] = setting(
        "deliver",
        doc="Daemon down, slow or answering badly: deliver unfiltered (spamc's safe fallback) or exit 75.",
    )
    mark_unfiltered: bool = setting(
        True, doc="Add an X-Filterd-Skipped header to a message the daemon did not see, saying why."
    )
    recipes: str = setting(
        "~/.filterd-recipes.yaml",
        doc="The user's recipe file when --recipes is not given; ~ is their home; missing = everything to INBOX.",
    )
    mbox_folders: str = setting(
        "~/mail", doc="mbox delivery: where relative folder names of recipes live (~ is the user's home)."
    )
    sendmail: tuple[str, ...] = setting(
        ("/usr/sbin/sendmail", "-i"),
        doc="Command of the forward action; '-f SENDER -- ADDRESS...' is appended (message on stdin).",
    )
    command_timeout: Duration = setting(
        parse_duration("10m"), min=parse_duration("1s"), max=parse_duration("1d"),
        doc="Longest a pipe or forward command of a recipe may run; then it is killed and delivery deferred.",
    )  # fmt: skip
    lock_timeout: Duration = setting(
        parse_duration("60s"), min=parse_duration("1s"), max=parse_duration("1h"),
        doc="Longest wait for an mbox lock before the delivery is deferred (exit 75).",
    )  # fmt: skip
    stale_lock: Duration = setting(
        parse_duration("500s"), min=parse_duration("10s"), max=parse_duration("1d"),
        doc="An mbox dot-lock file older than this is taken as left over by a crash and removed (Postfix's 500s).",
    )  # fmt: skip
    maildir_sizes: bool = setting(
        True, doc="Put ,S=<size>,W=<CRLF size> in Maildir file names, as Dovecot does, so readers need not stat."
    )
    system_users_only: bool = setting(
        False, doc="Refuse (exit 67) a --user with no passwd entry; false also serves virtual users."
    )
    drop_privileges: bool = setting(
        True, doc="Started as root for a user in passwd: deliver, read recipes and run commands as that user."
    )

    def check(self) -> Sequence[tuple[str, str]]:
        problems = []
        try:
            clamd_address(self.daemon)
        except ValueError as exc:
            problems.append(("daemon", str(exc)))
        if not self.sendmail:
            problems.append(("sendmail", "expected a command (a list of arguments)"))
        return problems


@dataclass(frozen=True, slots=True)
class Config(Section):
    """The whole configuration; immutable. A reload builds a new one."""

    state_dir: str = setting(
        "", doc="State directory; empty = the one given on the command line, else ./filterd-state."
    )
    scoring: ScoringConfig = section(ScoringConfig)
    rules: RulesConfig = section(RulesConfig)
    network: NetworkConfig = section(NetworkConfig)
    dns: DnsConfig = section(DnsConfig)
    dnsbl: DnsblConfig = section(DnsblConfig)
    auth: AuthConfig = section(AuthConfig)
    antivirus: AntivirusConfig = section(AntivirusConfig)
    daemon: DaemonConfig = section(DaemonConfig)
    lists: ListsConfig = section(ListsConfig)
    bayes: BayesConfig = section(BayesConfig)
    state: StateConfig = section(StateConfig)
    greylist: GreylistConfig = section(GreylistConfig)
    reputation: ReputationConfig = section(ReputationConfig)
    milter: MilterConfig = section(MilterConfig)
    mta: MtaConfig = section(MtaConfig)
    deliver: DeliverConfig = section(DeliverConfig)

    def check(self) -> Sequence[tuple[str, str]]:
        if self.milter.reject_score < self.scoring.required_score:
            return [
                (
                    "milter",
                    f"reject_score: expected a number >= scoring.required_score ({self.scoring.required_score}), "
                    f"got {self.milter.reject_score}",
                )
            ]
        return ()

    @property
    def state_path(self) -> Path:
        """`state_dir`, or ``filterd-state`` when it is empty."""
        return Path(self.state_dir or "filterd-state")
