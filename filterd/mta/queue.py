"""The MTA's durable spool: messages the SMTP server accepted, until delivery is done.

On disk (everything under one root, normally ``<state-dir>/queue``; dirs 0700, files 0600)::

    lock            flock(2)'d by the one process that owns the queue (``Queue.lock()``)
    tmp/            files being written; anything here at start-up is a leftover, deleted
    data/<id>       message bodies; written once, never moved or rewritten until removed
    incoming/<id>   envelope of a message the queue manager has not picked up yet
    active/<id>     envelope of a message the queue manager is working on
    deferred/<id>   envelope of a message waiting for its next attempt
    hold/<id>       envelope of a message parked by a human or by the filter (quarantine)
    corrupt/        quarantine for unreadable files: ``<id>.env`` and ``<id>.data``; a human looks,
                    nothing here is ever deleted by filterd

A message's *state* is the directory that holds its envelope; changing state is one rename.
A message exists once its envelope is in a state directory; its data file is then complete.

Data file: the message exactly as it will be transmitted: CRLF line ends, already
dot-unstuffed, our ``Received:`` header and the filter's header edits included.

Envelope file: one UTF-8 JSON object (the closing brace is the end marker: a truncated file
does not parse and is treated as corrupt)::

    {"version": 1, "id": "18C2F3A4B5C6D7-3FA91C", "mail_from": "a@example.org",
     "rcpts": [{"address": "b@example.net", "status": "pending", "attempts": 0,
                "last_error": "", "next_attempt": 0.0, "last_status": "",
                "last_reply_code": 0, "last_reply_status": ""}],
     "received_at": 1700000000.123, "client_ip": "192.0.2.1", "client_name": "mx.example.org",
     "client_helo": "mx.example.org", "auth_user": "", "hops": 1, "size": 1234,
     "body_type": "8BITMIME", "smtputf8": false, "hold_reason": "", "delay_warned": false}

``mail_from`` is "" for the null sender. ``size`` is the data file's length in bytes and is
checked on load. ``status`` is "pending" (not delivered yet, maybe after failed attempts),
"delivered" or "bounced" (given up; a DSN was or will be sent). ``last_error`` says what the
last failed attempt got, for people: ``"<status> <detail>"``; ``last_status`` is that status alone
(RFC 3463, "4.4.1"), for programs (a delay warning's Status:); both are "" while there is none,
and ``last_status`` is "" in envelopes written before it was recorded (readers then fall back
on ``last_error``: `Recipient.failure_status`). ``last_reply_code`` and ``last_reply_status``
are the SMTP reply a server gave the last attempt, delivered or not ("250", "2.0.0"): its code
and the enhanced status as the server wrote it ("" if the text had none); 0 and "" when no
server replied (local delivery, no MX, no connection, a reply we made up) and in envelopes
written before they were kept. ``next_attempt`` is a Unix time, 0 for "now". ``hops`` counts the Received
headers, ours included. ``hold_reason`` says why a message is in hold/. ``delay_warned`` is set
once the sender was sent a "delayed" DSN (``mta.delay_warning``). A reader ignores keys it does
not know; a ``version`` newer than `ENVELOPE_VERSION` is treated as unreadable.

Ids: ``<microseconds since the epoch, 14 hex digits>-<6 random hex digits>``: sortable by
arrival, filesystem-safe, unique across restarts (a collision with an existing data file is
retried); upper-case like Postfix's.

API (synchronous, blocking file I/O; call it from a thread or accept the short stalls)::

    q = Queue(root)                        # creates the directories
    with q.lock(): ...                     # one owner at a time; QueueError if already held
    q.recover() -> Recovery                # at start, with the lock held, before serving
    qid = q.new_id()                       # for the milter's {i} macro, before enqueue
    q.enqueue(envelope, data, qid=..., state="incoming") -> qid   # durable when it returns
    q.load(qid) -> (Envelope, data_path)   # QueueError if unknown or unreadable
    q.state_of(qid) -> state | None
    q.save_envelope(qid, envelope)         # atomic replace, in whatever state it is
    q.move(qid, state, sync=True)          # one rename + directory fsyncs (sync=False: none)
    q.remove(qid)                          # envelope first, then data
    q.ids(state) -> sorted list of ids
    q.quarantine(qid, reason)              # envelope and data to corrupt/, logged

Durability order of `enqueue` (SMTP may answer 250 only after it returns): data written in
tmp/ and fsync'd; envelope written in tmp/ and fsync'd; data renamed into data/, data/ fsync'd;
envelope renamed into ``incoming/``, that directory fsync'd. A crash before the last rename
leaves at most an orphan data file (no envelope anywhere), which `recover` deletes: no 250
was given for it. A crash after it leaves a complete message (delivered, perhaps twice if the
client retries: duplicates are the accepted price, loss is not). An exception before that
rename (an envelope that cannot be encoded, a full disk) removes what `enqueue` wrote before
it propagates; after it the message exists and stays.

`recover` (with the lock held): deletes everything in tmp/; moves active/ back to incoming/
(the manager died mid-work); sends envelopes in deferred/ and hold/ that do not parse, whose
data file is missing or has the wrong size, to corrupt/ with a warning; deletes data files that
no envelope names. It parses those envelopes for that, and returns, for each message in
deferred/, when it is next due (``Recovery.deferred``): the queue manager's schedule starts from
that instead of a second parse. Envelopes in incoming/ are not parsed here: the queue manager
parses each when it takes it for delivery (`load`), which it does first, and sends an
unreadable one to corrupt/ the same way; one parse per message, not two.

Concurrency: within the owning process, callers must not act on the same id from two threads
at once. Other processes (``filterd mta queue list|show``) may read without the lock; they
must tolerate an id vanishing between `ids` and `load` (QueueError).
"""

from __future__ import annotations

__all__ = [
    "ENVELOPE_VERSION",
    "ID_RE",
    "STATES",
    "Envelope",
    "Queue",
    "QueueState",
    "Recipient",
    "RecipientStatus",
    "Recovery",
    "fsync_dir",
]

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from filterd.durable import fsync_dir, write_all
from filterd.errors import QueueError

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1

QueueState = Literal["incoming", "active", "deferred", "hold"]
STATES: tuple[QueueState, ...] = get_args(QueueState)
RecipientStatus = Literal["pending", "delivered", "bounced"]
_RECIPIENT_STATUSES = frozenset(get_args(RecipientStatus))

ID_RE = re.compile(r"\A[0-9A-F]{14}-[0-9A-F]{6}\Z")
_STATUS_RE = re.compile(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")


@dataclass(slots=True)
class Recipient:
    """One envelope recipient and its delivery progress."""

    address: str
    status: RecipientStatus = "pending"
    attempts: int = 0
    last_error: str = ""  # "<status> <detail>" of the last failed attempt, for people
    next_attempt: float = 0.0
    last_status: str = ""  # its RFC 3463 status alone ("4.4.1"); "" in envelopes from before it was kept
    last_reply_code: int = 0  # the last attempt's SMTP reply code (550); 0: no server replied
    last_reply_status: str = ""  # the enhanced status in that reply as written ("5.1.1"), "" if none

    @property
    def failure_status(self) -> str:
        """The last failed attempt's status: ``last_status``, or for an envelope written before
        that was kept, the status word ``last_error`` starts with; "" when there is none."""
        if self.last_status or not self.last_error:
            return self.last_status
        word = self.last_error.partition(" ")[0]
        return word if _STATUS_RE.match(word) else ""


@dataclass(slots=True)
class Envelope:
    """What the SMTP conversation said about a message, plus per-recipient progress."""

    mail_from: str
    rcpts: list[Recipient]
    received_at: float = field(default_factory=time.time)
    client_ip: str = ""
    client_name: str = ""
    client_helo: str = ""
    auth_user: str = ""
    hops: int = 0
    id: str = ""
    size: int = 0
    body_type: Literal["7BIT", "8BITMIME"] = "7BIT"
    smtputf8: bool = False
    hold_reason: str = ""
    delay_warned: bool = False  # the queue manager told the sender once that delivery is late

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.rcpts if r.status == "pending"]

    @property
    def due(self) -> float:
        """When the first pending recipient is due for an attempt (0.0: now, or none pending)."""
        return min((r.next_attempt for r in self.rcpts if r.status == "pending"), default=0.0)

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {"version": ENVELOPE_VERSION, **asdict(self)}
        return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """Parse an envelope file; ValueError for anything that is not a valid one."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        version = obj.get("version")
        if not isinstance(version, int) or not 1 <= version <= ENVELOPE_VERSION:
            raise ValueError(f"unsupported envelope version {version!r}")
        rcpts_raw = obj.get("rcpts")
        if not isinstance(rcpts_raw, list) or not rcpts_raw:
            raise ValueError("no recipients")
        rcpts = []
        for r in rcpts_raw:
            if not isinstance(r, dict):
                raise ValueError("recipient is not an object")
            rcpt = Recipient(
                address=_typed(r, "address", str),
                status=cast(RecipientStatus, _typed(r, "status", str, "pending")),
                attempts=_typed(r, "attempts", int, 0),
                last_error=_typed(r, "last_error", str, ""),
                next_attempt=float(_typed(r, "next_attempt", (int, float), 0.0)),
                last_status=_typed(r, "last_status", str, ""),
                last_reply_code=_typed(r, "last_reply_code", int, 0),
                last_reply_status=_typed(r, "last_reply_status", str, ""),
            )
            if rcpt.status not in _RECIPIENT_STATUSES:
                raise ValueError(f"unknown recipient status {rcpt.status!r}")
            rcpts.append(rcpt)
        body_type = _typed(obj, "body_type", str, "7BIT")
        if body_type not in ("7BIT", "8BITMIME"):
            raise ValueError(f"unknown body_type {body_type!r}")
        return cls(
            mail_from=_typed(obj, "mail_from", str),
            rcpts=rcpts,
            received_at=float(_typed(obj, "received_at", (int, float))),
            client_ip=_typed(obj, "client_ip", str, ""),
            client_name=_typed(obj, "client_name", str, ""),
            client_helo=_typed(obj, "client_helo", str, ""),
            auth_user=_typed(obj, "auth_user", str, ""),
            hops=_typed(obj, "hops", int, 0),
            id=_typed(obj, "id", str),
            size=_typed(obj, "size", int),
            body_type=cast(Literal["7BIT", "8BITMIME"], body_type),
            smtputf8=_typed(obj, "smtputf8", bool, False),
            hold_reason=_typed(obj, "hold_reason", str, ""),
            delay_warned=_typed(obj, "delay_warned", bool, False),
        )


def _unencodable(envelope: Envelope) -> str:
    """What in an envelope that `Envelope.to_json` cannot encode is not UTF-8."""
    addresses = [("sender", envelope.mail_from), *(("recipient", r.address) for r in envelope.rcpts)]
    for what, address in addresses:
        try:
            address.encode()
        except UnicodeEncodeError:
            return f"the {what} address {address!r} is not valid UTF-8"
    return "a field is not valid UTF-8"


_MISSING: Any = object()


def _typed(obj: dict[str, Any], key: str, kind: Any, default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise ValueError(f"missing {key!r}")
    # bool is an int subclass: a JSON true must not pass for a count
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{key!r} has the wrong type")
    return value


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `Queue.recover` found and did."""

    tmp_removed: int = 0
    active_requeued: int = 0
    corrupt: tuple[str, ...] = ()  # from deferred/ and hold/ (incoming/ is checked when loaded)
    orphans_removed: int = 0
    # (id, Envelope.due) of every readable message in deferred/, from the parse recovery did anyway
    deferred: tuple[tuple[str, float], ...] = ()


class Queue:
    """The spool under *root*; see the module docstring for the format and the guarantees."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.data = root / "data"
        self.corrupt = root / "corrupt"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.tmp, self.data, self.corrupt, *(root / s for s in STATES)):
            d.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(root)

    # -- helpers -------------------------------------------------------------------------

    def _step(self, name: str) -> None:
        """Called between the steps of `enqueue`; crash tests override it to die there."""

    def _write_tmp(self, name: str, payload: bytes) -> Path:
        path = self.tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, payload)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    def _envelope_path(self, qid: str) -> tuple[QueueState, Path] | None:
        for state in STATES:
            path = self.root / state / qid
            if path.exists():
                return state, path
        return None

    @staticmethod
    def _check_id(qid: str) -> None:
        if not ID_RE.match(qid):
            raise QueueError(f"not a queue id: {qid!r}")

    # -- API -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the queue for this process (the running MTA); QueueError if another holds it."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QueueError(f"{self.root} is in use by another process") from None
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def new_id(self) -> str:
        """A fresh id: time-ordered, not used by any message in the queue."""
        while True:
            qid = f"{time.time_ns() // 1000:014X}-{secrets.token_hex(3).upper()}"
            if not (self.data / qid).exists():
                return qid

    def enqueue(
        self, envelope: Envelope, data: bytes, *, qid: str | None = None, state: QueueState = "incoming"
    ) -> str:
        """Store a message durably and return its id; the caller may acknowledge it then.

        Sets ``envelope.id`` and ``envelope.size``. *state* is "hold" for quarantined mail.
        """
        if not envelope.rcpts:
            raise QueueError("a message needs at least one recipient")
        if qid is None:
            qid = self.new_id()
        self._check_id(qid)
        envelope.id, envelope.size = qid, len(data)
        try:
            encoded = envelope.to_json()
        except UnicodeEncodeError:  # surrogate escapes of undecodable bytes, say from a milter's edit
            raise QueueError(f"{qid}: cannot store the envelope: {_unencodable(envelope)}") from None
        written: list[Path] = []  # removed again if anything fails before the envelope's rename
        try:
            written.append(self._write_tmp(f"{qid}.data", data))
            self._step("data-written")
            written.append(self._write_tmp(f"{qid}.env", encoded))
            self._step("envelope-written")
            if (self.data / qid).exists():  # os.rename would silently replace it
                raise QueueError(f"queue id {qid} is already in use")
            os.rename(written[0], self.data / qid)
            written[0] = self.data / qid
            fsync_dir(self.data)
            self._step("data-renamed")
            os.rename(written[1], self.root / state / qid)
        except BaseException:
            for path in reversed(written):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        # The message exists now: the queue manager may already be working on it.
        self._step("envelope-renamed")
        fsync_dir(self.root / state)
        self._step("done")
        return qid

    def state_of(self, qid: str) -> QueueState | None:
        found = self._envelope_path(qid)
        return found[0] if found else None

    def load(self, qid: str) -> tuple[Envelope, Path]:
        """The envelope and the path of the data file; QueueError if unknown or unreadable."""
        self._check_id(qid)
        found = self._envelope_path(qid)
        if found is None:
            raise QueueError(f"no message {qid} in the queue")
        try:
            raw = found[1].read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no message {qid} in the queue") from None
        try:
            envelope = Envelope.from_json(raw)
        except ValueError as e:
            raise QueueError(f"{found[1]}: unreadable envelope: {e}") from None
        data = self.data / qid
        try:
            size = data.stat().st_size
        except FileNotFoundError:
            raise QueueError(f"{qid}: data file is missing") from None
        if envelope.id != qid or size != envelope.size:
            raise QueueError(f"{qid}: envelope does not match its data ({envelope.id}, {envelope.size} != {size})")
        return envelope, data

    def save_envelope(self, qid: str, envelope: Envelope) -> None:
        """Replace the envelope atomically, in whatever state the message is."""
        self._check_id(qid)
        found = self._envelope_path(qid)
        if found is None:
            raise QueueError(f"no message {qid} in the queue")
        envelope.id = qid
        tmp = self._write_tmp(f"{qid}.env.{secrets.token_hex(4)}", envelope.to_json())
        os.rename(tmp, found[1])
        fsync_dir(found[1].parent)

    def move(self, qid: str, state: QueueState, *, sync: bool = True) -> None:
        """Change a message's state. ``sync=False`` skips the directory fsyncs, for moves a crash
        may undo harmlessly (incoming/deferred -> active: recovery moves active/ back anyway)."""
        self._check_id(qid)
        found = self._envelope_path(qid)
        if found is None:
            raise QueueError(f"no message {qid} in the queue")
        if found[0] == state:
            return
        os.rename(found[1], self.root / state / qid)
        if sync:
            fsync_dir(self.root / state)
            fsync_dir(found[1].parent)

    def remove(self, qid: str) -> None:
        """Delete a message: envelope first, so a crash leaves an orphan data file, not a half message."""
        self._check_id(qid)
        found = self._envelope_path(qid)
        if found is not None:
            found[1].unlink(missing_ok=True)
            fsync_dir(found[1].parent)
        (self.data / qid).unlink(missing_ok=True)

    def ids(self, state: QueueState) -> list[str]:
        return sorted(name for name in os.listdir(self.root / state) if ID_RE.match(name))

    def quarantine(self, qid: str, reason: str) -> None:
        """Move a message's files to corrupt/ for a human to look at."""
        found = self._envelope_path(qid)
        log.warning("queue: %s moved to %s: %s", qid, self.corrupt, reason)
        if found is not None:
            os.rename(found[1], self.corrupt / f"{qid}.env")
        if (self.data / qid).exists():
            os.rename(self.data / qid, self.corrupt / f"{qid}.data")
        fsync_dir(self.corrupt)

    def recover(self) -> Recovery:
        """Make the queue consistent after a crash; call with the lock held, before serving."""
        tmp_removed = 0
        for name in os.listdir(self.tmp):
            (self.tmp / name).unlink(missing_ok=True)
            tmp_removed += 1
        active = self.ids("active")
        for qid in active:
            os.rename(self.root / "active" / qid, self.root / "incoming" / qid)
        if active:
            fsync_dir(self.root / "incoming")
        corrupt: list[str] = []
        named: set[str] = set()
        deferred: list[tuple[str, float]] = []
        for state in STATES:
            for name in os.listdir(self.root / state):
                if not ID_RE.match(name):
                    log.warning("queue: %s: not a queue file; moved to %s", self.root / state / name, self.corrupt)
                    os.rename(self.root / state / name, self.corrupt / f"{state}-{name}")
                    continue
                if state == "incoming":  # checked when the queue manager loads it, at once
                    named.add(name)
                    continue
                try:
                    envelope, _ = self.load(name)
                except QueueError as e:
                    self.quarantine(name, str(e))
                    corrupt.append(name)
                    continue
                named.add(name)
                if state == "deferred":
                    deferred.append((name, envelope.due))
        orphans = 0
        for name in os.listdir(self.data):
            if name not in named:
                # written before a crash that came before its envelope's rename: never acknowledged
                (self.data / name).unlink()
                orphans += 1
        if tmp_removed or orphans:
            fsync_dir(self.tmp)
            fsync_dir(self.data)
        result = Recovery(tmp_removed, len(active), tuple(corrupt), orphans, tuple(sorted(deferred)))
        if tmp_removed or active or corrupt or orphans:
            log.info(
                "queue: recovered: %d temp files removed, %d active requeued, %d corrupt, %d orphans removed",
                tmp_removed,
                len(active),
                len(corrupt),
                orphans,
            )
        return result
