"""Every exception filterd raises on purpose, in one tree.

    FilterdError
    ├── ConfigError            bad configuration; carries every problem found, each with file:line
    ├── RuleError              a rule set that does not compile (lint lists them all)
    ├── ProtocolError
    │   ├── LocalProtocolError     we misbehaved
    │   └── RemoteProtocolError    the peer did
    ├── CheckError             a check plugin failed (recorded as a zero-score hit)
    ├── QueueError             the MTA spool is unusable
    ├── StateError             the state store (SQLite file or Redis) failed or is unreachable
    └── DeliveryError
        ├── TemporaryDeliveryError  try again later (4xx, EX_TEMPFAIL)
        └── PermanentDeliveryError  give up and bounce (5xx)

Inner code raises these; the edge (CLI, daemon listener, SMTP server) translates them once
into an exit code, a spamd status, a milter action or an SMTP reply.
"""

from __future__ import annotations

__all__ = [
    "CheckError",
    "ConfigError",
    "DeliveryError",
    "FilterdError",
    "LocalProtocolError",
    "PermanentDeliveryError",
    "Problem",
    "ProtocolError",
    "QueueError",
    "RemoteProtocolError",
    "RuleError",
    "StateError",
    "TemporaryDeliveryError",
]

from dataclasses import dataclass


class FilterdError(Exception):
    """Base of every error filterd raises deliberately."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a file: where it is and what is wrong."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class _ProblemsError(FilterdError):
    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("<config>", None, "", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(_ProblemsError):
    """The configuration is invalid; ``problems`` lists every issue found."""


class RuleError(_ProblemsError):
    """The rule set is invalid; ``problems`` lists every issue found."""


class ProtocolError(FilterdError):
    """A protocol conversation went wrong; ``reply`` suggests what to send back."""

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class CheckError(FilterdError):
    """A check plugin failed."""


class QueueError(FilterdError):
    """The queue is unusable (permissions, disk, corruption that blocks progress)."""


class StateError(FilterdError):
    """The state store (greylisting, reputation) failed: unreachable, locked too long, corrupt."""


class DeliveryError(FilterdError):
    """A delivery attempt failed; ``status`` is the RFC 3463 enhanced status code if known ("5.1.2")."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class TemporaryDeliveryError(DeliveryError):
    """The delivery may succeed later."""


class PermanentDeliveryError(DeliveryError):
    """The delivery will never succeed; bounce."""
