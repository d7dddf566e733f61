"""`filterd reputation show|remove ADDRESS` and `filterd greylist list|remove CLIENT`: look at
and correct the learnt state (`filterd.state`) in the store the configuration names.

Exit status: 0 done, 1 nothing found, 69 (EX_UNAVAILABLE) the store failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable

from filterd.config import Config
from filterd.errors import StateError
from filterd.greylist import Greylist
from filterd.state import StateStore, open_state_store

__all__ = ["add_state_commands", "run_state_command"]

EX_UNAVAILABLE = 69


def add_state_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the two subcommands to the `filterd` parser (``common`` adds --config, --state-dir, ...)."""
    p = sub.add_parser("reputation", help="show or forget a sender's history (rule REPUTATION)")
    actions = p.add_subparsers(dest="state_action", metavar="ACTION", required=True)
    for action, text in (("show", "every network's message count and mean score"), ("remove", "forget it all")):
        a = actions.add_parser(action, help=f"{text} for ADDRESS")
        common(a)
        a.add_argument("address", help="sender address, e.g. user@example.com")
    p = sub.add_parser("greylist", help="list or forget greylisted triplets")
    actions = p.add_subparsers(dest="state_action", metavar="ACTION", required=True)
    common(actions.add_parser("list", help="every remembered (client network, sender, recipient)"))
    a = actions.add_parser("remove", help="forget a client network's triplets and auto-whitelisting")
    common(a)
    a.add_argument("client", help="client IP address (masked like greylisting does) or network")


def run_state_command(args: argparse.Namespace, config: Config) -> int:
    store = open_state_store(config, args.state_dir or "")

    async def run() -> int:
        try:
            if args.command == "reputation":
                return await (_show if args.state_action == "show" else _remove)(store, args.address)
            greylist = Greylist.from_config(config, store)
            if args.state_action == "list":
                return await _list(greylist)
            removed = await greylist.remove(args.client)
            print(f"removed {removed} greylist records of {args.client}")
            return 0 if removed else 1
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StateError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except ValueError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return 64


# The reputation check is imported where it is used: importing it loads every check plugin
# (DKIM, DNS, Bayes, ...), and this module is imported whenever the `filterd` parser is built,
# whatever the command (0.2-0.3 s of `filterd learn`'s start-up).


async def _show(store: StateStore, address: str) -> int:
    from filterd.engine.checks.reputation import reputation_of

    entries = await reputation_of(store, address)
    if not entries:
        print(f"no history for {address.lower()}")
        return 1
    print(f"{'address':<32} {'network':<24} {'messages':>8} {'mean':>7}")
    for e in entries:
        print(f"{e.address:<32} {e.block:<24} {e.count:>8} {e.mean:>7.2f}")
    return 0


async def _remove(store: StateStore, address: str) -> int:
    from filterd.engine.checks.reputation import forget_reputation

    removed = await forget_reputation(store, address)
    print(f"removed {removed} histories of {address.lower()}")
    return 0 if removed else 1


async def _list(greylist: Greylist) -> int:
    entries = sorted([e async for e in greylist.entries()], key=lambda e: (e.client, e.sender, e.recipient))
    if not entries:
        print("no greylist records")
        return 1
    print(f"{'client':<20} {'sender':<32} {'recipient':<32} {'first seen':<20} state")
    for e in entries:
        first = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.first))
        state = "passed" if e.passed else "waiting"
        print(f"{e.client:<20} {e.sender or '<>':<32} {e.recipient:<32} {first:<20} {state}")
    return 0
