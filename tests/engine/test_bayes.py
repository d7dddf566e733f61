"""The Bayes classifier: tokenizer facts, store semantics, durability, sharing, and the rules.

Real SQLite files in tmp_path and real subprocesses (for kill -9 and for a second process
learning while this one scores); no mocks.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse  # type: ignore[import-untyped]
from sklearn.naive_bayes import ComplementNB, MultinomialNB

from filterd.config import load_config, parse_duration
from filterd.engine.bayes import (
    BayesCheck,
    BayesStore,
    LearnResult,
    StoreError,
    autolearn_decision,
    bayes_rules,
    message_digest,
    token_hashes,
    token_ids,
    tokenize,
)
from filterd.engine.bayes.classifier import (
    chi2q,
    complement_nb_log_odds,
    complement_nb_norms,
    naive_bayes_log_odds,
    robinson_fisher,
)
from filterd.engine.bayes.tokenizer import IGNORED_HEADERS, Tokenizer, hash_tokens
from filterd.engine.engine import Engine
from filterd.engine.message import parse_message
from filterd.engine.plugin import Hit
from filterd.engine.ruleset import RuleInfo
from filterd.engine.uris import UriParser
from filterd.errors import ConfigError
from tests.conftest import offline_config
from tests.engine.bayes_helpers import bayes_config, check_consistent, make_msg, make_raw, parse

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin"

BASE = (
    b"From: Alex Sender <alex@mail.sender.example>\n"
    b"To: Dana <dana@example.net>\n"
    b"Subject: Quarterly report draft\n"
    b"Date: Mon, 12 Jan 2026 10:00:00 +0000\n"
    b"Message-ID: <abc123@sender.example>\n"
    b"Content-Type: text/plain; charset=us-ascii\n"
)
BODY = b"\nHere is the draft of the quarterly report, see https://www.reports.example/q3/summary.html\n"


def msg_with(headers: bytes = b"", body: bytes = BODY, base: bytes = BASE) -> object:
    return parse(base + headers + body)


# -- tokenizer ------------------------------------------------------------------------------------

ADDED_BY_OTHERS = [
    b"X-Spam-Status: Yes, score=99.0 required=5.0 tests=SECRET_RULE\n",
    b"X-Spam-Flag: YES\n",
    b"X-Rspamd-Score: 15.5\n",
    b"X-Rspamd-Action: reject\n",
    b"X-Spamd-Result: default: False [2.0 / 15.0]\n",
    b"Authentication-Results: mx.example.net; spf=fail smtp.mailfrom=forged.example\n",
    b"ARC-Seal: i=1; a=rsa-sha256; t=1; cv=none; d=example.net; s=arc; b=QUJDREVG\n",
    b"ARC-Authentication-Results: i=1; mx.example.net; dkim=pass\n",
    b"Received-SPF: fail (mx.example.net: domain of forged.example) client-ip=192.0.2.99\n",
    b"X-Virus-Scanned: clean by secretscanner\n",
    b"X-Virus-Status: Clean\n",
    b"X-Microsoft-Antispam: BCL:9;\n",
    b"X-Microsoft-Antispam-Message-Info: secretinfo\n",
    b"X-MS-Exchange-Organization-SCL: 9\n",
    b"X-Forefront-Antispam-Report: SFV:SPM\n",
    b"X-Mimecast-Spam-Score: 20\n",
    b"X-Proofpoint-Spam-Details: rule=spam\n",
    b"X-Barracuda-Spam-Score: 9.9\n",
    b"X-IronPort-Anti-Spam-Result: secretresult\n",
    b"X-Amavis-Alert: BANNED\n",
    b"X-Greylist: delayed 300 seconds by secretgrey\n",
    b"Delivered-To: dana@example.net\n",
    b"List-Id: Secret list <secret.lists.example>\n",
    b"X-Keywords: $Junk\n",
    b"Status: RO\n",
]


@pytest.mark.parametrize("header", ADDED_BY_OTHERS, ids=lambda h: h.split(b":")[0].decode())
def test_tokenizer_ignores_headers_added_by_filters_and_lists(header: bytes) -> None:
    assert token_ids(msg_with(header)).tolist() == token_ids(msg_with()).tolist()  # type: ignore[arg-type]


def test_tokenizer_ignored_list_names_the_usual_suspects() -> None:
    for name in ("authentication-results", "received-spf", "x-greylist", "delivered-to", "date"):
        assert name in IGNORED_HEADERS


def test_tokenizer_dkim_signature_counts_by_presence_and_domain_only() -> None:
    signed = msg_with(b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=sel; bh=SECRETBH; b=SECRETSIG\n")
    extra = set(tokenize(signed)) - set(tokenize(msg_with()))  # type: ignore[arg-type]
    assert extra == {"hdr:dkim-signature", "dkim:d:sender.example"}


def test_tokenizer_prefixes_header_tokens_and_reads_the_body() -> None:
    tokens = set(tokenize(msg_with()))  # type: ignore[arg-type]
    assert {"subject:quarterly", "subject:report", "from:user:alex", "from:dom:mail.sender.example"} <= tokens
    assert {
        "from:dom:sender.example",
        "from:name:alex",
        "to:dom:example.net",
        "message-id:dom:sender.example",
    } <= tokens
    assert {"quarterly", "report", "draft", "ct:text/plain", "part:ct:text/plain"} <= tokens
    assert not any(t.startswith("date:") for t in tokens)


def test_tokenizer_url_pieces() -> None:
    tokens = set(tokenize(msg_with()))  # type: ignore[arg-type]
    assert {"url:host:www.reports.example", "url:dom:reports.example", "url:scheme:https"} <= tokens
    assert {"url:p:summary", "url:p:html"} <= tokens


def test_tokenizer_long_words_numbers_and_addresses() -> None:
    body = b"\nsupercalifragilisticexpialidocious costs $19.95 call 555-1234 or write to sales@shop.example.com\n"
    tokens = set(tokenize(msg_with(body=body)))  # type: ignore[arg-type]
    assert "skip:s 30" in tokens
    assert {"num:$99.99", "num:999-9999", "$19.95"} <= tokens
    assert {"email:sales", "email:dom:shop.example.com", "email:dom:example.com"} <= tokens
    assert "supercalifragilisticexpialidocious" not in tokens


def test_tokenizer_cjk_bigrams_and_8bit_share() -> None:
    base = BASE.replace(b"charset=us-ascii", b"charset=utf-8")
    msg = msg_with(body="\n今天天气很好，我们去公园吧。\n".encode(), base=base)
    tokens = set(tokenize(msg))  # type: ignore[arg-type]
    assert {"cjk:今天", "cjk:天天", "cjk:天气", "cjk:公园"} <= tokens
    assert "8bit%:30" in tokens  # 14 of the 38 characters with the Subject line
    assert not any(t.startswith("8bit%:") for t in tokenize(msg_with()))  # type: ignore[arg-type]
    assert not any(len(t) > 15 and not t.startswith(("cjk:", "8bit", "skip:")) and "今" in t for t in tokens)
    latin = msg_with(body="\nCafé crème brûlée à la carte\n".encode(), base=base)
    assert {"café", "crème", "brûlée", "carte"} <= set(tokenize(latin))  # type: ignore[arg-type]


def test_token_ids_are_distinct_sorted_buckets() -> None:
    msg = msg_with()
    for n_features in (1 << 10, 1 << 22):
        ids = token_ids(msg, n_features)  # type: ignore[arg-type]
        assert ids.dtype == np.int64
        assert (np.diff(ids) > 0).all() and ids.min() >= 0 and ids.max() < n_features
    hashes = token_hashes(msg)  # type: ignore[arg-type]
    assert hashes.dtype == np.uint32 and len(hashes) == len(set(tokenize(msg)))  # type: ignore[arg-type]


def test_tokenizer_bounds_its_work_on_hostile_mail() -> None:
    headers = b"".join(b"X-Junk-%d: value %d here\n" % (i, i) for i in range(5000))
    received = b"".join(b"Received: from h%d.example ([192.0.2.%d]) by mx.example\n" % (i, i % 250) for i in range(500))
    body = b"\n" + b" ".join(b"word%dx" % i for i in range(300_000)) + b"\n"
    msg = parse(BASE + headers + received + body)
    started = time.perf_counter()
    tokens = tokenize(msg)
    hashes = Tokenizer().hashes(msg)
    elapsed = time.perf_counter() - started
    # The bounds on the work are structural: few tokens, few of the 5000 junk headers. The clock
    # only guards against a hang (say a regex gone quadratic on 300k words): 60 s, far above what
    # a loaded machine needs for the well under a second this takes.
    assert elapsed < 60.0, elapsed
    assert len(tokens) < 20_000 and len(hashes) == len(tokens)
    assert sum(t.startswith("hdr:x-junk-") for t in tokens) < 300


def test_tokenizer_cached_hashes_equal_the_spelled_out_tokens() -> None:
    tokenizer = Tokenizer(cache_size=64)  # small: the caches fill and empty along the way
    raws = [make_raw(i, i % 2 == 0) for i in range(40)] + [BASE + BODY]
    if (CORPUS / "split.tsv").exists():
        rows = [line.split("\t") for line in (CORPUS / "split.tsv").read_text().splitlines()[1:200]]
        raws += [(CORPUS / p).read_bytes() for p, _, _ in rows]
    for raw in raws * 2:
        msg = parse(raw)
        assert np.array_equal(tokenizer.hashes(msg), hash_tokens(tokenize(msg)))


def test_parse_without_rule_texts_tokenises_and_digests_the_same() -> None:
    """filterd learn's workers parse with rule_texts=False: only what rules read is left out."""
    raws = [make_raw(i, i % 2 == 0) for i in range(10)] + [BASE + BODY]
    raws += [p.read_bytes() for p in sorted((ROOT / "corpora").rglob("*.eml"))]
    uri_parser = UriParser()
    for raw in raws:
        full = parse(raw)
        lite = parse_message(raw, uri_parser=uri_parser, rule_texts=False)
        assert lite.body_text == lite.rawbody_text == lite.normalized_body == ""
        assert np.array_equal(Tokenizer().hashes(lite), Tokenizer().hashes(full))
        assert message_digest(lite) == message_digest(full)


def test_message_digest_ignores_what_transport_and_filters_add() -> None:
    plain = BASE + BODY
    digest = message_digest(parse(plain))
    added = (
        b"From MAILER-DAEMON Mon Jan 12 10:00:00 2026\n"
        b"Received: from mx.example.net by mail.example.net; Mon, 12 Jan 2026 10:00:09 +0000\n"
        b"X-Spam-Status: No, score=0.1\nAuthentication-Results: mx.example.net; spf=pass\n" + plain
    )
    assert message_digest(parse(added)) == digest
    assert message_digest(parse(plain.replace(b"\n", b"\r\n"))) == digest
    assert message_digest(parse(plain.replace(b"draft", b"final"))) != digest
    assert message_digest(parse(plain.replace(b"abc123", b"abc124"))) != digest


# -- combiners ------------------------------------------------------------------------------------


def _chi2q_spamassassin(x2: float, halfv: int) -> float:
    m = x2 / 2.0
    total = term = math.exp(-m)
    for i in range(1, halfv):
        term *= m / i
        total += term
    return min(total, 1.0)


def _robinson_fisher_spamassassin(s: list[int], h: list[int], nspam: int, nham: int) -> float | None:
    """SpamAssassin 4's Bayes.pm + CombineChi.pm, written out naively."""
    probs = []
    for sc, hc in zip(s, h, strict=True):
        if sc + hc == 0:
            continue
        ratio_s, ratio_h = sc / nspam, hc / nham
        p = ratio_s / (ratio_s + ratio_h)
        n = sc + hc
        f = (0.030 * 0.538 + n * p) / (0.030 + n)
        if abs(f - 0.5) >= 0.346:
            probs.append(f)
    probs = sorted(probs, key=lambda f: abs(f - 0.5))[-150:]
    if not probs:
        return None
    spam_p, ham_p = nspam / (nspam + nham), nham / (nspam + nham)
    for f in probs:
        spam_p *= 1.0 - f
        ham_p *= f
    spam_e = 1.0 - _chi2q_spamassassin(-2.0 * math.log(spam_p), len(probs))
    ham_e = 1.0 - _chi2q_spamassassin(-2.0 * math.log(ham_p), len(probs))
    return (spam_e - ham_e + 1.0) / 2.0


@pytest.mark.parametrize(("x2", "k"), [(0.5, 1), (10.0, 5), (300.0, 150), (40.0, 150), (1e-9, 3)])
def test_chi2q_matches_spamassassin(x2: float, k: int) -> None:
    assert chi2q(x2, k) == pytest.approx(_chi2q_spamassassin(x2, k), rel=1e-9, abs=1e-300)


def test_chi2q_survives_where_the_naive_sum_underflows() -> None:
    assert chi2q(2000.0, 3000) == pytest.approx(1.0, abs=1e-6)  # m = 1000 < k: the mass is above
    assert chi2q(4000.0, 150) == 0.0


def test_robinson_fisher_matches_spamassassin() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        size = int(rng.integers(1, 400))
        s = rng.integers(0, 40, size=size).astype(np.int32) * (rng.random(size) < 0.5)
        h = rng.integers(0, 40, size=size).astype(np.int32) * (rng.random(size) < 0.5)
        nspam, nham = int(rng.integers(50, 500)), int(rng.integers(50, 500))
        expected = _robinson_fisher_spamassassin(s.tolist(), h.tolist(), nspam, nham)
        got = robinson_fisher(s.astype(np.int32), h.astype(np.int32), nspam, nham)
        if expected is None:
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-9)


def test_naive_bayes_maths_equal_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    n_features, alpha = 64, 0.1
    x = (rng.random((80, n_features)) < 0.15).astype(np.float64)
    y = np.arange(80) % 3 == 0
    x[y, :8] = 1.0  # spam likes the first features
    spam = x[y].sum(axis=0).astype(np.int32)
    ham = x[~y].sum(axis=0).astype(np.int32)
    test = (rng.random((20, n_features)) < 0.2).astype(np.float64)
    mnb = MultinomialNB(alpha=alpha, force_alpha=True).fit(sparse.csr_matrix(x), y)
    cnb = ComplementNB(alpha=alpha, force_alpha=True, norm=True).fit(sparse.csr_matrix(x), y)
    jll = mnb.predict_joint_log_proba(test)
    norms = complement_nb_norms(spam, ham, alpha)
    for row, expected, c_row in zip(test, jll[:, 1] - jll[:, 0], test @ cnb.feature_log_prob_.T, strict=True):
        ids = np.flatnonzero(row)
        got = naive_bayes_log_odds(
            spam[ids], ham[ids], int(y.sum()), int((~y).sum()), int(spam.sum()), int(ham.sum()), n_features, alpha
        )
        assert got == pytest.approx(expected, rel=1e-9)
        c_got = complement_nb_log_odds(spam[ids], ham[ids], int(spam.sum()), int(ham.sum()), n_features, alpha, norms)
        assert c_got == pytest.approx(c_row[1] - c_row[0], rel=1e-9, abs=1e-12)


# -- BAYES_xx bands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "rules"),
    [
        (0.0, ["BAYES_00"]),
        (0.01, ["BAYES_00"]),
        (0.0100001, ["BAYES_05"]),
        (0.2, ["BAYES_20"]),
        (0.5, ["BAYES_50"]),
        (0.95, ["BAYES_80"]),
        (0.999, ["BAYES_99"]),
        (0.9991, ["BAYES_99", "BAYES_999"]),
        (1.0, ["BAYES_99", "BAYES_999"]),
    ],
)
def test_bayes_rules_bands_as_spamassassin(p: float, rules: list[str]) -> None:
    assert bayes_rules(p) == rules


# -- the store ----------------------------------------------------------------------------------


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bayes.sqlite"


def trained(path: Path, n: int = 8, **config: object) -> BayesStore:
    store = BayesStore.open(path, bayes_config(**config))
    store.learn_many([(make_msg(i, True), True) for i in range(n)] + [(make_msg(i, False), False) for i in range(n)])
    return store


def test_store_creates_file_in_wal_mode(store_path: Path) -> None:
    with BayesStore.open(store_path, bayes_config()) as store:
        assert store.counts() == (0, 0)
    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_store_learn_is_idempotent_moves_and_forgets(store_path: Path) -> None:
    store = BayesStore.open(store_path, bayes_config())
    msg = make_msg(1, True)
    assert store.learn(msg, True) is LearnResult.LEARNED
    assert store.learn(msg, True) is LearnResult.ALREADY
    assert store.counts() == (1, 0)
    same_message_redelivered = parse(b"X-Spam-Status: Yes\nReceived: from relay.example\n" + make_raw(1, True))
    assert store.learn(same_message_redelivered, True) is LearnResult.ALREADY
    assert store.learn(msg, False) is LearnResult.MOVED
    assert store.counts() == (0, 1)
    check_consistent(store_path)
    assert store.forget(msg) is LearnResult.FORGOTTEN
    assert store.forget(msg) is LearnResult.NOT_KNOWN
    assert store.counts() == (0, 0)
    assert store.dump()["ntokens"] == 0
    check_consistent(store_path)
    store.close()


def test_store_learn_many_counts_results_and_batches(store_path: Path) -> None:
    store = BayesStore.open(store_path, bayes_config())
    items = [(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(700)]  # two transactions
    items.append((make_msg(0, True), True))  # a duplicate in the same batch
    items.append((make_msg(1, False), True))  # learnt as ham above, now spam
    results = store.learn_many(items)
    assert results == Counter({LearnResult.LEARNED: 700, LearnResult.ALREADY: 1, LearnResult.MOVED: 1})
    assert store.counts() == (351, 349)
    check_consistent(store_path)
    store.close()


def test_store_silent_until_min_spam_and_min_ham(store_path: Path) -> None:
    store = BayesStore.open(store_path, bayes_config(min_spam=4, min_ham=3))
    probe = make_msg(99, True)
    for i in range(4):
        store.learn(make_msg(i, True), True)
        assert store.spam_probability(probe) is None
    for i in range(2):
        store.learn(make_msg(i, False), False)
        assert store.spam_probability(probe) is None
    store.learn(make_msg(2, False), False)
    assert store.spam_probability(probe) is not None
    store.close()


def test_store_probability_follows_training(store_path: Path) -> None:
    store = trained(store_path)
    spam_p = store.spam_probability(make_msg(1000, True))
    ham_p = store.spam_probability(make_msg(1000, False))
    assert spam_p is not None and ham_p is not None
    assert spam_p > 0.9 and ham_p < 0.1
    # A new word learnt in spam makes a ham-like message that carries it more spammy.
    probe = make_msg(2000, False, extra="zanzibarfoo quixotrel")
    before = store.spam_probability(probe)
    assert before is not None
    store.learn_many([(make_msg(3000 + i, True, extra="zanzibarfoo quixotrel"), True) for i in range(6)])
    after = store.spam_probability(probe)
    assert after is not None and after > before
    store.close()


@pytest.mark.parametrize("combiner", ["robinson_fisher", "naive_bayes", "complement_nb"])
def test_store_every_combiner_separates_synthetic_mail(store_path: Path, combiner: str) -> None:
    store = trained(store_path, combiner=combiner)
    spam = [store.spam_probability(make_msg(500 + i, True)) for i in range(10)]
    ham = [store.spam_probability(make_msg(500 + i, False)) for i in range(10)]
    assert all(p is not None and p > 0.5 for p in spam)
    assert all(p is not None and p < 0.5 for p in ham)
    store.close()


def test_store_backup_clear_restore_gives_identical_probabilities(store_path: Path) -> None:
    store = trained(store_path)
    store.forget(make_msg(0, True))
    probes = [make_msg(700 + i, i % 2 == 0) for i in range(10)]
    before = [store.spam_probability(m) for m in probes]
    out = io.StringIO()
    store.backup(out)
    text = out.getvalue()
    assert text.startswith("filterd-bayes-backup\t1\n") and text.rstrip("\n").split("\n")[-1].startswith("end\t")
    store.clear()
    assert store.counts() == (0, 0) and store.spam_probability(probes[0]) is None
    store.restore(io.StringIO(text))
    assert [store.spam_probability(m) for m in probes] == before
    assert store.counts() == (7, 8)
    check_consistent(store_path)
    again = io.StringIO()
    store.backup(again)
    assert again.getvalue().split("\n")[4:] == text.split("\n")[4:]  # same records
    store.close()


def test_store_restore_rejects_a_truncated_backup_and_keeps_the_store(store_path: Path) -> None:
    store = trained(store_path)
    out = io.StringIO()
    store.backup(out)
    truncated = "\n".join(out.getvalue().split("\n")[:-3]) + "\n"
    with pytest.raises(StoreError, match="truncated"):
        store.restore(io.StringIO(truncated))
    with pytest.raises(StoreError, match="not a filterd Bayes backup"):
        store.restore(io.StringIO("v\t3\tdb_version\n"))
    assert store.counts() == (8, 8)
    store.close()


def test_store_restore_into_other_n_features_rebuilds_buckets(tmp_path: Path) -> None:
    small = trained(tmp_path / "a.sqlite", n_features=1 << 16)
    out = io.StringIO()
    small.backup(out)
    big = BayesStore.open(tmp_path / "b.sqlite", bayes_config(n_features=1 << 18))
    big.restore(io.StringIO(out.getvalue()))
    assert big.counts() == (8, 8) and big.n_features == 1 << 18
    check_consistent(tmp_path / "b.sqlite")
    p = big.spam_probability(make_msg(900, True))
    assert p is not None and p > 0.9
    small.close()
    big.close()


def test_store_keeps_its_n_features_when_the_config_changes(store_path: Path) -> None:
    trained(store_path, n_features=1 << 16).close()
    with BayesStore.open(store_path, bayes_config(n_features=1 << 20)) as store:
        assert store.n_features == 1 << 16
        assert store.spam_probability(make_msg(900, True)) is not None


def test_store_expiry_bounds_tokens_dropping_the_least_recently_seen(store_path: Path) -> None:
    store = BayesStore.open(store_path, bayes_config())
    old = make_msg(1, True, extra="ancientword oldtimer")
    store.learn(old, True)
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE buckets SET atime = atime - 86400")
    conn.commit()
    conn.close()
    new = make_msg(2, False, extra="freshword")
    store.learn(new, False)
    new_ids = set(token_ids(new, store.n_features).tolist())
    n_before = store.dump()["ntokens"]
    assert isinstance(n_before, int)
    dropped = store.expire(max_tokens=len(new_ids))
    assert dropped == n_before - len(new_ids)
    assert store.dump()["ntokens"] == len(new_ids)
    conn = sqlite3.connect(store_path)
    kept = {row[0] for row in conn.execute("SELECT id FROM buckets")}
    conn.close()
    assert kept == new_ids
    assert store.counts() == (1, 1)
    check_consistent(store_path, exact=False)
    # Memory equals the file: a fresh process sees the same numbers.
    with BayesStore.open(store_path, bayes_config(min_spam=1, min_ham=1)) as fresh:
        store.config = fresh.config
        for probe in (old, new, make_msg(3, True)):
            assert store.spam_probability(probe) == fresh.spam_probability(probe)
    # Forgetting the old message after its buckets expired never goes below zero.
    assert store.forget(old) is LearnResult.FORGOTTEN
    check_consistent(store_path, exact=False)
    assert store.expire() == 0
    assert store.dump()["expired_total"] == dropped
    store.close()


def test_store_scanning_marks_buckets_as_seen(store_path: Path) -> None:
    store = trained(store_path)
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE buckets SET atime = 1000")
    conn.commit()
    probe = make_msg(5, True)
    store.spam_probability(probe)
    store.close()  # writes what was seen
    seen = {row[0] for row in conn.execute("SELECT id FROM buckets WHERE atime > 1000")}
    conn.close()
    assert seen and seen <= set(token_ids(probe, 1 << 16).tolist())


def test_store_dump_magic(store_path: Path) -> None:
    store = trained(store_path)
    info = store.dump()
    assert info["nspam"] == 8 and info["nham"] == 8 and info["nmessages"] == 16
    assert isinstance(info["ntokens"], int) and info["ntokens"] > 50
    assert isinstance(info["size"], int) and info["size"] > 0
    assert info["n_features"] == 1 << 16 and info["version"] == 1
    assert isinstance(info["oldest_atime"], int) and info["oldest_atime"] <= info["newest_atime"]  # type: ignore[operator]
    store.close()


def test_store_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    bogus = tmp_path / "bayes.sqlite"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        BayesStore.open(bogus, bayes_config())


def test_store_refreshes_from_a_pruned_log_by_reloading(store_path: Path) -> None:
    reader = BayesStore.open(store_path, bayes_config())
    writer = trained(store_path)
    conn = sqlite3.connect(store_path)
    conn.execute("DELETE FROM changes")  # as if the log had been pruned while the reader slept
    conn.commit()
    conn.close()
    reader.refresh()
    probe = make_msg(40, True)
    assert reader.spam_probability(probe) == writer.spam_probability(probe)
    reader.close()
    writer.close()


def test_store_snapshot_and_table_give_the_same_counts(store_path: Path) -> None:
    store = trained(store_path, n=20)
    store.forget(make_msg(3, False))
    store.expire(max_tokens=40)
    store.learn(make_msg(77, True, extra="afterwards"), True)
    conn = sqlite3.connect(store_path)
    snap_seq, state_seq = conn.execute("SELECT (SELECT seq FROM snapshot), (SELECT seq FROM state)").fetchone()
    assert snap_seq < state_seq  # the snapshot plus the changes after it
    probes = [make_msg(900 + i, i % 2 == 0, extra="afterwards") for i in range(8)]
    with BayesStore.open(store_path, bayes_config()) as from_snapshot:
        via_snapshot = [from_snapshot.spam_probability(m) for m in probes]
    conn.execute("DELETE FROM snapshot")  # as an old store without one
    conn.commit()
    with BayesStore.open(store_path, bayes_config()) as from_table:
        via_table = [from_table.spam_probability(m) for m in probes]
    assert via_snapshot == via_table == [store.spam_probability(m) for m in probes]
    assert conn.execute("SELECT seq FROM snapshot").fetchone() == (state_seq,)  # written again on open
    conn.close()
    store.close()


# -- processes ----------------------------------------------------------------------------------

CHILD_PRELUDE = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(ROOT)!r})
    from pathlib import Path
    from filterd.engine.bayes import BayesStore
    from tests.engine.bayes_helpers import bayes_config, make_msg
    """
)


def child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


TRAIN_FOREVER = """
    import itertools
    store = BayesStore.open(sys.argv[1], bayes_config())
    base = int(sys.argv[2])
    print("ready", flush=True)
    for i in itertools.count():
        n = base + i
        if i % 3 == 2:
            store.learn_many([(make_msg(n * 10 + k, k % 2 == 0), k % 2 == 0) for k in range(10)])
        elif i % 5 == 4:
            store.forget(make_msg((n - 3) * 10, True))
        else:
            store.learn(make_msg(n * 10, n % 2 == 0), n % 2 == 0)
"""


def test_store_survives_kill_9_during_training(store_path: Path) -> None:
    rng = random.Random(1234)
    learnt = []
    for round_ in range(6):
        proc = child(TRAIN_FOREVER, str(store_path), str(round_ * 100_000))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        nspam, nham = check_consistent(store_path)
        learnt.append(nspam + nham)
    assert learnt[-1] > 0
    with BayesStore.open(store_path, bayes_config()) as store:
        assert store.counts() == (nspam, nham)


def test_store_two_writers_at_once_stay_consistent(store_path: Path) -> None:
    BayesStore.open(store_path, bayes_config()).close()
    code = """
        store = BayesStore.open(sys.argv[1], bayes_config())
        base = int(sys.argv[2])
        for i in range(40):
            store.learn(make_msg(base + i, i % 2 == 0), i % 2 == 0)
        store.learn_many([(make_msg(base + 100 + i, True), True) for i in range(30)])
        store.close()
    """
    procs = [child(code, str(store_path), str(base)) for base in (0, 10_000)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert check_consistent(store_path) == (100, 40)


LEARN_LATER = """
    import time
    store = BayesStore.open(sys.argv[1], bayes_config())
    time.sleep(float(sys.argv[2]))
    store.learn_many([(make_msg(50_000 + i, True, extra="shibboleth"), True) for i in range(20)])
    print(time.time(), flush=True)
    store.close()
"""


def test_learning_in_another_process_changes_scores_within_5_seconds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trained(state / "bayes.sqlite").close()
    config = offline_config()
    config = dataclasses.replace(config, bayes=bayes_config())
    engine = Engine.load(config, state_dir=str(state))
    probe = make_raw(60_000, False, extra="shibboleth " * 30)
    first = engine.scan_sync(probe)
    before = [h for h in first.hits if h.rule.startswith("BAYES_")]
    assert before and before[0].rule in ("BAYES_00", "BAYES_05", "BAYES_20"), before
    proc = child(LEARN_LATER, str(state / "bayes.sqlite"), "0.5")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    learnt_at = float(out.strip())
    while True:
        hits = [h for h in engine.scan_sync(probe).hits if h.rule.startswith("BAYES_")]
        if hits != before:
            break
        assert time.time() - learnt_at < 5.0, "the other process's learning never showed"
        time.sleep(0.05)
    assert time.time() - learnt_at < 5.0
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck)
    check.close()


# -- through the engine ---------------------------------------------------------------------------


def test_bayes_rules_fire_through_the_engine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trained(state / "bayes.sqlite", n=12).close()
    config = dataclasses.replace(offline_config(), bayes=bayes_config())
    engine = Engine.load(config, state_dir=str(state))
    spam = engine.scan_sync(make_raw(800, True))
    ham = engine.scan_sync(make_raw(800, False))
    spam_hits = {h.rule: h for h in spam.hits if h.rule.startswith("BAYES_")}
    ham_hits = {h.rule: h for h in ham.hits if h.rule.startswith("BAYES_")}
    # Scored from the "with Bayes" set (rules/scores.yaml's second value), whatever the fit made it.
    top, bottom = engine.info("BAYES_99"), engine.info("BAYES_00")
    assert top is not None and bottom is not None and top.score_bayes is not None and top.score_bayes > 0
    assert "BAYES_99" in spam_hits and spam_hits["BAYES_99"].score == top.score_for(True)
    assert spam_hits["BAYES_99"].detail in ("score: 0.9990", "score: 1.0000") or spam_hits[
        "BAYES_99"
    ].detail.startswith("score: 0.99")
    assert set(ham_hits) == {"BAYES_00"} and ham_hits["BAYES_00"].score == bottom.score_for(True) < 0
    info = engine.info("BAYES_99")
    assert info is not None and "learn" in info.tflags
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck) and check.store is not None
    check.close()


def test_bayes_rules_silent_below_min_counts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trained(state / "bayes.sqlite", n=3).close()
    config = dataclasses.replace(offline_config(), bayes=bayes_config())
    engine = Engine.load(config, state_dir=str(state))
    result = engine.scan_sync(make_raw(800, True))
    assert not [h for h in result.hits if h.rule.startswith("BAYES_")]
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck)
    check.close()


def test_bayes_check_without_a_store_is_silent_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = dataclasses.replace(offline_config(), bayes=bayes_config())  # no autolearn: it would create one
    engine = Engine.load(config, state_dir=str(state))
    result = engine.scan_sync(make_raw(1, True))
    assert not [h for h in result.hits if h.rule.startswith("BAYES_")]
    assert not state.exists()
    plain = Engine.load(offline_config())
    check = plain.check("bayes")
    assert isinstance(check, BayesCheck) and check.store is None


def test_bayes_disabled_never_opens_a_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    trained(state / "bayes.sqlite", n=12).close()
    config = dataclasses.replace(offline_config(), bayes=bayes_config(enabled=False))
    engine = Engine.load(config, state_dir=str(state))
    assert not [h for h in engine.scan_sync(make_raw(800, True)).hits if h.rule.startswith("BAYES_")]


# -- configuration ------------------------------------------------------------------------------


def test_config_bayes_defaults_and_power_of_two(tmp_path: Path) -> None:
    cfg = offline_config().bayes
    assert (cfg.min_spam, cfg.min_ham, cfg.autolearn_ham_below, cfg.autolearn_spam_at) == (200, 200, 0.1, 12.0)
    assert cfg.n_features & (cfg.n_features - 1) == 0
    path = tmp_path / "filterd.yaml"
    path.write_text("bayes:\n  n_features: 1000000\n  combiner: naive_bayes\n")
    with pytest.raises(ConfigError, match="power of two"):
        load_config(path)
    path.write_text("bayes:\n  n_features: 1048576\n  combiner: naive_bayes\n  expiry_period: 6h\n")
    loaded = load_config(path).bayes
    assert loaded.n_features == 1 << 20 and loaded.combiner == "naive_bayes"
    assert loaded.expiry_period == parse_duration("6h")


# -- autolearn ----------------------------------------------------------------------------------


def _info(name: str, score: float, type_: str, *tflags: str) -> RuleInfo:
    return RuleInfo(name, type_, "", score, frozenset(tflags), "", "test")


INFOS = {
    "HDR_A": _info("HDR_A", 4.0, "header"),
    "HDR_B": _info("HDR_B", 3.0, "header"),
    "BODY_A": _info("BODY_A", 4.0, "body"),
    "URI_A": _info("URI_A", 3.5, "uri"),
    "EVAL_A": _info("EVAL_A", 5.0, "eval"),
    "NICE": _info("NICE", -2.0, "header", "nice"),
    "WELCOME": _info("WELCOME", -100.0, "eval", "userconf", "noautolearn"),
    "FORCE": _info("FORCE", 12.0, "eval", "autolearn_force"),
    "BAYES_00": _info("BAYES_00", -1.9, "eval", "learn", "nice"),
    "BAYES_50": _info("BAYES_50", 0.8, "eval", "learn"),
    "BAYES_99": _info("BAYES_99", 3.5, "eval", "learn"),
}


def decide(*names: str, **overrides: object) -> bool | None:
    config = dataclasses.replace(offline_config(), bayes=dataclasses.replace(offline_config().bayes, **overrides))  # type: ignore[arg-type]
    return autolearn_decision([Hit(n) for n in names], INFOS, config)


def test_autolearn_spam_needs_points_from_headers_and_body() -> None:
    assert decide("HDR_A", "HDR_B", "BODY_A", "URI_A") is True  # 14.5 points, 7 header, 7.5 body
    assert decide("HDR_A", "HDR_B", "EVAL_A") is None  # 12 points but no body points
    assert decide("FORCE") is True  # autolearn_force waives the header/body split
    assert decide("HDR_A", "HDR_B", "BODY_A", "URI_A", "BAYES_00") is None  # Bayes disagrees
    assert decide("HDR_A", "HDR_B", "BODY_A", "URI_A", "BAYES_99") is True
    assert decide("HDR_A", "HDR_B", "BODY_A", "URI_A", "WELCOME") is None  # not spam by its final score
    assert decide("HDR_A", "HDR_B", "BODY_A", "URI_A", autolearn=False) is None


def test_autolearn_ham_below_threshold_unless_bayes_says_spam() -> None:
    assert decide() is False
    assert decide("NICE") is False
    assert decide("NICE", "BAYES_00") is False
    assert decide("NICE", "BAYES_99") is None  # learned points 3.5 > 1.0
    assert decide("NICE", "BAYES_50") is False  # 0.8 <= 1.0
    assert decide("WELCOME") is False  # ignored: points 0 < 0.1
    assert decide("HDR_A") is None  # 4 points: neither
    assert decide(autolearn_ham_below=-1.0) is None


def test_autolearn_points_use_the_set_without_bayes_and_the_verdict_the_set_with_it() -> None:
    infos = dict(INFOS)
    # 12.5 points without Bayes; with Bayes the rules are worth less and the message is ham.
    infos["HDR_A"] = dataclasses.replace(INFOS["HDR_A"], score_bayes=0.5)
    infos["BODY_A"] = dataclasses.replace(INFOS["BODY_A"], score_bayes=0.5)
    infos["URI_A"] = dataclasses.replace(INFOS["URI_A"], score_bayes=0.5)
    infos["HDR_B"] = dataclasses.replace(INFOS["HDR_B"], score_bayes=0.5)
    hits = [Hit(n) for n in ("HDR_A", "BODY_A", "URI_A", "HDR_B")]
    config = offline_config()
    assert autolearn_decision(hits, infos, config) is True  # no BAYES_xx: the first set decides
    # With BAYES_50 the engine scores 4 x 0.5 + 0.8 = 2.8: not spam, so not learnt as spam.
    assert autolearn_decision([*hits, Hit("BAYES_50")], infos, config) is None


def test_autolearn_accepts_a_scan_hit_dict_and_shares_for_eval_rules() -> None:
    config = offline_config()
    hits = {n: Hit(n) for n in ("HDR_A", "HDR_B", "EVAL_A")}
    assert autolearn_decision(hits, INFOS, config) is None
    assert autolearn_decision(hits, INFOS, config, shares={"EVAL_A": (0.0, 1.0)}) is True
    assert autolearn_decision(hits, INFOS, config, shares={"EVAL_A": (0.4, 0.6)}) is True  # 3 body points
    assert autolearn_decision(hits, INFOS, config, shares={"EVAL_A": (0.5, 0.5)}) is None  # 2.5 < 3


def _shipped() -> tuple[Engine, list[str], list[str]]:
    """The shipped rule set, and its strongest plain header and body rules (no Bayes, no tflags)."""
    engine = Engine.load(offline_config())
    plain = [i for i in engine.rules.info.values() if not i.tflags and not i.is_sub and i.score >= 1.0]
    top = sorted(plain, key=lambda i: -i.score)
    header = [i.name for i in top if i.type == "header"][:3]
    body = [i.name for i in top if i.type == "body"][:3]
    return engine, header, body


def test_autolearn_learned_points_come_from_the_scores_with_bayes_on_the_shipped_rules() -> None:
    """With the shipped scores every BAYES_xx rule is worth 0 without Bayes: learned points must
    use the set the engine scored with (SpamAssassin: "the original scoreset"), or Bayes's own
    verdict could never stop autolearn from going against it."""
    engine, header, body = _shipped()
    infos, config = engine.rules.info, engine.config
    assert infos["BAYES_00"].score == 0 and infos["BAYES_00"].score_bayes is not None
    assert infos["BAYES_00"].score_bayes < -1 and infos["BAYES_99"].score_bayes is not None
    spam = [Hit(n) for n in header + body]
    assert autolearn_decision(spam, infos, config) is True
    assert autolearn_decision([*spam, Hit("BAYES_00")], infos, config) is None  # Bayes says ham
    ham = [Hit("RCVD_IN_DNSWL_HI")]
    assert autolearn_decision(ham, infos, config) is False
    assert autolearn_decision([*ham, Hit("BAYES_99"), Hit("BAYES_999")], infos, config) is None  # Bayes says spam


def test_autolearn_counts_eval_rules_by_their_check_and_metas_by_their_rules_on_the_shipped_rules() -> None:
    engine, header, body = _shipped()
    shares, infos = engine.autolearn_shares, engine.rules.info
    assert shares["RCVD_IN_SBL"] == (1.0, 0.0) and shares["URIBL_BLACK"] == (0.0, 1.0)  # dnsbl, tflags
    assert shares["SPF_FAIL"] == (1.0, 0.0) and shares["HTML_IMAGE_ONLY"] == (0.0, 1.0)
    assert "BAYES_99" not in shares and "USER_IN_WELCOMELIST" not in shares
    metas = [n for n in engine.rules.meta_deps if n in shares and infos[n].score >= 1.0 and not infos[n].tflags]
    assert metas  # the shipped metas name header and body rules
    for name in metas:
        assert sum(shares[name]) == pytest.approx(1.0)
    # Header points from header-side evals and metas alone, body points from body rules: learnt
    # as spam only when both count.
    on_header = sorted((n for n in shares if shares[n] == (1.0, 0.0) and infos[n].score >= 1.0 and not infos[n].tflags
                        and infos[n].type in ("eval", "meta")), key=lambda n: -infos[n].score)  # fmt: skip
    hits, header_points = [Hit(n) for n in body], 0.0
    while (header_points < 3.0 or sum(infos[h.rule].score for h in hits) < 12.0) and on_header:
        name = on_header.pop(0)
        hits.append(Hit(name))
        header_points += infos[name].score
    assert header_points >= 3.0 and sum(infos[h.rule].score for h in hits) >= 12.0
    assert autolearn_decision(hits, infos, engine.config, shares=shares) is True
    assert autolearn_decision(hits, infos, engine.config, shares={}) is None  # no header points at all
