"""The Bayes store contract on both backends (SQLite file, real redis-server), Redis-only
behaviour (concurrent learners, log and snapshot, generations, an unreachable server), and
moving a store between backends with backup/restore.

The SQLite-only tests (WAL, kill -9, the file's tables) stay in test_bayes.py. Every store here
is opened through `open_bayes_store`, the way the daemon and `filterd learn` open it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from filterd.config import Config
from filterd.engine.bayes import (
    BayesCheck,
    BayesStore,
    BayesStoreBase,
    LearnResult,
    RedisBayesStore,
    StoreError,
    open_bayes_store,
    token_ids,
)
from filterd.engine.bayes import redis_store as redis_store_module
from filterd.engine.bayes.base import Backup, read_backup
from filterd.engine.engine import Engine
from filterd.errors import StateError
from tests.conftest import offline_config
from tests.engine.bayes_helpers import bayes_config, make_msg, make_raw
from tests.redis_fixture import MakeRedisServer, RedisServer

pytest_plugins = ["tests.redis_fixture"]

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Backend:
    """One store on one backend; `open` gives another handle on the same data."""

    name: str
    state: dict[str, str]  # the state section's settings
    state_dir: Path
    url: str = ""

    def config(self, **bayes: Any) -> Config:
        cfg = offline_config()
        state = dataclasses.replace(cfg.state, **self.state)  # type: ignore[arg-type]
        return dataclasses.replace(cfg, state=state, state_dir=str(self.state_dir), bayes=bayes_config(**bayes))

    def open(self, **bayes: Any) -> BayesStoreBase:
        return open_bayes_store(self.config(**bayes), self.state_dir)

    @property
    def prefix(self) -> str:
        return self.state.get("redis_key_prefix", "") + "bayes:"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def shift_atimes(self, change: Callable[[int], int]) -> None:
        """Rewrite every bucket's atime, as if time had passed."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.state_dir / "bayes.sqlite")
            for bucket, atime in conn.execute("SELECT id, atime FROM buckets").fetchall():
                conn.execute("UPDATE buckets SET atime = ? WHERE id = ?", (change(atime), bucket))
            conn.commit()
            conn.close()
            return
        with self.client() as r:
            epoch = int(r.hget(self.prefix + "state", "epoch"))
            chunk = redis_store_module._CHUNK
            for n in range(-(-self.config().bayes.n_features // chunk)):
                keys = [f"{self.prefix}g{epoch}:{kind}:{n}" for kind in "sha"]
                s, h, a = (np.frombuffer((r.get(key) or b"").ljust(4 * chunk, b"\0"), ">u4") for key in keys)
                if s.any() or h.any():
                    r.set(keys[2], np.where((s | h) != 0, [change(int(x)) for x in a], a).astype(">u4").tobytes())


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", {"backend": "sqlite"}, tmp_path / "state")
    server: RedisServer = request.getfixturevalue("redis_server")
    state = {"backend": "redis", "redis_url": server.url, "redis_key_prefix": server.unique_prefix()}
    return Backend("redis", state, tmp_path / "state", server.url)


@pytest.fixture
def redis_backend(redis_server: RedisServer, tmp_path: Path) -> Backend:
    state = {"backend": "redis", "redis_url": redis_server.url, "redis_key_prefix": redis_server.unique_prefix()}
    return Backend("redis", state, tmp_path / "state", redis_server.url)


def trained(backend: Backend, n: int = 8, **config: Any) -> BayesStoreBase:
    store = backend.open(**config)
    store.learn_many([(make_msg(i, True), True) for i in range(n)] + [(make_msg(i, False), False) for i in range(n)])
    return store


def backup_of(store: BayesStoreBase) -> str:
    out = io.StringIO()
    store.backup(out)
    return out.getvalue()


def without_atimes(lines: list[str]) -> list[str]:
    return [line.rsplit("\t", 1)[0] if line.startswith("b\t") else line for line in lines]


def check_consistent(store: BayesStoreBase, *, exact: bool = True) -> Backup:
    """What the store holds is sound, whatever the backend: its counts agree with its messages,
    its buckets with the messages' token hashes (unless expiry dropped some), and a refreshed
    process's memory with its buckets."""
    backup = read_backup(io.StringIO(backup_of(store)))  # checks counts against messages
    n = store.n_features
    table_spam = np.zeros(n, dtype=np.int64)
    table_ham = np.zeros(n, dtype=np.int64)
    for bucket, s, h, _ in backup.buckets:
        assert s > 0 or h > 0, "empty buckets are deleted"
        table_spam[bucket], table_ham[bucket] = s, h
    if exact:
        spam = np.zeros(n, dtype=np.int64)
        ham = np.zeros(n, dtype=np.int64)
        for _, is_spam, _, blob in backup.messages:
            ids = np.unique(np.frombuffer(blob, dtype="<u4") & np.uint32(n - 1)).astype(np.int64)
            (spam if is_spam else ham)[ids] += 1
        assert np.array_equal(spam, table_spam) and np.array_equal(ham, table_ham)
    store.refresh()
    assert np.array_equal(store._spam, table_spam) and np.array_equal(store._ham, table_ham)
    assert store.counts() == (backup.nspam, backup.nham)
    return backup


# -- the contract, on both backends ---------------------------------------------------------------


def test_open_bayes_store_picks_the_configured_backend(backend: Backend) -> None:
    with backend.open() as store:
        assert store.backend == backend.name
        assert isinstance(store, RedisBayesStore if backend.name == "redis" else BayesStore)
        assert store.counts() == (0, 0)
    assert (backend.state_dir / "bayes.sqlite").exists() == (backend.name == "sqlite")


def test_learn_twice_counts_once_relearn_moves_forget_is_exact(backend: Backend) -> None:
    store = backend.open()
    msg = make_msg(1, True)
    other = make_msg(2, False)
    assert store.learn(other, False) is LearnResult.LEARNED
    before = backup_of(store).split("\n")
    assert store.learn(msg, True) is LearnResult.LEARNED
    assert store.learn(msg, True) is LearnResult.ALREADY
    assert store.counts() == (1, 1)
    redelivered = make_msg(1, True, headers="X-Spam-Status: Yes\nReceived: from relay.example\n")
    assert store.learn(redelivered, True) is LearnResult.ALREADY
    assert store.learn(msg, False) is LearnResult.MOVED
    assert store.counts() == (0, 2)
    check_consistent(store)
    assert store.forget(msg) is LearnResult.FORGOTTEN
    assert store.forget(msg) is LearnResult.NOT_KNOWN
    assert store.counts() == (0, 1)
    after = backup_of(store).split("\n")
    # Exactly as before msg: the same buckets with the same counts, the same message records.
    assert without_atimes(after) == without_atimes(before)
    check_consistent(store)
    store.close()


def test_learn_many_batches_duplicates_and_moves(backend: Backend) -> None:
    store = backend.open()
    items = [(make_msg(i, i % 2 == 0), i % 2 == 0) for i in range(700)]  # several batches either way
    items.append((make_msg(0, True), True))  # a duplicate
    items.append((make_msg(1, False), True))  # learnt as ham above, now spam
    results = store.learn_many(items)
    assert results == Counter({LearnResult.LEARNED: 700, LearnResult.ALREADY: 1, LearnResult.MOVED: 1})
    assert store.counts() == (351, 349)
    assert len(check_consistent(store).messages) == 700
    store.close()


def test_silent_until_min_spam_and_min_ham(backend: Backend) -> None:
    store = backend.open(min_spam=4, min_ham=3)
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


def test_probability_follows_training(backend: Backend) -> None:
    store = trained(backend)
    spam_p = store.spam_probability(make_msg(1000, True))
    ham_p = store.spam_probability(make_msg(1000, False))
    assert spam_p is not None and ham_p is not None and spam_p > 0.9 and ham_p < 0.1
    probe = make_msg(2000, False, extra="zanzibarfoo quixotrel")
    before = store.spam_probability(probe)
    store.learn_many([(make_msg(3000 + i, True, extra="zanzibarfoo quixotrel"), True) for i in range(6)])
    after = store.spam_probability(probe)
    assert before is not None and after is not None and after > before
    store.close()


def test_two_handles_see_each_others_learning_after_refresh(backend: Backend) -> None:
    one, two = trained(backend), backend.open()
    probe = make_msg(4000, False, extra="shibboleth " * 30)
    assert one.spam_probability(probe) == two.spam_probability(probe)
    before = two.spam_probability(probe)
    one.learn_many([(make_msg(50_000 + i, True, extra="shibboleth"), True) for i in range(20)])
    assert two.spam_probability(probe) == before  # memory only, until refreshed
    two.refresh()
    assert two.counts() == (28, 8)
    after = two.spam_probability(probe)
    assert before is not None and after is not None and after > before
    assert after == one.spam_probability(probe)
    two.forget(make_msg(50_000, True, extra="shibboleth"))
    one.refresh()
    assert one.spam_probability(probe) == two.spam_probability(probe)
    one.close()
    two.close()


CHILD = """
import dataclasses, json, sys
sys.path.insert(0, {root!r})
from filterd.engine.bayes import open_bayes_store
from tests.conftest import offline_config
from tests.engine.bayes_helpers import bayes_config, make_msg
spec = json.loads(sys.argv[1])
cfg = offline_config()
cfg = dataclasses.replace(cfg, bayes=bayes_config(), state=dataclasses.replace(cfg.state, **spec["state"]))
store = open_bayes_store(cfg, spec["state_dir"])
"""


def child(backend: Backend, code: str) -> subprocess.Popen[str]:
    spec = json.dumps({"state": backend.state, "state_dir": str(backend.state_dir)})
    program = CHILD.format(root=str(ROOT)) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", program, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip


def test_another_process_learning_is_seen_after_refresh(backend: Backend) -> None:
    reader = trained(backend)
    probe = make_msg(4000, False, extra="shibboleth " * 30)
    before = reader.spam_probability(probe)
    proc = child(backend, """
        store.learn_many([(make_msg(50_000 + i, True, extra="shibboleth"), True) for i in range(20)])
        store.close()
    """)  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    reader.refresh()
    after = reader.spam_probability(probe)
    assert before is not None and after is not None and after > before
    assert reader.counts() == (28, 8)
    check_consistent(reader)
    reader.close()


def test_processes_learning_the_same_messages_at_once_count_each_once(backend: Backend) -> None:
    backend.open().close()
    code = """
        import random
        rng = random.Random(int(sys.argv[2]))
        order = list(range(60))
        rng.shuffle(order)
        for i in order[:30]:
            store.learn(make_msg(i, i % 3 == 0), i % 3 == 0)
        store.learn_many([(make_msg(i, i % 3 == 0), i % 3 == 0) for i in order[30:]])
        store.close()
    """
    procs = []
    for seed in (1, 2, 3):
        spec = json.dumps({"state": backend.state, "state_dir": str(backend.state_dir)})
        program = CHILD.format(root=str(ROOT)) + textwrap.dedent(code)
        procs.append(subprocess.Popen([sys.executable, "-c", program, spec, str(seed)], stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT))  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    with backend.open() as store:
        assert store.counts() == (20, 40)
        assert len(check_consistent(store).messages) == 60


def test_backup_clear_restore_gives_identical_probabilities(backend: Backend) -> None:
    store = trained(backend)
    store.forget(make_msg(0, True))
    probes = [make_msg(700 + i, i % 2 == 0) for i in range(10)]
    before = [store.spam_probability(m) for m in probes]
    text = backup_of(store)
    assert text.startswith("filterd-bayes-backup\t1\n") and text.rstrip("\n").split("\n")[-1].startswith("end\t")
    other = backend.open()
    store.clear()
    assert store.counts() == (0, 0) and store.spam_probability(probes[0]) is None
    other.refresh()
    assert other.counts() == (0, 0) and other.spam_probability(probes[0]) is None
    store.restore(io.StringIO(text))
    assert [store.spam_probability(m) for m in probes] == before
    assert store.counts() == (7, 8)
    check_consistent(store)
    assert backup_of(store).split("\n")[4:] == text.split("\n")[4:]  # the same records
    other.refresh()
    assert [other.spam_probability(m) for m in probes] == before
    # Learning after a restore, from a handle that was open before it, goes into the new store.
    assert other.learn(make_msg(0, True), True) is LearnResult.LEARNED
    store.refresh()
    assert store.counts() == (8, 8)
    check_consistent(store)
    store.close()
    other.close()


def test_restore_rejects_a_bad_backup_and_keeps_the_store(backend: Backend) -> None:
    store = trained(backend)
    text = backup_of(store)
    truncated = "\n".join(text.split("\n")[:-3]) + "\n"
    with pytest.raises(StoreError, match="truncated"):
        store.restore(io.StringIO(truncated))
    with pytest.raises(StoreError, match="not a filterd Bayes backup"):
        store.restore(io.StringIO("v\t3\tdb_version\n"))
    assert store.counts() == (8, 8)
    assert backup_of(store) == text
    store.close()


def test_restore_into_other_n_features_rebuilds_buckets(backend: Backend, tmp_path: Path) -> None:
    small = BayesStore.open(tmp_path / "small.sqlite", bayes_config(n_features=1 << 16))
    small.learn_many([(make_msg(i, True), True) for i in range(8)] + [(make_msg(i, False), False) for i in range(8)])
    big = backend.open(n_features=1 << 18)
    big.restore(io.StringIO(backup_of(small)))
    assert big.counts() == (8, 8) and big.n_features == 1 << 18
    check_consistent(big)
    p = big.spam_probability(make_msg(900, True))
    assert p is not None and p > 0.9
    small.close()
    big.close()


def test_keeps_its_n_features_when_the_config_changes(backend: Backend) -> None:
    trained(backend, n_features=1 << 16).close()
    with backend.open(n_features=1 << 20) as store:
        assert store.n_features == 1 << 16
        assert store.spam_probability(make_msg(900, True)) is not None


def test_expiry_bounds_tokens_dropping_the_least_recently_seen(backend: Backend) -> None:
    store = backend.open()
    old = make_msg(1, True, extra="ancientword oldtimer")
    store.learn(old, True)
    backend.shift_atimes(lambda atime: atime - 86400)
    new = make_msg(2, False, extra="freshword")
    store.learn(new, False)
    new_ids = set(token_ids(new, store.n_features).tolist())
    n_before = store.dump()["ntokens"]
    assert isinstance(n_before, int) and n_before > len(new_ids)
    dropped = store.expire(max_tokens=len(new_ids))
    assert dropped == n_before - len(new_ids)
    assert store.dump()["ntokens"] == len(new_ids)
    kept = {bucket for bucket, _, _, _ in check_consistent(store, exact=False).buckets}
    assert kept == new_ids
    assert store.counts() == (1, 1)
    with backend.open(min_spam=1, min_ham=1) as fresh:  # memory equals the store: a new process agrees
        store.config = fresh.config
        for probe in (old, new, make_msg(3, True)):
            assert store.spam_probability(probe) == fresh.spam_probability(probe)
    # Forgetting the old message after its buckets expired never goes below zero.
    assert store.forget(old) is LearnResult.FORGOTTEN
    check_consistent(store, exact=False)
    assert store.expire() == 0
    assert store.dump()["expired_total"] == dropped
    assert store.expire_if_due() is None  # expired just now
    store.close()


def test_scanning_marks_buckets_as_seen(backend: Backend) -> None:
    store = trained(backend)
    backend.shift_atimes(lambda _: 1000)
    probe = make_msg(5, True)
    store.spam_probability(probe)
    store.close()  # writes what was seen
    with backend.open() as again:
        seen = {bucket for bucket, _, _, atime in read_backup(io.StringIO(backup_of(again))).buckets if atime > 1000}
    assert seen and seen <= set(token_ids(probe, 1 << 16).tolist())


def test_dump_magic(backend: Backend) -> None:
    store = trained(backend)
    info = store.dump()
    assert info["nspam"] == 8 and info["nham"] == 8 and info["nmessages"] == 16
    assert isinstance(info["ntokens"], int) and info["ntokens"] > 50
    assert isinstance(info["size"], int) and info["size"] > 0
    assert info["n_features"] == 1 << 16 and info["version"] == 1 and info["backend"] == backend.name
    assert isinstance(info["oldest_atime"], int) and info["oldest_atime"] <= info["newest_atime"]  # type: ignore[operator]
    store.close()


def test_the_check_scores_from_the_configured_store_and_scanning_creates_none(backend: Backend) -> None:
    config = backend.config()
    engine = Engine.load(config, state_dir=str(backend.state_dir))
    assert not [h for h in engine.scan_sync(make_raw(800, True)).hits if h.rule.startswith("BAYES_")]
    if backend.name == "redis":
        with backend.client() as r:
            assert not r.keys(backend.prefix + "*")
    else:
        assert not backend.state_dir.exists()
    trained(backend, n=12).close()
    time.sleep(1.1)  # the check looks for a store at most once a second
    spam = {h.rule for h in engine.scan_sync(make_raw(801, True)).hits}
    ham = {h.rule for h in engine.scan_sync(make_raw(801, False)).hits}
    assert "BAYES_99" in spam and "BAYES_00" in ham
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck) and check.store is not None and check.store.backend == backend.name
    check.close()


# -- moving a store between backends ---------------------------------------------------------------


def test_backup_restore_round_trip_sqlite_to_redis_and_back(redis_backend: Backend, tmp_path: Path) -> None:
    sqlite_store = BayesStore.open(tmp_path / "a.sqlite", bayes_config())
    sqlite_store.learn_many([(make_msg(i, i % 3 != 0), i % 3 != 0) for i in range(60)])
    sqlite_store.forget(make_msg(3, False))
    sqlite_store.expire(max_tokens=150)
    text = backup_of(sqlite_store)
    probes = [make_msg(900 + i, i % 2 == 0) for i in range(10)]
    expected = [sqlite_store.spam_probability(m) for m in probes]
    on_redis = redis_backend.open()
    on_redis.restore(io.StringIO(text))
    assert on_redis.counts() == sqlite_store.counts()
    assert [on_redis.spam_probability(m) for m in probes] == expected
    assert backup_of(on_redis) == text  # the same records, atimes and learnt times included
    check_consistent(on_redis, exact=False)
    # ... learns more on Redis, then goes back to a new SQLite file.
    on_redis.learn(make_msg(1000, True), True)
    back_text = backup_of(on_redis)
    back = BayesStore.open(tmp_path / "b.sqlite", bayes_config())
    back.restore(io.StringIO(back_text))
    assert backup_of(back) == back_text
    assert [back.spam_probability(m) for m in probes] == [on_redis.spam_probability(m) for m in probes]
    for store in (sqlite_store, on_redis, back):
        store.close()


# -- Redis only -----------------------------------------------------------------------------------


def test_redis_two_clients_changing_one_message_at_once_count_it_once(
    redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race made certain: client A reads the message's record, then client B changes it
    before A's script runs. A's script sees the version moved and changes nothing; A reads again
    and finds the work done: the message counts once."""
    a, b = redis_backend.open(), redis_backend.open()
    msg = make_msg(7, True)
    real = RedisBayesStore._run_apply
    races: list[Callable[[], LearnResult]] = [
        lambda: b.learn(msg, True),
        lambda: b.learn(msg, False),
        lambda: b.forget(msg),
    ]
    raced: list[LearnResult] = []

    def racing(self: RedisBayesStore, *args: Any) -> bool:
        if self is a and races:
            raced.append(races.pop(0)())
        return real(self, *args)

    monkeypatch.setattr(RedisBayesStore, "_run_apply", racing)
    assert a.learn(msg, True) is LearnResult.ALREADY
    assert a.counts() == (1, 0)
    assert a.learn(msg, False) is LearnResult.ALREADY
    assert a.counts() == (0, 1)
    check_consistent(a)
    assert a.forget(msg) is LearnResult.NOT_KNOWN
    assert raced == [LearnResult.LEARNED, LearnResult.MOVED, LearnResult.FORGOTTEN]
    assert a.counts() == (0, 0) and a.dump()["ntokens"] == 0
    check_consistent(a)
    a.close()
    b.close()


def test_redis_counts_are_fixed_size_strings_updated_in_place(redis_backend: Backend) -> None:
    store = trained(redis_backend, n=30)
    with redis_backend.client() as r:
        keys = sorted(r.scan_iter(match=redis_backend.prefix + "g1:*"))
        kinds = Counter(k.decode()[len(redis_backend.prefix) + 3 :].split(":")[0] for k in keys)
        assert set(kinds) == {"s", "h", "a", "msgs", "log"} and kinds["msgs"] == kinds["log"] == 1
        assert 10 < kinds["a"] <= 17  # 2**16 buckets in strings of 4094
        for key in keys:
            if b":msgs" not in key and b":log" not in key:
                assert r.strlen(key) == 4 * 4094  # made at full size, updated in place
                assert r.memory_usage(key) <= 16384 + 100  # one 16 KB allocation and the key
    store.close()


def test_redis_refresh_after_the_log_was_trimmed_away_reloads(redis_backend: Backend) -> None:
    reader = redis_backend.open()
    writer = trained(redis_backend)
    with redis_backend.client() as r:
        r.delete(redis_backend.prefix + "g1:log")  # as if trimmed while the reader slept
    reader.refresh()
    probe = make_msg(40, True)
    assert reader.spam_probability(probe) == writer.spam_probability(probe)
    check_consistent(reader)
    reader.close()
    writer.close()


def test_redis_log_stays_bounded_and_a_reader_far_behind_reloads(
    redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store_module, "_LOG_MAX", 5)  # read when a store builds its scripts
    reader = redis_backend.open()
    writer = redis_backend.open()
    for i in range(300):
        writer.learn(make_msg(i, i % 2 == 0), i % 2 == 0)
    with redis_backend.client() as r:
        log_seqs = [int(fields[b"seq"]) for _, fields in r.xrange(redis_backend.prefix + "g1:log")]
    assert log_seqs == list(range(log_seqs[0], 301)) and len(log_seqs) < 250  # the newest, no gap
    reader.refresh()  # its position was trimmed away: it reloads the counts
    probes = [make_msg(900 + i, i % 2 == 0) for i in range(6)]
    assert [reader.spam_probability(m) for m in probes] == [writer.spam_probability(m) for m in probes]
    check_consistent(reader)
    reader.close()
    writer.close()


def test_redis_clear_deletes_the_old_generation_and_stale_writers_follow(redis_backend: Backend) -> None:
    stale = trained(redis_backend)
    other = redis_backend.open()
    other.clear()
    with redis_backend.client() as r:
        names = {k.decode()[len(redis_backend.prefix) :].split(":")[0] for k in r.scan_iter(redis_backend.prefix + "*")}
    assert names == {"meta", "state"}  # generation 1 is gone; 2 is empty, so has no keys yet
    assert stale.learn(make_msg(1, True), True) is LearnResult.LEARNED  # into generation 2
    with redis_backend.client() as r:
        assert r.exists(redis_backend.prefix + "g2:msgs") and not r.keys(redis_backend.prefix + "g1:*")
    other.refresh()
    assert other.counts() == (1, 0)
    check_consistent(other)
    stale.close()
    other.close()


def test_redis_unreachable_raises_state_error_and_the_check_scores_from_memory(
    make_redis_server: MakeRedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    backend = Backend(
        "redis", {"backend": "redis", "redis_url": server.url, "redis_key_prefix": "x:"}, tmp_path, server.url
    )
    trained(backend, n=12).close()
    engine = Engine.load(backend.config(), state_dir=str(tmp_path))
    assert "BAYES_99" in {h.rule for h in engine.scan_sync(make_raw(801, True)).hits}
    server.stop()
    time.sleep(1.1)  # due for a refresh, which fails
    started = time.monotonic()
    for _ in range(20):
        hits = {h.rule for h in engine.scan_sync(make_raw(801, True)).hits}
        assert "BAYES_99" in hits and not any(h.startswith("CHECK_ERROR") for h in hits)
    assert time.monotonic() - started < 5
    assert [r for r in caplog.records if "Bayes store unavailable" in r.getMessage()][:1]
    with pytest.raises(StateError, match="ConnectionError"):
        backend.open()
    check = engine.check("bayes")
    assert isinstance(check, BayesCheck)
    check.close()


def test_filterd_learn_on_redis(redis_backend: Backend, tmp_path: Path) -> None:
    corpus = ROOT / "corpora"
    config = tmp_path / "filterd.yaml"
    state = redis_backend.state
    config.write_text(f"state: {{backend: redis, redis_url: '{state['redis_url']}', "
                      f"redis_key_prefix: '{state['redis_key_prefix']}'}}\n")  # fmt: skip

    def learn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "filterd", "learn", "--config", str(config), *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip

    n_spam = len(list((corpus / "spam").glob("*.eml")))
    proc = learn("--spam", str(corpus / "spam"))
    assert proc.returncode == 0 and f"learnt {n_spam} as spam, already known 0" in proc.stdout, proc
    proc = learn("--spam", str(corpus / "spam"))
    assert f"learnt 0 as spam, already known {n_spam}" in proc.stdout
    assert learn("--ham", str(corpus / "ham")).returncode == 0
    dump = json.loads(learn("--dump").stdout)
    assert dump["backend"] == "redis" and dump["nspam"] == n_spam
    backup = tmp_path / "bayes.txt"
    assert learn("--backup", str(backup)).returncode == 0
    assert learn("--clear").returncode == 0
    assert json.loads(learn("--dump").stdout)["nspam"] == 0
    assert learn("--restore", str(backup)).returncode == 0
    assert {k: v for k, v in json.loads(learn("--dump").stdout).items() if k in ("nspam", "nham", "ntokens")} == {
        k: v for k, v in dump.items() if k in ("nspam", "nham", "ntokens")
    }
    assert not (tmp_path / "filterd-state").exists()  # nothing written locally
    proc = learn("--restore", str(tmp_path / "filterd.yaml"))
    assert proc.returncode == 65 and "not a filterd Bayes backup" in proc.stderr
