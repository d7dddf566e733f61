"""Synthetic mail and store checks shared by the Bayes tests and the subprocesses they start.

Kept importable on its own (no pytest, no fixtures): the crash and cross-process tests run it
in child interpreters with ``sys.path`` pointing here.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np

from filterd.config import BayesConfig
from filterd.engine.message import ParsedMessage, parse_message
from filterd.engine.uris import UriParser
from tests.conftest import offline_config

SPAM_WORDS = (
    "viagra", "cialis", "casino", "jackpot", "winner", "lottery", "prize", "mortgage", "refinance",
    "bargain", "discount", "pharmacy", "pills", "rolex", "replica", "investment", "guaranteed",
    "unclaimed", "inheritance", "bitcoin", "crypto", "unsubscribe", "limited", "offer", "exclusive",
    "cheapest",
)  # fmt: skip
HAM_WORDS = (
    "meeting", "agenda", "minutes", "patch", "kernel", "compile", "review", "branch", "release",
    "schedule", "lunch", "project", "budget", "report", "draft", "thanks", "regards", "tomorrow",
    "office", "conference", "paper", "deadline", "module", "python", "function", "variable",
)  # fmt: skip
COMMON_WORDS = ("the", "and", "you", "for", "with", "this", "that", "have", "from", "will", "your", "about")


@functools.lru_cache(maxsize=1)
def _parser() -> UriParser:
    return UriParser()  # loads the public-suffix list: once per process


def make_raw(n: int, spam: bool, *, extra: str = "", seed: int | None = None, headers: str = "") -> bytes:
    """Message number ``n`` of one class: distinct Message-ID, class-typical words."""
    rng = random.Random(n * 2 + int(spam) if seed is None else seed)
    words = SPAM_WORDS if spam else HAM_WORDS
    body = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(COMMON_WORDS) for _ in range(60))
    sender = "promo@deals.example" if spam else "colleague@work.example"
    subject = " ".join(rng.choice(words) for _ in range(3))
    return (
        f"From: {sender}\nTo: dana@example.net\nSubject: {subject}\n"
        f"Message-ID: <{n}.{'s' if spam else 'h'}.{seed}@{sender.split('@')[1]}>\n"
        f"Date: Mon, 12 Jan 2026 10:00:00 +0000\n{headers}"
        f"Content-Type: text/plain; charset=us-ascii\n\n{body}\n{extra}\n"
    ).encode()


def parse(raw: bytes) -> ParsedMessage:
    return parse_message(raw, uri_parser=_parser())


def make_msg(n: int, spam: bool, **kwargs: object) -> ParsedMessage:
    return parse(make_raw(n, spam, **kwargs))  # type: ignore[arg-type]


def bayes_config(**overrides: object) -> BayesConfig:
    """Small gates so that a few synthetic messages make the store speak; small arrays; no
    autolearn (engine tests would otherwise teach the store the probes they score)."""
    base = dataclasses.replace(offline_config().bayes, min_spam=5, min_ham=5, n_features=1 << 16, autolearn=False)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def check_consistent(path: Path, *, exact: bool = True) -> tuple[int, int]:
    """Assert the file is sound and its counts agree with its messages; returns (nspam, nham).

    With ``exact`` (no expiry happened), every bucket's counts must equal what the stored token
    hashes of the learnt messages add up to.
    """
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        nspam, nham, seq = conn.execute("SELECT nspam, nham, seq FROM state").fetchone()
        by_class = Counter(dict(conn.execute("SELECT spam, count(*) FROM messages GROUP BY spam").fetchall()))
        assert (nspam, nham) == (by_class[1], by_class[0])
        (n_features,) = conn.execute("SELECT value FROM meta WHERE key = 'n_features'").fetchone()
        n_features = int(n_features)
        (last_change,) = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
        assert last_change == seq or last_change == 0
        if exact:
            spam = np.zeros(n_features, dtype=np.int64)
            ham = np.zeros(n_features, dtype=np.int64)
            for is_spam, blob in conn.execute("SELECT spam, hashes FROM messages"):
                ids = np.unique(np.frombuffer(blob, dtype="<u4") & np.uint32(n_features - 1)).astype(np.int64)
                (spam if is_spam else ham)[ids] += 1
            table_spam = np.zeros(n_features, dtype=np.int64)
            table_ham = np.zeros(n_features, dtype=np.int64)
            for bucket, s, h in conn.execute("SELECT id, spam, ham FROM buckets"):
                assert s > 0 or h > 0, "empty bucket rows are deleted"
                table_spam[bucket], table_ham[bucket] = s, h
            assert np.array_equal(spam, table_spam) and np.array_equal(ham, table_ham)
        return nspam, nham
    finally:
        conn.close()
