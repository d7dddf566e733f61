"""Turning mail bytes into text: charsets with fallbacks, RFC 2047 encoded words.

Mail declares charsets wrongly all the time (8-bit bytes under us-ascii, cp1252 bytes under
iso-8859-1, made-up names). Decoding never fails here: it falls back step by step and says so,
so rules can score the lie without the scan tripping over it.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re

__all__ = ["DecodedText", "decode_bytes", "decode_header_value", "normalize_charset"]

# Names seen in the wild that Python does not know or that browsers treat as a superset.
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso_8859-1": "cp1252",
    "us-ascii": "ascii",
    "ascii": "ascii",
    "ansi_x3.4-1968": "ascii",
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "",
    "unknown-8bit": "",
    "unknown": "",
    "default": "",
    "x-user-defined": "",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "windows-874": "cp874",
    "tis-620": "cp874",
    "x-sjis": "shift_jis",
    "shift-jis": "shift_jis",
    "x-mac-roman": "mac_roman",
    "utf8": "utf-8",
}


@functools.lru_cache(maxsize=256)
def normalize_charset(charset: str | None) -> str | None:
    """Return a Python codec name for a declared charset, "" if it says nothing, None if unknown."""
    if not charset:
        return ""
    name = charset.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    if not name:
        return ""
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


class DecodedText(str):
    """A str that remembers how decoding went (declared charset, used codec, problems)."""

    __slots__ = ("codec", "declared", "problem")
    codec: str
    declared: str
    problem: str  # "" | "unknown-charset" | "bad-bytes" | "undeclared-8bit"

    def __new__(cls, text: str, codec: str, declared: str, problem: str) -> DecodedText:
        self = super().__new__(cls, text)
        self.codec = codec
        self.declared = declared
        self.problem = problem
        return self


def decode_bytes(data: bytes, charset: str | None) -> DecodedText:
    """Decode ``data`` declared as ``charset``; never raises.

    Order: the declared charset strictly; then UTF-8 strictly; then cp1252 (which maps every
    byte but five), replacing what is left.
    """
    declared = (charset or "").strip().lower()
    codec = normalize_charset(charset)
    if codec is None:
        problem = "unknown-charset"
        codec = ""
    else:
        problem = ""
    if codec in ("", "ascii"):
        try:
            return DecodedText(data.decode("ascii"), "ascii", declared, problem)
        except UnicodeDecodeError:
            problem = problem or ("undeclared-8bit" if not declared else "bad-bytes")
    else:
        try:
            return DecodedText(data.decode(codec), codec, declared, problem)
        except UnicodeDecodeError:
            problem = "bad-bytes"
        except Exception:  # some codecs raise other errors on junk (e.g. utf-7)
            problem = "bad-bytes"
    try:
        return DecodedText(data.decode("utf-8"), "utf-8", declared, problem)
    except UnicodeDecodeError:
        return DecodedText(data.decode("cp1252", "replace"), "cp1252", declared, problem)


_ENCODED_WORD = re.compile(r"=\?(?P<cs>[^?*\s]+)(?:\*[^?\s]*)?\?(?P<enc>[bBqQ])\?(?P<text>[^?\s]*)\?=", re.ASCII)
# Whitespace between two adjacent encoded words is dropped (RFC 2047 section 6.2).
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")


def _decode_word(match: re.Match[str]) -> str:
    charset, enc, text = match.group("cs"), match.group("enc"), match.group("text")
    try:
        if enc in "bB":
            text += "=" * (-len(text) % 4)
            raw = binascii.a2b_base64(text.encode("ascii"))
        else:
            raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    return decode_bytes(raw, charset)


def decode_header_value(value: str) -> str:
    """Unfold a raw header value and decode RFC 2047 words and stray 8-bit bytes.

    ``value`` may carry surrogate escapes for 8-bit bytes (how the email package hands over
    undecodable header bytes); those are decoded as UTF-8, else cp1252.
    """
    if "\n" in value or "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n").replace("\n\t", " ").replace("\n ", " ")
        value = value.replace("\n", " ")
    if not value.isascii():
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError:
            value = value.encode("utf-8", "surrogateescape").decode("cp1252", "replace")
    if "=?" in value:
        value = _BETWEEN_WORDS.sub(r"\1\2", value)
        value = _ENCODED_WORD.sub(_decode_word, value)
    return value.strip()
