"""Helpers of the delivery tests: running `filterd deliver` as an MTA would (a subprocess, the
message on stdin), and listing what landed where."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml


class Deliver:
    """``deliver(*args, data=..., **settings)`` runs ``filterd deliver --config FILE ARGS``;
    FILE holds ``deliver:`` ``settings`` (``recipes`` is empty unless given, so a test never
    reads the recipes of the user running the tests)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.count = 0

    def config_file(self, settings: dict[str, object]) -> Path:
        self.count += 1
        path = self.tmp_path / f"filterd-{self.count}.yaml"
        path.write_text(yaml.safe_dump({"deliver": {"recipes": "", **settings}}))
        return path

    def __call__(
        self,
        *args: str,
        data: bytes,
        preexec_fn: Callable[[], None] | None = None,
        run_timeout: float = 60,
        **settings: object,
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "filterd", "deliver", "--config", str(self.config_file(settings)), *args]
        return subprocess.run(
            cmd,
            input=data,
            capture_output=True,
            timeout=run_timeout,
            preexec_fn=preexec_fn,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )


def maildir_files(root: Path, folder: str = "") -> list[Path]:
    """The files in new/ of the Maildir (``folder``: a subfolder directory such as .Junk)."""
    new = root / folder / "new" if folder else root / "new"
    return sorted(new.iterdir()) if new.is_dir() else []
