"""HTML to visible text, plus the facts spammers' HTML tricks leave behind.

The document is parsed by lexbor (through selectolax), which repairs broken HTML the way
browsers and mail clients do, in C. Python only visits the few elements that matter: those
with a style, colour or hidden attribute (to drop invisible text and count tiny text), links,
images, forms and active content. Paragraph structure survives text extraction because a form
feed (HTML whitespace that no mail contains and the parser keeps) is put before every
block-level tag first; the text is then cut into paragraphs at the form feeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser, LexborNode

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
    hidden_chars: int = 0  # display:none, visibility:hidden, text coloured like its background
    tiny_chars: int = 0  # font-size <= 2px, <font size=1>
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
    unknown_tags: int = 0  # tags no mail client knows (<xyzzy>): word splitters, parser confusers
    font_color_tags: int = 0
    bgcolor_set: bool = False
    has_head: bool = False
    title: str = ""
    base_href: str = ""
    truncated: bool = False


_BLOCK_TAG = re.compile(
    r"<(?=/?(?:p|div|br|tr|li|ul|ol|h[1-6]|table|blockquote|pre|hr|dl|dt|dd|form|center|"
    r"section|article|header|footer|address|td|th)\b)",
    re.I,
)
_COMMENT = re.compile(r"<!--.{0,200}?-->", re.S)
_TAG_NAME = re.compile(r"<([A-Za-z][A-Za-z0-9]*)")
_KNOWN_TAGS = frozenset(
    [
        "html",
        "head",
        "body",
        "title",
        "meta",
        "link",
        "style",
        "script",
        "noscript",
        "base",
        "p",
        "div",
        "span",
        "br",
        "hr",
        "a",
        "img",
        "table",
        "tr",
        "td",
        "th",
        "tbody",
        "thead",
        "tfoot",
        "caption",
        "col",
        "colgroup",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "b",
        "i",
        "u",
        "s",
        "em",
        "strong",
        "small",
        "big",
        "sup",
        "sub",
        "strike",
        "tt",
        "code",
        "pre",
        "blockquote",
        "center",
        "font",
        "form",
        "input",
        "select",
        "option",
        "textarea",
        "button",
        "label",
        "iframe",
        "frame",
        "frameset",
        "object",
        "embed",
        "applet",
        "param",
        "map",
        "area",
        "abbr",
        "cite",
        "q",
        "address",
        "article",
        "section",
        "header",
        "footer",
        "nav",
        "main",
        "aside",
        "figure",
        "figcaption",
        "time",
        "mark",
        "del",
        "ins",
        "picture",
        "source",
        "video",
        "audio",
        "canvas",
        "svg",
        "wbr",
        "nobr",
        "marquee",
        "blink",
        "o",
        "xml",
        "v",
        "w",
        "st1",
        "template",
        "basefont",
        "bdo",
        "dfn",
        "kbd",
        "samp",
        "var",
        "legend",
        "fieldset",
        "optgroup",
        "details",
        "summary",
    ]
)
_STYLE_PROP = re.compile(r"([a-z-]+)\s*:\s*([^;]+)", re.I)
_WS = re.compile(r"[ \t\r\n\u00a0]+")
_WHITES = frozenset(("white", "#fff", "#ffffff", "#fefefe", "#fdfdfd", "rgb(255,255,255)"))
_URL_ATTRS = ("href", "src", "action", "background", "data", "codebase", "lowsrc", "formaction")
_SELECT_STYLED = "[style],[hidden],font,[bgcolor]"
_SELECT_ACTIVE = "a,img,form,input,iframe,frame,object,embed,applet,meta,base,area,[background],[src]"


def _colour(value: str) -> str:
    colour = value.strip().lower().replace(" ", "").rstrip(";").strip("'\"")
    if colour in _WHITES:
        return "#ffffff"
    if len(colour) == 4 and colour.startswith("#"):
        return "#" + "".join(c * 2 for c in colour[1:])
    return colour


def _px(value: str) -> float | None:
    m = re.match(r"\s*([0-9]*\.?[0-9]+)\s*(px|pt|em|rem|%)?", value)
    if not m:
        return None
    number = float(m.group(1))
    unit = (m.group(2) or "px").lower()
    return {"px": number, "pt": number * 1.33, "em": number * 16, "rem": number * 16}.get(unit, number * 0.16)


def _style(style: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2).strip().lower() for m in _STYLE_PROP.finditer(style)}


def _background(node: LexborNode | None) -> str:
    """The nearest background colour set on the node or an ancestor ("" if none)."""
    depth = 0
    while node is not None and depth < 64:
        attrs = node.attributes
        if attrs.get("bgcolor"):
            return _colour(attrs["bgcolor"] or "")
        style = attrs.get("style")
        if style and "background" in style.lower():
            props = _style(style)
            value = props.get("background-color") or props.get("background", "")
            if value.split():
                return _colour(value.split()[0])
        node = node.parent
        depth += 1
    return ""


def _is_hidden(node: LexborNode, attrs: dict[str, str | None], props: dict[str, str], any_bg: bool) -> bool:
    """``any_bg``: some element before this one set a background (else it is white)."""
    if "hidden" in attrs and node.tag != "input":
        return True
    if props.get("display", "").startswith("none") or props.get("visibility", "").startswith("hidden"):
        return True
    opacity = props.get("opacity", "")
    if opacity and opacity.replace(".", "").strip("0") == "":
        return True
    size = props.get("font-size")
    if size is not None:
        px = _px(size)
        if px is not None and px <= 0.5:
            return True
    colour = props.get("color") or ((attrs.get("color") or "") if node.tag == "font" else "")
    if colour:
        colour = _colour(colour)
        # Mail clients paint an unset background white.
        if not any_bg:
            return colour == "#ffffff"
        return colour == (_background(node) or "#ffffff")
    return False


def _is_tiny(node: LexborNode, attrs: dict[str, str | None], props: dict[str, str]) -> bool:
    if node.tag == "font" and (attrs.get("size") or "").strip() in ("0", "1", "-3", "-4"):
        return True
    size = props.get("font-size")
    if size is None:
        return False
    px = _px(size)
    return px is not None and px <= 2


def _inside(node: LexborNode, ids: set[int]) -> bool:
    if not ids:
        return False
    parent = node.parent
    depth = 0
    while parent is not None and depth < 256:
        if parent.mem_id in ids:
            return True
        parent = parent.parent
        depth += 1
    return False


def _int_attr(node: LexborNode, name: str) -> int:
    digits = re.sub(r"\D", "", node.attributes.get(name) or "")[:6]
    return min(int(digits), 5000) if digits else 0


def render_html(source: str, max_chars: int = 1_000_000) -> tuple[str, HtmlFacts]:
    """Render HTML to visible text (paragraphs separated by blank lines) and collect facts."""
    facts = HtmlFacts()
    if len(source) > max_chars:
        source = source[:max_chars]
        facts.truncated = True
    if "<!--" in source:
        facts.comments_in_words = sum(
            1
            for m in _COMMENT.finditer(source)
            if source[m.start() - 1 : m.start()].isalpha() and source[m.end() : m.end() + 1].isalpha()
        )
    names = _TAG_NAME.findall(source)
    facts.tags = len(names)
    facts.unknown_tags = sum(1 for n in names if n.lower() not in _KNOWN_TAGS)
    marked = _BLOCK_TAG.sub("\f<", source.replace("\f", " "))
    tree = LexborHTMLParser(marked)
    head = tree.head
    if head is not None and head.child is not None:
        facts.has_head = True
        title = tree.css_first("title")
        if title is not None:
            facts.title = _WS.sub(" ", title.text() or "").strip()
    facts.scripts = len(tree.css("script"))
    tree.strip_tags(["script", "style", "noscript", "template", "title", "xml"])
    root = tree.body or tree.root
    if root is None:
        return "", facts

    hidden_parts: list[str] = []
    hidden_nodes: list[LexborNode] = []
    hidden_ids: set[int] = set()
    seen: set[int] = set()
    for node in tree.css(_SELECT_STYLED):  # document order: ancestors come first
        if node.mem_id in seen:  # a node matching several selectors is listed again
            continue
        seen.add(node.mem_id)
        attrs = node.attributes
        if node.tag == "font" and "color" in attrs:
            facts.font_color_tags += 1
        if _inside(node, hidden_ids):
            continue
        style = attrs.get("style")
        props = _style(style) if style else {}
        if "bgcolor" in attrs or "background" in (style or "").lower():
            facts.bgcolor_set = True
        if _is_hidden(node, attrs, props, facts.bgcolor_set):
            hidden_nodes.append(node)
            hidden_ids.add(node.mem_id)
            continue
        if _is_tiny(node, attrs, props):
            facts.tiny_chars += len((node.text() or "").strip())
    # Only outermost hidden elements are removed: freeing a node frees its subtree.
    for node in hidden_nodes:
        text = _WS.sub(" ", (node.text(separator=" ") or "").replace("\f", " ")).strip()
        if text:
            facts.hidden_chars += len(text)
            hidden_parts.append(text)
        node.decompose()

    seen.clear()
    for node in tree.css(_SELECT_ACTIVE):
        if node.mem_id in seen:
            continue
        seen.add(node.mem_id)
        tag = node.tag
        attrs = node.attributes
        for key in _URL_ATTRS:
            value = attrs.get(key)
            if value and value.strip():
                facts.urls.append(value.strip())
        if tag == "a":
            href = attrs.get("href")
            if href is not None:
                text = node.text(separator=" ") or ""
                if not text.strip():
                    alts = [i.attributes.get("alt") or "" for i in node.css("img")]
                    text = " ".join(a for a in alts if a)
                facts.links.append(HtmlLink(href.strip(), _WS.sub(" ", text.replace("\f", " ")).strip()))
        elif tag == "img":
            facts.images += 1
            facts.image_area += _int_attr(node, "width") * _int_attr(node, "height")
        elif tag == "form":
            facts.forms += 1
        elif tag == "input":
            if (attrs.get("type") or "").lower() == "password":
                facts.password_inputs += 1
        elif tag in ("iframe", "frame"):
            facts.iframes += 1
        elif tag in ("object", "embed", "applet"):
            facts.objects += 1
        elif tag == "meta":
            if (attrs.get("http-equiv") or "").lower() == "refresh":
                facts.meta_refresh = True
                content = attrs.get("content") or ""
                if "url=" in content.lower():
                    facts.urls.append(content[content.lower().index("url=") + 4 :].strip("'\" "))
        elif tag == "base":
            facts.base_href = attrs.get("href") or ""

    text = root.text(separator="") or ""
    paragraphs = [p.strip() for p in _WS.sub(" ", text).split("\f")]
    visible = "\n\n".join(p for p in paragraphs if p)
    facts.visible_chars = len(visible) - visible.count("\n")
    facts.hidden_text = " ".join(hidden_parts)[:10_000]
    return visible, facts
