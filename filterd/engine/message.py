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
from email import errors as email_errors
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses

from filterd.engine.html import HtmlFacts, render_html
from filterd.engine.received import Relay, parse_received
from filterd.engine.textcodec import decode_bytes, decode_header_value
from filterd.engine.uris import Uri, UriParser, extract_text_uris

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
_ZW_TABLE = {ord(c): None for c in ZERO_WIDTH}
_SPACED_LETTERS = re.compile(r"\b(?:[A-Za-z][ .\-_*]){3,}[A-Za-z]\b")
_WS_RUN = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\u00a0]*\n\s*")
_HEADER_NAME = re.compile(rb"^[!-9;-~]+[ \t]*:")
_DEFECT_NAMES = {
    email_errors.StartBoundaryNotFoundDefect: "missing-boundary",
    email_errors.CloseBoundaryNotFoundDefect: "missing-close-boundary",
    email_errors.NoBoundaryInMultipartDefect: "no-boundary-parameter",
    email_errors.FirstHeaderLineIsContinuationDefect: "header-starts-with-continuation",
    email_errors.MisplacedEnvelopeHeaderDefect: "misplaced-envelope-header",
    email_errors.MissingHeaderBodySeparatorDefect: "no-header-body-separator",
    email_errors.MultipartInvariantViolationDefect: "multipart-not-multipart",
    email_errors.InvalidBase64PaddingDefect: "bad-base64",
    email_errors.InvalidBase64CharactersDefect: "bad-base64",
    email_errors.InvalidBase64LengthDefect: "bad-base64",
}
_MAX_PARTS = 500
_MAX_HEADERS = 2000


def _collapse_spaced(match: re.Match[str]) -> str:
    return re.sub(r"[ .\-_*]", "", match.group(0))


def normalize_for_rules(text: str) -> str:
    """The de-obfuscated view: NFKC, no zero-width characters, homoglyphs to Latin, and
    spaced-out words ("v i a g r a") joined."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text.translate(_ZW_TABLE)).translate(_CONFUSABLES)
    return _SPACED_LETTERS.sub(_collapse_spaced, text)


@dataclass(frozen=True, slots=True)
class _HeaderSplit:
    mbox_from: str
    newline: str
    fields: list[tuple[str, str, bytes]]  # name, raw value (folded, surrogateescaped), raw bytes
    body: bytes
    problems: list[str]


def _split_headers(data: bytes) -> _HeaderSplit:
    problems: list[str] = []
    mbox_from = ""
    if data.startswith(b"From "):
        end = data.find(b"\n")
        line = data[: end if end >= 0 else len(data)]
        mbox_from = line.rstrip(b"\r").decode("latin-1")
        data = data[end + 1 :] if end >= 0 else b""
    first_nl = data.find(b"\n")
    newline = "\r\n" if first_nl > 0 and data[first_nl - 1 : first_nl] == b"\r" else "\n"
    fields: list[tuple[str, str, bytes]] = []
    size = len(data)
    pos = 0
    current = -1  # start offset of the field being read
    body_start = size
    while pos < size:
        nl = data.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        line = data[pos:end]
        if not line.rstrip(b"\r\n"):  # the blank line that ends the header block
            body_start = end
            break
        if line[:1] in (b" ", b"\t"):
            if current < 0:
                problems.append("header-starts-with-continuation")
                current = pos
            pos = end
            continue
        if not _HEADER_NAME.match(line) or len(fields) >= _MAX_HEADERS:
            # Neither a field nor a fold: the header block ended without a blank line.
            problems.append(
                "too-many-headers" if len(fields) >= _MAX_HEADERS else "no-header-body-separator"
            )
            body_start = pos
            break
        if current >= 0:
            fields.append(_field(data[current:pos]))
        current = pos
        pos = end
    else:
        pos = size
    if current >= 0:
        fields.append(_field(data[current : min(pos, body_start)]))
    return _HeaderSplit(mbox_from, newline, fields, data[body_start:], problems)


def _field(block: bytes) -> tuple[str, str, bytes]:
    colon = block.find(b":")
    if colon < 0:  # a leading continuation line with no field name
        return "X-Broken-Header", block.decode("ascii", "surrogateescape").strip(), block
    name = block[:colon].strip().decode("ascii", "replace")
    value = block[colon + 1 :].decode("ascii", "surrogateescape")
    if value.startswith(" "):
        value = value[1:]
    return name, value.rstrip("\r\n"), block


@dataclass(frozen=True)
class ParsedMessage:
    """Everything rules and checks read about one message. Build it with `parse_message`."""

    raw: bytes  # the message as received, X-Spam-* headers removed, mbox From line removed
    original: bytes  # exactly the input bytes
    newline: str  # "\r\n" or "\n": the message's own line ending
    mbox_from: str
    headers: tuple[HeaderField, ...]  # in order, X-Spam-* excluded
    header_block: str  # raw header block (no X-Spam-*), surrogate-escaped text
    body_raw: bytes
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


def _part_text(msg: Message, payload: bytes) -> tuple[str, str]:
    decoded = decode_bytes(payload, msg.get_param("charset") if msg.get("content-type") else None)  # type: ignore[arg-type]
    return str(decoded), decoded.problem


def _safe_param(msg: Message, name: str, header: str = "content-type") -> str:
    try:
        value = msg.get_param(name, header=header)
    except Exception:
        return ""
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
        try:
            from email.utils import collapse_rfc2231_value

            return str(collapse_rfc2231_value(value))
        except Exception:
            return str(value[2])
    return str(value or "")


def _walk(msg: Message, path: str, out: list[tuple[str, Message]], depth: int = 0) -> None:
    if len(out) >= _MAX_PARTS or depth > 50:
        return
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for i, sub in enumerate(payload, 1):
                if isinstance(sub, Message):
                    _walk(sub, f"{path}.{i}" if path else str(i), out, depth + 1)
        return
    out.append((path or "1", msg))


def _paragraph_lines(text: str) -> list[str]:
    lines: list[str] = []
    for para in _PARAGRAPH_SPLIT.split(text):
        line = _WS_RUN.sub(" ", para.replace("\r", "").replace("\n", " ")).strip()
        if line:
            lines.append(line)
    return lines


def parse_message(
    data: bytes, *, uri_parser: UriParser, body_scan_size: int = 200_000
) -> ParsedMessage:
    """Parse any bytes into a ParsedMessage. Never raises on message content."""
    split = _split_headers(data)
    problems = list(split.problems)
    kept = [(n, v, b) for n, v, b in split.fields if not n.lower().startswith("x-spam-")]
    header_bytes = b"".join(b if b.endswith(b"\n") else b + split.newline.encode() for _, _, b in kept)
    nl = split.newline.encode()
    raw = header_bytes + nl + split.body
    headers: list[HeaderField] = []
    index: dict[str, list[int]] = {}
    for i, (name, value, _) in enumerate(kept):
        headers.append(HeaderField(name, value, decode_header_value(value)))
        index.setdefault(name.lower(), []).append(i)

    try:
        root = BytesParser(policy=compat32).parsebytes(raw)
    except Exception:  # the email package is lenient; this is belt and braces
        problems.append("mime-parse-failed")
        root = Message()
        root.set_payload(split.body.decode("ascii", "surrogateescape"))
    leaves: list[tuple[str, Message]] = []
    _walk(root, "", leaves)
    if len(leaves) >= _MAX_PARTS:
        problems.append("too-many-parts")

    parts: list[Part] = []
    plain_texts: list[str] = []
    raw_texts: list[str] = []
    text_for_uris: list[str] = []
    html_urls: list[tuple[str, str]] = []
    merged: HtmlFacts | None = None
    html_parts = 0
    for path, leaf in leaves:
        for defect in getattr(leaf, "defects", []):
            problems.append(_DEFECT_NAMES.get(type(defect), type(defect).__name__))
        try:
            ctype = leaf.get_content_type()
        except Exception:
            ctype = "text/plain"
        try:
            payload = leaf.get_payload(decode=True)
        except Exception:
            payload = None
            problems.append("undecodable-payload")
        if not isinstance(payload, bytes):
            payload = b""
        for defect in getattr(leaf, "defects", []):
            name = _DEFECT_NAMES.get(type(defect))
            if name == "bad-base64" and name not in problems:
                problems.append(name)
        charset = _safe_param(leaf, "charset")
        try:
            filename = leaf.get_filename() or ""
        except Exception:
            filename = ""
        if filename:
            filename = decode_header_value(str(filename))
        disposition = (leaf.get("content-disposition") or "").split(";")[0].strip().lower()
        encoding = str(leaf.get("content-transfer-encoding") or "").strip().lower()
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
            Part(path, ctype, charset.lower(), filename, disposition, encoding, len(payload),
                 payload, text, charset_problem)
        )

    rendered_text = "\n\n".join(plain_texts)
    if len(rendered_text) > body_scan_size:
        rendered_text = rendered_text[:body_scan_size]
        problems.append("body-truncated-for-rules")
    subject = headers[index["subject"][0]].value if "subject" in index else ""
    lines = _paragraph_lines(rendered_text)
    body_text = "\n".join([subject, *lines]) if subject else "\n".join(lines)
    rawbody_text = "\n".join(raw_texts)[:body_scan_size]

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
        newline=split.newline,
        mbox_from=split.mbox_from,
        headers=tuple(headers),
        header_block=header_bytes.decode("ascii", "surrogateescape"),
        body_raw=split.body,
        parts=tuple(parts),
        problems=tuple(dict.fromkeys(problems)),
        rendered_text=rendered_text,
        body_text=body_text,
        rawbody_text=rawbody_text,
        normalized_body=normalize_for_rules(body_text),
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
        "visible_chars", "hidden_chars", "tiny_chars", "images", "image_area", "forms",
        "password_inputs", "scripts", "iframes", "objects", "comments_in_words", "tags",
        "unknown_tags", "font_color_tags",
    ):
        setattr(a, name, getattr(a, name) + getattr(b, name))
    a.links.extend(b.links)
    a.urls.extend(b.urls)
    a.meta_refresh = a.meta_refresh or b.meta_refresh
    a.bgcolor_set = a.bgcolor_set or b.bgcolor_set
    a.hidden_text = (a.hidden_text + " " + b.hidden_text).strip()
    return a
