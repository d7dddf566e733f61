"""What every Bayes store backend shares: the in-memory counts that scoring reads, the change-log
delta format, batched learning, and the backup format.

Both backends (`filterd.engine.bayes.store.BayesStore` on SQLite, `RedisBayesStore` on Redis)
keep the same durable data and give the same guarantees:

* per learnt message (keyed by `message_digest`): its class, when it was learnt and its token
  hashes, so that learning it again changes nothing, learning it as the other class moves its
  counts over, and forgetting it undoes exactly what learning did;
* per hashed bucket: how many spam and ham messages contained it, and when it was last learnt or
  seen (expiry drops the least recently seen buckets beyond ``bayes.max_tokens``);
* the number of spam and ham messages learnt;
* a change log: every learn/forget/expire is one atomic change with a sequence number and a
  *delta* (increments, clamped decrements, buckets zeroed), and a snapshot of all counts, so
  that each process mirrors the counts in memory (`BayesStoreBase`) and catches up with what
  others learnt by applying the deltas after its position (`refresh`).

Scoring reads only the mirror: two int32 arrays of ``n_features`` counts, gathered with numpy.
A handle that only writes (``write_only``: a daemon worker's writer thread, an expiry) keeps no
mirror: learning and forgetting read the message's stored record, not the counts, so they need
none; it neither loads the counts when it opens nor applies its own changes to memory.

Backup format (`backup`/`restore`), UTF-8 text, tab-separated, one record per line, the same
for both backends::

    filterd-bayes-backup	1
    n_features	4194304
    tokenizer	1
    counts	<nspam>	<nham>
    b	<bucket>	<spam>	<ham>	<atime>        (one per non-empty bucket, by bucket)
    m	<s|h>	<digest>	<learnt>	<base64 of uint32 little-endian token hashes>   (by digest)
    end	<number of b lines>	<number of m lines>

A restore into a store with another n_features rebuilds the bucket counts from the messages'
token hashes (the b lines only fit the n_features they were written with).
"""

from __future__ import annotations

import abc
import base64
import contextlib
import enum
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Literal, Self

import numpy as np
import numpy.typing as npt

from filterd.config import BayesConfig
from filterd.config.schema import n_features_problem
from filterd.engine.bayes.classifier import ClassifierParams, complement_nb_norms, pooled_probability, spam_probability
from filterd.engine.bayes.tokenizer import TOKENIZER_VERSION, Tokenizer, TokenViews, message_digest
from filterd.engine.message import ParsedMessage

__all__ = [
    "BACKUP_VERSION",
    "EMPTY_IDS",
    "EMPTY_TRIPLES",
    "LearnPlan",
    "Backup",
    "BayesStoreBase",
    "BucketRow",
    "Hashed",
    "Ids",
    "LearnResult",
    "MessageRow",
    "StoreError",
    "StoreInterrupted",
    "Triples",
    "aggregate",
    "apply_delta",
    "buckets_from_messages",
    "decode_counts",
    "decode_delta",
    "encode_counts",
    "encode_delta",
    "read_backup",
    "write_backup",
]

BACKUP_VERSION = 1
_BACKUP_MAGIC = "filterd-bayes-backup"
_TOUCH_FLUSH_INTERVAL = 600.0  # seconds between writes of scanned buckets' atime

Ids = npt.NDArray[np.int64]
Triples = npt.NDArray[np.int64]  # shape (k, 3): bucket, spam count, ham count
Counts = npt.NDArray[np.int32]
Hashed = tuple[str, npt.NDArray[np.uint32], bool]  # digest, token hashes, is_spam
BucketRow = tuple[int, int, int, int]  # bucket, spam, ham, atime
MessageRow = tuple[str, int, int, bytes]  # digest, 1 = spam / 0 = ham, learnt, token hashes (uint32 LE)

EMPTY_TRIPLES: Triples = np.zeros((0, 3), dtype=np.int64)
EMPTY_IDS: Ids = np.zeros(0, dtype=np.int64)


class StoreError(Exception):
    """The store is not a filterd Bayes store, or a backup cannot be read."""


class StoreInterrupted(Exception):
    """`BayesStoreBase.interrupt` stopped an expiry before its end; what it had committed stays."""


class LearnResult(enum.Enum):
    """What learning or forgetting one message did."""

    LEARNED = "learned"
    ALREADY = "already"  # learnt before as the same class: nothing changed
    MOVED = "moved"  # learnt before as the other class: its counts moved over
    FORGOTTEN = "forgotten"
    NOT_KNOWN = "not_known"  # forget() of a message never learnt


# -- deltas and snapshots ----------------------------------------------------------------------


def encode_delta(inc: Triples, dec: Triples, zero: Ids) -> bytes:
    """One change as little-endian int32: counts of each part, then inc and dec triples, zeroed ids."""
    head = np.array([len(inc), len(dec), len(zero)], dtype=np.int64)
    return np.concatenate([head, inc.ravel(), dec.ravel(), zero]).astype("<i4").tobytes()


def decode_delta(blob: bytes) -> tuple[Triples, Triples, Ids]:
    data = np.frombuffer(blob, dtype="<i4").astype(np.int64)
    n_inc, n_dec, n_zero = (int(x) for x in data[:3])
    at = 3
    inc = data[at : at + 3 * n_inc].reshape(n_inc, 3)
    at += 3 * n_inc
    dec = data[at : at + 3 * n_dec].reshape(n_dec, 3)
    at += 3 * n_dec
    return inc, dec, data[at : at + n_zero]


def encode_counts(spam: Counts, ham: Counts) -> bytes:
    """The non-empty buckets as three little-endian int32 columns: ids, spam, ham."""
    ids = np.flatnonzero(spam | ham)
    return np.concatenate([ids.astype("<i4"), spam[ids].astype("<i4"), ham[ids].astype("<i4")]).tobytes()


def decode_counts(blob: bytes, n_features: int) -> tuple[Counts, Counts]:
    data = np.frombuffer(blob, dtype="<i4").reshape(3, -1)
    spam = np.zeros(n_features, dtype=np.int32)
    ham = np.zeros(n_features, dtype=np.int32)
    spam[data[0]] = data[1]
    ham[data[0]] = data[2]
    return spam, ham


def aggregate(parts: list[tuple[Ids, int, int]]) -> Triples:
    """Sum (bucket ids, d_spam, d_ham) pieces into distinct-bucket triples."""
    if not parts:
        return EMPTY_TRIPLES
    ids = np.concatenate([p[0] for p in parts])
    spam = np.concatenate([np.full(len(p[0]), p[1], dtype=np.int64) for p in parts])
    ham = np.concatenate([np.full(len(p[0]), p[2], dtype=np.int64) for p in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)
    out = np.zeros((len(uniq), 3), dtype=np.int64)
    out[:, 0] = uniq
    np.add.at(out[:, 1], inverse, spam)
    np.add.at(out[:, 2], inverse, ham)
    return out


def apply_delta(spam: Counts, ham: Counts, inc: Triples, dec: Triples, zero: Ids) -> tuple[int, int]:
    """Apply one delta to count arrays as every backend applies it to its durable counts:
    increments, then decrements clamped at 0, then zeroing. Returns the change of the sums."""
    d_spam = d_ham = 0
    if len(inc):
        ids = inc[:, 0]
        spam[ids] += inc[:, 1].astype(np.int32)
        ham[ids] += inc[:, 2].astype(np.int32)
        d_spam += int(inc[:, 1].sum())
        d_ham += int(inc[:, 2].sum())
    if len(dec):
        ids = dec[:, 0]
        for counts, column in ((spam, 1), (ham, 2)):
            old = counts[ids]
            new = np.maximum(old - dec[:, column], 0).astype(np.int32)
            counts[ids] = new
            change = int(new.sum(dtype=np.int64) - old.sum(dtype=np.int64))
            if column == 1:
                d_spam += change
            else:
                d_ham += change
    if len(zero):
        d_spam -= int(spam[zero].sum(dtype=np.int64))
        d_ham -= int(ham[zero].sum(dtype=np.int64))
        spam[zero] = 0
        ham[zero] = 0
    return d_spam, d_ham


def bucket_ids(hashes: npt.NDArray[np.uint32], n_features: int) -> Ids:
    """The distinct bucket ids of token hashes, sorted."""
    ids = np.sort((hashes & np.uint32(n_features - 1)).astype(np.int64))
    if ids.size > 1:
        keep = np.empty(ids.size, dtype=np.bool_)
        keep[0] = True
        np.not_equal(ids[1:], ids[:-1], out=keep[1:])
        ids = ids[keep]
    return ids


def view_bucket_ids(views: Sequence[npt.NDArray[np.uint32]], n_features: int) -> tuple[Ids, Ids]:
    """Bucket ids of each view's token hashes (distinct within a view; a bucket may be in
    several views), with the view index of each: one sort for all views."""
    keys = np.concatenate(
        [(h & np.uint32(n_features - 1)).astype(np.int64) + j * n_features for j, h in enumerate(views)]
    )
    keys = np.sort(keys)
    if keys.size > 1:
        keep = np.empty(keys.size, dtype=np.bool_)
        keep[0] = True
        np.not_equal(keys[1:], keys[:-1], out=keep[1:])
        keys = keys[keep]
    view, ids = np.divmod(keys, n_features)
    return ids, view


# -- backups -----------------------------------------------------------------------------------


class LearnPlan:
    """What learning a batch changes, message by message, whatever the backend: the bucket counts
    to add and take away, and the change in the spam and ham message counts."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.inc: list[tuple[Ids, int, int]] = []
        self.dec: list[tuple[Ids, int, int]] = []
        self.d_spam = 0
        self.d_ham = 0

    def learn(
        self, hashes: npt.NDArray[np.uint32], is_spam: bool, was: tuple[bool, bytes | None]
    ) -> tuple[LearnResult, bytes | None]:
        """Plan learning one message whose stored state is ``was`` (class, token-hash blob or
        None if unknown): the result, and the blob to store (None when nothing changes)."""
        was_spam, old_blob = was
        if old_blob is not None and was_spam == is_spam:
            return LearnResult.ALREADY, None
        ids = bucket_ids(hashes, self.n_features)
        self.inc.append((ids, 1, 0) if is_spam else (ids, 0, 1))
        self.d_spam += int(is_spam)
        self.d_ham += int(not is_spam)
        if old_blob is not None:
            self.forget(was_spam, old_blob)
        return (LearnResult.MOVED if old_blob is not None else LearnResult.LEARNED), hashes.astype("<u4").tobytes()

    def forget(self, was_spam: bool, blob: bytes) -> None:
        """Plan taking back a message learnt as ``was_spam`` with these stored token hashes."""
        ids = bucket_ids(np.frombuffer(blob, dtype="<u4"), self.n_features)
        self.dec.append((ids, 1, 0) if was_spam else (ids, 0, 1))
        self.d_spam -= int(was_spam)
        self.d_ham -= int(not was_spam)

    @property
    def changes(self) -> bool:
        return bool(self.inc or self.dec)


@dataclass(frozen=True, slots=True)
class Backup:
    """A backup read and checked by `read_backup`."""

    n_features: int
    nspam: int
    nham: int
    buckets: list[BucketRow]
    messages: list[MessageRow]


def write_backup(
    out: IO[str],
    n_features: int,
    counts: tuple[int, int],
    buckets: Iterable[BucketRow],
    messages: Iterable[MessageRow],
) -> None:
    """Write a backup (module docstring) from rows in the order they should appear."""
    out.write(f"{_BACKUP_MAGIC}\t{BACKUP_VERSION}\nn_features\t{n_features}\n")
    out.write(f"tokenizer\t{TOKENIZER_VERSION}\ncounts\t{counts[0]}\t{counts[1]}\n")
    n_b = n_m = 0
    for bucket, spam, ham, atime in buckets:
        out.write(f"b\t{bucket}\t{spam}\t{ham}\t{atime}\n")
        n_b += 1
    for digest, is_spam, learnt, blob in messages:
        out.write(f"m\t{'s' if is_spam else 'h'}\t{digest}\t{learnt}\t{base64.b64encode(blob).decode()}\n")
        n_m += 1
    out.write(f"end\t{n_b}\t{n_m}\n")


# What a restore can store: bayes.n_features's values, int32 counts (the in-memory arrays), uint32
# atimes (Redis keeps them so), int64 learnt times (SQLite), SHA-1 hexdigests (`message_digest`).
_COUNT_MAX = 2**31 - 1
_ATIME_MAX = 2**32 - 1
_LEARNT_MAX = 2**63 - 1
_DIGEST = re.compile(r"[0-9a-f]{40}")


def _header(inp: IO[str], number: int, name: str, n_values: int) -> list[int]:
    """The integers of the header record expected on line ``number``."""
    fields = inp.readline().rstrip("\n").split("\t")
    if fields[0] != name or len(fields) != n_values + 1:
        raise StoreError(f"line {number}: expected the {name} record ({n_values} value(s))")
    try:
        return [int(x) for x in fields[1:]]
    except ValueError as exc:
        raise StoreError(f"line {number}: {exc}") from exc


def _bad_bucket(last: int, n_features: int, bucket: int, spam: int, ham: int, atime: int) -> str:
    """What is wrong with a b record that failed the combined check in `read_backup`."""
    if not 0 <= bucket < n_features:
        return f"bucket {bucket} outside 0 .. {n_features - 1} (n_features {n_features})"
    if bucket == last:
        return f"bucket {bucket} repeats"
    if bucket < last:
        return f"bucket {bucket} after bucket {last} (the b records go by bucket)"
    if not (0 <= spam <= _COUNT_MAX and 0 <= ham <= _COUNT_MAX):
        return f"bucket {bucket}: counts {spam}, {ham} outside 0 .. {_COUNT_MAX}"
    if not spam + ham:
        return f"bucket {bucket}: both counts 0 (only non-empty buckets have a record)"
    return f"bucket {bucket}: atime {atime} outside 0 .. {_ATIME_MAX}"


def read_backup(inp: IO[str]) -> Backup:
    """Read and check a whole backup. Raises StoreError naming the first bad line.

    Every value is checked against what a store can hold, so that a restore of a hand-edited
    or damaged file fails here, before either backend has changed anything."""
    buckets: list[BucketRow] = []
    messages: list[MessageRow] = []
    digest_lines: dict[str, int] = {}
    last = -1  # the previous b record's bucket
    ended = False
    number = 0  # the last line read
    try:
        first = inp.readline().rstrip("\n").split("\t")
        if first[0] != _BACKUP_MAGIC or len(first) != 2 or first[1] != str(BACKUP_VERSION):
            raise StoreError("not a filterd Bayes backup (or another version)")
        number = 1
        (n_features,) = _header(inp, 2, "n_features", 1)
        number = 2
        if (problem := n_features_problem(n_features)) is not None:
            raise StoreError(f"line 2: n_features: {problem}")
        _header(inp, 3, "tokenizer", 1)
        number = 3
        counts = _header(inp, 4, "counts", 2)
        number = 4
        if min(counts) < 0:
            raise StoreError(f"line 4: negative counts {counts[0]}, {counts[1]}")
        for number, line in enumerate(inp, start=5):
            if ended:
                raise StoreError(f"line {number}: data after the end marker")
            fields = line.rstrip("\n").split("\t")
            kind = fields[0]
            try:
                if kind == "b":
                    if len(fields) != 5:
                        raise ValueError(f"a b record has 4 values, not {len(fields) - 1}")
                    bucket, spam, ham, atime = int(fields[1]), int(fields[2]), int(fields[3]), int(fields[4])
                    # One comparison for the common case (a million lines); `_bad_bucket` says which failed.
                    if not (
                        last < bucket < n_features
                        and 0 <= spam <= _COUNT_MAX
                        and 0 <= ham <= _COUNT_MAX
                        and spam + ham
                        and 0 <= atime <= _ATIME_MAX
                    ):
                        raise ValueError(_bad_bucket(last, n_features, bucket, spam, ham, atime))
                    last = bucket
                    buckets.append((bucket, spam, ham, atime))
                elif kind == "m":
                    if len(fields) != 5:
                        raise ValueError(f"an m record has 4 values, not {len(fields) - 1}")
                    _, klass, digest, learnt_field, hashes = fields
                    if klass not in ("s", "h"):
                        raise ValueError(f"class {klass!r}")
                    if not _DIGEST.fullmatch(digest):
                        raise ValueError(f"message digest {digest!r} is not 40 lowercase hex digits")
                    if digest in digest_lines:
                        raise ValueError(f"message {digest} repeats (first on line {digest_lines[digest]})")
                    learnt = int(learnt_field)
                    if not 0 <= learnt <= _LEARNT_MAX:
                        raise ValueError(f"message {digest}: learnt time {learnt} outside 0 .. {_LEARNT_MAX}")
                    blob = base64.b64decode(hashes, validate=True)
                    if len(blob) % 4:
                        raise ValueError(f"message {digest}: token hashes of a length not a multiple of 4")
                    digest_lines[digest] = number
                    messages.append((digest, int(klass == "s"), learnt, blob))
                elif kind == "end":
                    if len(fields) != 3:
                        raise ValueError(f"an end record has 2 values, not {len(fields) - 1}")
                    if (int(fields[1]), int(fields[2])) != (len(buckets), len(messages)):
                        raise ValueError("record counts do not match the end marker")
                    ended = True
                else:
                    raise ValueError(f"unexpected record {kind!r}")
            except ValueError as exc:
                raise StoreError(f"line {number}: {exc}") from exc
    except UnicodeDecodeError as exc:  # decoded a block at a time: the bad byte may be a few lines on
        raise StoreError(f"line {number + 1} or soon after: not UTF-8 text ({exc.reason})") from exc
    if not ended:
        raise StoreError("the backup is truncated (no end marker)")
    nspam = sum(m[1] for m in messages)
    nham = len(messages) - nspam
    if (counts[0], counts[1]) != (nspam, nham):
        raise StoreError(f"line 4: counts {counts[0]}, {counts[1]} but the messages are {nspam} spam, {nham} ham")
    return Backup(n_features, nspam, nham, buckets, messages)


def buckets_from_messages(messages: list[MessageRow], n_features: int) -> list[BucketRow]:
    """Bucket rows rebuilt from the messages' token hashes (a restore into another n_features)."""
    spam = np.zeros(n_features, dtype=np.int64)
    ham = np.zeros(n_features, dtype=np.int64)
    for _, is_spam, _, blob in messages:
        ids = bucket_ids(np.frombuffer(blob, dtype="<u4"), n_features)
        (spam if is_spam else ham)[ids] += 1
    now = int(time.time())
    nonzero = np.flatnonzero(spam + ham)
    return [(int(b), int(spam[b]), int(ham[b]), now) for b in nonzero]


# -- the mirror every backend keeps --------------------------------------------------------------


class BayesStoreBase(abc.ABC):
    """One process's handle on a shared Bayes store: the in-memory counts scoring reads, and
    the operations every backend offers. Not thread-safe (`interrupt` aside); open one per
    process or thread (never use one across fork()).

    ``write_only``: the handle holds no counts (module docstring). It learns, forgets, expires,
    writes atimes and does everything else but score (`spam_probability` raises); its `refresh`
    does only the upkeep."""

    _batch_size = 500  # messages per atomic write in learn_many / learn_hashed

    def __init__(self, config: BayesConfig, n_features: int, *, write_only: bool = False) -> None:
        self.config = config
        self.n_features = n_features
        self.write_only = write_only
        self._params = ClassifierParams(
            combiner=config.combiner,
            robinson_s=config.robinson_s,
            robinson_x=config.robinson_x,
            min_prob_strength=config.min_prob_strength,
            max_interesting=config.max_interesting,
            alpha=config.alpha,
            pooled=config.views == "pooled",
            text_min_prob_strength=config.text_min_prob_strength,
        )
        mirrored = 0 if write_only else n_features
        self._spam = np.zeros(mirrored, dtype=np.int32)
        self._ham = np.zeros(mirrored, dtype=np.int32)
        self._spam_total = 0
        self._ham_total = 0
        self._nspam = 0
        self._nham = 0
        self._norms: tuple[float, float] | None = None  # complement_nb, recomputed after changes
        # Buckets marked as seen: one flag per bucket where scans mark them, the few handed over
        # (sorted, distinct) in a write-only handle.
        self._touched = np.zeros(mirrored, dtype=np.bool_)
        self._marks: Ids = EMPTY_IDS
        self._touched_since = time.monotonic()
        self._tokenizer = Tokenizer()
        # The last message tokenised: scored, then often learnt (autolearn, TELL)
        self._last: tuple[ParsedMessage, TokenViews[npt.NDArray[np.uint32]]] | None = None
        self._pid = os.getpid()
        self._interrupted = threading.Event()
        # Whether `refresh` also makes the upkeep writes: the atimes of the buckets scans marked
        # as seen (every 10 minutes, and on close) and, SQLite, a new snapshot once one is due. A
        # handle that scores on an event loop turns it off and has a writer thread write them
        # (`filterd.engine.bayes.writer`), so that its refresh only ever reads.
        self.upkeep = True
        # Entered around each commit (SQLite COMMIT, Redis learning or atime script): a writer
        # thread's `CommitGate`, which a stopping worker shuts so that nothing commits once it
        # has stopped waiting for the answer.
        self.commit_guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

    @property
    @abc.abstractmethod
    def backend(self) -> Literal["sqlite", "redis"]:
        """Which kind of store this is."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The file or server (without password) and key prefix, for messages."""

    # -- what each backend implements ------------------------------------------------------------

    @abc.abstractmethod
    def counts(self) -> tuple[int, int]:
        """(spam, ham) messages learnt, as the shared store says now."""

    @abc.abstractmethod
    def refresh(self) -> None:
        """Catch up with what other processes (or this one) committed; cheap when nothing did."""

    @abc.abstractmethod
    def _learn_batch(self, batch: list[Hashed]) -> list[LearnResult]:
        """Learn a batch atomically per message; one result per item, in order."""

    @abc.abstractmethod
    def forget(self, msg: ParsedMessage) -> LearnResult:
        """Undo what learning ``msg`` did: FORGOTTEN, or NOT_KNOWN if it was never learnt."""

    @abc.abstractmethod
    def expire(self, max_tokens: int | None = None) -> int:
        """Drop the least recently seen buckets beyond ``max_tokens`` (default: the configured
        maximum); returns how many were dropped. Message counts stay as they are, as in
        SpamAssassin: expiry forgets rare old clues, not messages."""

    @abc.abstractmethod
    def expiry_due(self) -> bool:
        """Whether expiry_period has passed since the last expiry (one row or key read)."""

    def expire_if_due(self) -> int | None:
        """`expire` if expiry_period has passed since the last one; None if it was not due."""
        return self.expire() if self.expiry_due() else None

    @abc.abstractmethod
    def dump(self) -> dict[str, object]:
        """What ``sa-learn --dump magic`` shows, and a little more."""

    @abc.abstractmethod
    def backup(self, out: IO[str]) -> None:
        """Write the whole store in the portable text format (module docstring)."""

    @abc.abstractmethod
    def restore(self, inp: IO[str]) -> None:
        """Replace the store's contents with a backup, all or nothing. Raises StoreError."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget everything (messages, counts, the change log)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Write pending atimes and release the connection."""

    def interrupt(self) -> None:
        """Make an `expire` running on this store in another thread stop soon (between two of its
        steps, or at once where the backend can abort a statement) with StoreInterrupted; the
        steps it committed stay, each a change of its own. The one method that may be called
        from another thread."""
        self._interrupted.set()

    def _raise_if_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise StoreInterrupted(f"{self.where}: expiry interrupted")

    @property
    def mirror_nbytes(self) -> int:
        """Memory held for counts and seen marks (0 for a write-only handle with no marks)."""
        return self._spam.nbytes + self._ham.nbytes + self._touched.nbytes + self._marks.nbytes

    def take_seen_marks(self) -> Ids:
        """The buckets scans marked as seen since their atimes were last written, unmarked here:
        for another handle (an expiry in its own thread, the writer) to write with its own
        connection. A handle with counts leaves out the buckets empty in them: those have no
        atime to keep (the Redis store would otherwise make count strings for them)."""
        if self.write_only:
            ids, self._marks = self._marks, EMPTY_IDS
            return ids
        touched: Ids = np.flatnonzero(self._touched)
        self._touched[touched] = False
        kept: Ids = touched[(self._spam[touched] | self._ham[touched]) != 0]
        return kept

    def add_seen_marks(self, ids: Ids) -> None:
        """Mark buckets as seen, as scanning them would (`take_seen_marks` handed over)."""
        if self.write_only:
            self._marks = np.union1d(self._marks, np.asarray(ids, dtype=np.int64))
        else:
            self._touched[ids] = True

    def take_seen_marks_if_due(self) -> Ids | None:
        """`take_seen_marks` once the 10 minutes between two writes of them have passed (for a
        handle without `upkeep`, whose marks another handle writes), else None."""
        if not self._touch_flush_due():
            return None
        self._touched_since = time.monotonic()
        return self.take_seen_marks()

    def write_seen_marks(self, ids: Ids) -> None:
        """Write now, as last seen, the atime of these buckets (another handle's `take_seen_marks`)
        and of those this handle marked."""
        self._check_pid()
        self.add_seen_marks(ids)
        self._flush_touches()

    @abc.abstractmethod
    def _flush_touches(self) -> None:
        """Write the atime of the buckets marked as seen, and unmark them."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the mirror ------------------------------------------------------------------------------

    def _totals(self) -> None:
        self._spam_total = int(self._spam.sum(dtype=np.int64))
        self._ham_total = int(self._ham.sum(dtype=np.int64))
        self._norms = None

    def _apply(self, inc: Triples, dec: Triples, zero: Ids) -> None:
        """Apply one delta to the in-memory counts, exactly as the store did."""
        d_spam, d_ham = apply_delta(self._spam, self._ham, inc, dec, zero)
        self._spam_total += d_spam
        self._ham_total += d_ham
        self._norms = None

    def _view_hashes(self, msg: ParsedMessage) -> TokenViews[npt.NDArray[np.uint32]]:
        """The message's token hashes per view, remembered for the last message (scored, then
        often autolearnt)."""
        last = self._last
        if last is None or last[0] is not msg:
            last = self._last = (msg, self._tokenizer.view_hashes(msg))
        return last[1]

    def _hashes(self, msg: ParsedMessage) -> npt.NDArray[np.uint32]:
        """All the message's token hashes, distinct and sorted (what a store counts)."""
        return np.unique(np.concatenate(self._view_hashes(msg)))

    def _touch_flush_due(self) -> bool:
        return time.monotonic() - self._touched_since >= _TOUCH_FLUSH_INTERVAL

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            raise RuntimeError(f"a {type(self).__name__} cannot be used across fork(); open one per process")

    def spam_probability(self, msg: ParsedMessage) -> float | None:
        """The message's spam probability from the in-memory counts (call `refresh` to see
        others' learning). None until min_spam and min_ham messages are learnt, or when no
        token of the message says anything."""
        if self.write_only:
            raise RuntimeError(f"{self.where}: a write-only handle holds no counts to score with")
        if self._nspam < self.config.min_spam or self._nham < self.config.min_ham:
            return None
        if self._params.combiner == "complement_nb" and self._norms is None:
            self._norms = complement_nb_norms(self._spam, self._ham, self._params.alpha)
        counts = self._spam_total, self._ham_total, self.n_features, self._norms
        if not self._params.pooled:
            ids = bucket_ids(self._hashes(msg), self.n_features)
            if ids.size == 0:
                return None
            self._touched[ids] = True
            return spam_probability(self._params, self._spam[ids], self._ham[ids], self._nspam, self._nham, *counts)
        ids, view = view_bucket_ids(self._view_hashes(msg), self.n_features)
        if ids.size == 0:
            return None
        self._touched[ids] = True
        return pooled_probability(self._params, self._spam[ids], self._ham[ids], view, self._nspam, self._nham, *counts)

    # -- learning --------------------------------------------------------------------------------

    def learn(self, msg: ParsedMessage, is_spam: bool) -> LearnResult:
        """Learn one message as spam or ham, atomically."""
        return self._learn_batch([self.hashed(msg, is_spam)])[0]

    def hashed(self, msg: ParsedMessage, is_spam: bool) -> Hashed:
        """What `learn_hashed` takes for ``msg``; the message just scored is not tokenised again."""
        return message_digest(msg), self._hashes(msg), bool(is_spam)

    def learn_many(self, items: Iterable[tuple[ParsedMessage, bool]]) -> Counter[LearnResult]:
        """Learn many messages in batches (tokenised before each batch is written)."""
        return self.learn_hashed(
            (message_digest(msg), self._tokenizer.hashes(msg), bool(is_spam)) for msg, is_spam in items
        )

    def learn_hashed(self, items: Iterable[Hashed]) -> Counter[LearnResult]:
        """`learn_many` for messages already reduced to (digest, token hashes, is_spam): lets
        `filterd learn` parse and tokenise in several processes and write from one."""
        results: Counter[LearnResult] = Counter()
        batch: list[Hashed] = []
        for item in items:
            batch.append(item)
            if len(batch) >= self._batch_size:
                results.update(self._learn_batch(batch))
                batch = []
        if batch:
            results.update(self._learn_batch(batch))
        return results
