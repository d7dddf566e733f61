"""Whose Authentication-Results field is this: the authserv-id at its start (RFC 8601 §2.2).

Downstream software (MUAs, Sieve, our delivery agent) believes A-R fields carrying our
authserv-id, so one that arrives from outside with our id is a forgery and must go before the
message is delivered (RFC 8601 §5). The comparison errs on the side of deleting: comments and
folding are skipped, case and a trailing root dot are ignored, whatever follows the id (a
version, or junk) does not matter, and RFC 2047 encoded-words count in their decoded form too
(Sieve and many MUAs decode them before looking).
"""

from __future__ import annotations

import email.errors
import email.header
import re

from filterd.config import AuthConfig
from filterd.headerblock import mbox_from_end, split_header_fields
from filterd.net.hostname import fqdn

__all__ = [
    "authserv_id_of", "claims_authserv_id", "effective_authserv_id", "message_without_claims", "without_claims",
]  # fmt: skip

HEADER = "authentication-results"
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')  # RFC 2045: what ends a token
_WHITESPACE = frozenset(" \t\r\n")
# A header block split into fields: each starts at a line that does not begin with a blank.
_FIELD_START = re.compile(r"(?<=\n)(?=[^ \t\r\n])")


def effective_authserv_id(config: AuthConfig) -> str:
    """The id our own Authentication-Results fields carry: ``auth.authserv_id``, else this
    host's name (the auth check, the milter and spamd all take it from here)."""
    return config.authserv_id or fqdn()


def _skip_cfws(value: str, i: int) -> int | None:
    """The index after any folding whitespace and (nested) comments at ``i``; None when a
    comment never closes."""
    depth = 0
    while i < len(value):
        c = value[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in _WHITESPACE:
            return i
        i += 1
    return None if depth else i


def authserv_id_of(value: str) -> str | None:
    """The authserv-id (a token or quoted-string after optional CFWS) an A-R value starts
    with, lower-cased and without a trailing dot; None when there is none."""
    start = _skip_cfws(value, 0)
    if start is None or start >= len(value):
        return None
    if value[start] == '"':
        text: list[str] = []
        i = start + 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\":
                i += 1
            if i < len(value) and value[i] not in "\r\n":
                text.append(value[i])
            i += 1
        if i >= len(value):
            return None  # unterminated
        found = "".join(text).strip()
    else:
        end = start
        while end < len(value) and 32 < ord(value[end]) < 127 and value[end] not in _TSPECIALS:
            end += 1
        found = value[start:end]
    found = found.lower().removesuffix(".")
    return found or None


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    """Whether an A-R value claims ``authserv_id``, as written or after decoding encoded-words."""
    ours = authserv_id.lower().removesuffix(".")
    if authserv_id_of(value) == ours:
        return True
    if "=?" not in value:
        return False
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return False
    return authserv_id_of(decoded) == ours


def without_claims(header_block: str, authserv_id: str) -> str:
    """``header_block`` (whole fields, each ending with its newline) without the
    Authentication-Results fields that claim ``authserv_id``."""
    if HEADER not in header_block.lower():
        return header_block
    kept = []
    for raw in _FIELD_START.split(header_block):
        name, colon, value = raw.partition(":")
        if colon and name.rstrip(" \t").lower() == HEADER and claims_authserv_id(value, authserv_id):
            continue
        kept.append(raw)
    return "".join(kept)


def message_without_claims(data: bytes, authserv_id: str) -> bytes:
    """A whole message, bytes as they came, without the Authentication-Results fields of its
    header block that claim ``authserv_id`` (`without_claims`); for a message handed back
    unparsed, such as one too big to scan. The header block ends where the parser ends it
    (`split_header_fields`, after an mbox ``From `` line: the first empty line, or a line that is
    no field); the body is not read, and comes back byte for byte."""
    start = mbox_from_end(data)
    cut = start + split_header_fields(data[start:]).end
    block = data[:cut].decode("ascii", "surrogateescape")
    kept = without_claims(block, authserv_id)
    if kept == block:
        return data
    return kept.encode("ascii", "surrogateescape") + data[cut:]
