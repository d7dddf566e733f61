"""HTML tricks: pictures instead of words, text nobody can see, links that show one place and
go to another, and active content that has no business in mail.

All facts come from `msg.html` (collected while the parser rendered the HTML); this check
only weighs them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.html import HtmlLink
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.engine.uris import UriParser

__all__ = ["HtmlCheck"]

# Anchor text that reads as an address: with a scheme or www., or a bare host in a common TLD.
_SHOWS_ADDRESS = re.compile(
    r"^(?:(?:https?://|www\d?\.)[a-z0-9-]+(?:\.[a-z0-9-]+)+"
    r"|(?:[a-z0-9-]+\.)+(?:com|net|org|edu|gov|info|biz|us|uk|ca|de|fr|io|co))"
    r"(?::\d+)?(?:[/?#]\S*)?$",
    re.I,
)
_MAX_LINKS = 60


class HtmlCheck:
    """Weighs the facts the HTML renderer collected."""

    name: ClassVar[str] = "html"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = "body"
    emits: ClassVar[frozenset[str]] = frozenset(
        {
            "HTML_IMAGE_ONLY",
            "HTML_IMAGE_MOSTLY",
            "HTML_HIDDEN_TEXT",
            "HTML_HIDDEN_TEXT_MOSTLY",
            "HTML_TINY_TEXT",
            "HTML_LINK_SHOWS_OTHER_DOMAIN",
            "HTML_FORM",
            "HTML_PASSWORD_FIELD",
            "HTML_SCRIPT",
            "__HTML_IFRAME",
            "__HTML_EMBEDDED_OBJECT",
            "HTML_META_REFRESH",
            "HTML_COMMENT_SPLITS_WORD",
            "HTML_MANY_UNKNOWN_TAGS",
            "HTML_NO_VISIBLE_TEXT",
            "HTML_SHORT_WITH_LINK",
        }
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._uris: UriParser = setup.uri_parser

    def run(self, scan: Scan) -> Sequence[Hit]:
        html = scan.message.html
        if html is None:
            return []
        hits: list[Hit] = []
        visible = html.visible_chars
        if html.images:
            if visible < 200:
                detail = f"{html.images} images, {visible} chars of text"
                hits.append(Hit("HTML_IMAGE_ONLY", detail))
            elif visible < 1000 and html.image_area >= 150_000:
                detail = f"{html.image_area} px of images, {visible} chars"
                hits.append(Hit("HTML_IMAGE_MOSTLY", detail))
        elif visible == 0 and not html.links:
            hits.append(Hit("HTML_NO_VISIBLE_TEXT"))
        hidden = html.hidden_chars
        shown = f"{hidden} hidden vs {visible} visible chars"
        if hidden >= 100 and hidden > visible:
            hits.append(Hit("HTML_HIDDEN_TEXT_MOSTLY", shown))
        elif hidden >= 30 and hidden * 10 > visible:
            hits.append(Hit("HTML_HIDDEN_TEXT", shown))
        if html.tiny_chars >= 30:
            hits.append(Hit("HTML_TINY_TEXT", f"{html.tiny_chars} chars in tiny type"))
        if html.forms:
            hits.append(Hit("HTML_FORM"))
        if html.password_inputs:
            hits.append(Hit("HTML_PASSWORD_FIELD"))
        if html.scripts:
            hits.append(Hit("HTML_SCRIPT"))
        if html.iframes:
            hits.append(Hit("__HTML_IFRAME"))
        if html.objects:
            hits.append(Hit("__HTML_EMBEDDED_OBJECT"))
        if html.meta_refresh:
            hits.append(Hit("HTML_META_REFRESH"))
        if html.comments_in_words:
            hits.append(Hit("HTML_COMMENT_SPLITS_WORD", value=float(html.comments_in_words)))
        if html.unknown_tags >= 10 and html.unknown_tags * 5 > html.tags:
            hits.append(Hit("HTML_MANY_UNKNOWN_TAGS", f"{html.unknown_tags} of {html.tags} tags"))
        if 0 < visible < 150 and html.links and not html.images:
            hits.append(Hit("HTML_SHORT_WITH_LINK"))
        mismatch = self._link_mismatch(html.links)
        if mismatch:
            hits.append(Hit("HTML_LINK_SHOWS_OTHER_DOMAIN", mismatch))
        return hits

    def _link_mismatch(self, links: Sequence[HtmlLink]) -> str:
        for link in links[:_MAX_LINKS]:
            text, href = link.text, link.href
            if "." not in text or len(text) > 300 or not href:
                continue
            text = text.strip()
            if not _SHOWS_ADDRESS.match(text):
                continue
            shown = self._uris.parse(text, "text")
            real = self._uris.parse(href, "href")
            if shown is None or real is None:
                continue
            if shown.domain != real.domain:
                return f"shows {shown.host}, goes to {real.host}"
        return ""
