"""Per-user settings: what a user may change about how their mail is judged.

A directory holds one `<user>.yaml` per user (the spamd `User` header, or the recipient in the
milter). Each file is checked like the main configuration; a user without a file, or with a
broken one (logged), gets the global settings. So does a user whose name cannot name a file in
that directory (a path separator, '..', a leading dot, too long): such a name is never put into
a path, and the mail is still scanned, with the global settings, as spamd does for a user it
does not know.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from filterd.config import Network, Section, load_section_file, setting
from filterd.errors import ConfigError

__all__ = ["UserPrefs", "UserPrefsStore"]

log = logging.getLogger(__name__)

# What keeps "<name>.yaml" a plain file right in the directory: no separator (a backslash is
# refused too, for whoever copies the directory elsewhere), no NUL or other control characters,
# no leading dot (".", "..", hidden files) and no ".." anywhere. Anything else an address's local
# part may hold (o'brien, user#1, a!b, non-ASCII) names a file well enough.
_NOT_IN_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")
_MAX_NAME = 128  # characters
_MAX_NAME_BYTES = 200  # as a file name: with ".yaml", within NAME_MAX (255)
_MAX_NOTED = 10_000  # names remembered as already logged, per store


def _unnamable(name: str) -> bool:
    """Whether ``name`` cannot safely name a file in the prefs directory: empty, a path
    separator, a control character, a leading dot, "..", or too long for a file name."""
    try:
        size = len(os.fsencode(name))
    except UnicodeError:  # a lone surrogate the file system encoding cannot carry
        return True
    return (
        not name
        or name.startswith(".")
        or ".." in name
        or _NOT_IN_NAME.search(name) is not None
        or len(name) > _MAX_NAME
        or size > _MAX_NAME_BYTES
    )


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
        self._unnamable: set[str] = set()  # names already logged as unable to name a file

    def get(self, user: str | None) -> UserPrefs:
        """The user's settings, or the global ones (all None): for no user, no directory, a name
        that cannot name a file in it (logged once per name, and no file is touched), no file or
        a broken one."""
        if not user or self.directory is None:
            return UserPrefs()
        if _unnamable(user):
            if user not in self._unnamable:
                if len(self._unnamable) >= _MAX_NOTED:
                    self._unnamable.clear()
                self._unnamable.add(user)
                log.info("user name cannot name a settings file: %r; global settings for this user", user[:64])
            return UserPrefs()
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
