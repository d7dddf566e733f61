"""MIME structure checks: what the parser had to forgive, how the text was packed, and what
is attached.

Reads `msg.problems` (parse defects recorded once by the parser) and `msg.parts`; no text is
searched here beyond a few byte tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.checks._facts import EXECUTABLE_EXTENSIONS
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage

__all__ = ["MimeCheck"]

# Parser problem -> rule. Problems not listed here are not scored.
_PROBLEM_RULES: dict[str, str] = {
    "missing-boundary": "MIME_BOUNDARY_NOT_FOUND",
    "missing-close-boundary": "MIME_NO_CLOSING_BOUNDARY",
    "no-boundary-parameter": "MIME_MULTIPART_NO_BOUNDARY",
    "no-header-body-separator": "MIME_NO_HEADER_BODY_GAP",
    "header-starts-with-continuation": "MIME_HEADER_LEADING_FOLD",
    "bad-base64": "MIME_BASE64_DAMAGED",
    "charset-unknown-charset": "MIME_CHARSET_UNKNOWN",
    "charset-bad-bytes": "MIME_CHARSET_WRONG",
    "charset-undeclared-8bit": "MIME_8BIT_UNDECLARED",
}
_EAST_ASIAN = (
    "gb2312",
    "gbk",
    "gb18030",
    "big5",
    "euc-kr",
    "ks_c_5601",
    "iso-2022-jp",
    "shift_jis",
    "shift-jis",
    "euc-jp",
    "iso-2022-kr",
    "x-sjis",
    "hz-gb-2312",
)
_MANY_PARTS = 12
_ARCHIVES = frozenset({"zip", "rar", "7z", "ace", "arj", "cab", "iso", "img", "gz", "tgz"})
_WEB_PAGES = frozenset({"htm", "html", "shtml", "xhtml", "svg", "mht", "mhtml"})


class MimeCheck:
    """Parse defects, encodings, charsets, attachments and the shape of the MIME tree."""

    name: ClassVar[str] = "mime"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = "body"
    emits: ClassVar[frozenset[str]] = frozenset(
        {
            *_PROBLEM_RULES.values(),
            "MIME_BASE64_TEXT",
            "MIME_BASE64_ASCII_TEXT",
            "MIME_EXEC_ATTACHMENT",
            "MIME_DOUBLE_EXTENSION",
            "MIME_ARCHIVE_ATTACHMENT",
            "MIME_HTML_ATTACHMENT",
            "MIME_MANY_PARTS",
            "MIME_HTML_ONLY",
            "MIME_HTML_IN_PLAIN_PART",
            "MIME_ALT_TEXT_MISMATCH",
            "MIME_ALT_TEXT_EMPTY",
            "MIME_NO_TEXT_PART",
            "MIME_CHARSET_EAST_ASIAN",
        }
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._setup = setup

    def run(self, scan: Scan) -> Sequence[Hit]:
        msg = scan.message
        hits: list[Hit] = []
        for problem in msg.problems:
            rule = _PROBLEM_RULES.get(problem)
            if rule is not None:
                hits.append(Hit(rule, problem))
        plain: list[str] = []
        html_declared = 0
        base64_text = base64_ascii = False
        east_asian = ""
        for part in msg.parts:
            ctype = part.content_type
            if part.text is not None:
                if part.encoding == "base64":
                    base64_text = True
                    if part.payload.isascii():
                        base64_ascii = True
                if ctype == "text/plain":
                    plain.append(part.text)
                elif ctype == "text/html":
                    html_declared += 1
                if part.charset and part.charset.startswith(_EAST_ASIAN):
                    east_asian = part.charset
            if part.filename:
                self._attachment(part.filename, hits)
        if base64_text:
            hits.append(Hit("MIME_BASE64_ASCII_TEXT" if base64_ascii else "MIME_BASE64_TEXT"))
        if east_asian:
            hits.append(Hit("MIME_CHARSET_EAST_ASIAN", east_asian))
        if len(msg.parts) >= _MANY_PARTS:
            hits.append(Hit("MIME_MANY_PARTS", f"{len(msg.parts)} parts"))
        html = msg.html
        if msg.html_parts > html_declared:
            hits.append(Hit("MIME_HTML_IN_PLAIN_PART"))
        if html is not None and html_declared and not plain:
            hits.append(Hit("MIME_HTML_ONLY"))
        if not plain and html is None and msg.parts and all(p.text is None for p in msg.parts):
            hits.append(Hit("MIME_NO_TEXT_PART"))
        if html is not None and html_declared == 1 and len(plain) == 1 and self._alternative(scan):
            shown = len(plain[0].strip())
            visible = html.visible_chars
            if shown < 10 and visible >= 100:
                hits.append(Hit("MIME_ALT_TEXT_EMPTY", f"text {shown} chars, html {visible}"))
            elif min(shown, visible) >= 100 and (shown * 4 < visible or visible * 4 < shown):
                hits.append(Hit("MIME_ALT_TEXT_MISMATCH", f"text {shown} chars, html {visible}"))
        return hits

    @staticmethod
    def _alternative(scan: Scan) -> bool:
        """True when the text and HTML parts are two versions of one message."""
        msg = scan.message
        if "alternative" in msg.get("content-type").lower():
            return True
        paths = [p.path for p in msg.parts if p.content_type in ("text/plain", "text/html")]
        return len(paths) == 2 and paths[0].rpartition(".")[0] == paths[1].rpartition(".")[0] != ""

    @staticmethod
    def _attachment(filename: str, hits: list[Hit]) -> None:
        name = filename.strip().strip('"').lower()
        stem, dot, ext = name.rpartition(".")
        if not dot:
            return
        if ext in _ARCHIVES or ext in _WEB_PAGES:
            rule = "MIME_ARCHIVE_ATTACHMENT" if ext in _ARCHIVES else "MIME_HTML_ATTACHMENT"
            if not any(h.rule == rule for h in hits):
                hits.append(Hit(rule, filename[:80]))
            return
        if ext not in EXECUTABLE_EXTENSIONS:
            return
        if not any(h.rule == "MIME_EXEC_ATTACHMENT" for h in hits):
            hits.append(Hit("MIME_EXEC_ATTACHMENT", filename[:80]))
        inner = stem.rstrip(" _.").rpartition(".")[2]
        double = ("." in stem and 2 <= len(inner) <= 4 and inner.isalnum()) or stem.endswith("   ")
        if double and not any(h.rule == "MIME_DOUBLE_EXTENSION" for h in hits):
            hits.append(Hit("MIME_DOUBLE_EXTENSION", filename[:80]))
