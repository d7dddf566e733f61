"""The README's main command end to end: scripts/demo.py runs learn, the daemon (milter), the
MTA and deliver on loopback and sends every sample over SMTP; each must land somewhere, every
ham in the Inbox, and no spam in the Inbox that expected.yaml does not already excuse."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_whole_chain() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict(re.findall(r"^(\S+\.eml)\s+(?:spam|ham)\s+\S*\s+(.+?)\s*$", proc.stdout, re.M))
    expected = yaml.safe_load((ROOT / "corpora" / "expected.yaml").read_text())
    assert len(rows) == len(expected)
    for name, facts in expected.items():
        where = rows[Path(name).name]
        if facts["label"] == "ham":
            assert where == "Inbox", (name, where)
        elif facts.get("reaches_threshold", True):
            assert where == "Junk" or where.startswith("refused 550"), (name, where)
    gtube = rows["27-gtube-test-message.eml"]
    assert gtube.startswith("refused 550") and "rejected as spam" in gtube
