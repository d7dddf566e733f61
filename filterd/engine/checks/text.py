"""Counting over the visible text: shouting, punctuation runs, money signs, and characters
put inside words to hide them from filters (zero-width characters, letters from other
scripts that look Latin).

Counts use `bytes.translate` / `str.count`, which run in C over the whole text in a few
microseconds; the one regex here runs only when the text has non-ASCII characters at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage

__all__ = ["TextCheck"]

_ALL = bytes(range(256))
_NOT_UPPER = bytes(b for b in range(256) if not 65 <= b <= 90)
_NOT_LETTER = bytes(b for b in range(256) if not (65 <= b <= 90 or 97 <= b <= 122))
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u180e"
_ZW_IN_WORD = re.compile(r"\w[\u200b\u200c\u200d\u2060\ufeff\u180e]+\w")
# A Latin letter next to a Cyrillic or Greek one inside a single word.
_MIXED_SCRIPT = re.compile(r"[A-Za-z][\u0370-\u03ff\u0400-\u04ff]|[\u0370-\u03ff\u0400-\u04ff][A-Za-z]")
_CYRILLIC_OR_GREEK = re.compile(r"[\u0370-\u03ff\u0400-\u04ff]")


class TextCheck:
    """Cheap counts over msg.body_text (Subject excluded)."""

    name: ClassVar[str] = "text"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = "body"
    emits: ClassVar[frozenset[str]] = frozenset(
        {
            "TEXT_CAPS_50",
            "TEXT_CAPS_70",
            "TEXT_EXCLAIM_MANY",
            "TEXT_EXCLAIM_RUNS",
            "TEXT_DOLLAR_MANY",
            "TEXT_ZERO_WIDTH_IN_WORD",
            "TEXT_MIXED_SCRIPT_WORD",
            "TEXT_EMPTY_BODY",
            "TEXT_SHORT_BODY",
        }
    )

    def __init__(self, setup: CheckSetup) -> None:
        self._setup = setup

    def run(self, scan: Scan) -> Sequence[Hit]:
        msg = scan.message
        text = msg.body_text
        if msg.subject:
            text = text.partition("\n")[2]
        hits: list[Hit] = []
        stripped_len = len(text.strip())
        if stripped_len == 0:
            if not msg.attachments:
                hits.append(Hit("TEXT_EMPTY_BODY"))
            return hits
        if stripped_len < 60 and not msg.attachments:
            hits.append(Hit("TEXT_SHORT_BODY", f"{stripped_len} chars"))
        raw = text.encode("ascii", "ignore")
        letters = len(raw.translate(None, _NOT_LETTER))
        if letters >= 200:
            upper = len(raw.translate(None, _NOT_UPPER))
            if upper * 10 >= letters * 7:
                hits.append(Hit("TEXT_CAPS_70", f"{100 * upper // letters}% capitals"))
            elif upper * 2 >= letters:
                hits.append(Hit("TEXT_CAPS_50", f"{100 * upper // letters}% capitals"))
        bangs = text.count("!")
        if bangs >= 10:
            hits.append(Hit("TEXT_EXCLAIM_MANY", f"{bangs} '!'", value=float(bangs)))
        if bangs >= 3:
            runs = text.count("!!!")
            if runs >= 3:
                hits.append(Hit("TEXT_EXCLAIM_RUNS", f"{runs} runs of '!!!'", value=float(runs)))
        dollars = text.count("$")
        if dollars >= 8:
            hits.append(Hit("TEXT_DOLLAR_MANY", f"{dollars} '$'", value=float(dollars)))
        if not text.isascii():
            if any(c in text for c in _ZERO_WIDTH):
                m = _ZW_IN_WORD.search(text)
                if m:
                    hits.append(Hit("TEXT_ZERO_WIDTH_IN_WORD", repr(m.group(0))))
            if _CYRILLIC_OR_GREEK.search(text):
                m = _MIXED_SCRIPT.search(text)
                if m:
                    hits.append(Hit("TEXT_MIXED_SCRIPT_WORD", repr(m.group(0))))
        return hits
