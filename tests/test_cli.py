"""The `filterd` command as an admin runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GTUBE = (
    b"Subject: test\nFrom: admin@example.org\n\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)


def filterd(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "filterd", *args], input=stdin, capture_output=True, timeout=120)


def test_check_json_has_the_documented_fields() -> None:
    proc = filterd("check", "--local", "--json", "-", stdin=GTUBE)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["is_spam"] is True and doc["score"] >= 1000 and doc["required_score"] == 5.0
    gtube = next(h for h in doc["hits"] if h["name"] == "GTUBE")
    assert gtube["score"] == 1000 and gtube["description"]
    # Each async (network) check's wall time, even with the network off (they return at once then).
    assert {"dnsbl", "auth"} <= set(doc["async_check_ms"]) and min(doc["async_check_ms"].values()) >= 0


def test_check_plain_and_process(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(GTUBE)
    proc = filterd("check", "--local", str(path))
    assert proc.returncode == 0 and proc.stdout.startswith(b"spam 10")
    proc = filterd("check", "--local", "--process", str(path))
    assert b"X-Spam-Flag: YES" in proc.stdout and b"x-spam-type=original" in proc.stdout


def test_check_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = filterd("check", "--local", str(tmp_path / "nope.eml"))
    assert proc.returncode == 66 and b"cannot read" in proc.stderr


def test_config_check_reports_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "filterd.yaml"
    cfg.write_text("scoring:\n  required_score: banana\n  colour: red\n")
    proc = filterd("config", "check", "--config", str(cfg))
    assert proc.returncode == 78
    err = proc.stderr.decode()
    assert f"{cfg}:2: scoring.required_score:" in err and f"{cfg}:3: scoring.colour:" in err
    cfg.write_text("scoring:\n  required_score: 6.5\n")
    proc = filterd("config", "check", "--diff", "--config", str(cfg))
    assert proc.returncode == 0 and b"required_score: 6.5" in proc.stdout


def test_rules_lint_lists_every_problem(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10_x.yaml").write_text("A: {body: '/(/', describe: x}\nB: {meta: 'NOPE', describe: y}\n")
    cfg = tmp_path / "filterd.yaml"
    cfg.write_text(f"rules:\n  extra_dirs: [{rules}]\n")
    proc = filterd("rules", "lint", "--config", str(cfg))
    assert proc.returncode == 78
    err = proc.stderr.decode()
    assert "10_x.yaml:1: A: bad regex" in err and "10_x.yaml:2: B: meta: unknown rule 'NOPE'" in err


def test_shipped_rules_lint_clean() -> None:
    proc = filterd("rules", "lint", "--strict")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"rules OK" in proc.stdout


def test_only_the_command_asked_for_is_imported(tmp_path: Path) -> None:
    """`filterd learn` (run from cron or a script, often) does not import eval, the MTA or the
    MDA to define their arguments; help without a command still lists every command."""
    code = (
        "import sys; from filterd.cli import main; rc = main(['learn', '--state-dir', sys.argv[1], '--dump']);"
        " print(sorted(m for m in sys.modules if m.startswith(('filterd.evaluate', 'filterd.mta', 'filterd.mda'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    proc = subprocess.run([sys.executable, "-m", "filterd", "--help"], capture_output=True, text=True, timeout=120)
    for command in ("check", "daemon", "learn", "eval", "reputation", "greylist", "deliver", "mta", "dkim"):
        assert f"    {command}" in proc.stdout, command
    typo = filterd("lern")
    assert typo.returncode == 2 and b"invalid choice: 'lern'" in typo.stderr and b"'learn'" in typo.stderr
