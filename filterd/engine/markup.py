"""Marking a message up the way SpamAssassin does, so existing sieve/procmail rules keep working.

X-Spam-Checker-Version, X-Spam-Flag (spam), X-Spam-Level, X-Spam-Status, X-Spam-Report (spam with
report_safe 0) go at the top of the header block; with report_safe 1 or 2 spam is wrapped in a
new message that carries the report and the original, byte for byte, as an attachment. Existing
X-Spam-* headers are dropped first (they are never trusted), but for X-Spam-Prev-*, which
SpamAssassin keeps. Nothing taken from the message or the configuration can put a CR or LF into
a header we write: values are cleaned, folded by us, and non-ASCII is RFC 2047-encoded.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from email.header import Header
from email.utils import formatdate

from filterd import __version__
from filterd.engine.engine import Engine, Result
from filterd.engine.message import ParsedMessage
from filterd.engine.mime import content_params, split_header_block, split_multipart
from filterd.engine.textcodec import decode_header_value
from filterd.headerblock import split_header_fields
from filterd.net.hostname import fqdn

__all__ = [
    "MarkupOptions",
    "build_report",
    "format_score",
    "original_message",
    "process_message",
    "rewritten_subject",
    "spam_headers",
]

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class MarkupOptions:
    """Per-user choices that shape the output."""

    report_safe: int = 1
    rewrite_subject: str = ""
    hostname: str = ""
    contact: str = "the administrator of that system"

    @classmethod
    def from_engine(cls, engine: Engine, *, report_safe: int | None = None) -> MarkupOptions:
        s = engine.config.scoring
        return cls(
            report_safe=s.report_safe if report_safe is None else report_safe,
            rewrite_subject=s.rewrite_subject,
            hostname=s.report_hostname or fqdn(),
            contact=s.report_contact,
        )


def format_score(score: float, required: float, is_spam: bool) -> str:
    """%2.1f, except that ham never displays a score at or above the threshold."""
    shown = f"{score:.1f}"
    if not is_spam and float(shown) >= required:
        shown = f"{required - 0.1:.1f}"
    return shown


def _clean(text: str) -> str:
    """One line of header text: no control characters that could end the header."""
    return _CONTROL.sub(" ", text)


def _fold(name: str, value: str, newline: str) -> str:
    """Wrap `Name: value` at 79 columns after spaces or commas; continuation lines start with a tab."""
    value = _clean(value)
    if not value.isascii():
        value = Header(value, "utf-8", header_name=name).encode(linesep=newline, maxlinelen=78)
        return f"{name}: {value}{newline}"
    line = f"{name}: "
    lines: list[str] = []
    for token in re.findall(r"[^ ,]*[ ,]?", value):
        if not token:
            continue
        width = len(line.expandtabs(8))
        if width + len(token.rstrip()) > 79 and line.strip() and not line.endswith(": "):
            lines.append(line.rstrip())
            line = "\t"
        line += token
    lines.append(line.rstrip() if line.strip() else line)
    return newline.join(lines) + newline


def _report_lines(engine: Engine, result: Result) -> list[str]:
    """`* score RULE area description` lines, plus detail lines."""
    out: list[str] = []
    for hit in sorted(result.hits, key=lambda h: (-(h.score or 0), h.rule)):
        info = engine.info(hit.rule)
        score = hit.score or 0.0
        shown = f"{score:4.0f}" if abs(score) >= 10 else f"{score:4.1f}"
        describe = info.describe if info else "No description available."
        area = info.area if info else ""
        out.append(f"* {shown} {hit.rule} {area}{_clean(describe)}")
        if hit.detail:
            out.append(f"*      [{_clean(hit.detail)[:200]}]")
    # Header text must be ASCII; details can quote the message.
    return [line.encode("ascii", "replace").decode("ascii") for line in out]


def spam_headers(engine: Engine, result: Result, options: MarkupOptions, newline: str = "\n") -> str:
    """The X-Spam-* header lines for this result, folded, with the given line ending."""
    yes = result.is_spam
    score = format_score(result.score, result.required_score, yes)
    tests = ",".join(h.rule for h in result.hits) or "none"
    status = (
        f"{'Yes' if yes else 'No'}, score={score} required={result.required_score:.1f} "
        f"tests={tests} autolearn={result.autolearn} version={__version__}"
    )
    stars = "*" * min(50, max(0, int(result.score)))
    # Headers the checks asked for (Authentication-Results, ...) come first, as an MTA adds them.
    out = "".join(_fold(name, _clean(value), newline) for name, value in result.extra_headers)
    out += _fold("X-Spam-Checker-Version", f"filterd {__version__} on {options.hostname or fqdn()}", newline)
    if yes:
        out += f"X-Spam-Flag: YES{newline}"
    out += f"X-Spam-Level: {stars}{newline}"
    out += _fold("X-Spam-Status", status, newline)
    if yes and options.report_safe == 0:
        lines = _report_lines(engine, result)
        out += "X-Spam-Report: " + newline + "".join(f"\t{line}{newline}" for line in lines)
        if not lines:
            out = out[: -len(newline)] if out.endswith(newline + newline) else out
    return out


def build_report(engine: Engine, result: Result, options: MarkupOptions) -> str:
    """The human report (spamd REPORT body): LF line ends, ends with exactly two newlines."""
    msg = result.message
    preview = re.sub(r"\s+", " ", msg.rendered_text).strip()[:200]
    score = format_score(result.score, result.required_score, result.is_spam)
    lines = [
        f'Spam detection software, running on the system "{options.hostname or fqdn()}",',
        "has identified this incoming email as possible spam."
        if result.is_spam
        else "has checked this incoming email and did not find it to be spam.",
        "The original message has been attached to this so you can view it or label",
        f"similar future email. If you have any questions, see {options.contact} for details.",
        "",
        f"Content preview:  {_clean(preview)}",
        "",
        f"Content analysis details:   ({score} points, {result.required_score:.1f} required)",
        "",
        " pts rule name              description",
        "---- ---------------------- --------------------------------------------------",
    ]
    for hit in sorted(result.hits, key=lambda h: (-(h.score or 0), h.rule)):
        info = engine.info(hit.rule)
        s = hit.score or 0.0
        shown = f"{s:4.0f}" if abs(s) >= 10 else f"{s:4.1f}"
        lines.append(f"{shown} {hit.rule:<22} {(info.area if info else '')}{info.describe if info else ''}")
        if hit.detail:
            lines.append(" " * 28 + f"[{_clean(hit.detail)[:200]}]")
    return "\n".join(lines).rstrip("\n") + "\n\n"


def _header_block_without_spam(raw_header_block: str) -> tuple[str, str]:
    """Split off a leading Return-Path field (it must stay first); the rest follows our headers."""
    if raw_header_block[:12].lower() == "return-path:":
        m = re.match(r"Return-Path:[^\n]*\n(?:[ \t][^\n]*\n)*", raw_header_block, re.I)
        if m:
            return m.group(0), raw_header_block[m.end() :]
    return "", raw_header_block


def process_message(engine: Engine, result: Result, options: MarkupOptions) -> bytes:
    """The message as it leaves the filter (spamd PROCESS): marked up, or wrapped when spam.

    A leading mbox ``From `` line goes back in front, as SpamAssassin's rewrite_mail does:
    procmail's ``:0fw | spamc`` hands it through and writes what comes back to the mbox.
    Wrapped, the original part is the input byte for byte; marked up, only the header fields
    change, and the empty line (or its absence) and the body stay as they came.
    """
    msg = result.message
    nl = msg.newline
    rewrite = bool(options.rewrite_subject) and result.is_spam
    if result.is_spam and options.report_safe in (1, 2):
        header_block = msg.header_block
        if rewrite:
            header_block = _rewrite_subject(header_block, options.rewrite_subject, nl)
        return _mbox_separator(msg) + _wrap(engine, result, options, header_block)
    header_block = _with_prev_fields(msg).decode("ascii", "surrogateescape")
    if rewrite:
        header_block = _rewrite_subject(header_block, options.rewrite_subject, nl)
    first, rest = _header_block_without_spam(header_block)
    added = spam_headers(engine, result, options, nl)
    head = (first + added + rest).encode("ascii", "surrogateescape")
    return _mbox_separator(msg) + head + msg.separator + msg.body_raw


def _with_prev_fields(msg: ParsedMessage) -> bytes:
    """``msg.header_block`` with the input's X-Spam-Prev-* fields back where they were:
    SpamAssassin drops the other X-Spam-* fields and keeps those (the Subject before an
    earlier rewrite). The header block is what the caller leaves of the input's fields (it may
    have removed some), so the input's fields are matched against it in order."""
    block = msg.header_block.encode("ascii", "surrogateescape")
    out: list[bytes] = []
    pos = 0
    for name, raw in split_header_fields(msg.pristine[: msg.header_end]).fields:
        lower = name.lower()
        if not raw.endswith(b"\n"):  # the last line of a message that is only headers: the
            raw += b"\n"  # parser gave it this newline in the header block too
        if lower.startswith(b"x-spam-prev-"):
            out.append(raw)
        elif not lower.startswith(b"x-spam-") and block.startswith(raw, pos):
            out.append(raw)
            pos += len(raw)
    out.append(block[pos:])
    return b"".join(out)


def _mbox_separator(msg: ParsedMessage) -> bytes:
    """The mbox ``From `` line the parser set aside, byte for byte with its own line end; or b"".

    Taken from the input rather than ``msg.mbox_from``, which has lost its CR. A separator with
    no line end at all (the input is nothing else) gets the message's, so headers cannot join it.
    """
    data = msg.original
    if not data.startswith(b"From "):  # the parser's own test
        return b""
    end = data.find(b"\n")
    return data + msg.newline.encode() if end < 0 else data[: end + 1]


def rewritten_subject(old: str | None, prefix: str) -> tuple[str, str | None] | None:
    """The Subject of spam with ``prefix`` in front, and the Subject it replaces (for
    X-Spam-Prev-Subject; None when there was none); None when it starts with the prefix already
    (a message scanned twice is tagged once). spamd's PROCESS and the milter both use this.

    ``old`` is the raw value and stays as it was behind the prefix; a non-ASCII prefix goes in
    RFC 2047-encoded, so the new value is a valid header whatever the prefix."""
    prefix = _clean(prefix)
    tag = _encoded_words(prefix)
    if old is None:
        return tag, None
    if old.lstrip().startswith((prefix, tag)) or decode_header_value(old).lstrip().startswith(prefix):
        return None
    if tag != prefix and old.lstrip().startswith("=?"):
        # Blanks between two encoded words vanish when decoded: the space goes inside.
        tag = _encoded_words(prefix + " ")
    return f"{tag} {old}", old


def _encoded_words(text: str) -> str:
    """``text`` itself when ASCII, else RFC 2047 encoded words on one line, blank-separated."""
    if text.isascii():
        return text
    return " ".join(Header(text, "utf-8").encode().split())


def _host(name: str) -> str:
    """A host name for a Received field: one line of ASCII (IDNA when it can be)."""
    name = _clean(name).strip()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name.encode("ascii", "replace").decode("ascii")


def _rewrite_subject(header_block: str, prefix: str, nl: str) -> str:
    m = re.search(r"^Subject:[ \t]?([^\n]*(?:\n[ \t][^\n]*)*)\n", header_block, re.I | re.M)
    rewritten = rewritten_subject(m.group(1).rstrip("\r") if m else None, prefix)
    if rewritten is None:
        return header_block
    new, old = rewritten
    if m is None:
        return header_block + f"Subject: {new}{nl}"
    return header_block[: m.start()] + f"Subject: {new}{nl}X-Spam-Prev-Subject: {old}{nl}" + header_block[m.end() :]


def _wrap(engine: Engine, result: Result, options: MarkupOptions, header_block: str) -> bytes:
    msg = result.message
    nl = msg.newline
    original = msg.pristine  # SpamAssassin's get_pristine: X-Spam-* fields and all
    boundary = f"----------=_{int(time.time()):08X}.{os.urandom(4).hex().upper()}"
    while b"--" + boundary.encode() in original:
        boundary += "/" + os.urandom(4).hex().upper()
    copied = []
    for name in ("From", "To", "Cc", "Subject", "Date", "Message-Id"):
        m = re.search(rf"^{name}:[^\n]*\n(?:[ \t][^\n]*\n)*", header_block, re.I | re.M)
        if m:
            copied.append(m.group(0).replace("\r\n", "\n").replace("\n", nl))
    lines = [
        f"Received: from localhost by {_host(options.hostname or fqdn())}{nl}"
        f"\twith filterd (version {__version__});{nl}\t{formatdate(localtime=True)}{nl}",
        *copied,
        spam_headers(engine, result, options, nl),
        f"MIME-Version: 1.0{nl}",
        f'Content-Type: multipart/mixed; boundary="{boundary}"{nl}',
        nl,
        f"This is a multi-part message in MIME format.{nl}{nl}",
        f"--{boundary}{nl}",
        f"Content-Type: text/plain; charset=UTF-8{nl}Content-Disposition: inline{nl}"
        f"Content-Transfer-Encoding: 8bit{nl}{nl}",
    ]
    report = build_report(engine, result, options).replace("\n", nl)
    original_type = msg.get("content-type", "text/plain").split(";")[0].strip().lower() or "text/plain"
    disposition = "inline" if original_type == "text/plain" else "attachment"
    if options.report_safe == 2:
        part_head = f"Content-Type: text/plain; x-spam-type=original{nl}"
    else:
        part_head = f"Content-Type: message/rfc822; x-spam-type=original{nl}"
    part_head += (
        f"Content-Description: original message before filterd{nl}"
        f"Content-Disposition: {disposition}{nl}Content-Transfer-Encoding: 8bit{nl}{nl}"
    )
    head = "".join(lines).encode("ascii", "surrogateescape") + report.encode("utf-8")
    tail = f"{nl}--{boundary}{nl}{part_head}".encode()
    return head + tail + original + f"{nl}--{boundary}--{nl}{nl}".encode()


def original_message(raw: bytes) -> bytes:
    """Undo report_safe wrapping (ours or SpamAssassin's): the part marked x-spam-type=original.

    Learning from a message a user drags to Junk must learn what the sender sent, not our report.
    Anything else comes back as it is (X-Spam-* headers are ignored by the parser anyway).
    """
    if b"x-spam-type=original" not in raw:
        return raw
    top = split_header_block(raw[raw.find(b"\n") + 1 :] if raw.startswith(b"From ") else raw)
    ctype = next((f.value for f in top.fields if f.name.lower() == "content-type"), "")
    kind, params = content_params(ctype)
    if not kind.startswith("multipart/") or not params.get("boundary"):
        return raw
    for chunk in split_multipart(top.body, params["boundary"], []):
        part = split_header_block(chunk)
        part_type = next((f.value for f in part.fields if f.name.lower() == "content-type"), "")
        if content_params(part_type)[1].get("x-spam-type", "").lower() == "original":
            return part.body
    return raw
