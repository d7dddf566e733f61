"""SMTP AUTH users: an unknown name costs a scrypt run, and a malformed users line is reported."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import cast

import pytest

import filterd.mta.auth as auth_module
from filterd.errors import ConfigError
from filterd.mta.auth import DUMMY_HASH, check_user, hash_password, load_users, verify_password


def _spy_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, int]]:
    """Record (salt, ln) of every scrypt run, still running the real one."""
    runs: list[tuple[bytes, int]] = []
    real = auth_module._scrypt

    def scrypt(password: str, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
        runs.append((salt, ln))
        return real(password, salt, ln, r, p, length)

    monkeypatch.setattr(auth_module, "_scrypt", scrypt)
    return runs


def test_unknown_user_is_verified_against_the_dummy_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"alice": hash_password("right", ln=10)}
    runs = _spy_scrypt(monkeypatch)
    assert not check_user(users, "mallory", "right")
    # one scrypt run, on the dummy's salt and at the cost hash_password uses by default
    dummy_salt = base64.b64decode(DUMMY_HASH.split("$")[3])
    assert runs == [(dummy_salt, auth_module._LN)]
    assert DUMMY_HASH.startswith(f"$scrypt$ln={auth_module._LN},")
    runs.clear()
    assert not check_user(users, "alice", "wrong") and check_user(users, "alice", "right")
    assert len(runs) == 2 and all(salt != dummy_salt for salt, _ in runs)


def test_the_dummy_hash_matches_no_password() -> None:
    assert not verify_password("", DUMMY_HASH) and not check_user({}, "x", "")


def test_bad_base64_in_the_users_file_is_reported_with_its_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    good = hash_password("pw", ln=4)
    users.write_text(f"alice:{good}\nbob:$scrypt$ln=1,r=1,p=1$abc$abcde\ncarol:$scrypt$ln=1,r=1,p=1$YWJj$a=bc\n")
    users.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        load_users(users)
    lines = sorted(cast(int, problem.line) for problem in caught.value.problems)
    assert lines == [2, 3], caught.value.problems
    assert f"{users}:2" in str(caught.value)
    # the same hashes handed to verify_password directly are refused, not raised
    assert not verify_password("pw", "$scrypt$ln=1,r=1,p=1$abc$abcde")
    users.write_text(f"alice:{good}\n")
    assert verify_password("pw", load_users(users)["alice"])
