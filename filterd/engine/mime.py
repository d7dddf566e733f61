"""A small, total MIME parser over bytes: header fields, the part tree, decoded payloads.

Why not the email package: its feed parser walks the message line by line in Python, which
cost more than half of a whole scan's budget on the reference corpus. Here header blocks are
split with bytes operations, multipart bodies are cut at their boundaries with `bytes.find`,
and transfer encodings are undone by binascii. Every oddity becomes a named problem instead of
an exception: any bytes give a result.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from filterd.engine.textcodec import decode_bytes, decode_header_value
from filterd.headerblock import header_block_bounds, split_header_fields

__all__ = ["MimeLeaf", "RawField", "content_params", "split_header_block", "split_multipart", "walk_mime"]

_MAX_HEADERS = 2001  # fields kept (the line loop this replaced checked 2000 finished ones before each new one)
_MAX_PARTS = 500
_MAX_DEPTH = 30


@dataclass(frozen=True, slots=True)
class RawField:
    name: str
    value: str  # raw value, folds kept, 8-bit bytes as surrogate escapes
    raw: bytes  # the whole field as it appeared, line ends included


@dataclass(slots=True)
class HeaderBlock:
    fields: list[RawField]
    body: bytes  # what the MIME walk reads: may lack the data's last newline (below)
    problems: list[str] = field(default_factory=list)
    fields_end: int = 0  # offsets into the data: the fields end here, the body starts at
    body_start: int = 0  # body_start; the bytes between are the empty line, if there was one


def split_header_block(data: bytes) -> HeaderBlock:
    """Split a header block into fields (`filterd.headerblock.split_header_fields`, at most
    `_MAX_HEADERS`) and return the body after the blank line. ``data[body_start:]`` is the body
    byte for byte; ``body`` is the text the parser reads."""
    split = split_header_fields(data, _MAX_HEADERS)
    found = split.fields
    problems: list[str] = []
    if found:
        if not found[0][0]:
            problems.append("header-starts-with-continuation")
        if found[-1][1][-1:] != b"\n":  # the data's last line, without its newline: given one
            found[-1] = (found[-1][0], found[-1][1] + b"\n")
    fields = [_raw_field(raw) for _, raw in found]
    body = data[split.body :]
    if split.cut:
        # Neither a field nor a fold: the header block ended without a blank line.
        problems.append("too-many-headers" if len(fields) >= _MAX_HEADERS else "no-header-body-separator")
        if body[-1:] == b"\n" and header_block_bounds(data)[0] == len(data):
            # The line loop this replaced lost a final newline here. Kept in the text the parser
            # reads, so rule texts and Bayes tokens stay as they were; the output, which must
            # not lose it, takes the body from body_start.
            body = body[:-1]
    return HeaderBlock(fields, body, problems, split.end, split.body)


def _raw_field(raw: bytes) -> RawField:
    colon = raw.find(b":")
    if colon < 0:
        return RawField("X-Broken-Header", raw.decode("ascii", "surrogateescape").strip(), raw)
    name = raw[:colon].strip().decode("ascii", "replace")
    value = raw[colon + 1 :].decode("ascii", "surrogateescape")
    if value[:1] == " ":
        value = value[1:]
    return RawField(name, value.rstrip("\r\n").replace("\r\n", "\n"), raw)


_PARAM = re.compile(r"""\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)""", re.S)


def content_params(value: str) -> tuple[str, dict[str, str]]:
    """Parse `type/subtype; a=b; c="d"` into (lower-case type, params). RFC 2231 values
    (`name*=utf-8''x`, `name*0=`...) are joined and decoded."""
    if "\n" in value or "\r" in value:  # unfold only: boundaries must keep their raw bytes
        value = " ".join(value.split())
    head, _, rest = value.partition(";")
    ctype = head.strip().lower()
    params: dict[str, str] = {}
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for m in _PARAM.finditer(rest):
        key, raw = m.group(1).lower(), m.group(2).strip()
        if raw.startswith('"'):
            raw = raw[1:-1] if raw.endswith('"') and len(raw) > 1 else raw[1:]
            raw = raw.replace('\\"', '"').replace("\\\\", "\\")
        if "*" in key:
            base, _, index = key.partition("*")
            encoded = index.endswith("*") or index == ""
            number = index.rstrip("*")
            continued.setdefault(base, []).append((int(number) if number.isdigit() else 0, raw, encoded))
        elif key not in params:
            params[key] = raw
    for base, pieces in continued.items():
        pieces.sort()
        first_encoded = pieces[0][2]
        charset = ""
        chunks: list[bytes] = []
        for i, (_, raw, encoded) in enumerate(pieces):
            if i == 0 and first_encoded and raw.count("'") >= 2:
                charset, _, raw = raw.split("'", 2)[0], "", raw.split("'", 2)[2]
            chunks.append(unquote_to_bytes(raw) if encoded else raw.encode("utf-8", "surrogateescape"))
        params[base] = str(decode_bytes(b"".join(chunks), charset or "utf-8"))
    return ctype, params


@dataclass(slots=True)
class MimeLeaf:
    """A leaf of the MIME tree with its decoded payload."""

    path: str
    content_type: str
    params: dict[str, str]
    disposition: str
    filename: str
    encoding: str
    payload: bytes
    headers: list[RawField]


def _get(fields: list[RawField], name: str) -> str:
    for f in fields:
        if f.name.lower() == name:
            return f.value
    return ""


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_BASE64_JUNK = re.compile(rb"[^\sA-Za-z0-9+/=]")


def _decode_payload(body: bytes, encoding: str, problems: list[str]) -> bytes:
    if encoding == "base64":
        cleaned = _NOT_BASE64.sub(b"", body)
        if _BASE64_JUNK.search(body) is not None:
            problems.append("bad-base64")
        extra = len(cleaned) % 4
        if extra == 1:
            problems.append("bad-base64")
            cleaned = cleaned[:-1]
        cleaned += b"=" * (-len(cleaned) % 4)
        try:
            return binascii.a2b_base64(cleaned)
        except (binascii.Error, ValueError):
            problems.append("bad-base64")
            return b""
    if encoding == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):
            problems.append("bad-quoted-printable")
            return body
    if encoding not in ("", "7bit", "8bit", "binary"):
        if encoding in ("x-uuencode", "uuencode", "x-uue"):
            return _uudecode(body)
        problems.append("unknown-transfer-encoding")
    return body


def _uudecode(body: bytes) -> bytes:
    out: list[bytes] = []
    started = False
    for line in body.splitlines():
        if not started:
            started = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            break
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            continue
    return b"".join(out)


def split_multipart(body: bytes, boundary: str, problems: list[str]) -> list[bytes]:
    """Cut a multipart body at its delimiter lines (`--boundary` at a line start)."""
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    parts: list[bytes] = []
    pos = 0
    starts: list[int] = []
    closed = False
    size = len(body)
    while True:
        i = body.find(delim, pos)
        if i < 0:
            break
        pos = i + len(delim)
        if i != 0 and body[i - 1 : i] != b"\n":
            continue
        after = body[pos : pos + 2]
        if after == b"--":
            starts.append(-i - 1)  # closing delimiter
            closed = True
            break
        if after[:1] not in (b"\r", b"\n", b" ", b"\t", b""):
            continue  # a longer boundary that merely starts like ours
        starts.append(i)
        if len(starts) > _MAX_PARTS:
            problems.append("too-many-parts")
            break
    if not starts or starts[0] < 0:
        problems.append("missing-boundary")
        return []
    if not closed:
        problems.append("missing-close-boundary")
    for n, start in enumerate(starts):
        if start < 0:
            break
        line_end = body.find(b"\n", start)
        content_start = size if line_end < 0 else line_end + 1
        at_delimiter = n + 1 < len(starts)
        if at_delimiter:
            nxt = starts[n + 1]
            end = (-nxt - 1) if nxt < 0 else nxt
        else:
            end = size
        chunk = body[content_start:end]
        # The line break before a delimiter belongs to the delimiter.
        if at_delimiter:
            if chunk.endswith(b"\r\n"):
                chunk = chunk[:-2]
            elif chunk.endswith(b"\n"):
                chunk = chunk[:-1]
        parts.append(chunk)
    return parts


def walk_mime(fields: list[RawField], body: bytes, problems: list[str]) -> list[MimeLeaf]:
    """Flatten the MIME tree under a header block into leaves (message/rfc822 is entered)."""
    leaves: list[MimeLeaf] = []
    _walk(fields, body, "", leaves, problems, 0, default_type="text/plain")
    return leaves


def _walk(
    fields: list[RawField],
    body: bytes,
    path: str,
    leaves: list[MimeLeaf],
    problems: list[str],
    depth: int,
    default_type: str,
) -> None:
    if len(leaves) >= _MAX_PARTS:
        return
    ctype_raw = _get(fields, "content-type")
    ctype, params = content_params(ctype_raw) if ctype_raw else (default_type, {})
    if "/" not in ctype:
        if ctype_raw:
            problems.append("bad-content-type")
        ctype = default_type
    encoding = _get(fields, "content-transfer-encoding").strip().lower()
    if ctype.startswith("multipart/") and depth < _MAX_DEPTH:
        boundary = params.get("boundary", "")
        if not boundary:
            problems.append("no-boundary-parameter")
        else:
            chunks = split_multipart(body, boundary, problems)
            if chunks:
                child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                for i, chunk in enumerate(chunks, 1):
                    sub = (
                        split_header_block(chunk)
                        if not chunk.startswith((b"\n", b"\r\n"))
                        else HeaderBlock([], chunk[1:] if chunk[:1] == b"\n" else chunk[2:])
                    )
                    problems.extend(p for p in sub.problems if p != "no-header-body-separator")
                    _walk(
                        sub.fields,
                        sub.body,
                        f"{path}.{i}" if path else str(i),
                        leaves,
                        problems,
                        depth + 1,
                        child_default,
                    )
                return
        # A multipart that cannot be split is scanned as text, like mail clients show it.
        ctype = "text/plain"
    if ctype == "message/rfc822" and depth < _MAX_DEPTH and encoding in ("", "7bit", "8bit", "binary"):
        inner = split_header_block(body)
        problems.extend(inner.problems)
        _walk(inner.fields, inner.body, f"{path}.1" if path else "1", leaves, problems, depth + 1, "text/plain")
        return
    disposition_raw = _get(fields, "content-disposition")
    disposition, dparams = content_params(disposition_raw) if disposition_raw else ("", {})
    filename = dparams.get("filename") or params.get("name") or ""
    if filename and ("=?" in filename or not filename.isascii()):
        filename = decode_header_value(filename)
    payload = _decode_payload(body, encoding, problems)
    leaves.append(MimeLeaf(path or "1", ctype, params, disposition, filename, encoding, payload, fields))
