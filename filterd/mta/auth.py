"""SMTP AUTH users: a file of ``name:hash`` lines, passwords hashed with scrypt.

File format (``mta.auth_users_file``; keep it mode 0600, it is checked on load)::

    # comments and empty lines are ignored
    alice:$scrypt$ln=14,r=8,p=1$<salt, base64>$<key, base64>

The hash is RFC 7914 scrypt (``hashlib.scrypt``, N = 2**ln, r, p, a 16-byte random salt and a
32-byte key), written in the PHC string style. scrypt is memory-hard: guessing passwords from a
stolen file costs an attacker memory as well as time. ``filterd mta passwd NAME`` prints a line
for a password read from standard input. Verification compares in constant time and costs
about 0.15 s of CPU, so the SMTP server runs it in a thread.
"""

from __future__ import annotations

__all__ = ["DUMMY_HASH", "check_user", "hash_password", "load_users", "verify_password"]

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from filterd.errors import ConfigError, Problem

_LN, _R, _P = 14, 8, 1  # N = 16384: 16 MiB of memory per hash
_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_NAME = re.compile(r"[^\s:]+")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=length
    )


def hash_password(password: str, *, ln: int = _LN) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, ln, _R, _P, 32)
    return f"$scrypt$ln={ln},r={_R},p={_P}${_b64(salt)}${_b64(key)}"


# Verified when the user is unknown, so that an unknown name costs the same scrypt run as a
# wrong password (no timing oracle for valid names). Same parameters as hash_password.
DUMMY_HASH = f"$scrypt$ln={_LN},r={_R},p={_P}${_b64(bytes(16))}${_b64(bytes(32))}"


def _decode(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    """The parameters, salt and key of a well-formed hash; None otherwise."""
    match = _HASH.fullmatch(stored)
    if match is None:
        return None
    ln, r, p = int(match[1]), int(match[2]), int(match[3])
    try:
        salt, key = base64.b64decode(match[4], validate=True), base64.b64decode(match[5], validate=True)
    except binascii.Error:
        return None
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16) or not key:
        return None
    return ln, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    decoded = _decode(stored)
    if decoded is None:
        return False
    ln, r, p, salt, key = decoded
    return hmac.compare_digest(_scrypt(password, salt, ln, r, p, len(key)), key)


def check_user(users: Mapping[str, str], username: str, password: str) -> bool:
    """Whether ``password`` is ``username``'s; an unknown user is verified against
    `DUMMY_HASH` (and refused), so both cost one scrypt run."""
    stored = users.get(username)
    ok = verify_password(password, DUMMY_HASH if stored is None else stored)
    return ok and stored is not None


def load_users(path: Path) -> dict[str, str]:
    """name -> hash; ConfigError naming each bad line, or a file others may read."""
    problems: list[Problem] = []
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(Problem(str(path), None, "", f"cannot read the AUTH users file: {exc.strerror}")) from None
    if mode & 0o077:
        problems.append(Problem(str(path), None, "", f"readable by others (mode {mode & 0o777:o}); chmod 600 it"))
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, stored = line.partition(":")
        if not _NAME.fullmatch(name) or _decode(stored) is None:
            problems.append(Problem(str(path), number, "", "expected 'name:$scrypt$...' (filterd mta passwd NAME)"))
        elif name in users:
            problems.append(Problem(str(path), number, "", f"user {name!r} is listed twice"))
        else:
            users[name] = stored
    if problems:
        raise ConfigError(problems)
    return users
