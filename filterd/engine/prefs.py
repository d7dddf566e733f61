"""Per-user settings: what a user may change about how their mail is judged.

A directory holds one `<user>.yaml` per user (the spamd `User` header, or the recipient in the
milter). Each file is checked like the main configuration; a user without a file, or with a
broken one (logged), gets the global settings. A user name that could escape the directory
is refused before any file is touched.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from filterd.config import Network, Section, load_section_file, setting
from filterd.errors import ConfigError

__all__ = ["BadUserName", "UserPrefs", "UserPrefsStore", "check_user_name"]

log = logging.getLogger(__name__)

_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+=-]{0,127}$")


class BadUserName(ValueError):
    """A user name that is not a plain name (path separators, '..', control characters)."""


def check_user_name(name: str) -> str:
    """Return ``name`` if it can safely name a file in the prefs directory; else raise."""
    if not _USER_NAME.match(name) or ".." in name:
        raise BadUserName(f"user name not allowed: {name[:64]!r}")
    return name


@dataclass(frozen=True, slots=True)
class UserPrefs(Section):
    """The settings one user may set; None/empty means: use the global one."""

    required_score: float | None = setting(None, min=-1000, max=1000, doc="Spam threshold for this user.")
    report_safe: int | None = setting(None, min=0, max=2, doc="How spam is marked up for this user.")
    welcomelist_from: tuple[str, ...] = setting((), doc="Sender globs this user always accepts.")
    blocklist_from: tuple[str, ...] = setting((), doc="Sender globs this user always refuses.")
    welcomelist_auth: tuple[str, ...] = setting(
        (), doc="Sender globs this user accepts when SPF or DKIM authenticates their domain."
    )
    welcomelist_ip: tuple[Network, ...] = setting((), doc="Client networks this user always accepts.")
    blocklist_ip: tuple[Network, ...] = setting((), doc="Client networks this user always refuses.")


class UserPrefsStore:
    """Loads and caches per-user files; a changed file is read again (by mtime)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory) if directory else None
        self._cache: dict[str, tuple[float, UserPrefs]] = {}

    def get(self, user: str | None) -> UserPrefs:
        """The user's settings; raises BadUserName for names that could escape the directory."""
        if not user or self.directory is None:
            return UserPrefs()
        check_user_name(user)
        path = self.directory / f"{user}.yaml"
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return UserPrefs()
        cached = self._cache.get(user)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            prefs = load_section_file(UserPrefs, path)
        except ConfigError as exc:
            log.warning("user settings %s ignored:\n%s", path, exc)
            prefs = UserPrefs()
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[user] = (mtime, prefs)
        return prefs
