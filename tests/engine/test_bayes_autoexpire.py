"""Bayes expiry without an admin: the daemon's workers (`Engine.maintain_bayes`) and `filterd
learn` expire the store once ``bayes.expiry_period`` has passed, as SpamAssassin's
bayes_auto_expire does; on both backends (SQLite file, real redis-server).

A store over ``bayes.max_tokens`` (10 000 at least) is made from messages of random words;
"expiry_period has passed" is made by setting the store's last expiry to 1970, as the store
itself would find it after a long time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import redis

from filterd.config import Config
from filterd.engine.bayes import BayesCheck, BayesStoreBase, open_bayes_store
from filterd.engine.engine import Engine
from tests._servers import wait_until
from tests.conftest import offline_config
from tests.daemon_fixture import start_daemon
from tests.engine.bayes_helpers import bayes_config, parse
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.redis_fixture"]

MAX_TOKENS = 10_000  # the smallest bayes.max_tokens allowed
N_FEATURES = 1 << 16
BAYES_YAML = f"bayes: {{max_tokens: {MAX_TOKENS}, expiry_period: 1m, n_features: {N_FEATURES}}}\n"


@dataclasses.dataclass
class Backend:
    name: str
    state_dir: Path
    url: str = ""
    prefix: str = ""  # state.redis_key_prefix

    def config(self) -> Config:
        cfg = offline_config()
        state = cfg.state
        if self.name == "redis":
            state = dataclasses.replace(state, backend="redis", redis_url=self.url, redis_key_prefix=self.prefix)
        bayes = bayes_config(max_tokens=MAX_TOKENS, n_features=N_FEATURES)
        return dataclasses.replace(cfg, state=state, state_dir=str(self.state_dir), bayes=bayes)

    def yaml(self) -> str:
        """The same settings for a daemon or `filterd learn` (--state-dir gives the directory)."""
        if self.name == "sqlite":
            return BAYES_YAML
        return BAYES_YAML + f"state: {{backend: redis, redis_url: '{self.url}', redis_key_prefix: '{self.prefix}'}}\n"

    def open(self) -> BayesStoreBase:
        return open_bayes_store(self.config(), self.state_dir)

    def make_overdue(self) -> None:
        """Set the last expiry to the epoch: expiry_period has passed."""
        if self.name == "sqlite":
            with sqlite3.connect(self.state_dir / "bayes.sqlite") as conn:
                conn.execute("UPDATE state SET last_expiry = 0")
            conn.close()
            return
        with redis.Redis.from_url(self.url) as r:
            r.hset(self.prefix + "bayes:state", "last_expiry", 0)

    def created_nothing(self) -> bool:
        if self.name == "sqlite":
            return not self.state_dir.exists()
        with redis.Redis.from_url(self.url) as r:
            return not r.keys(self.prefix + "*")


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path / "state")
    server: RedisServer = request.getfixturevalue("redis_server")
    return Backend("redis", tmp_path / "state", server.url, server.unique_prefix())


def wide_raw(n: int, words: int = 300) -> bytes:
    """Message ``n``: ``words`` random words, nearly all seen nowhere else (many buckets)."""
    rng = random.Random(n)
    body = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(words))
    return (
        f"From: sender{n}@example.org\nTo: dana@example.net\nSubject: note {n}\n"
        f"Message-ID: <{n}.wide@example.org>\nDate: Mon, 12 Jan 2026 10:00:00 +0000\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n{body}\n"
    ).encode()


def overfilled(backend: Backend) -> int:
    """Learn the store past MAX_TOKENS; returns its bucket count."""
    with backend.open() as store:
        store.learn_many([(parse(wide_raw(i)), i % 2 == 0) for i in range(50)])
        ntokens = int(cast(int, store.dump()["ntokens"]))
    assert ntokens > MAX_TOKENS + 2000
    return ntokens


def facts(backend: Backend) -> dict[str, object]:
    with backend.open() as store:
        return store.dump()


# -- the engine's upkeep --------------------------------------------------------------------------


def test_maintain_bayes_expires_only_when_due_and_logs_it(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    ntokens = overfilled(backend)
    engine = Engine.load(backend.config(), state_dir=str(backend.state_dir))
    try:
        assert asyncio.run(engine.maintain_bayes()) is None  # the store was created just now: not due
        assert facts(backend)["ntokens"] == ntokens
        backend.make_overdue()
        with caplog.at_level(logging.INFO, logger="filterd.engine.bayes.check"):
            assert asyncio.run(engine.maintain_bayes()) == ntokens - MAX_TOKENS
        assert f"Bayes expiry dropped {ntokens - MAX_TOKENS} tokens" in caplog.text
        after = facts(backend)
        assert (after["ntokens"], after["expired_total"]) == (MAX_TOKENS, ntokens - MAX_TOKENS)
        assert asyncio.run(engine.maintain_bayes()) is None  # expired just now
    finally:
        check = engine.check("bayes")
        assert isinstance(check, BayesCheck)
        check.close()


def test_maintain_bayes_creates_no_store(backend: Backend) -> None:
    engine = Engine.load(backend.config(), state_dir=str(backend.state_dir))
    assert asyncio.run(engine.maintain_bayes()) is None
    assert backend.created_nothing()


def test_maintain_bayes_logs_a_broken_store_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "bayes.sqlite").write_bytes(b"not a database, just bytes " * 100)
    engine = Engine.load(Backend("sqlite", state).config(), state_dir=str(state))
    with caplog.at_level(logging.WARNING, logger="filterd.engine.bayes.check"):
        assert asyncio.run(engine.maintain_bayes()) is None
    assert "Bayes expiry failed" in caplog.text


def test_workers_finding_expiry_due_at_once_drop_the_excess_once(backend: Backend) -> None:
    """Two handles that both saw expiry due (two workers' ticks): the second drops nothing."""
    ntokens = overfilled(backend)
    backend.make_overdue()
    with backend.open() as first, backend.open() as second:
        assert first.expire_if_due() == ntokens - MAX_TOKENS
        assert second.expire() == 0  # what a second worker that also found it due then does
        assert second.expire_if_due() is None
    after = facts(backend)
    assert (after["ntokens"], after["expired_total"]) == (MAX_TOKENS, ntokens - MAX_TOKENS)


# -- the daemon and filterd learn -------------------------------------------------------------------


def test_daemon_expires_an_overdue_store_by_itself(backend: Backend, tmp_path: Path) -> None:
    ntokens = overfilled(backend)
    backend.make_overdue()
    d = start_daemon(tmp_path, "--state-dir", str(backend.state_dir), config=backend.yaml(), workers=2, metrics=False)
    try:
        wait_until(
            lambda: facts(backend)["ntokens"] == MAX_TOKENS, d.proc, name="daemon",
            waiting_for=f"expire the store to {MAX_TOKENS} tokens", log=d.log, timeout=60, interval=0.2,
        )  # fmt: skip
        assert "Bayes expiry dropped" in d.log()
    finally:
        assert d.stop() == 0, d.log()
    after = facts(backend)  # both workers were done by then: the one that came second dropped nothing
    assert (after["ntokens"], after["expired_total"]) == (MAX_TOKENS, ntokens - MAX_TOKENS)


def learn(backend: Backend, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "learn.yaml"
    cfg.write_text("network: {enabled: false}\n" + backend.yaml())
    argv = ["learn", "--config", str(cfg), "--state-dir", str(backend.state_dir), *args]
    proc = subprocess.run([sys.executable, "-m", "filterd", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_filterd_learn_expires_an_overdue_store_after_learning(backend: Backend, tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    folder.mkdir()
    for n in range(50):
        (folder / f"{n}.eml").write_bytes(wide_raw(n))
    (tmp_path / "one.eml").write_bytes(wide_raw(50))
    proc = learn(backend, tmp_path, "--spam", str(folder))
    assert "learnt 50 as spam" in proc.stdout and "expired" not in proc.stdout  # a new store: not due
    ntokens = int(json.loads(learn(backend, tmp_path, "--dump").stdout)["ntokens"])
    assert ntokens > MAX_TOKENS + 2000
    backend.make_overdue()
    assert json.loads(learn(backend, tmp_path, "--dump").stdout)["ntokens"] == ntokens  # --dump changes nothing
    proc = learn(backend, tmp_path, "--ham", str(tmp_path / "one.eml"))
    after = facts(backend)
    assert after["ntokens"] == MAX_TOKENS
    dropped = int(cast(int, after["expired_total"]))
    assert dropped > ntokens - MAX_TOKENS  # the message just learnt added buckets too
    assert "learnt 1 as ham" in proc.stdout and f"expired {dropped} tokens" in proc.stdout
    proc = learn(backend, tmp_path, "--ham", str(tmp_path / "one.eml"))
    assert "expired" not in proc.stdout  # expired just now
