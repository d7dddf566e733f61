"""The parsed message: one immutable view of a mail that every check reads.

`parse_message(raw)` accepts any bytes and always returns a `ParsedMessage`; what was wrong
with the input is listed in `problems` (rules score those). Parsing uses the email package's
compat32 policy, which is several times faster than the modern one, and decodes text itself
with charset fallbacks (textcodec).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from email.utils import getaddresses

from filterd.engine.html import HtmlFacts, render_html
from filterd.engine.mime import split_header_block, walk_mime
from filterd.engine.received import Relay, parse_received
from filterd.engine.textcodec import decode_bytes, decode_header_value
from filterd.engine.uris import Uri, UriParser, extract_text_uris
from filterd.headerblock import mbox_from_end

__all__ = ["HeaderField", "ParsedMessage", "Part", "parse_message"]


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as it appeared (name, raw value with folds) and decoded."""

    name: str
    raw: str
    value: str


@dataclass(frozen=True, slots=True)
class Part:
    """One leaf of the MIME tree."""

    path: str  # "1", "1.2", ...: position in the tree
    content_type: str
    charset: str
    filename: str
    disposition: str
    encoding: str  # Content-Transfer-Encoding as declared, lower case
    size: int  # decoded size in bytes
    payload: bytes  # decoded bytes
    text: str | None  # decoded text for text/* parts
    charset_problem: str = ""  # textcodec.DecodedText.problem


# Zero-width and formatting characters that hide inside words.
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u200e\u200f"
# Letters from other scripts that look like Latin ones (the usual spam substitutions).
_CONFUSABLES = str.maketrans(
    "аеорсухіјѕԁɡӏАВЕКМНОРСТХІЈЅαεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ０１２３４５６７８９",
    "aeopcyxijsdglABEKMHOPCTXIJSaeiknoptuxABEZHIKMNOPTYX0123456789",
)
_SPACED_LETTERS = re.compile(r"\b(?:[A-Za-z][ .\-_*]){3,}[A-Za-z]\b")
_HAS_ZERO_WIDTH = re.compile(f"[{ZERO_WIDTH}]")
# Homoglyph words mix scripts: look for a Latin letter next to a Greek/Cyrillic one first (one
# linear pass), and only then visit words. (`\w*X\w*` would backtrack quadratically on long
# letter runs, such as Chinese text decoded as cp1252.)
_LOOKALIKES = "\u0370-\u03ff\u0400-\u04ff\uff10-\uff19\u0261\u0501\u04cf"
_MIXED_PAIR = re.compile(f"[A-Za-z][{_LOOKALIKES}]|[{_LOOKALIKES}][A-Za-z0-9]")
_MIXED_WORD = re.compile(f"[A-Za-z0-9{_LOOKALIKES}]+")
_LATIN = re.compile(r"[A-Za-z]")
# Cheap test before the costly pattern: a single letter between two separators.
_SPACED_HINT = re.compile(r"(?:^|[ .\-_*])[A-Za-z][ .\-_*][A-Za-z][ .\-_*][A-Za-z](?:[ .\-_*]|$)", re.M)
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\u00a0]*\n\s*")


def _collapse_spaced(match: re.Match[str]) -> str:
    return re.sub(r"[ .\-_*]", "", match.group(0))


def _unconfuse(match: re.Match[str]) -> str:
    word = match.group(0)
    # Only words that mix scripts are disguised Latin; a Russian or Greek word stays itself.
    if not _LATIN.search(word) or word.isascii():
        return word
    return word.translate(_CONFUSABLES)


def normalize_for_rules(text: str) -> str:
    """The de-obfuscated view: NFKC, no zero-width characters, look-alike letters inside Latin
    words mapped to Latin, and spaced-out words ("v i a g r a") joined."""
    if not text.isascii():
        if _HAS_ZERO_WIDTH.search(text):
            for char in ZERO_WIDTH:  # str.replace is C-speed; a dict-driven translate is not
                text = text.replace(char, "")
        text = unicodedata.normalize("NFKC", text)
        if _MIXED_PAIR.search(text):
            text = _MIXED_WORD.sub(_unconfuse, text)
    if _SPACED_HINT.search(text):
        text = _SPACED_LETTERS.sub(_collapse_spaced, text)
    return text


@dataclass(frozen=True, repr=False)
class ParsedMessage:
    """Everything rules and checks read about one message. Build it with `parse_message`."""

    def __repr__(self) -> str:  # short: reprs end up in logs and asyncio's debug paths
        return f"<ParsedMessage {self.size} bytes, {len(self.parts)} parts, subject={self.subject[:60]!r}>"

    raw: bytes  # the message as received, X-Spam-* headers removed, mbox From line removed
    original: bytes  # exactly the input bytes
    pristine: bytes  # the input without its mbox From line (SpamAssassin's get_pristine)
    header_end: int  # in pristine: where the header fields end
    body_start: int  # in pristine: where the body starts (after the empty line, if any)
    newline: str  # "\r\n" or "\n": the message's own line ending
    mbox_from: str
    headers: tuple[HeaderField, ...]  # in order, X-Spam-* excluded
    header_block: str  # raw header block (no X-Spam-*), surrogate-escaped text
    parts: tuple[Part, ...]
    problems: tuple[str, ...]  # parse problems: "missing-boundary", "bad-base64", ...
    rendered_text: str  # visible text of all text parts, paragraphs separated by blank lines
    body_text: str  # for body rules: Subject, then one line per paragraph
    rawbody_text: str  # decoded text parts with HTML kept, for rawbody rules
    normalized_body: str  # body_text de-obfuscated, for nbody rules
    html: HtmlFacts | None  # merged facts over all HTML parts
    html_parts: int
    uris: tuple[Uri, ...]
    relays: tuple[Relay, ...]  # top (newest) first
    _index: dict[str, tuple[int, ...]] = field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.original)

    @property
    def body_raw(self) -> bytes:
        """The body byte for byte (a copy: read it once)."""
        return self.pristine[self.body_start :]

    @property
    def separator(self) -> bytes:
        """The empty line between header and body as it came: b"\n", b"\r\n", or b"" (none)."""
        return self.pristine[self.header_end : self.body_start]

    def get_all(self, name: str) -> list[str]:
        """Decoded values of every field called ``name`` (case-insensitive), in order."""
        return [self.headers[i].value for i in self._index.get(name.lower(), ())]

    def get_raw_all(self, name: str) -> list[str]:
        return [self.headers[i].raw for i in self._index.get(name.lower(), ())]

    def get(self, name: str, default: str = "") -> str:
        """The first decoded value of ``name``."""
        ids = self._index.get(name.lower())
        return self.headers[ids[0]].value if ids else default

    def has(self, name: str) -> bool:
        return name.lower() in self._index

    def count(self, name: str) -> int:
        return len(self._index.get(name.lower(), ()))

    @property
    def subject(self) -> str:
        return self.get("subject")

    def addresses(self, name: str) -> list[tuple[str, str]]:
        """(display name, address) pairs from every ``name`` field."""
        values = self.get_all(name)
        if not values:
            return []
        try:
            return [(n, a) for n, a in getaddresses(values) if n or a]
        except Exception:  # getaddresses is lenient but not total on hostile input
            return []

    @property
    def from_addr(self) -> str:
        pairs = self.addresses("from")
        return pairs[0][1].lower() if pairs else ""

    @property
    def from_name(self) -> str:
        pairs = self.addresses("from")
        return pairs[0][0] if pairs else ""

    @property
    def text_parts(self) -> list[Part]:
        return [p for p in self.parts if p.text is not None]

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.filename or p.disposition == "attachment"]


def _paragraph_lines(text: str) -> list[str]:
    lines: list[str] = []
    for para in _PARAGRAPH_SPLIT.split(text):
        line = " ".join(para.split())
        if line:
            lines.append(line)
    return lines


def parse_message(
    data: bytes, *, uri_parser: UriParser, body_scan_size: int = 200_000, rule_texts: bool = True
) -> ParsedMessage:
    """Parse any bytes into a ParsedMessage. Never raises on message content.

    ``rule_texts=False`` leaves out the texts only rules read (``body_text``, ``rawbody_text``,
    ``normalized_body`` stay empty: a tenth of the parse), for callers that only tokenise it
    for Bayes, such as the workers of `filterd learn`.
    """
    start = mbox_from_end(data)
    mbox_from = data[:start].rstrip(b"\r\n").decode("latin-1")
    data_no_from = data[start:] if start else data
    first_nl = data_no_from.find(b"\n")
    newline = "\r\n" if first_nl > 0 and data_no_from[first_nl - 1 : first_nl] == b"\r" else "\n"
    nl = newline.encode()
    block = split_header_block(data_no_from)
    problems = list(block.problems)
    kept = [f for f in block.fields if not f.name.lower().startswith("x-spam-")]
    header_bytes = b"".join(f.raw if f.raw.endswith(b"\n") else f.raw + nl for f in kept)
    raw = header_bytes + nl + block.body
    headers: list[HeaderField] = []
    index: dict[str, list[int]] = {}
    for i, f in enumerate(kept):
        headers.append(HeaderField(f.name, f.value, decode_header_value(f.value)))
        index.setdefault(f.name.lower(), []).append(i)

    leaves = walk_mime(kept, block.body, problems)
    parts: list[Part] = []
    plain_texts: list[str] = []
    raw_texts: list[str] = []
    text_for_uris: list[str] = []
    html_urls: list[tuple[str, str]] = []
    merged: HtmlFacts | None = None
    html_parts = 0
    for leaf in leaves:
        ctype = leaf.content_type
        payload = leaf.payload
        charset = leaf.params.get("charset", "")
        filename = leaf.filename
        disposition = leaf.disposition
        text: str | None = None
        charset_problem = ""
        is_attachment = disposition == "attachment" or bool(filename)
        if ctype.startswith("text/") and not (is_attachment and ctype not in ("text/plain", "text/html")):
            decoded = decode_bytes(payload, charset or None)
            text, charset_problem = str(decoded), decoded.problem
            if charset_problem:
                problems.append(f"charset-{charset_problem}")
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if ctype == "text/html" or (ctype == "text/plain" and _looks_like_html(text)):
                html_parts += 1
                rendered, facts = render_html(text)
                merged = facts if merged is None else _merge_facts(merged, facts)
                plain_texts.append(rendered)
                for url in facts.urls:
                    html_urls.append((url, "href"))
                raw_texts.append(text)
            elif ctype in ("text/plain", "text/enriched", "text/richtext") or not is_attachment:
                plain_texts.append(text)
                raw_texts.append(text)
                text_for_uris.append(text)
        parts.append(
            Part(
                leaf.path,
                ctype,
                charset.lower(),
                filename,
                disposition,
                leaf.encoding,
                len(payload),
                payload,
                text,
                charset_problem,
            )
        )

    rendered_text = "\n\n".join(plain_texts)
    if len(rendered_text) > body_scan_size:
        rendered_text = rendered_text[:body_scan_size]
        problems.append("body-truncated-for-rules")
    body_text = rawbody_text = normalized_body = ""
    if rule_texts:
        subject = headers[index["subject"][0]].value if "subject" in index else ""
        lines = _paragraph_lines(rendered_text)
        body_text = "\n".join([subject, *lines]) if subject else "\n".join(lines)
        rawbody_text = "\n".join(raw_texts)[:body_scan_size]
        normalized_body = normalize_for_rules(body_text)

    uris: list[Uri] = []
    seen: set[str] = set()
    candidates = [(u, "href") for u, _ in html_urls]
    for chunk in text_for_uris:
        candidates.extend(extract_text_uris(chunk[:body_scan_size]))
    if merged is not None:
        candidates.extend(extract_text_uris(rendered_text))
    for candidate, source in candidates[:2000]:
        if source == "mailto":
            continue
        try:
            uri = uri_parser.parse(candidate, source)
        except Exception:  # hostile URL text: count it, never fail the scan
            problems.append("bad-uri")
            continue
        if uri is not None and uri.url not in seen:
            seen.add(uri.url)
            uris.append(uri)

    relays = tuple(parse_received(headers[i].value) for i in index.get("received", []))
    return ParsedMessage(
        raw=raw,
        original=data,
        pristine=data_no_from,
        header_end=block.fields_end,
        body_start=block.body_start,
        newline=newline,
        mbox_from=mbox_from,
        headers=tuple(headers),
        header_block=header_bytes.decode("ascii", "surrogateescape"),
        parts=tuple(parts),
        problems=tuple(dict.fromkeys(problems)),
        rendered_text=rendered_text,
        body_text=body_text,
        rawbody_text=rawbody_text,
        normalized_body=normalized_body,
        html=merged,
        html_parts=html_parts,
        uris=tuple(uris),
        relays=relays,
        _index={k: tuple(v) for k, v in index.items()},
    )


_HTML_SNIFF = re.compile(r"<\s*(?:html|body|div|table|p|a\s+href|font|br)\b", re.I)


def _looks_like_html(text: str) -> bool:
    head = text[:2048]
    return "<" in head and bool(_HTML_SNIFF.search(head))


def _merge_facts(a: HtmlFacts, b: HtmlFacts) -> HtmlFacts:
    for name in (
        "visible_chars",
        "hidden_chars",
        "tiny_chars",
        "images",
        "image_area",
        "forms",
        "password_inputs",
        "scripts",
        "iframes",
        "objects",
        "comments_in_words",
        "tags",
        "unknown_tags",
        "font_color_tags",
    ):
        setattr(a, name, getattr(a, name) + getattr(b, name))
    a.links.extend(b.links)
    a.urls.extend(b.urls)
    a.meta_refresh = a.meta_refresh or b.meta_refresh
    a.bgcolor_set = a.bgcolor_set or b.bgcolor_set
    a.hidden_text = (a.hidden_text + " " + b.hidden_text).strip()
    return a
