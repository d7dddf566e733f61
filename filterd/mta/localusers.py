"""Which local recipients exist: one answer for the SMTP server (refuse at RCPT) and for local
delivery (bounce), so that mail for a user who does not exist is refused while the client is
still connected instead of being accepted and then bounced to a sender who is usually forged
(backscatter) — Postfix's local_recipient_maps does the same by default.

A local part names ``user`` (lower-cased, ``user+extension`` with ``mta.recipient_delimiter``).
The user exists when ``mta.mailboxes`` names it, or when the mailbox template does not depend on
a home directory (every name is a mailbox then), or when the system knows the user (a home
directory from the password database).
"""

from __future__ import annotations

import pwd
from collections.abc import Callable

from filterd.config import MtaConfig
from filterd.mda.users import is_user_name

__all__ = ["home_directory", "local_user", "unknown_user_reason"]


def home_directory(user: str) -> str | None:
    """The user's home directory from the password database, or None for no such user."""
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


def local_user(config: MtaConfig, local_part: str) -> tuple[str, str]:
    """(user, extension) of a local part: lower-cased, split at the recipient delimiter."""
    local = local_part.lower()
    if config.recipient_delimiter:
        user, _, extension = local.partition(config.recipient_delimiter)
        return user, extension
    return local, ""


def unknown_user_reason(
    config: MtaConfig, local_part: str, home_of: Callable[[str], str | None] = home_directory
) -> str | None:
    """Why mail for ``local_part`` cannot be delivered here (no such user), or None."""
    user, _ = local_user(config, local_part)
    if not is_user_name(user):
        return f"unknown user: {user!r}"
    template = config.mailboxes.get(user, config.mailbox)
    if "{home}" in template and home_of(user) is None:
        return f"unknown user: {user!r}"
    return None
