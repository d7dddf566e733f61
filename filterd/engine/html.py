"""HTML to visible text, plus the facts spammers' HTML tricks leave behind.

One regex pass tokenises the document into tags and text (no DOM: a DOM costs far more per
message and spam HTML is rarely well formed). A stack of open elements carries inherited
invisibility (display:none, visibility:hidden, tiny fonts, text coloured like its background).
"""

from __future__ import annotations

import html as _html
import re
from dataclasses import dataclass, field

__all__ = ["HtmlFacts", "HtmlLink", "render_html"]


@dataclass(frozen=True, slots=True)
class HtmlLink:
    """An anchor: where it points and what it shows."""

    href: str
    text: str


@dataclass(slots=True)
class HtmlFacts:
    """What one HTML part looked like, beyond its visible text."""

    visible_chars: int = 0
    hidden_chars: int = 0  # display:none, visibility:hidden, same colour as background
    tiny_chars: int = 0  # font-size <= 2px / <font size=1> with little else
    hidden_text: str = ""
    images: int = 0
    image_area: int = 0  # sum of width*height where given
    links: list[HtmlLink] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # href, src, action, background, ...
    forms: int = 0
    password_inputs: int = 0
    scripts: int = 0
    iframes: int = 0
    objects: int = 0  # object / embed / applet
    meta_refresh: bool = False
    comments_in_words: int = 0  # v<!-- x -->iagra
    tags: int = 0
    unknown_tags: int = 0
    font_color_tags: int = 0
    bgcolor_set: bool = False
    has_head: bool = False
    has_title: bool = False
    title: str = ""
    base_href: str = ""
    truncated: bool = False


_TOKEN = re.compile(
    r"<!--.*?(?:-->|\Z)|<!\[CDATA\[.*?(?:\]\]>|\Z)|<![^>]*>|<\?[^>]*>|"
    r"</?([A-Za-z][A-Za-z0-9:-]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*)>",
    re.S,
)
_ATTR = re.compile(r"([A-Za-z_:][-A-Za-z0-9_:.]*)(?:\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s\"'>]+))?")
_STYLE_PROP = re.compile(r"([a-z-]+)\s*:\s*([^;]+)", re.I)
_WS = re.compile(r"[ \t\r\n\f\u00a0]+")
_BLOCK = frozenset(
    "p div br tr li ul ol h1 h2 h3 h4 h5 h6 table blockquote pre hr dl dt dd form center "
    "section article header footer address td th tbody thead title".split()
)
_SKIP = frozenset(("script", "style", "head", "title", "noscript", "xml", "template"))
_VOID = frozenset(
    "area base br col embed hr img input link meta param source track wbr basefont frame".split()
)
_KNOWN = _BLOCK | _SKIP | _VOID | frozenset(
    "html body a b i u s em strong span font small big sup sub strike tt code abbr "
    "caption center colgroup label select option textarea button iframe object applet "
    "map nobr o:p st1:place center map marquee blink del ins mark q cite dfn kbd samp var "
    "picture video audio canvas svg nav main aside figure figcaption time v:shape meta".split()
)
_URL_ATTRS = ("href", "src", "action", "background", "data", "codebase", "lowsrc", "formaction")
_WHITES = frozenset(("white", "#fff", "#ffffff", "#fefefe", "#fdfdfd", "rgb(255,255,255)"))
_MAX_TOKENS = 100_000


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in _ATTR.finditer(text):
        value = m.group(2) or ""
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        name = m.group(1).lower()
        if name not in out:
            out[name] = _html.unescape(value) if "&" in value else value
    return out


def _colour(value: str) -> str:
    colour = value.strip().lower().replace(" ", "").rstrip(";")
    if colour in _WHITES:
        return "#ffffff"
    if len(colour) == 4 and colour.startswith("#"):
        return "#" + "".join(c * 2 for c in colour[1:])
    return colour


def _px(value: str) -> float | None:
    m = re.match(r"\s*([0-9.]+)\s*(px|pt|em|rem|%)?", value)
    if not m:
        return None
    try:
        number = float(m.group(1))
    except ValueError:
        return None
    unit = (m.group(2) or "px").lower()
    return {"px": number, "pt": number * 1.33, "em": number * 16, "rem": number * 16}.get(
        unit, number * 0.16
    )


@dataclass(slots=True)
class _Frame:
    tag: str
    hidden: bool
    tiny: bool
    colour: str
    background: str


def _frame_for(tag: str, attrs: dict[str, str], parent: _Frame, facts: HtmlFacts) -> _Frame:
    hidden, tiny = parent.hidden, parent.tiny
    colour, background = parent.colour, parent.background
    if "hidden" in attrs and tag not in ("input",):
        hidden = True
    if tag == "font":
        facts.font_color_tags += "color" in attrs
        if "color" in attrs:
            colour = _colour(attrs["color"])
        size = attrs.get("size", "").strip()
        if size in ("0", "1", "-3", "-4"):
            tiny = True
    if "bgcolor" in attrs:
        background = _colour(attrs["bgcolor"])
        facts.bgcolor_set = True
    style = attrs.get("style")
    if style:
        for m in _STYLE_PROP.finditer(style):
            prop, value = m.group(1).lower(), m.group(2).strip().lower()
            if prop == "display" and value.startswith("none"):
                hidden = True
            elif prop == "visibility" and value.startswith("hidden"):
                hidden = True
            elif prop == "font-size":
                px = _px(value)
                if px is not None and px <= 2:
                    tiny = True
            elif prop == "color":
                colour = _colour(value)
            elif prop in ("background-color", "background"):
                background = _colour(value.split()[0]) if value.split() else background
                facts.bgcolor_set = True
            elif prop in ("max-height", "height") and value.startswith("0"):
                hidden = hidden or tag in ("div", "span", "p", "td", "table")
            elif prop == "opacity" and value.startswith("0") and not value.startswith("0."):
                hidden = True
    return _Frame(tag, hidden, tiny, colour, background)


def render_html(source: str, max_chars: int = 1_000_000) -> tuple[str, HtmlFacts]:
    """Render HTML to visible text (paragraphs separated by blank lines) and collect facts."""
    facts = HtmlFacts()
    if len(source) > max_chars:
        source = source[:max_chars]
        facts.truncated = True
    root = _Frame("#root", False, False, "", "")
    stack: list[_Frame] = [root]
    out: list[str] = []
    hidden_out: list[str] = []
    skip_depth = 0
    skip_tag = ""
    anchor_href: str | None = None
    anchor_text: list[str] = []
    pos = 0
    count = 0
    last_was_text_word = False

    def emit_text(chunk: str) -> None:
        nonlocal last_was_text_word
        if "&" in chunk:
            chunk = _html.unescape(chunk)
        frame = stack[-1]
        stripped = chunk.strip()
        if not stripped:
            out.append(" ")
            return
        n = len(stripped)
        # Mail clients paint an unset background white.
        invisible = frame.hidden or (
            frame.colour != "" and frame.colour == (frame.background or "#ffffff")
        )
        if invisible:
            facts.hidden_chars += n
            hidden_out.append(stripped)
            return
        if frame.tiny:
            facts.tiny_chars += n
        facts.visible_chars += n
        out.append(chunk)
        if anchor_href is not None:
            anchor_text.append(chunk)
        last_was_text_word = chunk[-1:].isalnum()

    for m in _TOKEN.finditer(source):
        count += 1
        if count > _MAX_TOKENS:
            facts.truncated = True
            break
        start = m.start()
        if start > pos and not skip_depth:
            emit_text(source[pos:start])
        pos = m.end()
        token = m.group(0)
        name = m.group(1)
        if name is None:
            if token.startswith("<!--"):
                after = source[pos : pos + 1]
                if last_was_text_word and after.isalnum():
                    facts.comments_in_words += 1
            continue
        tag = name.lower()
        facts.tags += 1
        closing = token[1] == "/"
        if tag not in _KNOWN:
            facts.unknown_tags += 1
        if skip_depth:
            if closing and tag == skip_tag:
                skip_depth -= 1
            elif not closing and tag == skip_tag:
                skip_depth += 1
            if tag == "title" and closing:
                facts.has_title = True
            continue
        if closing:
            if tag == "a" and anchor_href is not None:
                facts.links.append(HtmlLink(anchor_href, _WS.sub(" ", "".join(anchor_text)).strip()))
                anchor_href = None
                anchor_text = []
            for i in range(len(stack) - 1, 0, -1):
                if stack[i].tag == tag:
                    del stack[i:]
                    break
            if tag in _BLOCK:
                out.append("\n\n" if tag in ("p", "div", "table", "blockquote", "h1", "h2", "h3") else "\n")
            continue
        attrs = _attrs(m.group(2) or "") if m.group(2) else {}
        for key in _URL_ATTRS:
            if key in attrs and attrs[key].strip():
                facts.urls.append(attrs[key].strip())
        if tag in _SKIP:
            if tag == "head":
                facts.has_head = True
                continue  # head content is skipped by its children (title/style/script)
            if tag == "title":
                end = source.lower().find("</title", pos)
                facts.title = _WS.sub(" ", _html.unescape(source[pos : end if end >= 0 else pos])).strip()
            if tag not in _VOID and not token.endswith("/>"):
                skip_depth, skip_tag = 1, tag
            if tag == "script":
                facts.scripts += 1
            continue
        if tag == "img":
            facts.images += 1
            try:
                w = int(re.sub(r"\D", "", attrs.get("width", "")) or 0)
                h = int(re.sub(r"\D", "", attrs.get("height", "")) or 0)
            except ValueError:
                w = h = 0
            facts.image_area += min(w, 5000) * min(h, 5000)
            alt = attrs.get("alt", "").strip()
            if alt and anchor_href is not None:
                anchor_text.append(alt)
        elif tag == "a":
            if anchor_href is not None:
                facts.links.append(HtmlLink(anchor_href, _WS.sub(" ", "".join(anchor_text)).strip()))
            anchor_href = attrs.get("href", "").strip()
            anchor_text = []
        elif tag == "form":
            facts.forms += 1
        elif tag == "input":
            if attrs.get("type", "").lower() == "password":
                facts.password_inputs += 1
        elif tag == "iframe":
            facts.iframes += 1
        elif tag in ("object", "embed", "applet"):
            facts.objects += 1
        elif tag == "meta":
            if attrs.get("http-equiv", "").lower() == "refresh":
                facts.meta_refresh = True
        elif tag == "base":
            facts.base_href = attrs.get("href", "")
        elif tag == "body":
            if "bgcolor" in attrs:
                facts.bgcolor_set = True
                root.background = _colour(attrs["bgcolor"])
        if tag in _BLOCK:
            out.append("\n\n" if tag in ("p", "div", "table", "blockquote", "h1", "h2", "h3") else "\n")
        if tag not in _VOID and not token.endswith("/>"):
            stack.append(_frame_for(tag, attrs, stack[-1], facts))
            if len(stack) > 512:  # unclosed-tag bombs: keep the innermost state, cap memory
                del stack[1:256]
    if pos < len(source) and not skip_depth:
        emit_text(source[pos:])
    if anchor_href is not None:
        facts.links.append(HtmlLink(anchor_href, _WS.sub(" ", "".join(anchor_text)).strip()))
    facts.hidden_text = " ".join(hidden_out)[:10_000]
    text = "".join(out)
    return text, facts
