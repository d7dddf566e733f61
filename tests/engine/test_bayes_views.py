"""Bayes views: the tokenizer's text / links / headers split and the pooled probability.

Real SQLite stores in tmp_path; the probability maths is checked against hand computation.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from filterd.engine.bayes import BayesStore
from filterd.engine.bayes.base import view_bucket_ids
from filterd.engine.bayes.classifier import ClassifierParams, pooled_probability, robinson_fisher, robinson_fisher_views
from filterd.engine.bayes.tokenizer import Tokenizer, hash_tokens, tokenize
from tests.engine.bayes_helpers import bayes_config, make_raw, parse

ROOT = Path(__file__).resolve().parents[2]

HTML_MESSAGE = (
    b"From: Shop <offers@shop.example>\n"
    b"To: dana@example.net\n"
    b"Subject: Weekly bargains inside\n"
    b"Message-ID: <m1@shop.example>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/html; charset=us-ascii\n\n"
    b"<html><body><p>Visit https://deals.shop.example/week/bargains or write to sales@shop.example,"
    b" see catalog.shop.example today</p>"
    b'<div style="display:none">granola sprocket</div></body></html>\n'
)


def test_views_partition_the_tokens_by_what_they_describe() -> None:
    msg = parse(HTML_MESSAGE)
    text, links, headers = Tokenizer().view_tokens(msg)
    assert {"bargains", "subject:weekly", "today", "hidden:granola"} <= set(text)
    assert {"url:host:deals.shop.example", "url:p:bargains", "email:sales", "email:dom:shop.example"} <= set(links)
    assert "ud:catalog.shop.example" in links
    assert {"hdr:message-id", "from:dom:shop.example", "ct:text/html"} <= set(headers)
    assert not any(t.startswith(("url:", "email:", "ud:")) for t in text + headers)
    assert not any(t.startswith(("hdr:", "subject:", "rcvd:")) for t in links)
    # Together they are exactly the tokens a store learns.
    assert sorted(set(text + links + headers)) == sorted(tokenize(msg))


def test_cached_view_hashes_equal_the_spelled_out_view_tokens() -> None:
    tokenizer = Tokenizer(cache_size=64)  # small: the caches fill and empty along the way
    raws = [make_raw(i, i % 2 == 0) for i in range(20)] + [HTML_MESSAGE]
    raws += [p.read_bytes() for p in sorted((ROOT / "corpora").rglob("*.eml"))]
    assert len(raws) > 60
    for raw in raws * 2:
        msg = parse(raw)
        views = tokenizer.view_hashes(msg)
        for tokens, hashes in zip(tokenizer.view_tokens(msg), views, strict=True):
            assert np.array_equal(hashes, hash_tokens(tokens))
        assert np.array_equal(tokenizer.hashes(msg), np.unique(np.concatenate(views)))


def _counts(*pairs: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s for s, _ in pairs], dtype=np.int32), np.array([h for _, h in pairs], dtype=np.int32)


def _pooled(
    params: ClassifierParams, views: list[tuple[np.ndarray, np.ndarray]], nspam: int, nham: int
) -> float | None:
    s = np.concatenate([v[0] for v in views])
    h = np.concatenate([v[1] for v in views])
    label = np.concatenate([np.full(v[0].size, j, dtype=np.int64) for j, v in enumerate(views)])
    return pooled_probability(params, s, h, label, nspam, nham, 0, 0, 1 << 16)


def test_pooled_probability_is_the_weighted_mean_of_the_views_log_odds() -> None:
    params = ClassifierParams()
    views = [_counts((40, 1), (30, 2)), _counts((1, 50)), _counts((10, 10), (25, 1))]
    alone = [robinson_fisher(s, h, 100, 200) for s, h in views]
    assert all(p is not None and 0 < p < 1 for p in alone)
    z = [math.log(p / (1 - p)) for p in alone if p is not None]
    expected = 1 / (1 + math.exp(-(0.5 * z[0] + 0.25 * z[1] + 0.25 * z[2])))
    got = _pooled(params, views, 100, 200)
    assert got == pytest.approx(expected, rel=1e-9)


def test_pooled_probability_ignores_views_without_an_opinion() -> None:
    params = ClassifierParams()
    spammy = _counts((40, 1), (30, 2))
    unknown = _counts((0, 0))  # never seen: robinson_fisher has nothing to say (None)
    alone = robinson_fisher(*spammy, 100, 200)
    assert alone is not None
    # A silent view does not pull the others towards 0.5.
    got = _pooled(params, [spammy, unknown, unknown], 100, 200)
    assert got == pytest.approx(alone, rel=1e-9)
    # Strong clues both ways make a chi-square view say exactly 0.5: undecided, it abstains too.
    torn = _counts(*([(500, 0)] * 40 + [(0, 500)] * 40))
    assert robinson_fisher(*torn, 1000, 1000) == pytest.approx(0.5, abs=1e-9)
    got = _pooled(params, [torn, spammy, unknown], 100, 200)
    assert got == pytest.approx(alone, rel=1e-6)
    assert _pooled(params, [unknown, unknown, unknown], 100, 200) is None


def test_pooled_probability_bounds_a_saturated_view() -> None:
    params = ClassifierParams()
    certain = _counts(*([(900, 0)] * 150))  # p rounds to exactly 1.0 in floating point
    assert robinson_fisher(*certain, 1000, 1000) == 1.0
    hammy = _counts((0, 40))
    p = _pooled(params, [certain, hammy, _counts((0, 0))], 1000, 1000)
    assert p is not None and 0.5 < p < 1.0  # finite: the ham view still counts


LIST_HEADERS = (
    "Sender: owner-chat@lists.example\nErrors-To: chat-admin@lists.example\n"
    "Received: from lists.example (lists.example [192.0.2.7]) by mx.example.net\n"
)


def test_pooling_decides_spam_that_came_through_a_ham_mailing_list(tmp_path: Path) -> None:
    """The case the views are for: list headers are strong ham clues, the text strong spam."""
    config = bayes_config(min_spam=20, min_ham=20)
    with BayesStore.open(tmp_path / "bayes.sqlite", config) as store:
        ham = [parse(make_raw(i, False, headers=LIST_HEADERS)) for i in range(60)]
        spam = [parse(make_raw(i, True)) for i in range(60)]
        store.learn_many([(m, False) for m in ham] + [(m, True) for m in spam])
        probe = parse(make_raw(999, True, headers=LIST_HEADERS))
        pooled = store.spam_probability(probe)
    single_config = dataclasses.replace(config, views="single")
    with BayesStore.open(tmp_path / "bayes.sqlite", single_config) as store:
        single = store.spam_probability(probe)
        ordinary_ham = store.spam_probability(parse(make_raw(998, False, headers=LIST_HEADERS)))
    assert pooled is not None and single is not None and ordinary_ham is not None
    assert abs(single - 0.5) < 0.01  # one chi-square over everything: "unsure"
    assert pooled > 0.9
    assert ordinary_ham < 0.1


def test_each_view_is_scored_as_if_it_were_alone() -> None:
    """Labels keep the views apart: per-view selection of the most extreme tokens, per-view sums."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        sizes = rng.integers(0, 400, size=3)  # some views over max_interesting, some empty
        s = rng.integers(0, 60, size=int(sizes.sum())).astype(np.int32)
        h = rng.integers(0, 60, size=int(sizes.sum())).astype(np.int32)
        s[rng.random(s.size) < 0.1] = 0
        h[rng.random(h.size) < 0.1] = 0
        label = np.repeat(np.arange(3), sizes)
        got = robinson_fisher_views(s, h, label, 3, 300, 700)
        want = [robinson_fisher(s[label == j], h[label == j], 300, 700) for j in range(3)]
        for g, w in zip(got, want, strict=True):
            assert (g is None and w is None) or (g is not None and w is not None and g == pytest.approx(w, abs=1e-12))
        # and with a min_prob_strength of its own per view
        strengths = (0.25, 0.346, 0.1)
        got = robinson_fisher_views(s, h, label, 3, 300, 700, min_prob_strength=strengths)
        want = [
            robinson_fisher(s[label == j], h[label == j], 300, 700, min_prob_strength=strengths[j]) for j in range(3)
        ]
        for g, w in zip(got, want, strict=True):
            assert (g is None and w is None) or (g is not None and w is not None and g == pytest.approx(w, abs=1e-12))


def test_the_text_view_keeps_weaker_tokens_than_the_others() -> None:
    """bayes.text_min_prob_strength applies to the text view only: a token of strength 0.3 (f
    about 0.8) counts in the text view at 0.25 and is dropped from links and headers at 0.346."""
    params = ClassifierParams()
    assert params.view_min_prob_strength() == (0.25, 0.346, 0.346)
    mild = _counts((40, 20))  # p = 40*200 / (40*200 + 20*100) = 0.8
    unknown = _counts((0, 0))
    text_only = _pooled(params, [mild, unknown, unknown], 100, 200)
    assert text_only is not None and text_only > 0.5
    assert _pooled(params, [unknown, mild, unknown], 100, 200) is None
    assert _pooled(params, [unknown, unknown, mild], 100, 200) is None
    as_before = dataclasses.replace(params, text_min_prob_strength=0.346)
    assert _pooled(as_before, [mild, unknown, unknown], 100, 200) is None


def test_view_bucket_ids_keep_a_bucket_once_per_view() -> None:
    views = [np.array([5, 70_000, 5 + 65_536], np.uint32), np.array([5], np.uint32), np.array([], np.uint32)]
    ids, label = view_bucket_ids(views, 1 << 16)
    assert sorted(zip(label.tolist(), ids.tolist(), strict=True)) == [(0, 5), (0, 70_000 - 65_536), (1, 5)]
