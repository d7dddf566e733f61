"""Turning a message into Bayes tokens, and tokens into hashed bucket ids.

In the SpamAssassin/SpamBayes tradition: body words from the rendered text (HTML already turned
into what a reader sees) and the Subject, pieces of every URI, and header tokens prefixed with
the header's name so that "free" in a Subject and "free" in an X-Mailer stay different clues.
Each distinct token counts once per message.

Body words are lower-cased runs of letters, digits and ``$@'.*-`` of 3 to 15 characters.
Longer runs become ``skip:<first char> <length rounded down to 10>`` (SpamBayes), a run with
digits also yields its shape (``num:$99.99``, every digit written 9), a run with ``@`` yields
``email:`` user and domain tokens, a dotted run yields ``ud:`` and its parent domains. CJK text
has no spaces, so it yields character bigrams (``cjk:``) instead of words, and text with 8-bit
characters yields ``8bit%:<tens of percent>``.

Headers added by filters, list servers, mailbox software or our own MTA say nothing about the
sender, and learning them teaches the filter its own past verdicts (or the corpus's delivery
path). They are ignored entirely; see `IGNORED_HEADERS` and `IGNORED_PREFIXES` for the list
and `PRESENCE_ONLY_HEADERS` for those that only count as present. Received headers are not
read as text: the parsed relays give ``rcvd:`` tokens for IPs (a.b.c and a.b.c.d, as
SpamAssassin writes them), reverse DNS and HELO names with their parent domains, and protocol.

Every token belongs to one of three views (`TokenViews`), which the classifier scores apart and
pools: text (body and Subject words and their shapes, CJK bigrams, hidden text), links (URI
pieces, addresses and domains written in the text) and headers (fields, addresses, Message-ID,
relays, MIME structure). A store counts tokens the same whatever their view.

Tokens are hashed with CRC-32 (stable across processes and versions of Python, unlike `hash`),
and a store uses the low bits as bucket ids: ``hash & (n_features - 1)``. The message's own
hashes are kept with it, so a store can forget exactly what it learnt.

Speed: a typical message gives ~250 distinct tokens, and classifying and hashing each in Python
is most of the cost. `Tokenizer` (one per store, so per process) remembers the hashes of words,
header fields, address lists and relays it has seen, which recur from message to message; a
known word then costs one dictionary lookup. Splitting the text into words is done by
bytes.translate + split (C speed) rather than a regular expression.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import re
import zlib
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from filterd.engine.message import ParsedMessage

__all__ = [
    "DEFAULT_N_FEATURES",
    "IGNORED_HEADERS",
    "IGNORED_PREFIXES",
    "PRESENCE_ONLY_HEADERS",
    "TOKENIZER_VERSION",
    "TokenViews",
    "Tokenizer",
    "hash_tokens",
    "message_digest",
    "token_hashes",
    "token_ids",
    "tokenize",
]

_T = TypeVar("_T", bound=np.generic)
_K = TypeVar("_K")
_V = TypeVar("_V")
_S = TypeVar("_S")


class TokenViews(NamedTuple, Generic[_S]):
    """A message's tokens (or their hashes) in three views, each scored on its own and pooled
    (`filterd.engine.bayes.classifier.pooled_probability`): what the message says, where it
    points, and how it was made and travelled."""

    text: _S
    """Body and Subject words, their shapes (``num:``, ``skip:``), CJK bigrams, hidden text."""
    links: _S
    """URI pieces (``url:``) and addresses and domains written in the text (``email:``, ``ud:``)."""
    headers: _S
    """Header fields, addresses, Message-ID, relays, MIME structure."""


TOKENIZER_VERSION = 1
"""Changes whenever the same message would give other tokens; a store records it."""

DEFAULT_N_FEATURES = 1 << 22
"""Buckets of the hashing (matches `BayesConfig.n_features`' default)."""

IGNORED_HEADERS = frozenset(
    {
        # Added by filters and scanners: learning them would learn our own (or a peer's) verdicts.
        "authentication-results", "x-original-authentication-results", "received-spf",
        "x-greylist", "x-antispam", "x-antivirus", "x-pyzor", "x-razor", "x-dcc",
        "x-rbl-warning", "x-mass-check-id", "x-bogosity", "x-quarantine-id", "x-scanned-by",
        "x-mailscanner", "x-spam", "x-sieve", "x-policyd-weight",
        # Added on delivery or by mailbox software: the path inside our own system.
        "delivered-to", "delivery-date", "envelope-to", "x-envelope-to", "x-envelope-from",
        "x-original-to", "x-apparently-to", "x-rcpt-to", "x-real-to", "x-delivery-agent",
        "status", "x-status", "x-keywords", "x-flags", "x-uid", "x-uidl", "x-imapbase",
        "x-imap", "lines", "content-length", "replied", "forwarded", "xref", "x-gmail-labels",
        "x-mozilla-status", "x-mozilla-status2", "x-mozilla-keys", "x-evolution",
        # Mailing lists: a list that carries spam would otherwise turn its headers into ham clues.
        "mailing-list", "x-mailing-list", "x-mailman-version", "x-beenthere", "x-loop",
        "mail-followup-to", "x-unsubscribe", "x-unsub", "x-list", "x-list-admin", "precedence",
        "x-egroups-return", "x-egroups-from", "x-mdmailing-list", "x-xemacs-list",
        # Noise, or read elsewhere: dates mislead when ham and spam were collected at other
        # times; Subject and Received are tokenised specially.
        "date", "x-original-date", "x-mime-autoconverted", "x-converted-to-plain-text",
        "subject", "received", "x-originalarrivaltime", "thread-index", "content-class",
        "x-sender", "x-x-sender",
    }
)  # fmt: skip
"""Header names (lower case) never tokenised."""

IGNORED_PREFIXES = (
    "x-spam-", "x-spamd-", "x-rspamd-", "x-spamassassin", "x-spambayes", "x-dspam-", "x-crm114-",
    "x-filterd-", "arc-", "x-virus-", "x-microsoft-antispam", "x-ms-exchange-", "x-forefront-",
    "x-mimecast-", "x-proofpoint-", "x-barracuda-", "x-ironport-", "x-amavis-", "x-mailscanner-",
    "x-policyd-", "x-antiabuse", "x-junk", "list-", "x-list-", "resent-", "original-", "x-original-",
    "x-vm-", "x-gnus-", "x-bugzilla-", "x-mozilla-", "x-gm-",
)  # fmt: skip
"""Header-name prefixes (lower case) never tokenised: every X-Spam-*, ARC-*, List-*, ..."""

PRESENCE_ONLY_HEADERS = frozenset(
    {"dkim-signature", "domainkey-signature", "x-google-dkim-signature", "x-face", "face", "x-pgp-sig"}
)
"""Headers whose value is a signature or an image: only ``hdr:<name>`` (and DKIM ``d=``) count."""

_ADDRESS_HEADERS = ("from", "to", "cc", "reply-to", "sender", "return-path", "errors-to")
_UA_HEADERS = frozenset({"x-mailer", "user-agent", "x-mimeole", "x-newsreader"})
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_CJK_RUN = re.compile(f"[{_CJK}]+")
# Every byte but the UTF-8 lead bytes of U+3000-U+DFFF and U+F000-U+FFFF: deleting these from
# a text's UTF-8 leaves something only if it may hold CJK (a C-speed test; max(text) is 30x slower).
_NOT_CJK_LEAD = bytes(b for b in range(256) if not (0xE3 <= b <= 0xED or b == 0xEF))
# Words are runs of letters, digits and $@'.*,-_ ; everything else separates them. ASCII text
# is split with bytes.translate + split (C speed, 10x a regex findall); other text with a regex.
_WORD_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789$@'.*,-_"
_ASCII_SEPARATORS = bytes(c if chr(c) in _WORD_CHARS or c >= 0x80 else 0x20 for c in range(256))
# Non-ASCII punctuation and spaces that separate words (other 8-bit characters are letters),
# as UTF-8, replaced one by one: bytes.replace is a C scan, str.translate a dict lookup per char.
_UTF8_SEPARATORS = tuple(
    c.encode() for c in "\u00a0\u00ab\u00bb\u00b7\u2002\u2003\u2009\u200b\u2013\u2014\u2018\u2019\u201c\u201d"
    "\u2022\u2026\u3000\u3001\u3002\uff0c\uff01\uff1f\ufeff"
)  # fmt: skip
_STRIP = "'.*,-_@"
_HEADER_WORD = re.compile(r"[^\s,;:<>()\[\]\"'=/?&]{2,}")
_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
_DIGITS = str.maketrans("0123456789", "9999999999")
_SPLIT_PATH = re.compile(r"[/?&=._+%:;,~!#-]+")
_DKIM_DOMAIN = re.compile(r"\bd=([^;\s]+)")
_MSGID_DOMAIN = re.compile(r"@([^>\s]+)")
_LETTERS = re.compile(r"[a-z]+")
_CHARSET = re.compile(r'charset\s*=\s*"?([^";\s]+)', re.I)
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_MAX_BODY = 50_000  # characters of rendered text tokenised: enough for any clue, bounded cost
_MAX_URIS = 64
_MAX_HEADERS = 300  # header fields read; a message with thousands is hostile, not informative
_MAX_RELAYS = 20
_MAX_WORDS_PER_HEADER = 12
_MAX_CACHED_KEY = 200  # characters: longer header values and words are hashed, not remembered


def _words(text: str) -> list[str]:
    """Raw word candidates of lower-cased text (CJK runs left out).

    Words are split with bytes.translate + split, C speed and 10x a regex findall. Text with
    8-bit characters goes through UTF-8: its multi-byte sequences never contain ASCII bytes, so
    they stay inside words; the common non-ASCII separators are turned into spaces first.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_SEPARATORS).decode("ascii").split()
    data = text.encode("utf-8", "surrogatepass")
    if data.translate(None, _NOT_CJK_LEAD):
        data = _CJK_RUN.sub(" ", text).encode("utf-8", "surrogatepass")
    for separator in _UTF8_SEPARATORS:
        if separator in data:
            data = data.replace(separator, b" ")
    return data.translate(_ASCII_SEPARATORS).decode("utf-8", "replace").split()


def _domains(host: str, prefix: str, out: list[str]) -> None:
    """``prefix+host`` and its parent domains down to two labels (no public-suffix lookup)."""
    host = host.strip(".").lower()
    if not host:
        return
    out.append(prefix + host)
    labels = host.split(".")
    for i in range(1, len(labels) - 1):
        out.append(prefix + ".".join(labels[i:]))


def _special_word(word: str, out: list[str]) -> None:
    """A body word that is not all letters (already stripped, 3 characters or more)."""
    if "@" in word:
        user, _, domain = word.rpartition("@")
        if user and "." in domain:
            out.append("email:" + user[:20])
            _domains(domain, "email:dom:", out)
            return
    shape = word.translate(_DIGITS)
    if shape == word:  # no digits: a domain, or a word with ' or - in it
        if "." in word:
            _domains(word, "ud:", out)
        elif len(word) > 15:
            out.append(f"skip:{word[0]} {len(word) // 10 * 10}")
        else:
            out.append(word)
        return
    out.append("num:" + shape[:16])  # prices, dates, phone numbers: their shape generalises
    if len(word) <= 8:
        out.append(word)


def _word_tokens(word: str) -> list[str]:
    """The tokens of one raw body word: usually itself, or nothing, or a few special ones."""
    n = len(word)
    if n < 3:
        return []
    if word.isalpha():
        return [word if n <= 15 else f"skip:{word[0]} {n // 10 * 10}"]
    word = word.strip(_STRIP)
    if len(word) < 3:
        return []
    if word.isalpha():
        return [word if len(word) <= 15 else f"skip:{word[0]} {len(word) // 10 * 10}"]
    out: list[str] = []
    _special_word(word, out)
    return out


def _body_text(msg: ParsedMessage) -> str:
    subject = msg.subject
    text = subject + "\n" + msg.rendered_text if subject else msg.rendered_text
    return text[:_MAX_BODY].lower()


def _text_extras(lowered: str) -> list[str]:
    """``8bit%:`` and CJK bigram tokens of lower-cased body text (nothing for ASCII text)."""
    if lowered.isascii():
        return []
    eight_bit = len(lowered) - len(lowered.encode("ascii", "ignore"))
    out = [f"8bit%:{eight_bit * 10 // max(len(lowered), 1) * 10}"]
    if lowered.encode("utf-8", "surrogatepass").translate(None, _NOT_CJK_LEAD):
        for run in _CJK_RUN.findall(lowered):
            if len(run) == 1:
                out.append("cjk:" + run)
            else:
                out.extend("cjk:" + run[i : i + 2] for i in range(len(run) - 1))
    return out


def _header_words(value: str) -> list[str]:
    return _HEADER_WORD.findall(value.lower())[:_MAX_WORDS_PER_HEADER]


_IGNORE, _ADDRESSES, _MESSAGE_ID, _PRESENCE, _OTHER = range(5)


def _header_kind(name: str) -> int:
    if name in IGNORED_HEADERS or name.startswith(IGNORED_PREFIXES):
        return _IGNORE
    if name in _ADDRESS_HEADERS:
        return _ADDRESSES
    if name in ("message-id", "in-reply-to", "references"):
        return _MESSAGE_ID
    if name in PRESENCE_ONLY_HEADERS:
        return _PRESENCE
    return _OTHER


def _field_tokens(name: str, value: str) -> list[str]:
    """Tokens of one header field of kind _PRESENCE or _OTHER."""
    out = ["hdr:" + name]
    if name in PRESENCE_ONLY_HEADERS:
        if name == "dkim-signature":
            m = _DKIM_DOMAIN.search(value)
            if m:
                out.append("dkim:d:" + m.group(1).lower())
    elif name in _UA_HEADERS:
        out.append(f"ua:{value.strip().lower().translate(_DIGITS)[:40]}")
        out.extend("ua:" + w for w in _header_words(value))
    elif name == "content-type":
        out.append("ct:" + value.partition(";")[0].strip().lower())
        m = _CHARSET.search(value)
        if m:
            out.append("ct:charset:" + m.group(1).lower())
    else:
        out.extend(f"{name}:{w}" for w in _header_words(value))
    return out


def _message_id_tokens(name: str, value: str) -> list[str]:
    out = ["hdr:" + name]
    for domain in _MSGID_DOMAIN.findall(value)[-2:]:
        out.append(f"{name}:dom:{domain.lower()[:60]}")
    if name == "message-id":
        local = value.strip().strip("<>").partition("@")[0].lower().translate(_DIGITS)
        out.append("message-id:shape:" + _LETTERS.sub("a", local)[:20])
    return out


def _address_tokens(name: str, text: str) -> list[str]:
    """``<name>:user:``, ``:dom:`` (and parents) and display-name words; email.utils is 10x slower."""
    addresses = _ADDRESS.findall(text)
    out = ["hdr:" + name]
    if not addresses:
        out.append(f"{name}:none")
        return out
    if name in ("to", "cc"):
        out.append(f"{name}:count:{min(len(addresses), 10)}")
    for addr in addresses[:10]:
        user, _, domain = addr.lower().rpartition("@")
        out.append(f"{name}:user:{user.strip('.')[:30]}")
        _domains(domain, f"{name}:dom:", out)
    words = _header_words(_ADDRESS.sub(" ", text))
    if words:
        out.extend(f"{name}:name:{w}" for w in words)
    else:
        out.append(f"{name}:noname")
    return out


def _relay_tokens(ip: str, rdns: str, helo: str, with_: str, auth: bool) -> list[str]:
    out: list[str] = []
    if ip:
        if _IPV4.fullmatch(ip):
            out.append("rcvd:ip:" + ip.rpartition(".")[0])
        out.append("rcvd:ip:" + ip)
    if rdns:
        _domains(rdns, "rcvd:rdns:", out)
    else:
        out.append("rcvd:nordns")
    if helo and not _IPV4.search(helo):
        _domains(helo[:60], "rcvd:helo:", out)
    if with_:
        out.append("rcvd:with:" + with_.lower())
    if auth:
        out.append("rcvd:auth")
    return out


def _subject_tokens(msg: ParsedMessage) -> list[str]:
    subject = msg.subject
    if not subject:
        return ["subject:none"]
    lowered = subject.lower()
    out = ["subject:" + w for w in set(_words(lowered)) if len(w) > 1]
    if lowered != subject and subject.upper() == subject:
        out.append("subject:allcaps")
    return out


def _mime_tokens(msg: ParsedMessage) -> list[str]:
    out = [f"parts:{min(len(msg.parts), 10)}"]
    for part in msg.parts[:20]:
        out.append("part:ct:" + part.content_type)
        if part.encoding:
            out.append("part:cte:" + part.encoding)
        if part.charset:
            out.append("part:charset:" + part.charset)
        if part.filename:
            out.append("part:ext:" + part.filename.rpartition(".")[2].lower()[:10])
    for problem in msg.problems[:10]:
        out.append("problem:" + problem)
    out.append(f"rcvd:count:{min(len(msg.relays), 12)}")
    return out


def _uri_tokens(msg: ParsedMessage) -> list[str]:
    out: list[str] = []
    for uri in msg.uris[:_MAX_URIS]:
        out.append("url:scheme:" + uri.scheme)
        out.append("url:host:" + uri.host)
        if uri.domain != uri.host:
            out.append("url:dom:" + uri.domain)
        if uri.ip_literal:
            out.append("url:ip-literal")
        if uri.obfuscated:
            out.append("url:obfuscated")
        if uri.userinfo:
            out.append("url:userinfo")
        path = uri.url.partition("//")[2].partition("/")[2]
        for piece in _SPLIT_PATH.split(path.lower())[:12]:
            if 2 < len(piece) <= 20:
                out.append("url:p:" + piece.translate(_DIGITS))
    return out


def _hidden_tokens(msg: ParsedMessage) -> list[str]:
    """``hidden:`` words: text an HTML part hides from the reader (a classic poisoning trick)."""
    html = msg.html
    if html is None or not html.hidden_text:
        return []
    out = []
    for word in set(_words(html.hidden_text[:10_000].lower())):
        word = word.strip(_STRIP)
        if len(word) > 2:
            out.append("hidden:" + word)
    return out


def _is_link_token(token: str) -> bool:
    """Body-word tokens that name a place (an address, a domain) belong to the links view."""
    return token.startswith(("email:", "ud:"))


def _crc(token: str) -> int:
    try:
        return zlib.crc32(token.encode())
    except UnicodeEncodeError:  # a lone surrogate from an undecodable header byte
        return zlib.crc32(token.encode("utf-8", "surrogatepass"))


class Tokenizer:
    """Tokenises messages; `hashes` remembers what repeats from message to message.

    Words, header fields, address lists and relays recur (the vocabulary, our own relays, a
    list's From line, X-Mailer values), so `hashes` keeps their token hashes in dictionaries
    (the older half forgotten when they reach ``cache_size`` entries): a known word costs one lookup instead of
    being classified and hashed again. That halves the cost of a typical message. Keep one per
    store (per process); `tokens` is the uncached spelling-out for debugging.
    """

    def __init__(self, cache_size: int = 100_000) -> None:
        self._cache_size = cache_size
        self._words: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # word -> (text, links)
        self._fields: dict[tuple[str, str], tuple[int, ...]] = {}
        self._kinds: dict[str, int] = {}

    def tokens(self, msg: ParsedMessage) -> list[str]:
        """The message's distinct tokens, in a stable order (headers, MIME, URIs, body)."""
        text, links, headers = self.view_tokens(msg)
        return list(dict.fromkeys(headers + links + text))

    def view_tokens(self, msg: ParsedMessage) -> TokenViews[list[str]]:
        """`tokens` sorted into the three views (`TokenViews`), each in a stable order, distinct."""
        headers: list[str] = []
        addresses: dict[str, list[str]] = {}
        for field in msg.headers[:_MAX_HEADERS]:
            name = field.name.lower()
            kind = _header_kind(name)
            if kind in (_OTHER, _PRESENCE):
                headers.extend(_field_tokens(name, field.value))
            elif kind == _ADDRESSES:
                addresses.setdefault(name, []).append(field.value)
            elif kind == _MESSAGE_ID:
                headers.extend(_message_id_tokens(name, field.value))
        for name in _ADDRESS_HEADERS:
            if name in addresses:
                headers.extend(_address_tokens(name, " ".join(addresses[name])))
            elif name == "from" or name == "to":
                headers.append(f"{name}:none")
        for relay in msg.relays[:_MAX_RELAYS]:
            headers.extend(_relay_tokens(relay.ip, relay.rdns, relay.helo, relay.with_, relay.auth))
        headers.extend(_mime_tokens(msg))
        links = _uri_tokens(msg)
        text = _subject_tokens(msg) + _hidden_tokens(msg)
        lowered = _body_text(msg)
        for word in sorted(set(_words(lowered))):
            for token in _word_tokens(word):
                (links if _is_link_token(token) else text).append(token)
        text.extend(_text_extras(lowered))
        return TokenViews(*(list(dict.fromkeys(v)) for v in (text, links, headers)))

    def _remember(self, cache: dict[_K, tuple[int, ...]], key: _K, size: int, tokens: list[str]) -> tuple[int, ...]:
        """Hash ``tokens`` and keep them under ``key`` (see `_keep`)."""
        hashes = tuple(_crc(t) for t in tokens)
        self._keep(cache, key, size, hashes)
        return hashes

    def _keep(self, cache: dict[_K, _V], key: _K, size: int, value: _V) -> None:
        """Remember ``value`` under ``key``, unless the key is long (``size`` characters): long
        keys rarely repeat, and would let one message fill memory."""
        if size <= _MAX_CACHED_KEY:
            if len(cache) >= self._cache_size:
                # Drop the older half (dicts keep insertion order): what is still common comes
                # back at once, and the cost is paid once per cache_size/2 new entries.
                for old in list(itertools.islice(cache, len(cache) // 2)):
                    del cache[old]
            cache[key] = value

    def hashes(self, msg: ParsedMessage) -> npt.NDArray[np.uint32]:
        """CRC-32 of each of `tokens`' tokens, distinct and sorted; the same set, faster."""
        text, links, headers = self._collect(msg)
        return _distinct(np.frombuffer(array.array("I", text + links + headers), dtype=np.uint32))

    def view_hashes(self, msg: ParsedMessage) -> TokenViews[npt.NDArray[np.uint32]]:
        """`hashes` per view (`view_tokens`' tokens hashed), each distinct and sorted."""
        return TokenViews(*(_distinct(np.frombuffer(array.array("I", v), dtype=np.uint32)) for v in self._collect(msg)))

    def _collect(self, msg: ParsedMessage) -> tuple[list[int], list[int], list[int]]:
        """The token hashes of the text, links and headers views (repeats not removed)."""
        headers: list[int] = []
        extend = headers.extend
        fields, kinds = self._fields, self._kinds
        addresses: dict[str, list[str]] = {}
        for field in msg.headers[:_MAX_HEADERS]:
            name = field.name.lower()
            kind = kinds.get(name)
            if kind is None:
                kind = _header_kind(name)
                if len(kinds) < self._cache_size:
                    kinds[name] = kind
            if kind in (_OTHER, _PRESENCE):
                key = (name, field.value)
                hit = fields.get(key)
                if hit is None:
                    hit = self._remember(fields, key, len(field.value), _field_tokens(name, field.value))
                extend(hit)
            elif kind == _ADDRESSES:
                addresses.setdefault(name, []).append(field.value)
            elif kind == _MESSAGE_ID:
                extend(_crc(t) for t in _message_id_tokens(name, field.value))
        for name in _ADDRESS_HEADERS:
            if name in addresses:
                key = (name, " ".join(addresses[name]))
                hit = fields.get(key)
                extend(hit if hit is not None else self._remember(fields, key, len(key[1]), _address_tokens(*key)))
            elif name == "from" or name == "to":
                headers.append(_crc(f"{name}:none"))
        for relay in msg.relays[:_MAX_RELAYS]:
            key = ("\x00rcvd", f"{relay.ip}|{relay.rdns}|{relay.helo}|{relay.with_}|{relay.auth}")
            hit = fields.get(key)
            if hit is None:
                tokens = _relay_tokens(relay.ip, relay.rdns, relay.helo, relay.with_, relay.auth)
                hit = self._remember(fields, key, len(key[1]), tokens)
            extend(hit)
        extend(_crc(t) for t in _mime_tokens(msg))
        links = [_crc(t) for t in _uri_tokens(msg)]
        text = [_crc(t) for t in _subject_tokens(msg)]
        text.extend(_crc(t) for t in _hidden_tokens(msg))
        lowered = _body_text(msg)
        words = self._words
        get = words.get
        add_text, add_links = text.extend, links.extend
        for word in set(_words(lowered)):
            known = get(word)
            if known is None:
                tokens = _word_tokens(word)
                known = (
                    tuple(_crc(t) for t in tokens if not _is_link_token(t)),
                    tuple(_crc(t) for t in tokens if _is_link_token(t)),
                )
                self._keep(words, word, len(word), known)
            add_text(known[0])
            if known[1]:
                add_links(known[1])
        text.extend(_crc(t) for t in _text_extras(lowered))
        return text, links, headers


def hash_tokens(tokens: Iterable[str]) -> npt.NDArray[np.uint32]:
    """CRC-32 of each token's UTF-8 bytes, distinct, sorted (what `Tokenizer.hashes` computes)."""
    return _distinct(np.frombuffer(array.array("I", [_crc(t) for t in tokens]), dtype=np.uint32))


def _distinct(values: npt.NDArray[_T]) -> npt.NDArray[_T]:
    """Sorted distinct values; np.unique costs 30 us of overhead on a few hundred values."""
    values = np.sort(values)
    if values.size > 1:
        keep = np.empty(values.size, dtype=bool)
        keep[0] = True
        np.not_equal(values[1:], values[:-1], out=keep[1:])
        values = values[keep]
    return values


def tokenize(msg: ParsedMessage) -> list[str]:
    """The message's distinct tokens (for debugging and ``--dump``)."""
    return Tokenizer().tokens(msg)


def token_hashes(msg: ParsedMessage) -> npt.NDArray[np.uint32]:
    """The 32-bit hashes of the message's tokens (distinct, sorted): what a store keeps per message.

    Without caches; a store uses its own `Tokenizer`.
    """
    return Tokenizer().hashes(msg)


def token_ids(msg: ParsedMessage, n_features: int = DEFAULT_N_FEATURES) -> npt.NDArray[np.int64]:
    """Bucket ids (distinct, sorted) of the message's tokens for ``n_features`` (a power of 2) buckets."""
    return _distinct((token_hashes(msg) & np.uint32(n_features - 1)).astype(np.int64))


_MBOX_ESCAPE = re.compile(rb"^>+(From )", re.M)


def message_digest(msg: ParsedMessage) -> str:
    """A stable key for a message: SHA-1 over Message-ID, Date, From, Subject and the body.

    Only headers the author wrote take part, so headers added on the way (Received, X-Spam-*,
    Authentication-Results, ...) and the mbox From line leave it unchanged; line endings and
    mbox ``>From`` escaping of the body are normalised.
    """
    body = msg.body_raw.replace(b"\r\n", b"\n")
    if b">From " in body:
        body = _MBOX_ESCAPE.sub(rb"\1", body)
    h = hashlib.sha1(usedforsecurity=False)
    for name in ("message-id", "date", "from", "subject"):
        h.update(" ".join(msg.get(name).split()).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    h.update(body.rstrip())
    return h.hexdigest()
