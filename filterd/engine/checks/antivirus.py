"""Virus scanning with clamd: AV_VIRUS when clamd finds something, AV_ERROR when it cannot say.

The raw message goes to clamd by INSTREAM (clamd decodes MIME and unpacks archives itself).
With ``scan_attachments`` each decoded attachment goes too (every non-text part and every part
with a file name, each distinct payload once), so a part that our parser forgave but clamd's
mail parser would not still gets looked at. Streams run concurrently, a few at a time, all
within ``antivirus.timeout`` and always inside the scan deadline: the outcome is AV_ERROR,
never a silent pass and never the engine's anonymous CHECK_ERROR.

What the caller acts on is left in `Scan.facts`:

    av, av_action          signature names found ("A, B"); antivirus.action (reject|quarantine|tag)
    av_error, av_on_error  why there is no answer; antivirus.on_error (tempfail|continue)

A message larger than ``max_size`` is not sent and is an AV_ERROR ("too big to scan"), handled
like any failure by ``on_error``. clamd does the same with INSTREAM: past StreamMaxLength it
answers ``size limit exceeded`` rather than scan a prefix, which would miss whatever comes
last (a zip's central directory, the last attachment). Keep ``max_size`` at least the MTA's own
message size limit, or an over-limit message would be deferred (tempfail) until the sender gives
up.

Why a small asyncio client instead of pyclamd (pinned in pyproject): pyclamd blocks, so each
scan would hold an executor thread, and it mishandles exactly the cases this check must report:
it retries a timed-out receive five times (a stalled clamd holds it for 5 x timeout), ignores
short writes from ``socket.send`` on a socket with a timeout (a corrupt stream), and when clamd
closes early (size limit) it raises the broken pipe and loses clamd's reason. The framing lives
in `filterd.protocols.clamd`; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from filterd.config.schema import clamd_address
from filterd.engine.message import ParsedMessage
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage
from filterd.errors import RemoteProtocolError
from filterd.protocols.clamd import INSTREAM_COMMAND, MAX_REPLY, ScanReply, instream_frames, parse_reply

__all__ = ["AntivirusCheck", "scan_stream"]

log = logging.getLogger(__name__)

_PARALLEL = 4  # streams in flight per message; clamd's own MaxThreads (10) serves every worker
_DEADLINE_MARGIN = 0.1  # s: answer before the engine cancels the check at the scan deadline


@dataclass(frozen=True, slots=True)
class _Target:
    label: str  # where it came from, for the report: "message", "part 2 (invoice.zip)"
    data: bytes


async def _connect(address: str | tuple[str, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address
    else:
        host, port = address
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, target = infos[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, target)  # type: ignore[arg-type]
    except BaseException:
        sock.close()
        raise
    return sock


async def scan_stream(address: str | tuple[str, int], data: bytes) -> ScanReply:
    """Send ``data`` to clamd at ``address`` (Unix socket path or (host, port)) with INSTREAM.

    Raises OSError when clamd cannot be reached or drops the connection, RemoteProtocolError
    when its answer makes no sense; no time limit of its own (the caller sets one)."""
    loop = asyncio.get_running_loop()
    with await _connect(address) as sock:
        try:
            await loop.sock_sendall(sock, INSTREAM_COMMAND)
            for frame in instream_frames(data):
                await loop.sock_sendall(sock, frame)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # clamd may have stopped reading to say why (size limit): its reply is still queued.
            sent_error: OSError | None = exc
        else:
            sent_error = None
        reply = bytearray()
        try:
            while chunk := await loop.sock_recv(sock, 4096):
                reply += chunk
                if len(reply) > MAX_REPLY:
                    break
        except ConnectionResetError:
            if not reply:
                raise
        if not reply and sent_error is not None:
            raise sent_error
        return parse_reply(bytes(reply))


def _part_label(path: str, filename: str) -> str:
    return f"part {path} ({filename})" if filename else f"part {path}"


def _targets(msg: ParsedMessage, with_attachments: bool, max_size: int) -> list[_Target]:
    targets = [_Target("message", msg.raw)]
    if not with_attachments:
        return targets
    seen: set[bytes] = set()
    for part in msg.parts:
        if not part.payload or (part.text is not None and not part.filename):
            continue
        # Decoded parts are never larger than the message, so this only guards odd encodings.
        if len(part.payload) > max_size:
            continue
        digest = hashlib.sha256(part.payload).digest()
        if digest not in seen:
            seen.add(digest)
            targets.append(_Target(_part_label(part.path, part.filename), part.payload))
    return targets


def _describe(exc: BaseException, where: str) -> str:
    if isinstance(exc, RemoteProtocolError):
        return f"clamd at {where}: {exc}"
    if isinstance(exc, OSError):
        # asyncio's connect errors read "Connect call failed (addr)"; the errno says why.
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        return f"clamd at {where} unreachable: {reason}"
    return f"clamd at {where}: {type(exc).__name__}: {exc}"


class AntivirusCheck:
    """Send the message and its attachments to clamd; AV_VIRUS with the names, or AV_ERROR."""

    name: ClassVar[str] = "antivirus"
    stage: ClassVar[Stage] = Stage.BODY
    autolearn_side: ClassVar[AutolearnSide] = "body"
    emits: ClassVar[frozenset[str]] = frozenset({"AV_VIRUS", "AV_ERROR"})

    def __init__(self, setup: CheckSetup) -> None:
        cfg = setup.config.antivirus
        self._cfg = cfg
        # The config loader has validated the address; a bad one reaches here only through
        # dataclasses.replace, and then every scan reports it.
        try:
            self._address: str | tuple[str, int] | None = clamd_address(cfg.clamd)
        except ValueError:
            self._address = None

    async def run(self, scan: Scan) -> Sequence[Hit]:
        cfg = self._cfg
        if not cfg.enabled:
            return ()
        msg = scan.message
        if self._address is None:
            return [self._error(scan, f"antivirus.clamd {cfg.clamd!r} is not a socket path or HOST:PORT")]
        if len(msg.raw) > cfg.max_size:
            return [self._error(scan, f"message too big to scan ({len(msg.raw)} bytes > max_size {cfg.max_size})")]
        limit: float = cfg.timeout
        if scan.deadline > 0:
            limit = min(limit, scan.deadline - time.monotonic() - _DEADLINE_MARGIN)
        if limit <= 0:
            return [self._error(scan, "no time left before the scan deadline")]
        targets = _targets(msg, cfg.scan_attachments, int(cfg.max_size))
        replies = await self._scan_all(targets, limit)
        found: dict[str, list[str]] = {}  # signature -> where
        errors: list[str] = []
        for target in targets:
            reply = replies.get(target.label)
            if reply is None:
                errors.append(f"{target.label}: clamd at {cfg.clamd} did not answer within {limit:.2g}s")
            elif isinstance(reply, str):
                errors.append(f"{target.label}: {reply}")
            else:
                for name in reply.found:
                    found.setdefault(name, []).append(target.label)
                if reply.error:
                    errors.append(f"{target.label}: clamd: {reply.error}")
        if found:
            # A virus is an answer even if another part could not be scanned.
            for error in errors:
                scan.problems.append(f"antivirus: {error}")
            scan.facts["av"] = ", ".join(found)
            scan.facts["av_action"] = cfg.action
            log.info("virus found (qid=%s): %s", scan.ctx.queue_id or "-", scan.facts["av"])
            detail = "; ".join(f"{name} in {', '.join(where)}" for name, where in found.items())
            return [Hit("AV_VIRUS", detail)]
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            return [self._error(scan, errors[0] + more)]
        return ()

    async def _scan_all(self, targets: list[_Target], limit: float) -> dict[str, ScanReply | str]:
        """Label -> clamd's reply, or the reason there is none; labels missing ran out of time."""
        assert self._address is not None
        address = self._address
        results: dict[str, ScanReply | str] = {}
        gate = asyncio.Semaphore(_PARALLEL)

        async def one(target: _Target) -> None:
            async with gate:
                try:
                    results[target.label] = await scan_stream(address, target.data)
                except (OSError, RemoteProtocolError) as exc:
                    results[target.label] = _describe(exc, self._cfg.clamd)
                except Exception as exc:  # a bug here must still leave av_error for the caller
                    log.exception("clamd client failed")
                    results[target.label] = _describe(exc, self._cfg.clamd)

        try:
            async with asyncio.timeout(limit), asyncio.TaskGroup() as group:
                for target in targets:
                    group.create_task(one(target))
        except TimeoutError:
            pass  # what finished is in results; the rest timed out
        return results

    def _error(self, scan: Scan, reason: str) -> Hit:
        cfg = self._cfg
        scan.facts["av_error"] = reason
        scan.facts["av_on_error"] = cfg.on_error
        log.warning("antivirus failed (qid=%s), on_error=%s: %s", scan.ctx.queue_id or "-", cfg.on_error, reason)
        return Hit("AV_ERROR", reason)
