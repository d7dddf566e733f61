"""The `filterd` command: one entry point, one subcommand per job.

Exit codes follow sysexits: 0 ok, 64 usage, 65 bad input data, 66 no input, 70 internal error,
78 configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from filterd import __version__
from filterd.errors import ConfigError, RuleError

__all__ = ["main"]

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, EX_CANTCREAT, EX_CONFIG = 64, 65, 66, 70, 73, 78


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (default: embedded defaults)")
    p.add_argument("--state-dir", metavar="DIR", help="where learnt state lives (Bayes, reputation, greylisting)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument(
        "-L", "--local", action="store_true", help="no network checks (DNSBL, SPF, DKIM, DMARC), like spamd -L"
    )


COMMANDS = (
    "check", "mass-check", "daemon", "learn", "eval", "reputation", "greylist", "deliver", "mta", "config", "rules",
    "dkim",
)  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` just that command's parser: the other commands'
    argument definitions import their modules (eval, mta, deliver...), a quarter of a second that
    `filterd learn` or `filterd check` run from a script should not pay on every start."""
    parser = argparse.ArgumentParser(prog="filterd", description="filterd: a fast, honest mail filter.")
    parser.add_argument("--version", action="version", version=f"filterd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def wanted(*names: str) -> bool:
        return only is None or only in names

    if wanted("check"):
        p = sub.add_parser("check", help="score one message and print the verdict")
        _common(p)
        p.add_argument("file", nargs="?", default="-", help="message file, or - for standard input")
        out = p.add_mutually_exclusive_group()
        out.add_argument("--report", action="store_true", help="print the full report")
        out.add_argument("--json", action="store_true", help="print one JSON object")
        out.add_argument("--process", action="store_true", help="print the marked-up message")

    if wanted("mass-check"):
        p = sub.add_parser("mass-check", help="score many messages and print a table")
        _common(p)
        p.add_argument("paths", nargs="+", help="files or directories; the label is the ham/spam folder name")
        p.add_argument("--top", type=int, default=3, help="how many top rules to show per message")

    if wanted("daemon"):
        _daemon_arguments(sub)

    if wanted("learn"):
        p = sub.add_parser("learn", help="train Bayes from spam and ham folders (like sa-learn)")
        _common(p)
        _learn_arguments(p)

    if wanted("eval"):
        p = sub.add_parser("eval", help="measure accuracy on labelled folders: ROC AUC, recall, false positives, plots")
        _common(p)
        from filterd.evaluate import add_eval_arguments

        add_eval_arguments(p)

    if wanted("reputation", "greylist"):
        from filterd.statecmd import add_state_commands

        add_state_commands(sub, _common)

    if wanted("deliver"):
        from filterd.mda.main import add_deliver_command

        add_deliver_command(sub)

    if wanted("mta"):
        from filterd.mta.main import add_mta_command
        from filterd.mta.queuecmd import add_queue_command

        add_queue_command(add_mta_command(sub, _common), _common)  # `filterd mta queue ...`

    if wanted("config"):
        p = sub.add_parser("config", help="configuration tools")
        csub = p.add_subparsers(dest="config_command", metavar="ACTION")
        c = csub.add_parser("check", help="validate and print the configuration in force")
        _common(c)
        c.add_argument("--diff", action="store_true", help="only settings that differ from the defaults")
        c.add_argument("--list", action="store_true", help="list every setting with its type, default and meaning")

    if wanted("rules"):
        p = sub.add_parser("rules", help="rule set tools")
        rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
        r = rsub.add_parser("lint", help="compile every rule and report all problems")
        _common(r)
        r.add_argument("--strict", action="store_true", help="warnings (missing describe, ...) fail too")

    if wanted("dkim"):
        p = sub.add_parser("dkim", help="DKIM signing keys")
        dsub = p.add_subparsers(dest="dkim_command", metavar="ACTION")
        d = dsub.add_parser("genkey", help="make a signing key (mode 0600) and print the DNS TXT record to publish")
        d.add_argument("domain", help="signing domain (d=)")
        d.add_argument("selector", help="selector (s=): the key is published at SELECTOR._domainkey.DOMAIN")
        d.add_argument("--dir", default=".", help="where to write DOMAIN.SELECTOR.pem (default: .)")
        d.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048, at least 1024)")
    return parser


def _daemon_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("daemon", help="run the scoring daemon (spamd, milter, policy) in the foreground")
    _common(p)
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="serve spamd on HOST:PORT or a Unix socket path; repeatable (default 127.0.0.1:783 if nothing else is)",
    )
    p.add_argument(
        "--milter-listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="also serve the milter protocol (Postfix smtpd_milters, Sendmail) here; repeatable",
    )
    p.add_argument(
        "--policy-listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="also serve Postfix policy delegation (check_policy_service, greylisting) here; repeatable",
    )
    p.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve /metrics and /healthz over HTTP here")
    p.add_argument("--pid-file", metavar="FILE", help="write the master's PID here")
    p.add_argument("--allow-tell", action="store_true", help="accept spamd TELL (learning) requests")
    p.add_argument("--user-prefs", metavar="DIR", help="directory of per-user <user>.yaml settings")


class _JournalFormatter(logging.Formatter):
    """systemd's stderr convention: a <priority> prefix, no timestamp (journald adds it)."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _learn_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--spam", action="store_true", help="learn the messages as spam")
    what.add_argument("--ham", action="store_true", help="learn the messages as ham")
    what.add_argument("--forget", action="store_true", help="forget what was learnt from the messages")
    what.add_argument("--dump", action="store_true", help="print message and token counts (like sa-learn --dump magic)")
    what.add_argument("--backup", metavar="FILE", help="write the whole store to FILE (portable text; - for stdout)")
    what.add_argument("--restore", metavar="FILE", help="replace the store with a backup (- for stdin)")
    what.add_argument("--clear", action="store_true", help="forget everything")
    what.add_argument("--expire", action="store_true", help="drop least recently seen tokens down to bayes.max_tokens")
    p.add_argument("paths", nargs="*", metavar="PATH", help="Maildir, mbox, directory or file; - for stdin")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")


def _setup_logging(verbose: int, *, default: int = logging.WARNING) -> None:
    level = default if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s[%(process)d]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["deliver"]:  # once per message: skip the imports of the other commands
        from filterd.mda.main import main as deliver_main

        return deliver_main(words[1:])
    # Only the command asked for is defined (see build_parser); anything else (no command, --help,
    # a typo, an option first) gets the whole parser, so help and errors list every command.
    parser = build_parser(words[0] if words[:1] and words[0] in COMMANDS else None)
    args = parser.parse_args(words)
    if not args.command:
        parser.print_help(sys.stderr)
        return EX_USAGE
    servers = ("daemon", "mta")
    _setup_logging(getattr(args, "verbose", 0), default=logging.INFO if args.command in servers else logging.WARNING)
    try:
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "mass-check":
            return _cmd_mass_check(args)
        if args.command == "daemon":
            return _cmd_daemon(args)
        if args.command == "mta":
            from filterd.mta.main import run_mta_command

            return run_mta_command(args)
        if args.command == "eval":
            from filterd.evaluate import EvalArgs, run_eval

            return run_eval(EvalArgs.from_namespace(args, _load_config(args)))
        if args.command == "learn":
            from filterd.learn import run_learn

            return run_learn(args, _load_config(args))
        if args.command in ("reputation", "greylist"):
            from filterd.statecmd import run_state_command

            return run_state_command(args, _load_config(args))
        if args.command == "config":
            if args.config_command != "check":
                parser.parse_args(["config", "--help"])
            return _cmd_config_check(args)
        if args.command == "rules":
            if args.rules_command != "lint":
                parser.parse_args(["rules", "--help"])
            return _cmd_rules_lint(args)
        if args.command == "dkim":
            if args.dkim_command != "genkey":
                parser.parse_args(["dkim", "--help"])
            return _cmd_dkim_genkey(args)
    except ConfigError as exc:
        print(f"filterd: configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except RuleError as exc:
        print(f"filterd: rule error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except BrokenPipeError:
        return 0
    parser.print_help(sys.stderr)
    return EX_USAGE


def _load_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import dataclasses

    from filterd.config import load_config

    config = load_config(args.config, state_dir=args.state_dir)
    if getattr(args, "local", False):
        config = dataclasses.replace(config, network=dataclasses.replace(config.network, enabled=False))
    return config


def _load_engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from filterd.engine.engine import Engine

    config = _load_config(args)
    return Engine.load(config, state_dir=str(config.state_path))


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    return Path(name).read_bytes()


def _cmd_check(args: argparse.Namespace) -> int:
    from filterd.engine.markup import MarkupOptions, build_report, format_score, process_message
    from filterd.engine.plugin import ScanContext

    engine = _load_engine(args)
    try:
        raw = _read_input(args.file)
    except OSError as exc:
        print(f"filterd: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EX_NOINPUT
    # A one-off check learns nothing: autolearn belongs to the daemon, which owns the store.
    result = engine.scan_sync(raw, ScanContext(no_autolearn=True))
    options = MarkupOptions.from_engine(engine)
    if args.json:
        doc = {
            "score": result.score,
            "required_score": result.required_score,
            "is_spam": result.is_spam,
            "hits": [
                {
                    "name": h.rule,
                    "score": h.score,
                    "description": engine.info(h.rule).describe if engine.info(h.rule) else "",
                    "detail": h.detail,
                }
                for h in result.hits
            ],
            "scan_ms": round(result.scan_time * 1000, 3),
            # Wall time of each network check; they overlap, so they do not add up to scan_ms.
            "async_check_ms": {name: round(s * 1000, 3) for name, s in sorted(result.async_timings.items())},
            "problems": list(result.problems) + list(result.message.problems),
        }
        print(json.dumps(doc, indent=2))
    elif args.process:
        sys.stdout.buffer.write(process_message(engine, result, options))
    elif args.report:
        sys.stdout.write(build_report(engine, result, options))
    else:
        verdict = "spam" if result.is_spam else "ham"
        score = format_score(result.score, result.required_score, result.is_spam)
        print(f"{verdict} {score}/{result.required_score:.1f}")
        for h in sorted(result.hits, key=lambda h: (-(h.score or 0), h.rule)):
            info = engine.info(h.rule)
            print(f"  {h.score or 0:6.2f} {h.rule:<26} {info.describe if info else ''}")
    return 0


def _message_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not f.name.startswith(".") and f.suffix not in (".yaml", ".md", ".tsv")
                )
            )
        elif p.is_file():
            files.append(p)
    return files


def _label_of(path: Path) -> str:
    for part in reversed(path.parts[:-1]):
        if part in ("ham", "spam"):
            return part
    return "?"


def _cmd_mass_check(args: argparse.Namespace) -> int:
    from filterd.engine.plugin import ScanContext

    engine = _load_engine(args)
    files = _message_files(args.paths)
    if not files:
        print("filterd: no messages found", file=sys.stderr)
        return EX_NOINPUT

    async def run() -> list[tuple[Path, str, object]]:
        rows = []
        for f in files:
            rows.append((f, _label_of(f), await engine.scan(f.read_bytes(), ScanContext(no_autolearn=True))))
        return rows

    import asyncio

    rows = asyncio.run(run())
    width = max(len(str(f)) for f in files)
    print(f"{'file':<{width}}  {'label':<5} {'score':>7}  {'verdict':<7} top rules")
    right = counted = 0
    for f, label, result in rows:
        verdict = "spam" if result.is_spam else "ham"  # type: ignore[attr-defined]
        top = sorted(result.hits, key=lambda h: -(h.score or 0))[: args.top]  # type: ignore[attr-defined]
        mark = "" if label == "?" or label == verdict else "  <- wrong"
        if label != "?":
            counted += 1
            right += label == verdict
        print(
            f"{str(f):<{width}}  {label:<5} {result.score:7.1f}  {verdict:<7} "  # type: ignore[attr-defined]
            + ", ".join(f"{h.rule}({h.score:g})" for h in top)
            + mark
        )
    if counted:
        print(f"\n{right}/{counted} classified as labelled")
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    import dataclasses

    from filterd.config import Config
    from filterd.daemon.master import Master
    from filterd.engine.engine import Engine

    def load() -> tuple[Config, Engine]:
        """Read the configuration (with the command line on top) and build the engine."""
        config = _load_config(args)
        d = config.daemon
        d = dataclasses.replace(
            d,
            listen=tuple(args.listen) or d.listen,
            workers=args.workers if args.workers is not None else d.workers,
            metrics_listen=args.metrics_listen or d.metrics_listen,
            pid_file=args.pid_file or d.pid_file,
            allow_tell=args.allow_tell or d.allow_tell,
            user_prefs_dir=args.user_prefs or d.user_prefs_dir,
        )
        m = dataclasses.replace(
            config.milter,
            listen=tuple(args.milter_listen) or config.milter.listen,
            policy_listen=tuple(args.policy_listen) or config.milter.policy_listen,
        )
        config = dataclasses.replace(config, daemon=d, milter=m)
        return config, Engine.load(config, state_dir=str(config.state_path))

    return Master(load).run()


def _cmd_config_check(args: argparse.Namespace) -> int:
    from filterd.config import describe_settings, dump_config

    if args.list:
        for key, type_, default, doc in describe_settings():
            print(f"{key}  ({type_}, default {default})\n    {doc}")
        return 0
    config = _load_config(args)
    print(f"# configuration in force ({args.config or 'embedded defaults'})")
    print(dump_config(config, diff=args.diff), end="")
    return 0


def _cmd_rules_lint(args: argparse.Namespace) -> int:
    from filterd.engine.engine import Engine

    config = _load_config(args)
    engine = Engine.load(config)  # raises RuleError listing every problem
    warnings = engine.rules.problems
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    scored = sum(1 for i in engine.rules.info.values() if not i.is_sub and i.type != "meta")
    metas = sum(1 for i in engine.rules.info.values() if i.type == "meta")
    subs = sum(1 for i in engine.rules.info.values() if i.is_sub)
    fallback = engine.rules.fallback_rules
    print(
        f"{len(engine.rules.info)} rules OK: {scored} scored, {metas} meta, {subs} sub-rules; "
        f"{len(fallback)} on the fallback regex engine{': ' + ', '.join(fallback) if fallback else ''}"
    )
    return 1 if (args.strict and warnings) else 0


def _cmd_dkim_genkey(args: argparse.Namespace) -> int:
    from filterd.dkimsign import generate_key, write_key

    try:
        key = generate_key(args.domain, args.selector, args.bits)
        path = write_key(key, Path(args.dir))
    except ValueError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return EX_USAGE
    except FileExistsError as exc:
        print(f"filterd: {exc.filename} exists; not overwriting a key", file=sys.stderr)
        return EX_CANTCREAT
    except (OSError, RuntimeError) as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    print(f"private key written to {path}; publish this record, then set", file=sys.stderr)
    print(f"auth.dkim_keys: {{{key.domain}: '{key.selector}:{path.resolve()}'}}", file=sys.stderr)
    print(key.zone_line())
    return 0
