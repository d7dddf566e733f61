"""`filterd eval`: metrics on hand-computed cases, the split file, folds, output files, one whole run."""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import cast

import pytest

from filterd.config import default_config
from filterd.evaluate import (
    EvalArgs,
    EvalError,
    Sample,
    Scored,
    add_eval_arguments,
    apply_split,
    assign_folds,
    auc_interval,
    body_key,
    compute_metrics,
    plot_roc,
    plot_scores,
    rate_interval,
    read_split,
    run_eval,
    strip_x_spam,
    write_tsv,
)

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def msg(subject: str, body: str, *, extra: str = "") -> bytes:
    return f"From: a@example.org\nSubject: {subject}\n{extra}\n{body}\n".encode()


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_small_case_by_hand() -> None:
    # ham 0 1 2 3, spam 2 4 5 6. AUC: spam 2 beats 2 ham and ties 1 (2.5), 4/5/6 beat all 4 (12): 14.5/16.
    m = compute_metrics("x", [False] * 4 + [True] * 4, [0, 1, 2, 3, 2, 4, 5, 6], 5.0)
    assert m.auc == pytest.approx(14.5 / 16)
    assert (m.n_ham, m.n_spam) == (4, 4)
    assert m.recall == pytest.approx(0.5) and m.fpr == 0.0  # 5 and 6 reach 5.0 (>=); no ham does
    # No ham may be flagged: score >= 4 catches 4, 5, 6 and no ham; >= 3 would flag ham 3.
    for at in m.at_fpr:
        assert at.recall == pytest.approx(0.75) and at.fpr == 0.0 and at.threshold == 4.0


def test_rate_intervals_are_exact_binomial() -> None:
    # At the edges Clopper-Pearson has a closed form: k = 0 gives [0, 1 - (a/2)^(1/n)].
    assert cast(tuple[object, object], rate_interval(0, 100)) == (0.0, pytest.approx(1 - 0.025 ** (1 / 100)))
    assert cast(tuple[object, object], rate_interval(100, 100)) == (pytest.approx(0.025 ** (1 / 100)), 1.0)
    lo, hi = rate_interval(2, 2080)  # two false positives in the corpus's test ham
    assert lo < 0.001 < hi and hi == pytest.approx(0.00347, abs=1e-5)
    # k of n and n - k of n mirror each other.
    for k, n in ((1, 7), (30, 957), (907, 957)):
        a, b = rate_interval(k, n)
        c, d = rate_interval(n - k, n)
        assert cast(tuple[object, object], (a, b)) == (pytest.approx(1 - d), pytest.approx(1 - c))
        assert a < k / n < b


def test_auc_interval_brackets_the_auc_and_narrows_with_more_messages() -> None:
    import random

    rng = random.Random(1)

    def sample(n: int) -> tuple[list[bool], list[float]]:
        y = [True] * n + [False] * 2 * n
        return y, [rng.gauss(2.0, 1.0) for _ in range(n)] + [rng.gauss(0.0, 1.0) for _ in range(2 * n)]

    y, v = sample(100)
    m = compute_metrics("x", y, v, 1.0)
    assert m.auc is not None and m.auc_ci is not None
    assert m.auc_ci[0] < m.auc < m.auc_ci[1]
    assert auc_interval(y, v) == m.auc_ci  # seeded: the same resamples every run
    wide = m.auc_ci[1] - m.auc_ci[0]
    y, v = sample(1000)
    lo, hi = auc_interval(y, v)
    assert hi - lo < wide / 2  # ten times the messages: about a third of the width
    assert auc_interval([True, True, False], [3.0, 2.0, 1.0]) == (1.0, 1.0)  # no resample can misrank


def test_metrics_count_what_was_caught_and_flagged() -> None:
    m = compute_metrics("x", [False] * 4 + [True] * 4, [0, 1, 2, 5, 2, 4, 5, 6], 5.0)
    assert (m.caught, m.flagged_ham) == (2, 1)
    assert m.recall_ci == rate_interval(2, 4) and m.fpr_ci == rate_interval(1, 4)


def test_recall_at_fpr_limits_and_their_thresholds() -> None:
    # 1000 ham: 985 at 0, 10 at 3, 5 at 10. Spam: 20, 8, 4.
    ham = [0.0] * 985 + [3.0] * 10 + [10.0] * 5
    spam = [20.0, 8.0, 4.0]
    m = compute_metrics("x", [False] * 1000 + [True] * 3, ham + spam, 5.0)
    assert m.recall == pytest.approx(2 / 3) and m.fpr == pytest.approx(0.005)
    assert m.auc == pytest.approx((1000 + 995 + 995) / 3000)
    tight, loose = m.at_fpr
    # <= 0.1% allows one ham: only a threshold above 10 keeps it, catching 20 alone.
    assert tight.limit == 0.001 and tight.recall == pytest.approx(1 / 3) and tight.threshold == 20.0
    assert tight.fpr == 0.0
    # <= 1%: score >= 4 flags the five 10s (0.5%) and catches all spam; >= 3 would be 1.5%.
    assert loose.limit == 0.01 and loose.recall == 1.0 and loose.threshold == 4.0
    assert loose.fpr == pytest.approx(0.005)


def test_probability_threshold_is_strict() -> None:
    # p = 0.5 is Bayes' "no opinion": not spam at the 0.5 threshold.
    m = compute_metrics("Bayes alone", [False, False, True, True], [0.1, 0.5, 0.5, 0.9], 0.5, strict=True)
    assert m.recall == 0.5 and m.fpr == 0.0
    assert compute_metrics("x", [False, False, True, True], [0.1, 0.5, 0.5, 0.9], 0.5).fpr == 0.5


def test_no_threshold_reaches_a_tight_fpr() -> None:
    # The top score is a ham: any threshold that catches spam flags it (FPR 50%).
    m = compute_metrics("x", [False, False, True], [9.0, 0.0, 5.0], 5.0)
    assert m.at_fpr[0].recall == 0.0 and m.at_fpr[0].threshold is None


def test_metrics_with_one_class_have_no_auc() -> None:
    m = compute_metrics("x", [True, True], [6.0, 1.0], 5.0)
    assert m.auc is None and m.at_fpr == () and m.recall == 0.5 and m.fpr is None


# -- reading messages ----------------------------------------------------------------------------


def test_strip_x_spam_removes_top_level_fields_only() -> None:
    raw = (
        b"From: a@example.org\nX-Spam-Status: Yes, score=9\n\tfolded=line\nSubject: hi\n"
        b"x-spam-flag: YES\n\nbody\nX-Spam-Status: kept, it is body text\n"
    )
    assert strip_x_spam(raw) == b"From: a@example.org\nSubject: hi\n\nbody\nX-Spam-Status: kept, it is body text\n"
    crlf = b"X-Spam-Level: ***\r\nSubject: hi\r\n\r\nX-Spam-Flag: body\r\n"
    assert strip_x_spam(crlf) == b"Subject: hi\r\n\r\nX-Spam-Flag: body\r\n"
    assert strip_x_spam(b"\nX-Spam-Flag: no headers at all\n") == b"\nX-Spam-Flag: no headers at all\n"
    # An mbox From line on top (the corpus files have one) is no field and does not end the block.
    mbox = b"From a@example.org Mon Jan  5 10:00:00 2026\nX-Spam-Flag: YES\nSubject: hi\n\nbody\n"
    assert strip_x_spam(mbox) == b"From a@example.org Mon Jan  5 10:00:00 2026\nSubject: hi\n\nbody\n"
    # No empty line: the block ends at the first line that is no field, as the parser ends it, so
    # a body line that looks like a field is body.
    unseparated = b"Subject: hi\nX-Spam-Flag: YES\nthis is body text\nX-Spam-Status: kept\n"
    assert strip_x_spam(unseparated) == b"Subject: hi\nthis is body text\nX-Spam-Status: kept\n"


# -- the split file ------------------------------------------------------------------------------


def test_read_split_rows(tmp_path: Path) -> None:
    split = tmp_path / "split.tsv"
    split.write_text("path\tlabel\tpart\nham/1\tham\ttrain\nspam/2\tspam\ttest\n\n")
    rows = read_split(split)
    assert [(r.path, r.label, r.part) for r in rows] == [("ham/1", "ham", "train"), ("spam/2", "spam", "test")]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("path\tlabel\n", "header row lacks column(s) part"),
        ("path\tlabel\tpart\nham/1\tegg\ttrain\n", ":2: label must be ham or spam"),
        ("path\tlabel\tpart\nham/1\tham\ttrain\nham/2\tham\tvalidate\n", ":3: part must be train or test"),
        ("path\tlabel\tpart\nham/1\tham\ttrain\nham/1\tham\ttest\n", ":3: ham/1 is listed twice"),
        ("path\tlabel\tpart\nham/1 ham train\n", ":2: expected 3 tab-separated columns"),
        ("", "empty"),
    ],
)
def test_read_split_names_the_bad_line(tmp_path: Path, text: str, error: str) -> None:
    split = tmp_path / "split.tsv"
    split.write_text(text)
    with pytest.raises(EvalError, match=error.replace("(", r"\(").replace(")", r"\)")):
        read_split(split)


def test_apply_split_sorts_parts_and_reports_what_does_not_line_up(tmp_path: Path) -> None:
    samples = [
        Sample("ham/a", "ham", b""),
        Sample("ham/b", "ham", b""),
        Sample("ham/extra", "ham", b""),
        Sample("spam/c", "spam", b""),
        Sample("spam/d", "spam", b""),
    ]
    split = tmp_path / "split.tsv"
    split.write_text(
        "path\tlabel\tpart\n"
        "ham/a\tham\ttrain\nham/b\tspam\ttest\nspam/c\tspam\ttrain\nspam/d\tspam\ttest\n"
        "spam/gone\tspam\ttest\nham/limited\tham\ttrain\n"
    )
    on_disk = {s.ident for s in samples} | {"ham/limited"}  # read, then left out by --limit
    plan = apply_split(samples, read_split(split), on_disk)
    assert [s.ident for s in plan.train] == ["ham/a", "spam/c"]
    assert [(s.ident, s.label) for s in plan.test] == [("ham/b", "ham"), ("spam/d", "spam")]  # the folder decides
    assert plan.missing == ["spam/gone"]
    assert plan.unlisted == ["ham/extra"]
    assert plan.relabelled == ["ham/b"]


# -- folds ---------------------------------------------------------------------------------------


def test_body_key_groups_copies_of_a_body() -> None:
    a = Sample("1", "spam", msg("one", "Buy now"))
    b = Sample("2", "spam", msg("two", "Buy now").replace(b"\n", b"\r\n"))
    c = Sample("3", "spam", msg("three", "Buy later"))
    assert body_key(a) == body_key(b) != body_key(c)
    empty1, empty2 = Sample("4", "ham", b"Subject: x\n\n"), Sample("5", "ham", b"Subject: y\n")
    assert body_key(empty1) != body_key(empty2)  # no body is no evidence of kinship


def _corpus_with_campaigns() -> list[Sample]:
    samples = [Sample(f"ham/{i}", "ham", msg(f"h{i}", f"ham body {i}")) for i in range(40)]
    samples += [Sample(f"spam/{i}", "spam", msg(f"s{i}", f"spam body {i}")) for i in range(20)]
    samples += [Sample(f"spam/c{i}", "spam", msg(f"campaign {i}", "the same pitch")) for i in range(5)]
    samples += [Sample(f"ham/l{i}", "ham", msg(f"list {i}", "the same digest")) for i in range(3)]
    return samples


def test_folds_are_stratified() -> None:
    samples = [s for s in _corpus_with_campaigns() if "/c" not in s.ident and "/l" not in s.ident]
    folds = assign_folds(samples, 4, seed=1)
    per_fold = Counter((f, s.label) for s, f in zip(samples, folds, strict=True))
    assert all(per_fold[(f, "ham")] == 10 and per_fold[(f, "spam")] == 5 for f in range(4))


def test_folds_keep_near_duplicates_together_and_stay_balanced() -> None:
    samples = _corpus_with_campaigns()
    folds = assign_folds(samples, 4, seed=7)
    campaign = {f for s, f in zip(samples, folds, strict=True) if s.ident.startswith("spam/c")}
    digest = {f for s, f in zip(samples, folds, strict=True) if s.ident.startswith("ham/l")}
    assert len(campaign) == 1 and len(digest) == 1
    for label, largest in (("ham", 3), ("spam", 5)):
        sizes = Counter(f for s, f in zip(samples, folds, strict=True) if s.label == label)
        assert len(sizes) == 4 and max(sizes.values()) - min(sizes.values()) <= largest


def test_folds_are_deterministic_with_a_seed() -> None:
    samples = _corpus_with_campaigns()
    assert assign_folds(samples, 5, seed=3) == assign_folds(samples, 5, seed=3)
    assert assign_folds(samples, 5, seed=3) != assign_folds(samples, 5, seed=4)


def test_folds_refuse_impossible_counts() -> None:
    samples = [Sample("a", "ham", msg("a", "x")), Sample("b", "spam", msg("b", "x"))]  # one body group
    with pytest.raises(EvalError, match="at least 2"):
        assign_folds(samples, 1, seed=0)
    with pytest.raises(EvalError, match="2 folds need at least 2 distinct messages; there are 1"):
        assign_folds(samples, 2, seed=0)


# -- output files --------------------------------------------------------------------------------


def _scored() -> list[Scored]:
    return [
        Scored("ham/1", "ham", -1.5, -1.5, 0.01, False, ("ALL_TRUSTED",)),
        Scored("ham/2", "ham", 2.0, 2.5, 0.2, False, ("BAYES_00", "HTML_MESSAGE")),
        Scored("spam/1", "spam", 1000.0, 996.5, 0.99, True, ("BAYES_99", "GTUBE")),
        Scored("spam/2", "spam", 6.5, 6.5, None, True, ("X", "Y"), "check uri failed:\tboom\nagain"),
        Scored("spam/3", "spam", None, None, None, None, (), "ValueError: cannot parse"),
    ]


def test_tsv_has_every_message_failures_included(tmp_path: Path) -> None:
    path = tmp_path / "scores.tsv"
    write_tsv(_scored(), path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["path", "label", "score", "rules_score", "bayes_probability", "is_spam", "hits", "problems"]
    assert rows[2] == ["ham/2", "ham", "2.000", "2.500", "0.200000", "0", "BAYES_00,HTML_MESSAGE", ""]
    assert rows[4] == ["spam/2", "spam", "6.500", "6.500", "", "1", "X,Y", "check uri failed: boom again"]
    assert rows[5] == ["spam/3", "spam", "", "", "", "", "", "ValueError: cannot parse"]
    assert len(rows) == 6


def test_plots_are_pngs(tmp_path: Path) -> None:
    ok = [s for s in _scored() if s.score is not None]
    labels = [s.label == "spam" for s in ok]
    metrics = [
        compute_metrics("rules + Bayes", labels, [s.score or 0.0 for s in ok], 5.0),
        compute_metrics("rules alone", labels, [s.rules_score or 0.0 for s in ok], 5.0),
        compute_metrics("Bayes alone", labels, [0.5 if s.bayes is None else s.bayes for s in ok], 0.5, strict=True),
    ]
    plot_roc(metrics, tmp_path / "roc.png", "a title", ["a note"])
    plot_scores(ok, 5.0, tmp_path / "scores.png", "a title")
    for name in ("roc.png", "scores.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


# -- the command ---------------------------------------------------------------------------------


def test_arguments_build_eval_args(tmp_path: Path) -> None:
    ns = parse_args("--spam", "s1", "--spam", "s2", "--ham", "h", "--folds", "3", "--seed", "9")
    args = EvalArgs.from_namespace(ns, default_config())
    assert args.spam == [Path("s1"), Path("s2")] and args.ham == [Path("h")]
    assert (args.split, args.folds, args.seed, args.limit, args.out_dir) == (None, 3, 9, None, Path("filterd-eval"))
    with pytest.raises(SystemExit):
        parse_args("--spam", "s", "--ham", "h", "--folds", "3", "--split", "x.tsv")


def test_importing_the_module_stays_light() -> None:
    # `add_eval_arguments` runs whenever the filterd parser is built; it must not pull in plotting.
    code = "import sys, filterd.evaluate; print("
    code += "[m for m in ('matplotlib', 'sklearn', 'filterd.engine') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


def _args(tmp_path: Path, *argv: str) -> EvalArgs:
    return EvalArgs.from_namespace(parse_args(*argv, "--out", str(tmp_path / "out")), default_config())


def test_usage_errors_are_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ham").mkdir()
    (tmp_path / "spam").mkdir()
    (tmp_path / "ham" / "1").write_bytes(msg("h", "hello"))
    (tmp_path / "spam" / "1").write_bytes(msg("s", "buy"))
    assert run_eval(_args(tmp_path, "--spam", str(tmp_path / "nope"), "--ham", str(tmp_path / "ham"))) == 66
    (tmp_path / "split.tsv").write_text("path\tlabel\tpart\nham/1\tegg\ttrain\n")
    args = _args(tmp_path, "--spam", str(tmp_path / "spam"), "--ham", str(tmp_path / "ham"),
                 "--split", str(tmp_path / "split.tsv"))  # fmt: skip
    assert run_eval(args) == 65
    args = _args(tmp_path, "--spam", str(tmp_path / "spam"), "--ham", str(tmp_path / "ham"), "--folds", "3")
    assert run_eval(args) == 64  # two messages cannot make three folds
    err = capsys.readouterr().err
    assert "nope does not exist" in err and ":2: label must be ham or spam" in err and "3 folds need" in err


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """The repo's sample messages as a corpus root with ham/ and spam/, plus one that cannot be scored."""
    root = tmp_path / "corpus"
    for label in ("ham", "spam"):
        shutil.copytree(ROOT / "corpora" / label, root / label)
    (root / "ham" / ".notes").write_text("a dotfile: not even looked at")
    (root / "ham" / "README.txt").write_text("Not a message, reported as skipped.\n")
    (root / "spam" / "99-explodes.eml").write_bytes(msg("boom", "EVAL-TEST-EXPLODE"))
    return root


@pytest.fixture
def exploding_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.scan raises on one marked message, as a bug in the engine would."""
    from filterd.engine.engine import Engine

    real = Engine.scan

    async def scan(self: Engine, raw: bytes, *args: object, **kwargs: object) -> object:
        if b"EVAL-TEST-EXPLODE" in raw:
            raise RuntimeError("engine bug")
        return await real(self, raw, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "scan", scan)


@pytest.mark.usefixtures("exploding_engine")
def test_eval_runs_end_to_end_with_folds(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(tmp_path, "--spam", str(small_corpus / "spam"), "--ham", str(small_corpus / "ham"), "--folds", "2")
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    n_ham = len(list((ROOT / "corpora" / "ham").glob("*.eml")))
    n_spam = len(list((ROOT / "corpora" / "spam").glob("*.eml"))) + 1
    assert f"read {n_ham} ham, {n_spam} spam; 1 skipped (ham/README.txt: not a mail message" in out
    assert "2-fold cross-validation" in out
    assert "Bayes is SILENT in 2 of 2 folds" in out  # a few dozen messages are far below min_spam/min_ham
    assert (
        "FAILED to parse or score, left out of the figures: 1 (spam/99-explodes.eml (RuntimeError: engine bug))" in out
    )
    for row in ("rules + Bayes", "rules alone"):
        assert any(line.startswith(row) and "%" in line for line in out.splitlines())
    assert any(line.startswith("Bayes alone") and "silent" in line for line in out.splitlines())
    assert "95% intervals (the test messages are a sample" in out
    full = next(line for line in out.splitlines() if line.startswith("  rules + Bayes:"))
    assert "(1-AUC)% " in full and f"/{n_spam - 1} [" in full and f"/{n_ham} [" in full
    with (tmp_path / "out" / "scores.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == n_ham + n_spam
    assert {r["path"].split("/")[0] for r in rows} == {"ham", "spam"}
    boom = next(r for r in rows if r["path"] == "spam/99-explodes.eml")
    assert boom["score"] == "" and "engine bug" in boom["problems"]
    assert all(r["score"] and r["bayes_probability"] == "" for r in rows if r is not boom)
    for name in ("roc.png", "scores.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)


def test_eval_with_a_split_reports_missing_paths(
    small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (small_corpus / "spam" / "99-explodes.eml").unlink()
    (small_corpus / "ham" / "README.txt").unlink()
    files = sorted(p.relative_to(small_corpus).as_posix() for p in small_corpus.rglob("*.eml"))
    parts = ["train", "test"]
    lines = ["path\tlabel\tpart"] + [f"{p}\t{p.split('/')[0]}\t{parts[i % 2]}" for i, p in enumerate(files)]
    lines.append("spam/gone.eml\tspam\ttest")
    (small_corpus / "split.tsv").write_text("\n".join(lines) + "\n")
    args = _args(tmp_path, "--spam", str(small_corpus / "spam"), "--ham", str(small_corpus / "ham"),
                 "--split", str(small_corpus / "split.tsv"))  # fmt: skip
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    assert "in the split but not on disk: 1 (spam/gone.eml)" in out
    assert f"{len(files) - len(files) // 2} train" in out and "Bayes is SILENT:" in out
    with (tmp_path / "out" / "scores.tsv").open(newline="") as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == len(files) // 2
