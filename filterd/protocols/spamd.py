"""SPAMC/SPAMD (protocol 1.5) server side, sans-IO: bytes in, one SpamdRequest out, bytes back.

Byte compatibility with spamd of SpamAssassin 4.0 is the point, because real clients are
picky: spamc ``sscanf``s ``Content-length: %d`` and ``Spam: %5s ; %20s / %20s``, and aiospamc
rejects a body one byte longer than Content-length. The layouts follow the protocol reference
(shared/reference/protocols.md §1) and, where it is silent, spamd's own code (spamd.raw).

One request per connection: the client writes a request (and half-closes), the server answers
once and closes. So the machine has no response side; ``render_*`` are pure functions.

Reading the request, as spamd does:

* request line ``METHOD SPAMC/<version>``, CRLF or bare LF;
* headers for CHECK-family methods when version > 1.0, always for TELL, for PING/SKIP only when
  version >= 1.5 (older PING/SKIP end at the request line);
* body: exactly Content-length bytes when given (the event is ready without waiting for EOF),
  else everything up to EOF; with ``Compress: zlib`` everything up to EOF, Content-length being
  the compressed length (bytes past it are dropped, as spamd does), inflated as it arrives under
  the same size cap (zip bombs).

``max_body_size`` is a *protocol* cap: bigger requests get ``EX_DATAERR`` and are not read. The
daemon's *scan* size limit is separate and lives in the daemon: a message received within this
cap but too big to scan is answered as spamc expects for an unscanned message (returned
unchanged), never refused here.

Deliberate differences from spamd; none changes anything for spamc or aiospamc: the method must
be exact and the version numeric (spamd matches unanchored regexes); header lines may end with a
bare LF too; for TELL, ``Message-class`` must be spam or ham (spamd meant to check this, but its
test can never fail); a zlib body shorter than Content-length is a length mismatch (spamd does
not compare); a broken zlib stream is EX_PROTOCOL (spamd: EX_UNAVAILABLE "zlib: <Perl error>").
"""

from __future__ import annotations

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_IOERR",
    "EX_NOHOST",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_OSERR",
    "EX_OSFILE",
    "EX_PROTOCOL",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_TIMEOUT",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "METHODS",
    "NEED_DATA",
    "NeedData",
    "SpamdRequest",
    "SpamdServerConnection",
    "SpamdState",
    "render_error",
    "render_pong",
    "render_response",
    "render_tell",
    "spam_header_value",
]

import enum
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from filterd.errors import LocalProtocolError, RemoteProtocolError
from filterd.protocols import NEED_DATA, NeedData
from filterd.protocols._buffer import ReceiveBuffer, strip_line_ending

# sysexits.h, plus SpamAssassin's own EX_TIMEOUT. spamd itself sends 0, 69, 76 and 79.
EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66
EX_NOUSER: Final = 67
EX_NOHOST: Final = 68
EX_UNAVAILABLE: Final = 69
EX_SOFTWARE: Final = 70
EX_OSERR: Final = 71
EX_OSFILE: Final = 72
EX_CANTCREAT: Final = 73
EX_IOERR: Final = 74
EX_TEMPFAIL: Final = 75
EX_PROTOCOL: Final = 76
EX_NOPERM: Final = 77
EX_CONFIG: Final = 78
EX_TIMEOUT: Final = 79

# Methods whose body is a message to scan, and those without a body.
_SCAN_METHODS: Final = frozenset({"CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS"})
_BODYLESS_METHODS: Final = frozenset({"PING", "SKIP"})
METHODS: Final = _SCAN_METHODS | _BODYLESS_METHODS | {"TELL"}

_REQUEST_LINE: Final = re.compile(r"([A-Z_]+) SPAMC/([0-9]+(?:\.[0-9]+)?)")
_DIGITS: Final = re.compile(rb"[0-9]*")
_TARGETS: Final = ("local", "remote")  # spamd's order in DidSet/DidRemove lists
_PERL_SPACE: Final = b" \t\r\n\f\v"  # what Perl's \s strips after "Name:"
# More digits than this cannot be a size we accept; checked before int() (which caps digits).
_MAX_LENGTH_DIGITS: Final = 18


def _length_value(digits: str) -> int:
    """Content-length digits (already checked) as a number; spamd reads an empty value as 0.

    Absurdly long values clamp to 10**18, beyond any cap, before int() could choke on them.
    """
    significant = digits.lstrip("0")
    return int(significant) if 0 < len(significant) <= _MAX_LENGTH_DIGITS else (10**18 if significant else 0)


def _text(raw: bytes) -> str:
    """Decode protocol bytes losslessly: UTF-8 where it is, surrogate escapes where it is not."""
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class SpamdRequest:
    """One complete request, as the client sent it (body inflated when it came compressed).

    Text fields are decoded as UTF-8 with surrogate escapes, so odd bytes survive a round trip.
    ``headers`` keeps every header as sent (last one wins), names case-sensitive as in spamd.
    ``content_length`` is the header's value: the compressed size for zlib bodies.
    ``message_class`` (lower-cased) and the targets are read for TELL only; a TELL with Set but
    no Message-class gives None, which spamd would learn as ham: the daemon decides.
    """

    method: str
    version: str
    headers: dict[str, str]
    body: bytes = field(repr=False)
    user: str | None
    compressed: bool
    message_class: str | None
    set_targets: frozenset[str]
    remove_targets: frozenset[str]
    content_length: int | None


class SpamdState(enum.Enum):
    """Where the request reader is. One request per connection, so DONE and ERROR are final."""

    REQUEST_LINE = "request line"
    HEADERS = "headers"
    BODY = "body"
    DONE = "done"
    ERROR = "error"


class _Step(enum.Enum):
    """What the peer's bytes amounted to; each moves the reader along _TRANSITIONS."""

    REQUEST_LINE_THEN_HEADERS = "request line, headers follow"
    REQUEST_LINE_ONLY = "request line of PING/SKIP before 1.5"
    REQUEST_LINE_THEN_BODY = "request line of a version <= 1.0 scan, body follows"
    HEADERS_THEN_BODY = "blank line, body follows"
    HEADERS_ONLY = "blank line ending PING/SKIP"
    BODY_COMPLETE = "body complete"
    PROTOCOL_ERROR = "protocol error"


# Every legal move, in one place. Anything else is a bug in this module (LocalProtocolError).
_TRANSITIONS: Final[Mapping[SpamdState, Mapping[_Step, SpamdState]]] = {
    SpamdState.REQUEST_LINE: {
        _Step.REQUEST_LINE_THEN_HEADERS: SpamdState.HEADERS,
        _Step.REQUEST_LINE_ONLY: SpamdState.DONE,
        _Step.REQUEST_LINE_THEN_BODY: SpamdState.BODY,
        _Step.PROTOCOL_ERROR: SpamdState.ERROR,
    },
    SpamdState.HEADERS: {
        _Step.HEADERS_THEN_BODY: SpamdState.BODY,
        _Step.HEADERS_ONLY: SpamdState.DONE,
        _Step.PROTOCOL_ERROR: SpamdState.ERROR,
    },
    SpamdState.BODY: {
        _Step.BODY_COMPLETE: SpamdState.DONE,
        _Step.PROTOCOL_ERROR: SpamdState.ERROR,
    },
    SpamdState.DONE: {},
    SpamdState.ERROR: {},
}


def _protocol_error(detail: str) -> RemoteProtocolError:
    """spamd's protocol_error(): EX_PROTOCOL, always worded "Bad header line: <detail>"."""
    message = f"Bad header line: {detail}"
    return RemoteProtocolError(message, reply=render_error(EX_PROTOCOL, message))


class SpamdServerConnection:
    """Reads one spamd request from bytes; see the module docstring for the rules.

    Loop: ``receive_data(chunk)`` (``b""`` once the peer closed or half-closed), then
    ``next_event()`` until it returns a SpamdRequest or raises RemoteProtocolError, whose
    ``reply`` is the exact error line to send before closing. Once DONE, further bytes are
    ignored (one request per connection) and ``next_event()`` keeps returning NEED_DATA.
    """

    def __init__(
        self,
        *,
        max_body_size: int = 64 * 1024 * 1024,
        max_header_lines: int = 255,
        max_line: int = 8192,
    ) -> None:
        if max_body_size < 0 or max_header_lines < 0 or max_line < 1:
            raise ValueError("caps must not be negative, and max_line must be at least 1")
        self._max_body_size = max_body_size
        self._max_header_lines = max_header_lines
        self._max_line = max_line
        self._state = SpamdState.REQUEST_LINE
        self._buffer = ReceiveBuffer()
        self._error: RemoteProtocolError | None = None
        self._method = ""
        self._version = ""
        self._headers: dict[str, str] = {}
        self._header_lines = 0
        # Body framing, settled at the end of the headers.
        self._content_length: int | None = None
        self._content_length_raw = ""
        self._inflater: zlib._Decompress | None = None
        self._inflated = bytearray()
        self._compressed_seen = 0

    @property
    def state(self) -> SpamdState:
        """Where the reader is; DONE once the request has been returned, ERROR after a refusal."""
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means it closed (or half-closed) its side."""
        # One request per connection: spamd never reads what follows.
        self._buffer.receive(data, keep=self._state not in (SpamdState.DONE, SpamdState.ERROR))

    def next_event(self) -> SpamdRequest | NeedData:
        """Return the request once it is complete, NEED_DATA before that (and after DONE)."""
        if self._state is SpamdState.ERROR:
            assert self._error is not None
            raise self._error
        try:
            return self._advance()
        except RemoteProtocolError as exc:
            self._error = exc
            self._move(_Step.PROTOCOL_ERROR)
            self._buffer.clear()
            self._inflated = bytearray()
            raise

    # -- the machine ---------------------------------------------------------------------

    def _move(self, step: _Step) -> None:
        try:
            self._state = _TRANSITIONS[self._state][step]
        except KeyError:
            raise LocalProtocolError(f"spamd reader: {step.value!r} is not legal in {self._state.value}") from None

    def _advance(self) -> SpamdRequest | NeedData:
        while True:
            if self._state is SpamdState.REQUEST_LINE:
                line = self._next_line()
                if line is None:
                    if self._buffer.closed:
                        raise _protocol_error("(closed before headers)")
                    return NEED_DATA
                if self._request_line(line):
                    return self._finish(b"")
            elif self._state is SpamdState.HEADERS:
                line = self._next_line()
                if line is None:
                    if self._buffer.closed:
                        raise _protocol_error("(EOF during headers)")
                    return NEED_DATA
                if line:
                    self._header_line(line)
                elif self._end_of_headers():
                    return self._finish(b"")
            elif self._state is SpamdState.BODY:
                body = self._read_body()
                if body is None:
                    return NEED_DATA
                self._move(_Step.BODY_COMPLETE)
                return self._finish(body)
            else:  # DONE
                return NEED_DATA

    def _next_line(self) -> bytes | None:
        """The next line without its ending; at EOF an unterminated rest counts, as with Perl."""
        try:
            line = self._buffer.take_line(self._max_line)
        except RemoteProtocolError:
            raise _protocol_error(f"(line longer than {self._max_line} bytes)") from None
        if line is None:
            if self._buffer.closed and self._buffer:
                return self._buffer.take_all()
            return None
        return strip_line_ending(line)

    def _request_line(self, line: bytes) -> bool:
        """Parse ``METHOD SPAMC/x.y``; True when the request ends right here (old PING/SKIP)."""
        text = _text(line)
        match = _REQUEST_LINE.fullmatch(text)
        if match is None or match[1] not in METHODS:
            raise _protocol_error(text)  # spamd echoes the whole line
        self._method, self._version = match[1], match[2]
        version = float(self._version)
        if self._method in _BODYLESS_METHODS and version < 1.5:
            self._move(_Step.REQUEST_LINE_ONLY)
            return True
        if self._method in _SCAN_METHODS and version <= 1.0:
            self._move(_Step.REQUEST_LINE_THEN_BODY)
            self._start_body()
            return False
        self._move(_Step.REQUEST_LINE_THEN_HEADERS)
        return False

    def _header_line(self, line: bytes) -> None:
        """One ``Name: value`` line; names are compared case-sensitively, unknown ones kept."""
        raw_name, colon, raw_value = line.partition(b":")
        if not colon:
            raise _protocol_error("(header not in 'Name: value' format)")
        raw_value = raw_value.lstrip(_PERL_SPACE)
        name, value = _text(raw_name), _text(raw_value)
        if name == "Content-length":
            if _DIGITS.fullmatch(raw_value) is None:
                raise _protocol_error("(Content-Length contains non-numeric bytes)")
        elif name == "User":
            if any(byte < 0x20 for byte in raw_value):
                raise _protocol_error("(User header contains control chars)")
        elif name == "Compress":
            # spamd takes any value mentioning zlib (`/zlib/i`); real clients send exactly "zlib".
            if "zlib" not in value.lower():
                raise _protocol_error("(compression type not supported)")
        elif name == "Message-class" and self._method == "TELL" and value.lower() not in ("spam", "ham"):
            raise _protocol_error("(Message-class header contains invalid class)")
        self._headers[name] = value
        # Counted after parsing, like spamd: line 256 is read, then refused.
        self._header_lines += 1
        if self._header_lines > self._max_header_lines:
            raise _protocol_error("(too many headers)")

    def _end_of_headers(self) -> bool:
        """Check what needs all headers; True when the request has no body (PING/SKIP)."""
        if self._method in _BODYLESS_METHODS:
            self._move(_Step.HEADERS_ONLY)
            return True
        if self._method == "TELL":
            set_targets, remove_targets = self._targets("Set"), self._targets("Remove")
            for target in _TARGETS:
                if target in set_targets and target in remove_targets:
                    raise _protocol_error(f"Unable to set {target} and remove {target} in the same operation.")
        self._move(_Step.HEADERS_THEN_BODY)
        self._start_body()
        return False

    def _start_body(self) -> None:
        """Settle the body framing before reading a byte of it, refusing early what is too big."""
        raw_length = self._headers.get("Content-length")
        compressed = "Compress" in self._headers
        if compressed and raw_length is None:
            message = "Service Unavailable: Compress requires Content-length header"
            raise RemoteProtocolError(message, reply=render_error(EX_UNAVAILABLE, message))
        if raw_length is not None:
            self._content_length_raw = raw_length
            self._content_length = _length_value(raw_length)
            if self._content_length > self._max_body_size:
                raise self._too_big("")
        if compressed:
            self._inflater = zlib.decompressobj()

    def _read_body(self) -> bytes | None:
        """The body once complete, or None while more is needed."""
        if self._inflater is not None:
            return self._read_compressed()
        length = self._content_length
        if length is not None:
            body = self._buffer.take(length)
            if body is None and self._buffer.closed:
                raise self._mismatch(len(self._buffer))
            return body
        if len(self._buffer) > self._max_body_size:
            raise self._too_big("")
        return self._buffer.take_all() if self._buffer.closed else None

    def _read_compressed(self) -> bytes | None:
        """Inflate as bytes arrive (so bombs and garbage are refused early), finish at EOF."""
        assert self._inflater is not None and self._content_length is not None
        wanted = self._content_length - self._compressed_seen
        chunk = self._buffer.take_at_most(wanted)
        self._buffer.clear()  # spamd cuts the compressed data at Content-length, too
        self._compressed_seen += len(chunk)
        if chunk:
            self._inflate(chunk)
        if not self._buffer.closed:
            return None
        if self._compressed_seen < self._content_length:
            raise self._mismatch(self._compressed_seen)
        if not self._inflater.eof:
            raise _protocol_error("(Compress: zlib body is not a complete zlib stream)")
        return bytes(self._inflated)

    def _inflate(self, data: bytes) -> None:
        inflater = self._inflater
        assert inflater is not None
        try:
            while data:
                if inflater.eof:
                    raise _protocol_error("(Compress: zlib body has data after the end of the zlib stream)")
                # Ask for one byte more than the cap allows: getting it proves the body too big.
                room = self._max_body_size - len(self._inflated) + 1
                self._inflated += inflater.decompress(data, room)
                if len(self._inflated) > self._max_body_size:
                    raise self._too_big("decompressed ")
                data = inflater.unconsumed_tail
            if inflater.unused_data:
                raise _protocol_error("(Compress: zlib body has data after the end of the zlib stream)")
        except zlib.error:
            raise _protocol_error("(Compress: zlib body is not a valid zlib stream)") from None

    def _targets(self, name: str) -> frozenset[str]:
        """TELL ``Set``/``Remove``: spamd looks for each target as a case-insensitive substring."""
        value = self._headers.get(name, "").lower()
        return frozenset(target for target in _TARGETS if target in value)

    def _mismatch(self, got: int) -> RemoteProtocolError:
        expected = self._content_length_raw  # as sent: spamd interpolates the header's digits
        return _protocol_error(f"(Content-Length mismatch: Expected {expected} bytes, got {got} bytes)")

    def _too_big(self, what: str) -> RemoteProtocolError:
        message = f"Data error: {what}message larger than {self._max_body_size} bytes"
        return RemoteProtocolError(message, reply=render_error(EX_DATAERR, message))

    def _finish(self, body: bytes) -> SpamdRequest:
        """Build the event; whatever the client sent after the request is dropped."""
        self._buffer.clear()
        self._inflated = bytearray()
        headers = dict(self._headers)
        tell = self._method == "TELL"
        message_class = headers.get("Message-class") if tell else None
        if self._content_length is None and "Content-length" in headers:
            self._content_length = _length_value(headers["Content-length"])  # PING/SKIP: as sent
        return SpamdRequest(
            method=self._method,
            version=self._version,
            headers=headers,
            body=body,
            user=headers.get("User"),
            compressed=self._inflater is not None,
            message_class=message_class.lower() if message_class is not None else None,
            set_targets=self._targets("Set") if tell else frozenset(),
            remove_targets=self._targets("Remove") if tell else frozenset(),
            content_length=self._content_length,
        )


# -- responses ---------------------------------------------------------------------------

_STATUS_OK: Final = b"SPAMD/1.1 0 EX_OK\r\n"


def _perl_number(value: float) -> str:
    """How Perl prints a number it computed (``%.15g``): 4.9 -> "4.9", 5.0 -> "5"."""
    return f"{value:.15g}"


def spam_header_value(is_spam: bool, score: float, threshold: float, *, yes_no: bool = False) -> str:
    """The value of the ``Spam:`` response header, e.g. ``True ; 1000.0 / 5.0``.

    Numbers as spamd prints them: the score rounded to 3 decimals (SpamAssassin's own
    rounding), then ``%2.1f``. Ham whose printed score would reach the printed threshold shows
    threshold - 0.1 instead (SpamAssassin bug 6419), so displayed ham never looks like spam;
    spamd computes that value in Perl and prints it unformatted, hence "5" for a 5.1 threshold.
    ``yes_no`` gives the Yes/No flag spamd uses for REPORT_IFSPAM.
    """
    if not (math.isfinite(score) and math.isfinite(threshold)):
        raise LocalProtocolError(f"score and threshold must be finite, got {score!r} / {threshold!r}")
    shown_score = f"{float(f'{score:.3f}'):2.1f}"
    shown_threshold = f"{threshold:2.1f}"
    if not is_spam and not float(shown_score) < float(shown_threshold):
        shown_score = _perl_number(float(shown_threshold) - 0.1)
    if yes_no:
        flag = "Yes" if is_spam else "No"
    else:
        flag = "True" if is_spam else "False"
    return f"{flag} ; {shown_score} / {shown_threshold}"


def _headers_only(message: bytes) -> bytes:
    """HEADERS: the rewritten message up to and including its first empty line (spamd's regex)."""
    match = re.search(rb"\r?\n\r?\n", message)
    return message if match is None else message[: match.end()]


def render_response(
    request: SpamdRequest, *, is_spam: bool, score: float, threshold: float, body: bytes = b""
) -> bytes:
    """The exact success response spamd writes for ``request`` and this verdict.

    ``body`` is what the method returns: the comma-joined symbol names (SYMBOLS), the report
    (REPORT, REPORT_IFSPAM), or the whole rewritten message (PROCESS, and HEADERS, which is cut
    here after the header block). CHECK ignores it, and so does REPORT_IFSPAM for ham. Layouts
    follow the request's version as spamd's do; modern clients all send 1.5. PING answers PONG
    and SKIP answers nothing; TELL needs render_tell().
    """
    method = request.method
    try:
        version = float(request.version)
    except ValueError:
        raise LocalProtocolError(f"not a protocol version: {request.version!r}") from None
    if method == "PING":
        return render_pong()
    if method == "SKIP":
        return b""
    if method not in _SCAN_METHODS:
        raise LocalProtocolError(f"render_response cannot answer {method}; use render_tell()")
    flag_words = method == "REPORT_IFSPAM"
    spam = b"Spam: %b\r\n" % spam_header_value(is_spam, score, threshold, yes_no=flag_words).encode("ascii")
    if method == "CHECK":
        return _STATUS_OK + spam + b"\r\n"
    if method in ("PROCESS", "HEADERS"):
        message = _headers_only(body) if method == "HEADERS" else body
        length = b"Content-length: %d\r\n" % len(message)
        if version >= 1.3:
            return _STATUS_OK + length + spam + b"\r\n" + message
        if version >= 1.2:
            return _STATUS_OK + length + b"\r\n" + message
        return b"SPAMD/1.0 0 EX_OK\r\n" + message
    if method == "REPORT_IFSPAM" and not is_spam:
        body = b""
    elif method == "SYMBOLS" and version < 1.3:
        body += b"\r\n"
    if version >= 1.3:
        return _STATUS_OK + b"Content-length: %d\r\n" % len(body) + spam + b"\r\n" + body
    return _STATUS_OK + spam + b"\r\n" + body


def render_pong() -> bytes:
    """PING's answer: the status line alone (spamc -K reads nothing else)."""
    return b"SPAMD/1.5 0 PONG\r\n"


def render_tell(did_set: Iterable[str], did_remove: Iterable[str]) -> bytes:
    """TELL's answer: DidSet/DidRemove for what actually changed, then spamd's two CRLFs.

    Lists name only targets that changed, "local" before "remote"; nothing changed (already
    learned) means no header at all, which is how spamc tells "already learned" apart.
    """
    lines = [_STATUS_OK]
    for name, targets in (("DidSet", set(did_set)), ("DidRemove", set(did_remove))):
        unknown = targets - set(_TARGETS)
        if unknown:
            raise LocalProtocolError(f"{name} targets must be local/remote, got {sorted(unknown)}")
        if targets:
            lines.append(b"%s: %s\r\n" % (name.encode(), ",".join(t for t in _TARGETS if t in targets).encode()))
    lines.append(b"\r\n\r\n")
    return b"".join(lines)


_EX_NAMES: Final = {
    EX_USAGE: "EX_USAGE",
    EX_DATAERR: "EX_DATAERR",
    EX_NOINPUT: "EX_NOINPUT",
    EX_NOUSER: "EX_NOUSER",
    EX_NOHOST: "EX_NOHOST",
    EX_UNAVAILABLE: "EX_UNAVAILABLE",
    EX_SOFTWARE: "EX_SOFTWARE",
    EX_OSERR: "EX_OSERR",
    EX_OSFILE: "EX_OSFILE",
    EX_CANTCREAT: "EX_CANTCREAT",
    EX_IOERR: "EX_IOERR",
    EX_TEMPFAIL: "EX_TEMPFAIL",
    EX_PROTOCOL: "EX_PROTOCOL",
    EX_NOPERM: "EX_NOPERM",
    EX_CONFIG: "EX_CONFIG",
    EX_TIMEOUT: "EX_TIMEOUT",
}


def render_error(code: int, message: str) -> bytes:
    """An error answer, ``SPAMD/1.0 <code> <message>\\r\\n``; nothing may follow it.

    spamd words them "Bad header line: ..." (76), "Service Unavailable: ..." (69) and
    "Timeout: ..." (79). CR and LF in ``message`` become spaces so the reply stays one line,
    and an empty message becomes the code's name, since aiospamc rejects a status line without one.
    """
    if isinstance(code, bool) or not 1 <= code <= 255:
        raise LocalProtocolError(f"spamd error codes are 1..255, got {code!r}")
    text = message.replace("\r", " ").replace("\n", " ")
    if not text:
        text = _EX_NAMES.get(code, "EX_ERROR")
    return b"SPAMD/1.0 %d %b\r\n" % (code, text.encode("utf-8", "surrogateescape"))
