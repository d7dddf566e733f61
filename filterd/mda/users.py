"""What can name a local user's mailbox: one rule for `filterd deliver --user` and for the
MTA's check of local recipients (`filterd.mta.localusers`)."""

from __future__ import annotations

__all__ = ["is_user_name"]


def is_user_name(user: str) -> bool:
    """Whether ``user`` can name a mailbox: printable, no path separator, not hidden, and not
    taken for an option by the delivery command that gets it as an argument."""
    return bool(user) and not user.startswith((".", "-")) and "/" not in user and user.isprintable()
