"""`filterd eval`: how accurate filterd is on labelled mail, in numbers and pictures.

Bayes is trained on one part of the corpus in a temporary state directory (never the user's
store), the other part is scored with the full engine, and three scorers are compared:
rules + Bayes (the engine's score), rules alone (the same hits scored as without Bayes) and Bayes
alone (the store's spam probability). Either a fixed split (``--split split.tsv``) or stratified
k-fold cross-validation (``--folds N``) with near-duplicates kept in one fold, so a spam
campaign never sits on both sides. Writes roc.png, scores.png and scores.tsv.

Heavy imports (the engine, scikit-learn, matplotlib) happen inside the functions that need
them: `add_eval_arguments` runs every time the ``filterd`` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import hashlib
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from filterd.config import Config
from filterd.headerblock import header_block_bounds, mbox_from_end, split_header_fields
from filterd.mailbox import iter_messages

if TYPE_CHECKING:
    from filterd.engine.bayes import BayesStoreBase
    from filterd.engine.engine import Engine
    from filterd.engine.message import ParsedMessage

__all__ = [
    "AtFpr",
    "EvalArgs",
    "EvalError",
    "Metrics",
    "Sample",
    "Scored",
    "SplitPlan",
    "SplitRow",
    "add_eval_arguments",
    "apply_split",
    "assign_folds",
    "body_key",
    "compute_metrics",
    "plot_roc",
    "plot_scores",
    "read_split",
    "run_eval",
    "strip_x_spam",
    "write_tsv",
]

EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_SOFTWARE = 0, 64, 65, 66, 70
FPR_LIMITS = (0.001, 0.01)
BAYES_THRESHOLD = 0.5
DEFAULT_FOLDS = 10
ROC_MIN_FPR = 1e-4
Label = Literal["ham", "spam"]

_X_SPAM_FIELD = re.compile(rb"^X-Spam-[^:\n]*:[^\n]*\n(?:[ \t][^\n]*\n)*", re.M | re.I)


class EvalError(Exception):
    """Bad input the user has to fix (a malformed split file, an impossible fold count)."""


# -- reading the corpus --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled message; ``ident`` is its path relative to the corpus root (as in split.tsv)."""

    ident: str
    label: Label
    raw: bytes  # top-level X-Spam-* fields already removed

    @property
    def is_spam(self) -> bool:
        return self.label == "spam"


def strip_x_spam(raw: bytes) -> bytes:
    """Remove top-level ``X-Spam-*`` fields: a verdict someone else wrote must not be learnt or scored."""
    start = mbox_from_end(raw)
    end = start + split_header_fields(raw[start:]).end  # a body line is never taken for a field
    head, body = raw[:end], raw[end:]
    return _X_SPAM_FIELD.sub(b"", head) + body


def _read_folders(folders: Sequence[Path], label: Label, root: Path) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Samples from the folders (Maildir, mbox, plain directories), and (identifier, reason) of
    whatever was skipped: not mail, unreadable, empty."""
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for folder in folders:
        for item in iter_messages(folder.absolute()):
            ident = _relative(item.identifier, root)
            if item.skipped:
                skipped.append((ident, item.skipped))
            else:
                samples.append(Sample(ident, label, strip_x_spam(item.data)))
    return samples, skipped


def _relative(ident: str, root: Path) -> str:
    """The identifier as split.tsv writes it: relative to the corpus root, with forward slashes."""
    path = Path(ident)  # an mbox message is "FILE#N"; that still relativises as a path
    if path.is_absolute() and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return ident


def _corpus_root(folders: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.absolute()) for f in folders]))


# -- the split file -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SplitRow:
    path: str
    label: Label
    part: Literal["train", "test"]


def read_split(path: Path) -> list[SplitRow]:
    """Rows of a ``path label part`` TSV (header row first). Raises EvalError naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"cannot read the split file {path}: {exc}") from exc
    if not lines:
        raise EvalError(f"{path}: empty; expected a header row 'path<TAB>label<TAB>part'")
    header = lines[0].split("\t")
    missing = [c for c in ("path", "label", "part") if c not in header]
    if missing:
        raise EvalError(f"{path}:1: header row lacks column(s) {', '.join(missing)}")
    ip, il, it = header.index("path"), header.index("label"), header.index("part")
    rows: list[SplitRow] = []
    seen: set[str] = set()
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < len(header):
            raise EvalError(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(cols)}")
        p, label, part = cols[ip], cols[il], cols[it]
        if label not in ("ham", "spam"):
            raise EvalError(f"{path}:{n}: label must be ham or spam, got {label!r}")
        if part not in ("train", "test"):
            raise EvalError(f"{path}:{n}: part must be train or test, got {part!r}")
        if p in seen:
            raise EvalError(f"{path}:{n}: {p} is listed twice")
        seen.add(p)
        rows.append(SplitRow(p, label, part))  # type: ignore[arg-type]  # checked just above
    return rows


@dataclass(slots=True)
class SplitPlan:
    """A split applied to the messages read; everything that did not line up is kept for the report."""

    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the split, not on disk
    unlisted: list[str] = field(default_factory=list)  # on disk, not in the split (not used)
    relabelled: list[str] = field(default_factory=list)  # split label differs from the folder's


def apply_split(samples: Sequence[Sample], rows: Sequence[SplitRow], on_disk: set[str]) -> SplitPlan:
    """Put each sample in its part. The folder (--spam/--ham) decides the label, not the split file.

    ``on_disk`` is every identifier found, including ones left out by --limit or skipped as unreadable, so
    that only paths really absent are called missing.
    """
    plan = SplitPlan()
    by_path = {s.ident: s for s in samples}
    listed: set[str] = set()
    for row in rows:
        listed.add(row.path)
        sample = by_path.get(row.path)
        if sample is None:
            if row.path not in on_disk:
                plan.missing.append(row.path)
            continue
        if sample.label != row.label:
            plan.relabelled.append(row.path)
        (plan.train if row.part == "train" else plan.test).append(sample)
    plan.unlisted = [s.ident for s in samples if s.ident not in listed]
    return plan


# -- cross-validation folds ---------------------------------------------------------------------


def body_key(sample: Sample) -> str:
    """Group key: the hash of the body (line endings normalised), so copies of one campaign share it.

    An empty body says nothing about kinship, so such a message is its own group.
    """
    _, start = header_block_bounds(sample.raw)
    body = sample.raw[start:]
    body = body.replace(b"\r\n", b"\n").strip()
    if not body:
        return "id:" + sample.ident
    return "body:" + hashlib.sha256(body).hexdigest()


def assign_folds(samples: Sequence[Sample], folds: int, seed: int) -> list[int]:
    """The fold (0..folds-1) of each sample: stratified by label, near-duplicates together, seeded.

    Groups are dealt out largest first (seeded shuffle among equal sizes), each to the fold that
    holds fewest messages of the group's majority label, so per label the folds differ by at
    most the size of the largest group.
    """
    if folds < 2:
        raise EvalError(f"--folds must be at least 2, got {folds}")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(body_key(s), []).append(i)
    if len(groups) < folds:
        raise EvalError(f"{folds} folds need at least {folds} distinct messages; there are {len(groups)}")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    order.sort(key=len, reverse=True)  # stable: the shuffle still orders groups of one size
    load = [[0, 0] for _ in range(folds)]  # [ham, spam] per fold
    fold_of = [0] * len(samples)
    for members in order:
        spam = sum(samples[i].is_spam for i in members)
        ham = len(members) - spam
        major = 1 if spam >= ham else 0
        best = min(range(folds), key=lambda f: (load[f][major], load[f][1 - major], f))
        load[best][0] += ham
        load[best][1] += spam
        for i in members:
            fold_of[i] = best
    return fold_of


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AtFpr:
    """The best spam recall with ham FPR <= limit, and the threshold (score >= threshold) giving it."""

    limit: float
    recall: float
    fpr: float
    threshold: float | None  # None: no threshold keeps the FPR that low and catches any spam


@dataclass(frozen=True, slots=True)
class Metrics:
    name: str
    n_ham: int
    n_spam: int
    threshold: float
    strict: bool  # spam when value > threshold (True) or >= threshold (False)
    caught: int  # spam at or over the threshold
    flagged_ham: int  # ham at or over the threshold
    auc: float | None  # None when the test set lacks ham or spam
    auc_ci: tuple[float, float] | None  # its 95% interval (`auc_interval`)
    at_fpr: tuple[AtFpr, ...]
    curve_fpr: tuple[float, ...]
    curve_tpr: tuple[float, ...]

    @property
    def recall(self) -> float | None:
        return self.caught / self.n_spam if self.n_spam else None

    @property
    def fpr(self) -> float | None:
        return self.flagged_ham / self.n_ham if self.n_ham else None

    # 95% intervals: the test messages are a sample of the mail a site gets (see `rate_interval`).
    @property
    def recall_ci(self) -> tuple[float, float] | None:
        return rate_interval(self.caught, self.n_spam) if self.n_spam else None

    @property
    def fpr_ci(self) -> tuple[float, float] | None:
        return rate_interval(self.flagged_ham, self.n_ham) if self.n_ham else None


CONFIDENCE = 0.95
AUC_RESAMPLES = 2000


def rate_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a rate seen as ``k`` of ``n``: it never claims
    less uncertainty than there is, which matters at the edges (2 false positives in 2,080 ham is
    an FPR anywhere from 0.01% to 0.35%)."""
    from scipy.stats import beta  # type: ignore[import-untyped]  # scipy comes with scikit-learn

    if n <= 0:
        return (0.0, 1.0)
    tail = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return (lo, hi)


def auc_interval(
    is_spam: Sequence[bool],
    values: Sequence[float],
    *,
    resamples: int = AUC_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile interval of the ROC AUC from stratified bootstrap resamples (spam and ham
    drawn apart, with replacement, in their own numbers); the AUC of each resample is the
    Mann-Whitney statistic, ties counting half."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(is_spam, dtype=bool)
    spam, ham = v[y], v[~y]
    ham_sorted = np.sort(ham)
    rng = np.random.default_rng(seed)
    aucs = np.empty(resamples)
    for r in range(resamples):
        s = spam[rng.integers(0, len(spam), len(spam))]
        h = np.sort(ham_sorted[rng.integers(0, len(ham), len(ham))])
        below = np.searchsorted(h, s, side="left")  # ham strictly lower than each spam
        tied = np.searchsorted(h, s, side="right") - below
        aucs[r] = (below.sum() + 0.5 * tied.sum()) / (len(spam) * len(ham))
    tail = (1 - confidence) / 2
    return (float(np.quantile(aucs, tail)), float(np.quantile(aucs, 1 - tail)))


def compute_metrics(
    name: str,
    is_spam: Sequence[bool],
    values: Sequence[float],
    threshold: float,
    *,
    strict: bool = False,
    limits: Sequence[float] = FPR_LIMITS,
) -> Metrics:
    """ROC AUC, recall and FPR at the threshold, and recall at each ham-FPR limit.

    roc_curve runs with drop_intermediate=False: dropping collinear points can lose the best
    point under an FPR limit.
    """
    n_spam = sum(is_spam)
    n_ham = len(is_spam) - n_spam
    over = [(v > threshold) if strict else (v >= threshold) for v in values]
    caught = sum(o and s for o, s in zip(over, is_spam, strict=True))
    false = sum(o and not s for o, s in zip(over, is_spam, strict=True))
    if not (n_spam and n_ham):
        return Metrics(name, n_ham, n_spam, threshold, strict, caught, false, None, None, (), (), ())
    from sklearn.metrics import roc_auc_score, roc_curve

    y = [1 if s else 0 for s in is_spam]
    fprs, tprs, thresholds = roc_curve(y, list(values), drop_intermediate=False)
    auc = float(roc_auc_score(y, list(values)))
    at: list[AtFpr] = []
    for limit in limits:
        allowed = [i for i in range(len(fprs)) if fprs[i] <= limit]  # index 0 (nothing flagged) always is
        best = max(allowed, key=lambda i: (tprs[i], -i))  # equal recall: the highest threshold
        thr = float(thresholds[best]) if tprs[best] > 0 else None
        at.append(AtFpr(limit, float(tprs[best]), float(fprs[best]), thr))
    return Metrics(
        name, n_ham, n_spam, threshold, strict, caught, false, auc, auc_interval(is_spam, values), tuple(at),
        tuple(float(x) for x in fprs), tuple(float(x) for x in tprs),
    )  # fmt: skip


# -- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scored:
    """What one test message got. ``score`` None: it could not be scored (``problems`` says why)."""

    ident: str
    label: Label
    score: float | None
    rules_score: float | None
    bayes: float | None  # None: Bayes had no opinion (silent, or too few known tokens)
    is_spam: bool | None
    hits: tuple[str, ...]
    problems: str = ""

    @property
    def failed(self) -> bool:
        return self.score is None


@dataclass(slots=True)
class FoldStats:
    """Training and scoring figures of one train/test round."""

    trained: int = 0
    parsed: int = 0  # messages parsed for this round (the others came from the cache)
    parse_seconds: float = 0.0
    learn_seconds: float = 0.0
    learn_results: Counter[str] = field(default_factory=Counter)
    train_parse_failures: list[tuple[str, str]] = field(default_factory=list)
    bayes_spam: int = 0
    bayes_ham: int = 0
    silent: bool = True
    scored: int = 0
    scan_seconds: float = 0.0


def _train(
    store: BayesStoreBase,
    train: Sequence[Sample],
    config: Config,
    stats: FoldStats,
    parsed: dict[str, ParsedMessage | str],
) -> None:
    """Parse (once per message over all folds: ``parsed`` caches it) and learn the training part.

    A message that fails to parse is recorded, not learnt. The cache holds a ParsedMessage or
    the error text.
    """
    from filterd.engine.message import ParsedMessage, parse_message
    from filterd.engine.uris import UriParser

    uri_parser = UriParser()
    items: list[tuple[ParsedMessage, bool]] = []
    started = time.perf_counter()
    for s in train:
        if s.ident not in parsed:
            stats.parsed += 1
            try:
                parsed[s.ident] = parse_message(
                    s.raw, uri_parser=uri_parser, body_scan_size=config.rules.body_scan_size
                )
            except Exception as exc:  # counted and reported, never dropped silently
                parsed[s.ident] = f"{type(exc).__name__}: {exc}"
        msg = parsed[s.ident]
        if isinstance(msg, ParsedMessage):
            items.append((msg, s.is_spam))
        else:
            stats.train_parse_failures.append((s.ident, str(msg)))
    stats.parse_seconds += time.perf_counter() - started
    started = time.perf_counter()
    results = store.learn_many(items)
    stats.learn_seconds += time.perf_counter() - started
    stats.trained += len(items)
    stats.learn_results.update({r.name.lower(): n for r, n in results.items()})
    stats.bayes_spam, stats.bayes_ham = store.counts()
    stats.silent = stats.bayes_spam < config.bayes.min_spam or stats.bayes_ham < config.bayes.min_ham


async def _score(
    engine: Engine, store: BayesStoreBase, test: Sequence[Sample], stats: FoldStats, progress: _Progress
) -> list[Scored]:
    """Scan each message with the full engine and ask the store for its probability."""
    out: list[Scored] = []
    for s in test:
        started = time.perf_counter()
        try:
            result = await engine.scan(s.raw)
        except Exception as exc:  # counted and reported, never dropped silently
            stats.scan_seconds += time.perf_counter() - started
            out.append(Scored(s.ident, s.label, None, None, None, None, (), f"{type(exc).__name__}: {exc}"))
            progress.step()
            continue
        stats.scan_seconds += time.perf_counter() - started
        stats.scored += 1
        problems = list(result.problems)
        try:
            bayes = store.spam_probability(result.message)
        except Exception as exc:
            bayes = None
            problems.append(f"Bayes probability failed: {type(exc).__name__}: {exc}")
        # What the same hits score without Bayes: the score set used when Bayes has no opinion.
        rules_score = round(sum(_without_bayes(engine, h) for h in result.hits if not h.rule.startswith("BAYES_")), 3)
        out.append(
            Scored(
                s.ident,
                s.label,
                result.score,
                rules_score,
                bayes,
                result.is_spam,
                tuple(h.rule for h in result.hits),
                "; ".join(problems),
            )
        )
        progress.step()
    return out


def _run_round(
    train: Sequence[Sample],
    test: Sequence[Sample],
    config: Config,
    progress: _Progress,
    parsed: dict[str, ParsedMessage | str],
) -> tuple[list[Scored], FoldStats]:
    """Train a fresh store in a temporary state directory, then score the test part against it."""
    from filterd.engine.bayes import BayesCheck, open_bayes_store
    from filterd.engine.engine import Engine

    stats = FoldStats()
    with tempfile.TemporaryDirectory(prefix="filterd-eval-") as tmp:
        # Autolearn would teach the store the very test messages it is being judged on; and
        # network checks would judge an archived corpus by today's blocklists and DNS. State
        # (Bayes, reputation) is always a temporary SQLite file, never a shared Redis.
        cfg = dataclasses.replace(
            config,
            state_dir=tmp,
            state=dataclasses.replace(config.state, backend="sqlite", sqlite_path=""),
            bayes=dataclasses.replace(config.bayes, autolearn=False),
            network=dataclasses.replace(config.network, enabled=False),
        )
        store = open_bayes_store(cfg, tmp)
        try:
            _train(store, train, cfg, stats, parsed)
            engine = Engine.load(cfg, state_dir=tmp)
            try:
                scored = asyncio.run(_score(engine, store, test, stats, progress))
            finally:
                if isinstance(check := engine.check("bayes"), BayesCheck):
                    check.close()  # its own connection to the store, which is about to be deleted
        finally:
            store.close()
    return scored, stats


class _Progress:
    """A one-line counter on a terminal's stderr; silent when stderr is a file or pipe."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.on = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.on and (self.done % 50 == 0 or self.done == self.total):
            print(f"\rscored {self.done}/{self.total}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


# -- output files --------------------------------------------------------------------------------


def write_tsv(scored: Sequence[Scored], path: Path) -> None:
    """One row per test message, failures included (empty score, the reason under problems)."""

    def num(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["path", "label", "score", "rules_score", "bayes_probability", "is_spam", "hits", "problems"])
        for s in scored:
            verdict = "" if s.is_spam is None else ("1" if s.is_spam else "0")
            w.writerow(
                [
                    s.ident,
                    s.label,
                    num(s.score, ".3f"),
                    num(s.rules_score, ".3f"),
                    num(s.bayes, ".6f"),
                    verdict,
                    ",".join(s.hits),
                    re.sub(r"\s+", " ", s.problems),
                ]
            )


_STYLE = {"rules + Bayes": ("tab:blue", "-"), "rules alone": ("tab:orange", "--"), "Bayes alone": ("tab:green", "-.")}


def plot_roc(metrics: Sequence[Metrics], path: Path, title: str, notes: Sequence[str] = ()) -> None:
    """ROC curves on a log FPR axis (1e-4..1), where a mail filter lives; each threshold marked.

    A log axis cannot show FPR 0, so those points are drawn at the left edge (said on the axis).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, m in enumerate(metrics):
        colour, dash = _STYLE.get(m.name, ("tab:grey", ":"))
        if m.auc is None:
            continue
        xs = [max(x, ROC_MIN_FPR) for x in m.curve_fpr]
        label = f"{m.name}: AUC {m.auc:.4f}, (1-AUC)% {100 * (1 - m.auc):.2f}"
        ax.plot(xs, m.curve_tpr, color=colour, ls=dash, lw=1.6, label=label)
        if m.recall is not None and m.fpr is not None:
            op = ">" if m.strict else ">="
            ax.plot(
                [max(m.fpr, ROC_MIN_FPR)],
                [m.recall],
                "o",
                color=colour,
                ms=11 - 2 * i,  # later markers smaller, so one that sits on another still shows
                mec="black",
                label=f"{m.name} at {op} {m.threshold:g}: recall {100 * m.recall:.1f}%, FPR {100 * m.fpr:.2f}%",
            )
    for limit in FPR_LIMITS:
        ax.axvline(limit, color="grey", ls=":", lw=1)
        ax.text(limit, 0.01, f" FPR {100 * limit:g}%", color="grey", fontsize=8, rotation=90, va="bottom")
    ax.set_xscale("log")
    ax.set_xlim(ROC_MIN_FPR, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(f"ham false-positive rate (log scale; FPR 0 drawn at {ROC_MIN_FPR:g})")
    ax.set_ylabel("spam recall (true-positive rate)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    for i, note in enumerate(notes):
        ax.text(0.99, 0.30 - 0.05 * i, note, transform=ax.transAxes, ha="right", fontsize=8, color="dimgrey")
    ax.legend(loc="lower right", fontsize=7.5, bbox_to_anchor=(1, 0.32) if notes else None)
    fig.tight_layout()
    fig.savefig(path)


def plot_scores(scored: Sequence[Scored], threshold: float, path: Path, title: str) -> None:
    """Histogram of rules + Bayes scores, ham against spam, log counts, with the threshold line.

    The range is cut to the bulk of the scores (a GTUBE at 1000 would flatten everything);
    scores outside are counted in the end bins, as the axis label says.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ham = np.array([s.score for s in scored if s.score is not None and s.label == "ham"], dtype=float)
    spam = np.array([s.score for s in scored if s.score is not None and s.label == "spam"], dtype=float)
    both = np.concatenate([ham, spam]) if len(ham) + len(spam) else np.array([threshold])
    lo = min(float(np.percentile(both, 0.5)), threshold - 5.0)
    hi = max(float(np.percentile(both, 99.5)), threshold + 5.0)
    lo, hi = float(np.floor(lo)), float(np.ceil(hi))
    bins = [float(b) for b in np.linspace(lo, hi, min(120, max(20, int((hi - lo) * 2))) + 1)]
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for values, name, colour in ((ham, "ham", "tab:green"), (spam, "spam", "tab:red")):
        if len(values):
            ax.hist(
                np.clip(values, lo, hi),
                bins=bins,
                histtype="stepfilled",
                alpha=0.45,
                color=colour,
                edgecolor=colour,
                label=f"{name} ({len(values)})",
            )
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"required_score {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"rules + Bayes score (scores outside [{lo:g}, {hi:g}] are counted in the end bins)")
    ax.set_ylabel("messages (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# -- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalArgs:
    """What `filterd eval` needs; `from_namespace` builds it from `add_eval_arguments`' options."""

    spam: list[Path]
    ham: list[Path]
    split: Path | None
    folds: int | None
    out_dir: Path
    config: Config
    seed: int = 0
    limit: int | None = None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, config: Config) -> EvalArgs:
        return cls(ns.spam, ns.ham, ns.split, ns.folds, ns.out, config, ns.seed, ns.limit)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `filterd eval` (the configuration options come from the CLI's common set)."""
    parser.add_argument(
        "--spam",
        action="append",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder (or file) of spam; repeat for several",
    )
    parser.add_argument(
        "--ham",
        action="append",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder (or file) of ham; repeat for several",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--split",
        type=Path,
        metavar="FILE",
        help="TSV 'path label part' (paths relative to the common parent of --spam and --ham): "
        "train on 'train', score 'test'",
    )
    how.add_argument(
        "--folds",
        type=int,
        metavar="N",
        help=f"stratified N-fold cross-validation, near-duplicates in one fold "
        f"(default without --split: {DEFAULT_FOLDS})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("filterd-eval"),
        metavar="DIR",
        help="where roc.png, scores.png and scores.tsv go (default ./filterd-eval)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for folds and --limit (default 0)")
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="use at most N messages of each label (a seeded sample), for a quick look",
    )


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} msg/s" if seconds > 0 else "n/a"


def _listing(items: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f", ... ({len(items) - most} more)" if len(items) > most else "")


def _metrics_table(rows: Sequence[Metrics | str]) -> list[str]:
    """The three scorers side by side; a str row is a scorer that has nothing to show, and why."""
    head = f"{'':<14} {'ROC AUC':>8} {'(1-AUC)%':>9} {'recall':>8} {'ham FPR':>8}   " + "   ".join(
        f"{'at ham FPR <= ' + format(100 * lim, 'g') + '%':<34}" for lim in FPR_LIMITS
    )
    lines = [head.rstrip()]
    for m in rows:
        if isinstance(m, str):
            lines.append(m)
            continue
        auc = "n/a" if m.auc is None else f"{m.auc:.4f}"
        one_minus = "n/a" if m.auc is None else f"{100 * (1 - m.auc):.2f}"
        line = f"{m.name:<14} {auc:>8} {one_minus:>9} {_pct(m.recall):>8} {_pct(m.fpr, 2):>8}   "
        cells = []
        for a in m.at_fpr:
            what = "p" if m.name == "Bayes alone" else "score"
            thr = "no threshold" if a.threshold is None else f"{what} >= {a.threshold:.6g}"
            cells.append(f"{_pct(a.recall) + ' (' + thr + ', FPR ' + _pct(a.fpr, 2) + ')':<34}")
        lines.append((line + "   ".join(cells)).rstrip())
    return lines


def _intervals_heading() -> str:
    return (
        f"{100 * CONFIDENCE:g}% intervals (the test messages are a sample: exact binomial intervals for the rates, "
        f"{AUC_RESAMPLES} stratified bootstrap resamples for the AUC):"
    )


def _interval_line(m: Metrics) -> str:
    def span(ci: tuple[float, float] | None, digits: int) -> str:
        return "" if ci is None else f" [{100 * ci[0]:.{digits}f}%, {100 * ci[1]:.{digits}f}%]"

    parts = []
    if m.auc is not None and m.auc_ci is not None:
        # (1-AUC)% runs the other way: the interval's ends swap.
        parts.append(f"(1-AUC)% {100 * (1 - m.auc):.3f} [{100 * (1 - m.auc_ci[1]):.3f}, {100 * (1 - m.auc_ci[0]):.3f}]")
    if m.recall is not None:
        parts.append(f"recall {_pct(m.recall)} = {m.caught}/{m.n_spam}{span(m.recall_ci, 1)}")
    if m.fpr is not None:
        parts.append(f"ham FPR {_pct(m.fpr, 2)} = {m.flagged_ham}/{m.n_ham}{span(m.fpr_ci, 2)}")
    return f"  {m.name + ':':<14} " + "; ".join(parts)


def run_eval(args: EvalArgs) -> int:
    """Run the evaluation and print the report; returns a sysexits code."""
    started = time.perf_counter()
    config = args.config
    err = sys.stderr
    if args.folds is not None and args.split is not None:
        print("filterd eval: give --split or --folds, not both", file=err)
        return EX_USAGE
    if args.limit is not None and args.limit < 1:
        print("filterd eval: --limit must be at least 1", file=err)
        return EX_USAGE
    for folder in [*args.spam, *args.ham]:
        if not folder.exists():
            print(f"filterd eval: {folder} does not exist", file=err)
            return EX_NOINPUT
    root = _corpus_root([*args.spam, *args.ham])
    spam, spam_skipped = _read_folders(args.spam, "spam", root)
    ham, ham_skipped = _read_folders(args.ham, "ham", root)
    skipped = spam_skipped + ham_skipped
    on_disk = {s.ident for s in (*spam, *ham)} | {i for i, _ in skipped}
    print(
        f"corpus root {root}: read {len(ham)} ham, {len(spam)} spam; {len(skipped)} skipped"
        + (f" ({_listing([f'{i}: {e}' for i, e in skipped], 3)})" if skipped else "")
    )
    if not ham or not spam:
        print("filterd eval: need both ham and spam messages", file=err)
        return EX_NOINPUT
    if args.limit is not None:
        rng = random.Random(args.seed)
        spam = sorted(rng.sample(spam, min(args.limit, len(spam))), key=lambda s: s.ident)
        ham = sorted(rng.sample(ham, min(args.limit, len(ham))), key=lambda s: s.ident)
        print(f"--limit {args.limit}: using a seeded sample of {len(ham)} ham, {len(spam)} spam")
    samples = [*ham, *spam]

    rounds: list[tuple[list[Sample], list[Sample]]] = []
    try:
        if args.split is not None:
            plan = apply_split(samples, read_split(args.split), on_disk)
            how = f"split {args.split}: trained on its 'train' part, scored its 'test' part"
            print(
                f"split: {len(plan.train)} train ({_counts(plan.train)}), {len(plan.test)} test ({_counts(plan.test)})"
            )
            if plan.missing:
                print(f"  in the split but not on disk: {len(plan.missing)} ({_listing(plan.missing)})")
            if plan.unlisted:
                print(f"  on disk but not in the split, not used: {len(plan.unlisted)} ({_listing(plan.unlisted)})")
            if plan.relabelled:
                print(
                    f"  split label differs from the folder's (folder label used): {len(plan.relabelled)} "
                    f"({_listing(plan.relabelled)})"
                )
            if not plan.test:
                print("filterd eval: the split leaves nothing to test", file=err)
                return EX_DATAERR
            rounds.append((plan.train, plan.test))
        else:
            n = args.folds or DEFAULT_FOLDS
            fold_of = assign_folds(samples, n, args.seed)
            how = f"{n}-fold cross-validation (seed {args.seed}), scores pooled over the folds"
            groups = len({body_key(s) for s in samples})
            print(
                f"folds: {n}, stratified; {len(samples)} messages in {groups} body groups "
                "(near-duplicates share a fold)"
            )
            for k in range(n):
                rounds.append(
                    (
                        [s for s, f in zip(samples, fold_of, strict=True) if f != k],
                        [s for s, f in zip(samples, fold_of, strict=True) if f == k],
                    )
                )
    except EvalError as exc:
        print(f"filterd eval: {exc}", file=err)
        return EX_DATAERR if args.split is not None else EX_USAGE

    progress = _Progress(sum(len(t) for _, t in rounds))
    scored: list[Scored] = []
    stats: list[FoldStats] = []
    parsed: dict[str, ParsedMessage | str] = {}  # each message is parsed once, however many folds train on it
    for train, test in rounds:
        round_scored, round_stats = _run_round(train, test, config, progress, parsed)
        scored += round_scored
        stats.append(round_stats)
    return _report(args, config, how, scored, stats, started)


def _counts(samples: Sequence[Sample]) -> str:
    spam = sum(s.is_spam for s in samples)
    return f"{len(samples) - spam} ham, {spam} spam"


def _report(
    args: EvalArgs, config: Config, how: str, scored: list[Scored], stats: list[FoldStats], started: float
) -> int:
    """Print the figures and write the three files; returns the exit code."""
    required = config.scoring.required_score
    bayes_cfg = config.bayes
    trained = sum(s.trained for s in stats)
    n_parsed = sum(s.parsed for s in stats)
    parse_s = sum(s.parse_seconds for s in stats)
    learn_s = sum(s.learn_seconds for s in stats)
    scan_s = sum(s.scan_seconds for s in stats)
    ok = [s for s in scored if not s.failed]
    failed = [s for s in scored if s.failed]
    with_problems = [s for s in ok if s.problems]
    parse_failures = [f"{i} ({e})" for i, e in dict(f for st in stats for f in st.train_parse_failures).items()]
    learn = sum((st.learn_results for st in stats), Counter[str]())
    silent_rounds = sum(st.silent for st in stats)

    print(how)
    if not bayes_cfg.enabled:
        print(
            "NOTE: bayes.enabled is false in this configuration, so the engine never asks Bayes and "
            "'rules + Bayes' is 'rules alone'; 'Bayes alone' still shows what Bayes would say"
        )
    results = ", ".join(f"{k} {v}" for k, v in sorted(learn.items()))
    if len(stats) == 1:
        print(
            f"training: {trained} messages parsed and learnt in {parse_s + learn_s:.1f} s "
            f"({_rate(trained, parse_s + learn_s)}; parsing {parse_s:.1f} s, learning {learn_s:.1f} s); {results}"
        )
    else:
        print(
            f"training: {len(stats)} stores, {trained} messages learnt in all in {learn_s:.1f} s "
            f"({_rate(trained, learn_s)}), each message in {len(stats) - 1} of them; {n_parsed} messages parsed "
            f"once in {parse_s:.1f} s ({_rate(n_parsed, parse_s)}); {results}"
        )
    if parse_failures:
        print(f"  failed to parse, not learnt: {len(parse_failures)} ({_listing(parse_failures, 3)})")
    spam_n = [st.bayes_spam for st in stats]
    ham_n = [st.bayes_ham for st in stats]
    held = f"{_span(spam_n)} spam, {_span(ham_n)} ham" + ("" if len(stats) == 1 else " per fold")
    if silent_rounds:
        where = "" if len(stats) == 1 else f" in {silent_rounds} of {len(stats)} folds"
        print(
            f"Bayes is SILENT{where}: the store holds {held}, and Bayes speaks only from "
            f"{bayes_cfg.min_spam} spam and {bayes_cfg.min_ham} ham (bayes.min_spam, bayes.min_ham); "
            "no BAYES_* rule can fire there, so 'rules + Bayes' is 'rules alone'"
        )
    else:
        print(f"Bayes store: {held} (active: needs {bayes_cfg.min_spam} spam and {bayes_cfg.min_ham} ham)")
    print("  (bayes.autolearn is off for this run: it would learn the test messages it is judged on)")
    print(
        f"scoring: {len(scored)} test messages ({_counts_scored(scored)}) with the full engine in {scan_s:.1f} s "
        f"({_rate(len(scored), scan_s)})"
    )
    if failed:
        print(
            f"  FAILED to parse or score, left out of the figures: {len(failed)} "
            f"({_listing([f'{s.ident} ({s.problems})' for s in failed], 3)})"
        )
    if with_problems:
        print(
            f"  scored with engine problems (a check failed or a rule timed out): {len(with_problems)} "
            f"({_listing([f'{s.ident} ({s.problems})' for s in with_problems], 3)})"
        )
    bayes_fired = sum(any(h.startswith("BAYES_") for h in s.hits) for s in ok)
    no_opinion = sum(s.bayes is None for s in ok)
    print(f"  a BAYES_* rule fired on {bayes_fired} of {len(ok)}; Bayes gave no probability for {no_opinion}")
    if not silent_rounds and not bayes_fired and ok:
        print("  WARNING: Bayes is trained but no BAYES_* rule fired: is the engine's Bayes check loaded?")
    print(
        f"thresholds: spam when score >= {required:g} (scoring.required_score) for 'rules + Bayes' and "
        f"'rules alone'; when p > {BAYES_THRESHOLD:g} for 'Bayes alone' (0.5 is Bayes' 'no opinion')"
    )
    print()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(scored, out / "scores.tsv")
    if not ok:
        print(f"nothing could be scored; the failures are listed in {out / 'scores.tsv'}")
        return EX_SOFTWARE

    labels = [s.label == "spam" for s in ok]
    full = compute_metrics("rules + Bayes", labels, [s.score or 0.0 for s in ok], required)
    rules = compute_metrics("rules alone", labels, [s.rules_score or 0.0 for s in ok], required)
    rows: list[Metrics | str] = [full, rules]
    plotted = [full, rules]
    notes: list[str] = []
    if no_opinion == len(ok):
        rows.append(f"{'Bayes alone':<14} silent: no probability for any test message")
        notes.append("Bayes alone: silent (too little training), no curve")
    else:
        probs = [BAYES_THRESHOLD if s.bayes is None else s.bayes for s in ok]
        bayes = compute_metrics("Bayes alone", labels, probs, BAYES_THRESHOLD, strict=True)
        rows.append(bayes)
        plotted.append(bayes)
        if no_opinion:
            notes.append(f"Bayes alone: {no_opinion} messages without a probability counted as 0.5")
    for line in _metrics_table(rows):
        print(line)
    print(
        "(the 'at ham FPR <=' columns pick their threshold on these very test messages: the best case "
        "for this sample, not what a setting of that threshold would give on new mail)"
    )
    print(_intervals_heading())
    for m in rows:
        if isinstance(m, Metrics):
            print(_interval_line(m))
    if no_opinion and no_opinion < len(ok):
        print(f"(Bayes alone: the {no_opinion} messages without a probability count as p = 0.5)")
    n_ham = sum(1 for s in ok if s.label == "ham")
    coarse = [lim for lim in FPR_LIMITS if n_ham and 1 / n_ham > lim]
    if coarse:
        print(
            f"(with {n_ham} test ham one false positive is an FPR of {_pct(1 / n_ham, 2)}, so "
            + " and ".join(f"'FPR <= {100 * lim:g}%'" for lim in coarse)
            + " mean no ham flagged at all)"
        )
    title = f"filterd eval: {n_ham} ham, {len(ok) - n_ham} spam; {how}"
    plot_roc(plotted, out / "roc.png", _wrap(title), notes)
    plot_scores(ok, required, out / "scores.png", _wrap(title))
    print()
    print(f"wrote {out / 'roc.png'}, {out / 'scores.png'}, {out / 'scores.tsv'}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return EX_OK


def _span(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _counts_scored(scored: Sequence[Scored]) -> str:
    spam = sum(s.label == "spam" for s in scored)
    return f"{len(scored) - spam} ham, {spam} spam"


def _wrap(text: str, width: int = 90) -> str:
    """Break a long plot title at a '; ' so it fits the figure."""
    if len(text) <= width or "; " not in text:
        return text
    head, _, tail = text.partition("; ")
    return f"{head}\n{tail}"


def _without_bayes(engine: Any, hit: Any) -> float:
    """A hit's score from the score set for "Bayes gives no opinion" (rules/scores.yaml's first value)."""
    info = engine.info(hit.rule)
    if info is None or hit.rule.startswith("CHECK_ERROR_") or info.type == "engine":
        return float(hit.score or 0.0)
    return float(info.score)
