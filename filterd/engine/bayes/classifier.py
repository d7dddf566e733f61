"""Combining per-bucket counts into a spam probability.

Every classifier reads the same data: for each hashed bucket, how many learnt spam and ham
messages contained it (``spam[b]``, ``ham[b]``), how many spam and ham messages were learnt, and
the sums of the count arrays. Scoring a message gathers the counts of its buckets (a numpy
fancy index) and does a few vector operations; nothing here touches SQLite or scikit-learn.

Three combiners, compared by ``scripts/bayes-experiment`` on the SpamAssassin corpus:

* ``robinson_fisher`` (the default): SpamAssassin's. Per token Robinson's smoothed
  f(w) = (s·x + n·p)/(s + n), the tokens with |f - 0.5| >= min_prob_strength, at most
  ``max_interesting`` of the most extreme, combined with Fisher's chi-square method (prior
  included, as in SpamAssassin since bug 3118). Its output is a probability with a real
  "unsure" middle, which the BAYES_xx bands were made for.
* ``naive_bayes``: multinomial naive Bayes, Lidstone smoothing ``alpha``, as the sigmoid of the
  log-likelihood ratio plus the log prior ratio. Ranks well but is famously over-confident:
  nearly everything lands below 0.01 or above 0.99.
* ``complement_nb``: Rennie et al.'s complement naive Bayes with weight normalisation, as
  scikit-learn's ComplementNB(norm=True); the score is squashed through a logistic curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "COMBINERS",
    "ClassifierParams",
    "Combiner",
    "chi2q",
    "complement_nb_log_odds",
    "complement_nb_norms",
    "naive_bayes_log_odds",
    "robinson_fisher",
    "spam_probability",
]

Combiner = Literal["robinson_fisher", "naive_bayes", "complement_nb"]
COMBINERS: tuple[Combiner, ...] = ("robinson_fisher", "naive_bayes", "complement_nb")

Counts = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True)
class ClassifierParams:
    """How counts become a probability (see `BayesConfig` for what each one means)."""

    combiner: Combiner = "robinson_fisher"
    robinson_s: float = 0.030
    robinson_x: float = 0.538
    min_prob_strength: float = 0.346
    max_interesting: int = 150
    alpha: float = 0.1  # Lidstone smoothing of the naive Bayes combiners


def _log_factorials(n: int) -> npt.NDArray[np.float64]:
    """log(i!) for i < n, read-only."""
    table = np.zeros(n)
    if n > 1:
        np.cumsum(np.log(np.arange(1, n, dtype=np.float64)), out=table[1:])
    table.flags.writeable = False
    return table


_LOG_FACTORIALS = _log_factorials(4096)  # covers k up to 4096 tokens; larger k computes its own


def chi2q(x2: float, k: int) -> float:
    """P(X >= x2) for X chi-square distributed with 2k degrees of freedom.

    For even degrees of freedom this is exp(-m)·Σ_{i<k} m^i/i! with m = x2/2 (SpamAssassin's
    chi2q); summed in log space so that neither a large m nor a large k over- or underflows.
    """
    if k <= 0:
        return 1.0
    m = x2 / 2.0
    if m <= 0.0:
        return 1.0
    log_fact = _LOG_FACTORIALS[:k] if k <= _LOG_FACTORIALS.size else _log_factorials(k)
    logs = np.arange(k, dtype=np.float64) * math.log(m) - log_fact
    top = float(logs.max())
    total = top - m + math.log(float(np.exp(logs - top).sum()))
    return min(1.0, math.exp(total))


def robinson_fisher(
    s: Counts,
    h: Counts,
    nspam: int,
    nham: int,
    *,
    robinson_s: float = 0.030,
    robinson_x: float = 0.538,
    min_prob_strength: float = 0.346,
    max_interesting: int = 150,
) -> float | None:
    """SpamAssassin's chi-square combining over the counts of one message's buckets.

    None when no token is both known and interesting enough (SpamAssassin then fires no rule).
    """
    if nspam <= 0 or nham <= 0:
        return None
    s_f = s.astype(np.float64)
    h_f = h.astype(np.float64)
    n_f = s_f + h_f
    seen = n_f > 0
    if not seen.all():
        s_f, h_f, n_f = s_f[seen], h_f[seen], n_f[seen]
        if n_f.size == 0:
            return None
    spam_ratio = s_f * (1.0 / nspam)
    p = spam_ratio / (spam_ratio + h_f * (1.0 / nham))
    f = (robinson_s * robinson_x + n_f * p) / (robinson_s + n_f)
    strength = np.abs(f - 0.5)
    if min_prob_strength > 0:
        keep = strength >= min_prob_strength
        f, strength = f[keep], strength[keep]
    if f.size == 0:
        return None
    if f.size > max_interesting > 0:
        f = f[np.argpartition(strength, f.size - max_interesting)[f.size - max_interesting :]]
    k = int(f.size)
    total = nspam + nham
    log_s = math.log(nspam / total) + float(np.log1p(-f).sum())
    log_h = math.log(nham / total) + float(np.log(f).sum())
    spam_evidence = 1.0 - chi2q(-2.0 * log_s, k)
    ham_evidence = 1.0 - chi2q(-2.0 * log_h, k)
    return (1.0 + spam_evidence - ham_evidence) / 2.0


def naive_bayes_log_odds(
    s: Counts,
    h: Counts,
    nspam: int,
    nham: int,
    spam_total: int,
    ham_total: int,
    n_features: int,
    alpha: float,
) -> float:
    """log P(spam|x) - log P(ham|x) of multinomial naive Bayes with Lidstone smoothing.

    Exactly scikit-learn's MultinomialNB(alpha) fitted on binary bag-of-buckets rows (the test
    suite and the experiment check it): feature_log_prob = log((count + alpha) /
    (class total + alpha·n_features)).
    """
    llr = float(np.log((s + alpha) / (h + alpha)).sum())
    llr += s.size * (math.log(ham_total + alpha * n_features) - math.log(spam_total + alpha * n_features))
    return llr + math.log(nspam / nham)


def complement_nb_norms(spam: Counts, ham: Counts, alpha: float) -> tuple[float, float]:
    """The per-class normalisers of ComplementNB(norm=True): Σ over all buckets of log θ.

    O(n_features): computed once per change of the counts, not per message.
    """
    spam_total = float(spam.sum(dtype=np.int64)) + alpha * spam.size
    ham_total = float(ham.sum(dtype=np.int64)) + alpha * ham.size
    # The complement of spam is ham and vice versa.
    z_spam = float(np.log((ham + alpha) / ham_total).sum())
    z_ham = float(np.log((spam + alpha) / spam_total).sum())
    return z_spam, z_ham


def complement_nb_log_odds(
    s: Counts,
    h: Counts,
    spam_total: int,
    ham_total: int,
    n_features: int,
    alpha: float,
    norms: tuple[float, float],
) -> float:
    """ComplementNB(norm=True)'s joint log-likelihood of spam minus that of ham.

    Weights are w_c(t) = log θ_c̄(t) / Σ_t' log θ_c̄(t'); both sums are negative, so a token rare
    in the complement of c weighs more for c.
    """
    log_theta_ham = np.log((h + alpha) / (ham_total + alpha * n_features))
    log_theta_spam = np.log((s + alpha) / (spam_total + alpha * n_features))
    z_spam, z_ham = norms
    return float(log_theta_ham.sum()) / z_spam - float(log_theta_spam.sum()) / z_ham


def spam_probability(
    params: ClassifierParams,
    s: Counts,
    h: Counts,
    nspam: int,
    nham: int,
    spam_total: int,
    ham_total: int,
    n_features: int,
    norms: tuple[float, float] | None = None,
) -> float | None:
    """The probability the chosen combiner gives one message, from its buckets' counts."""
    if params.combiner == "robinson_fisher":
        return robinson_fisher(
            s,
            h,
            nspam,
            nham,
            robinson_s=params.robinson_s,
            robinson_x=params.robinson_x,
            min_prob_strength=params.min_prob_strength,
            max_interesting=params.max_interesting,
        )
    if nspam <= 0 or nham <= 0 or s.size == 0:
        return None
    if params.combiner == "naive_bayes":
        z = naive_bayes_log_odds(s, h, nspam, nham, spam_total, ham_total, n_features, params.alpha)
    else:
        if norms is None:
            raise ValueError("complement_nb needs the normalisers (complement_nb_norms)")
        # Normalised weights are tiny fractions; dividing by the mean weight puts the score back
        # in log-likelihood-ratio units, so that 0.5 is the decision boundary and the bands mean
        # what they mean for naive_bayes.
        mean_weight = 1.0 / n_features
        z = complement_nb_log_odds(s, h, spam_total, ham_total, n_features, params.alpha, norms) / mean_weight
    return _sigmoid(z)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
