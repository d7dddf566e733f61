"""A restore checks every value of a backup before it changes the store: a hand-edited or damaged
file fails with StoreError naming its line (`filterd learn --restore` exits 65), and the store stays
as it was, on SQLite and on Redis."""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filterd.engine.bayes import BayesStore, BayesStoreBase, StoreError, open_bayes_store
from filterd.engine.bayes.base import read_backup
from tests.conftest import offline_config
from tests.engine.bayes_helpers import bayes_config, make_msg
from tests.learn_helpers import dump, learn
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]

ROOT = Path(__file__).resolve().parents[2]

Edit = Callable[[list[list[str]]], int]  # edits the records in place, returns the bad line's number


def records(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.rstrip("\n").split("\n")]


def rejoin(recs: list[list[str]]) -> str:
    """The records as text, with the counts and end records made to agree with the b and m records
    (so that only the edited value is wrong)."""
    b = [r for r in recs if r[0] == "b"]
    m = [r for r in recs if r[0] == "m"]
    for r in recs:
        if r[0] == "counts" and len(r) == 3:
            r[1:] = [str(sum(x[1] == "s" for x in m)), str(sum(x[1] == "h" for x in m))]
        if r[0] == "end":
            r[1:] = [str(len(b)), str(len(m))]
    return "".join("\t".join(r) + "\n" for r in recs)


def line_of(recs: list[list[str]], kind: str, nth: int = 0) -> int:
    """The 0-based index of the nth record of a kind."""
    return [i for i, r in enumerate(recs) if r[0] == kind][nth]


def set_field(kind: str, field: int, value: str, nth: int = 0) -> Edit:
    def edit(recs: list[list[str]]) -> int:
        i = line_of(recs, kind, nth)
        recs[i][field] = value
        return i + 1

    return edit


def duplicate(kind: str) -> Edit:
    def edit(recs: list[list[str]]) -> int:
        i = line_of(recs, kind)
        recs.insert(i + 1, list(recs[i]))
        return i + 2

    return edit


def swap_first_buckets(recs: list[list[str]]) -> int:
    i = line_of(recs, "b")
    recs[i], recs[i + 1] = recs[i + 1], recs[i]
    return i + 2


def extra_field(recs: list[list[str]]) -> int:
    i = line_of(recs, "b")
    recs[i].append("7")
    return i + 1


def second_n_features(recs: list[list[str]]) -> int:
    i = line_of(recs, "m")
    recs.insert(i, ["n_features", "4096"])
    return i + 1


def odd_hashes(recs: list[list[str]]) -> int:
    i = line_of(recs, "m")
    recs[i][4] = base64.b64encode(base64.b64decode(recs[i][4])[:-1]).decode()
    return i + 1


def empty_bucket(recs: list[list[str]]) -> int:
    i = line_of(recs, "b")
    recs[i][2:4] = ["0", "0"]
    return i + 1


def upper_digest(recs: list[list[str]]) -> int:
    i = line_of(recs, "m")
    recs[i][2] = recs[i][2].upper()
    return i + 1


BAD: dict[str, tuple[Edit, str]] = {
    # n_features: a power of two within bayes.n_features's range
    "n_features not a power of two": (
        set_field("n_features", 1, "65535"),
        "n_features: expected a power of two from 4096 to 67108864, got 65535",
    ),
    "n_features below the range": (
        set_field("n_features", 1, "2048"),
        "n_features: expected a power of two from 4096 to 67108864, got 2048",
    ),
    "n_features above the range": (set_field("n_features", 1, str(1 << 27)), "expected a power of two from"),
    "tokenizer not a number": (set_field("tokenizer", 1, "x"), "invalid literal"),
    # b records
    "bucket far out of range": (set_field("b", 1, "99999999"), "bucket 99999999 outside 0 .. 65535"),
    "bucket -1": (set_field("b", 1, "-1"), "bucket -1 outside"),
    "bucket n_features": (set_field("b", 1, str(1 << 16)), "bucket 65536 outside"),
    "bucket repeats": (duplicate("b"), r"bucket \d+ repeats"),
    "buckets out of order": (swap_first_buckets, r"bucket \d+ after bucket \d+"),
    "negative spam count": (set_field("b", 2, "-5"), r"counts -5, \d+ outside"),
    "negative ham count": (set_field("b", 3, "-5"), r"counts \d+, -5 outside"),
    "count beyond int32": (set_field("b", 2, str(1 << 31)), "outside 0 .. 2147483647"),
    "empty bucket": (empty_bucket, "both counts 0"),
    "negative atime": (set_field("b", 4, "-1"), "atime -1 outside"),
    "atime beyond uint32": (set_field("b", 4, str(1 << 32)), "atime 4294967296 outside"),
    "b record with an extra value": (extra_field, "a b record has 4 values, not 5"),
    # m records
    "digest repeats": (duplicate("m"), r"message [0-9a-f]{40} repeats \(first on line \d+\)"),
    "digest in capitals": (upper_digest, "is not 40 lowercase hex digits"),
    "digest too short": (set_field("m", 2, "ab" * 19), "is not 40 lowercase hex digits"),
    "digest not hex": (set_field("m", 2, "g" * 40), "is not 40 lowercase hex digits"),
    "negative learnt time": (set_field("m", 3, "-1"), "learnt time -1 outside"),
    "token hashes of an odd length": (odd_hashes, r"message [0-9a-f]{40}: token hashes of a length not a multiple"),
    # records out of place
    "a second n_features record": (second_n_features, "unexpected record 'n_features'"),
}


@pytest.fixture(scope="module")
def backup_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real store's backup (n_features 2**16): 4 spam, 3 ham."""
    store = BayesStore.open(tmp_path_factory.mktemp("store") / "bayes.sqlite", bayes_config())
    store.learn_many([(make_msg(i, True), True) for i in range(4)] + [(make_msg(i, False), False) for i in range(3)])
    out = io.StringIO()
    store.backup(out)
    store.close()
    return out.getvalue()


def edited(text: str, edit: Edit) -> tuple[str, int]:
    recs = records(text)
    number = edit(recs)
    return rejoin(recs), number


@pytest.mark.parametrize("case", list(BAD))
def test_read_backup_rejects_a_bad_value_naming_its_line(backup_text: str, case: str) -> None:
    edit, what = BAD[case]
    assert rejoin(records(backup_text)) == backup_text and read_backup(io.StringIO(backup_text)).nspam == 4
    text, number = edited(backup_text, edit)
    with pytest.raises(StoreError, match=rf"^line {number}: .*{what}"):
        read_backup(io.StringIO(text))


def test_read_backup_rejects_totals_that_do_not_match_naming_the_counts_line(backup_text: str) -> None:
    text = backup_text.replace("\ncounts\t4\t3\n", "\ncounts\t5\t2\n")
    with pytest.raises(StoreError, match="^line 4: counts 5, 2 but the messages are 4 spam, 3 ham"):
        read_backup(io.StringIO(text))


def test_read_backup_rejects_negative_totals(backup_text: str) -> None:
    text = backup_text.replace("\ncounts\t4\t3\n", "\ncounts\t-5\t3\n")
    with pytest.raises(StoreError, match="^line 4: negative counts -5, 3"):
        read_backup(io.StringIO(text))


def test_read_backup_rejects_text_that_is_not_utf8(backup_text: str) -> None:
    raw = backup_text.encode().replace(b"\nb\t", b"\nb\t\xff", 1)
    with pytest.raises(StoreError, match=r"^line \d+ or soon after: not UTF-8 text"):
        read_backup(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))


# -- `filterd learn --restore` on SQLite --------------------------------------------------------


@pytest.fixture(scope="module")
def learnt_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A state directory that learnt the corpora, and its backup as `filterd learn --backup` wrote it."""
    base = tmp_path_factory.mktemp("learnt")
    state = base / "state"
    assert learn(state, "--spam", str(ROOT / "corpora" / "spam")).returncode == 0
    assert learn(state, "--ham", str(ROOT / "corpora" / "ham")).returncode == 0
    backup = base / "bayes.txt"
    assert learn(state, "--backup", str(backup)).returncode == 0
    return state, backup.read_text()


CLI_CASES = ["bucket far out of range", "bucket -1", "bucket repeats", "digest repeats", "negative spam count"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_learn_restore_of_a_bad_backup_exits_65_and_keeps_the_store(
    learnt_state: tuple[Path, str], tmp_path: Path, case: str
) -> None:
    state = tmp_path / "state"
    shutil.copytree(learnt_state[0], state)
    good = learnt_state[1]
    before = dump(state, without_size=True)
    bad, number = edited(good, BAD[case][0])
    (tmp_path / "bad.txt").write_text(bad)
    proc = learn(state, "--restore", str(tmp_path / "bad.txt"))
    assert proc.returncode == 65, proc.stderr
    assert proc.stderr.startswith(f"filterd learn: line {number}: ") and "Traceback" not in proc.stderr, proc.stderr
    assert dump(state, without_size=True) == before
    assert learn(state, "--backup", str(tmp_path / "again.txt")).returncode == 0
    assert (tmp_path / "again.txt").read_text() == good


# -- Redis --------------------------------------------------------------------------------------


@pytest.fixture
def redis_store(redis_server: RedisServer, tmp_path: Path) -> Iterator[BayesStoreBase]:
    cfg = offline_config()
    state = dataclasses.replace(
        cfg.state, backend="redis", redis_url=redis_server.url, redis_key_prefix=redis_server.unique_prefix()
    )
    cfg = dataclasses.replace(cfg, state=state, state_dir=str(tmp_path), bayes=bayes_config())
    store = open_bayes_store(cfg, tmp_path)
    yield store
    store.close()


def test_redis_restore_of_a_bad_backup_raises_and_keeps_the_store(redis_store: BayesStoreBase) -> None:
    store = redis_store
    store.learn_many([(make_msg(i, True), True) for i in range(4)] + [(make_msg(i, False), False) for i in range(3)])
    out = io.StringIO()
    store.backup(out)
    good = out.getvalue()
    probe = make_msg(100, True)
    p = store.spam_probability(probe)
    bad, number = edited(good, BAD["bucket -1"][0])  # numpy would take -1 for the last bucket
    with pytest.raises(StoreError, match=rf"^line {number}: bucket -1 outside"):
        store.restore(io.StringIO(bad))
    again = io.StringIO()
    store.backup(again)
    assert again.getvalue() == good and store.counts() == (4, 3) and store.spam_probability(probe) == p
