"""Running `filterd learn` as an admin would, for the tests of learning, backups and restores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def learn(state: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """``filterd learn --state-dir STATE ARGS...`` (default configuration), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "filterd", "learn", "--state-dir", str(state), *args],
        input=stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def dump(state: Path, *, without_size: bool = False) -> dict[str, object]:
    """``filterd learn --dump``; ``without_size`` drops the file's size (WAL included: a
    checkpoint may move it) for comparing a store's contents before and after."""
    proc = learn(state, "--dump")
    assert proc.returncode == 0, proc.stderr
    facts = dict(json.loads(proc.stdout))
    if without_size:
        facts.pop("size", None)
    return facts
