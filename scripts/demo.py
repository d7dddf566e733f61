#!/usr/bin/env python3
"""The README's main job: start `filterd daemon` on embedded defaults, score every sample in
corpora/ through `filterc` (as a delivery recipe would), print a table, stop the daemon.

    python scripts/demo.py [--keep-running]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=3, help="rules to show per message")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="filterd-demo-") as tmp:
        sock = Path(tmp) / "filterd.sock"
        log_path = Path(tmp) / "daemon.log"
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [str(BIN / "filterd"), "daemon", "--listen", str(sock), "--workers", "2", "--state-dir",
                 str(Path(tmp) / "state"), "--local"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while not sock.exists() or b"daemon ready" not in log_path.read_bytes():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(), file=sys.stderr)
                    print("the daemon did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print(f"filterd daemon up on {sock} (pid {daemon.pid}); scoring corpora/ through filterc\n")
            files = sorted((ROOT / "corpora").rglob("*.eml"))
            width = max(len(str(f.relative_to(ROOT))) for f in files)
            print(f"{'file':<{width}}  {'label':<5} {'score':>7}  {'verdict':<7} top rules")
            right = 0
            for path in files:
                label = path.parent.name
                proc = subprocess.run([str(BIN / "filterc"), "-U", str(sock), "-R"], input=path.read_bytes(),
                                      capture_output=True, timeout=60)
                first, _, report = proc.stdout.decode("utf-8", "replace").partition("\n")
                score_text, _, threshold = first.partition("/")
                try:
                    score, required = float(score_text), float(threshold)
                except ValueError:
                    print(f"{path}: no answer from the daemon: {proc.stdout[:200]!r} {proc.stderr[:200]!r}")
                    continue
                verdict = "spam" if score >= required else "ham"
                right += verdict == label
                rules = re.findall(r"^\s*(-?[\d.]+) ([A-Z0-9_]+)\s", report, re.M)
                top = ", ".join(f"{name}({float(pts):g})" for pts, name in rules[: args.top])
                mark = "" if verdict == label else "  <- wrong"
                print(f"{str(path.relative_to(ROOT)):<{width}}  {label:<5} {score:7.1f}  {verdict:<7} {top}{mark}")
            print(f"\n{right}/{len(files)} classified as labelled (rules alone: no Bayes, no network checks yet)")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            print(f"daemon stopped (exit {daemon.returncode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
