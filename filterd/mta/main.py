"""`filterd mta`: the relay MTA in the foreground, and its helper actions.

    filterd mta [--config FILE] [--state-dir DIR] --listen HOST:PORT [--filter ADDR]
    filterd mta passwd NAME            # a users-file line for a password read from stdin
    filterd mta queue ...              # the queue tools (filterd.mta.qmgr's side)

The server process holds the queue's lock, runs `Queue.recover`, then serves SMTP
(`filterd.mta.smtpd`) and runs the queue manager (`filterd.mta.qmgr`) on one event loop;
``--no-deliver`` leaves the manager out (mail stays queued: tests, benchmarks). SIGTERM or
SIGINT: stop accepting, let sessions and attempts in progress end (a few seconds), exit 0.
Exit codes: 0, 64 usage, 75 queue in use by another process, 78 configuration error.
"""

from __future__ import annotations

__all__ = ["add_mta_command", "run_mta_command"]

import argparse
import asyncio
import dataclasses
import getpass
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from filterd.config import Config, load_config
from filterd.errors import ConfigError, QueueError

log = logging.getLogger(__name__)

EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 64, 75, 78


def add_mta_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add `filterd mta`; returns its action subparsers. Other actions (``queue``) are added
    there with ``set_defaults(mta_handler=function)``: `run_mta_command` calls
    ``function(args)`` for them and returns its exit code."""
    p = sub.add_parser("mta", help="run the relay MTA (SMTP in, milter, queue, delivery) in the foreground")
    common(p)
    p.add_argument(
        "--listen", action="append", default=[], metavar="HOST:PORT", help="serve SMTP here; repeatable (mta.listen)"
    )
    p.add_argument(
        "--tls-listen", action="append", default=[], metavar="HOST:PORT", help="serve SMTP over implicit TLS here"
    )
    p.add_argument("--filter", metavar="ADDR", help="the filter's milter address, HOST:PORT or socket (mta.milter)")
    p.add_argument("--hostname", help="our name in the greeting and Received headers (mta.hostname)")
    p.add_argument("--no-deliver", action="store_true", help="only accept mail into the queue; no queue manager")
    actions = p.add_subparsers(dest="mta_command", metavar="ACTION")
    pw = actions.add_parser("passwd", help="print a users-file line (mta.auth_users_file) for a password on stdin")
    pw.add_argument("name", help="the user name to AUTH as")
    return actions


def _tls_context(config: Config) -> ssl.SSLContext | None:
    mta = config.mta
    if not mta.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(mta.tls_cert, mta.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mta.tls_cert/tls_key: cannot load {mta.tls_cert}: {exc}") from None
    return context


def _passwd(args: argparse.Namespace) -> int:
    from filterd.mta.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("filterd mta passwd: empty password", file=sys.stderr)
        return EX_USAGE
    print(f"{args.name}:{hash_password(password)}")
    return 0


def run_mta_command(args: argparse.Namespace) -> int:
    action = getattr(args, "mta_command", None)
    if action == "passwd":
        return _passwd(args)
    if action is not None:
        handler: Callable[[argparse.Namespace], int] = args.mta_handler
        return handler(args)
    try:
        config = load_config(args.config, state_dir=args.state_dir)
        mta = dataclasses.replace(
            config.mta,
            listen=tuple(args.listen) or config.mta.listen,
            tls_listen=tuple(args.tls_listen) or config.mta.tls_listen,
            milter=args.filter or config.mta.milter,
            hostname=args.hostname or config.mta.hostname,
        )
        config = dataclasses.replace(config, mta=mta)
        problems = mta.check()
        if problems:
            raise ConfigError("\n".join(f"mta.{key}: {message}" for key, message in problems))
        if not mta.listen and not mta.tls_listen:
            raise ConfigError("filterd mta needs --listen HOST:PORT (or mta.listen)")
        users: dict[str, str] = {}
        if mta.auth_users_file:
            from filterd.mta.auth import load_users

            users = load_users(Path(mta.auth_users_file))
        tls = _tls_context(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    try:
        return asyncio.run(_serve(config, users, tls, deliver=not args.no_deliver))
    except QueueError as exc:
        print(f"filterd mta: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:  # cannot bind
        print(f"filterd mta: {exc}", file=sys.stderr)
        return EX_CONFIG


async def _serve(config: Config, users: dict[str, str], tls: ssl.SSLContext | None, *, deliver: bool) -> int:
    from filterd.mta.queue import Queue
    from filterd.mta.smtpd import SmtpServer

    queue = Queue(config.state_path / "queue")
    with queue.lock():
        recovery = await asyncio.to_thread(queue.recover)
        resolver = None
        if deliver or config.mta.peername_lookup:
            from filterd.net.dns import Resolver

            # One cache for MX and client name lookups, and one judgement of whether the resolver
            # is alive (the server and the queue manager guard it: `Resolver.guard_resolver`).
            resolver = Resolver(config.dns)
        qmgr = None
        if deliver:
            from filterd.mta.qmgr import QueueManager

            assert resolver is not None
            qmgr = QueueManager(config, queue, resolver)
        server = SmtpServer(
            config.mta,
            queue,
            users=users,
            tls_context=tls,
            on_queued=qmgr.wake if qmgr is not None else None,
            resolver=resolver,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start(config.mta.listen, config.mta.tls_listen)
        manager = asyncio.create_task(qmgr.run(recovery)) if qmgr is not None else None
        log.info(
            "filterd mta: ready as %s; milter %s; delivery %s",
            server.hostname,
            config.mta.milter or "none",
            f"on (local: {qmgr.local.mode})" if qmgr else "off",
        )
        await stop.wait()
        log.info("filterd mta: stopping")
        await server.close()
        if qmgr is not None and manager is not None:
            qmgr.stop()
            await manager
    return 0
