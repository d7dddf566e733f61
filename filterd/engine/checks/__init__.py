"""The check plugins that ship with filterd; one module per check family."""

from __future__ import annotations

__all__ = ["builtin_checks"]


def builtin_checks() -> list[type]:
    """Classes of every shipped check, in a stable order."""
    return []
