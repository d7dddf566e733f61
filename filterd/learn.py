"""`filterd learn`: train Bayes from spam and ham folders, like sa-learn.

Messages are parsed and learnt in batches (one SQLite transaction, or one Redis script per 50
messages, per batch), so a large folder learns at hundreds of messages per second and a kill
loses at most one batch. The store is the one the configuration names (`open_bayes_store`):
with ``state.backend: redis`` every daemon sharing that Redis sees what was learnt. A
progress bar with rate and ETA is drawn on a terminal; elsewhere a plain line is logged every
few seconds. The summary says what was learnt, what was already known, what moved class,
and what was skipped (with a warning naming each skipped file). Like sa-learn, it then expires
the store if ``bayes.expiry_period`` has passed since the last expiry.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TextIO

import numpy as np
import numpy.typing as npt

from filterd.config import Config
from filterd.engine.bayes import BayesStoreBase, LearnResult, StoreError, message_digest, open_bayes_store
from filterd.engine.bayes.tokenizer import Tokenizer
from filterd.engine.message import ParsedMessage, parse_message
from filterd.engine.uris import UriParser
from filterd.errors import StateError
from filterd.mailbox import count_sources, iter_messages

__all__ = ["run_learn"]

log = logging.getLogger("filterd.learn")
_BATCH = 200
_TIMEOUT = 120.0  # seconds a Redis reply may take: backups, restores and expiry move whole stores
EX_DATAERR, EX_UNAVAILABLE = 65, 69


class _Progress:
    """A one-line bar on a terminal; a log line every few seconds elsewhere."""

    def __init__(self, total: int, stream: TextIO, tty: bool) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.tty = tty
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int, files: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        share = min(files / self.total, 1.0)
        eta = (elapsed / share - elapsed) if share > 0 else 0.0
        text = (
            f"{done} messages, {rate:.0f} msg/s, {share * 100:3.0f}% of files, ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            width = 30
            bar = "=" * int(width * share)
            self.stream.write(f"\r[{bar:<{width}}] {text}   ")
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s", text)


@functools.cache
def _worker_tools() -> tuple[UriParser, Tokenizer]:
    """One URI parser (it loads the public-suffix list) and one tokenizer per worker process."""
    return UriParser(), Tokenizer()


def _reduce(raws: list[bytes], body_scan_size: int) -> list[tuple[str, npt.NDArray[np.uint32]]]:
    """Parse and tokenise a chunk of messages (runs in a worker process)."""
    uri_parser, tokenizer = _worker_tools()
    out = []
    for raw in raws:
        msg = parse_message(raw, uri_parser=uri_parser, body_scan_size=body_scan_size, rule_texts=False)
        out.append((message_digest(msg), tokenizer.hashes(msg)))
    return out


def _raw_items(paths: Iterable[str], skipped: list[str], files_done: list[int]) -> Iterator[bytes]:
    for path in paths:
        last_file = ""
        for item in iter_messages(path):
            file = item.identifier.split("#", 1)[0]
            if file != last_file:
                files_done[0] += 1
                last_file = file
            if item.skipped:
                log.warning("skipped %s: %s", item.identifier, item.skipped)
                skipped.append(item.identifier)
                continue
            yield item.data


def _messages(
    paths: Iterable[str], skipped: list[str], uri_parser: UriParser, config: Config, files_done: list[int]
) -> Iterator[ParsedMessage]:
    for raw in _raw_items(paths, skipped, files_done):
        yield parse_message(raw, uri_parser=uri_parser, body_scan_size=config.rules.body_scan_size)


def _chunks(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write(
    store: BayesStoreBase,
    reduced: list[tuple[str, npt.NDArray[np.uint32]]],
    is_spam: bool,
    totals: Counter[LearnResult],
) -> int:
    totals.update(store.learn_hashed((digest, hashes, is_spam) for digest, hashes in reduced))
    return len(reduced)


def run_learn(args: argparse.Namespace, config: Config) -> int:
    try:
        store = open_bayes_store(config, config.state_path, timeout=_TIMEOUT)
        try:
            return _run(args, config, store)
        finally:
            store.close()
    except StoreError as exc:  # not a store, or not a backup
        print(f"filterd learn: {exc}", file=sys.stderr)
        return EX_DATAERR
    except StateError as exc:  # Redis unreachable
        print(f"filterd learn: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


def _run(args: argparse.Namespace, config: Config, store: BayesStoreBase) -> int:
    if args.dump:
        print(json.dumps(store.dump(), indent=2, default=str))
        return 0
    if args.backup:
        if args.backup == "-":
            store.backup(sys.stdout)
        else:
            with open(args.backup, "w", encoding="utf-8") as out:
                store.backup(out)
        nspam, nham = store.counts()
        print(f"backed up {nspam} spam and {nham} ham to {args.backup}", file=sys.stderr)
        return 0
    if args.restore:
        if args.restore == "-":
            store.restore(sys.stdin)
        else:
            with open(args.restore, encoding="utf-8") as inp:
                store.restore(inp)
        nspam, nham = store.counts()
        print(f"restored: {nspam} spam, {nham} ham")
        return 0
    if args.clear:
        store.clear()
        print("cleared: the Bayes store is empty")
        return 0
    if args.expire:
        print(f"expired {store.expire(config.bayes.max_tokens)} tokens")
        return 0
    if not args.paths:
        print("filterd learn: name at least one Maildir, mbox, directory or file (or - for stdin)", file=sys.stderr)
        return 64
    tty = sys.stderr.isatty() and not args.no_progress
    progress = _Progress(sum(count_sources(p) for p in args.paths), sys.stderr, tty)
    skipped: list[str] = []
    files_done = [0]
    totals: Counter[LearnResult] = Counter()
    done = 0
    batch: list[ParsedMessage] = []

    def flush() -> None:
        nonlocal done
        for msg in batch:
            totals[store.forget(msg)] += 1
        done += len(batch)
        batch.clear()
        progress.update(done, files_done[0])

    started = time.monotonic()
    if args.forget:
        for msg in _messages(args.paths, skipped, UriParser(), config, files_done):
            batch.append(msg)
            if len(batch) >= _BATCH:
                flush()
        flush()
    else:
        # Parsing and tokenising dominate: spread them over the cores; one process writes, a
        # transaction per _BATCH messages (per worker chunk, the store's CPU per message and
        # the commits were 2x and 4x as many).
        chunks = _chunks(_raw_items(args.paths, skipped, files_done), _BATCH // 4)
        workers = max(1, min(os.cpu_count() or 1, 8))
        ready: list[tuple[str, npt.NDArray[np.uint32]]] = []

        def take(future: Future[list[tuple[str, npt.NDArray[np.uint32]]]]) -> None:
            nonlocal done, ready
            ready += future.result()
            if len(ready) >= _BATCH:
                done += _write(store, ready, bool(args.spam), totals)
                ready = []
                progress.update(done, files_done[0])

        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: list[Future[list[tuple[str, npt.NDArray[np.uint32]]]]] = []
            for chunk in chunks:
                pending.append(pool.submit(_reduce, chunk, config.rules.body_scan_size))
                if len(pending) >= workers * 2:
                    take(pending.pop(0))
            for future in pending:
                take(future)
        done += _write(store, ready, bool(args.spam), totals)
    progress.update(done, files_done[0], final=True)
    elapsed = time.monotonic() - started
    nspam, nham = store.counts()
    if args.forget:
        summary = f"forgot {totals[LearnResult.FORGOTTEN]}, not known {totals[LearnResult.NOT_KNOWN]}"
    else:
        summary = (
            f"learnt {totals[LearnResult.LEARNED]} as {'spam' if args.spam else 'ham'}, "
            f"already known {totals[LearnResult.ALREADY]}, moved from the other class "
            f"{totals[LearnResult.MOVED]}"
        )
    print(
        f"{summary}, skipped {len(skipped)} ({done} messages in {elapsed:.1f}s, "
        f"{done / max(elapsed, 1e-6):.0f} msg/s). The store now holds {nspam} spam and {nham} ham."
    )
    if nspam < config.bayes.min_spam or nham < config.bayes.min_ham:
        print(f"Bayes stays silent until it has learnt {config.bayes.min_spam} spam and {config.bayes.min_ham} ham.")
    # As sa-learn: training is when a store grows, so it is expired here too once expiry_period has passed.
    expired = store.expire_if_due()
    if expired:
        print(f"expired {expired} tokens")
    return 0 if not skipped or done else EX_DATAERR
