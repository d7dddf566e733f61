"""One outgoing SMTP transaction to one next-hop address, with per-recipient replies.

    result = await send(hop_address, options, sender="a@x.org", recipients=["b@y.net"], data=raw,
                        size=len(raw), eight_bit=True, smtputf8=False)
    result.replies["b@y.net"]  # -> Reply(250, "2.0.0 Ok: queued as 12345")

The conversation: greeting, EHLO (HELO if EHLO is refused with 5xx), STARTTLS when offered and
``options.starttls`` (opportunistic, certificates not verified, as Postfix's ``may``; a failed
handshake is retried once in the clear by the caller), EHLO again, MAIL FROM with SIZE= and
BODY=8BITMIME / SMTPUTF8 when the server offers them, one RCPT TO per recipient, and DATA when
at least one was accepted, then QUIT. When the server offers PIPELINING (RFC 2920), MAIL FROM
and every RCPT TO go out in one write and their replies are read in order: one round trip
instead of one per command. DATA waits for those replies, so it is never sent when no recipient
was accepted. The bytes are `filterd.protocols.smtp_client`'s (sans-IO); this module owns the
socket, timeouts and TLS.

Anything failing before MAIL FROM (no connection, a greeting or EHLO that is not 2xx, a lost
connection) raises `SessionError`: the caller tries the next MX. Once MAIL FROM is sent every
recipient gets a `Reply`: the RCPT refusal, or the reply to the final dot (shared by all the
accepted ones), or a synthesised 4xx when the connection is lost or times out on the way (a
loss after the final dot was sent may mean the message was delivered: a retry then
duplicates it, which is the price of never losing one). An address that cannot be written in
a command at all (control characters, a space or angle bracket outside a quoted local part:
`unsendable`) is refused before connecting, permanently: the recipient with 5.1.3, or every
recipient with 5.1.7 when it is the sender's; the other recipients go as usual.
"""

from __future__ import annotations

__all__ = ["Reply", "SessionError", "SmtpOptions", "TlsError", "TransactionResult", "send", "unsendable"]

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from filterd.errors import ProtocolError
from filterd.protocols.smtp_client import CLOSED, NEED_DATA, ClientConnection, Reply, Response, path_problem

_READ = 65536


@dataclass(frozen=True, slots=True)
class SmtpOptions:
    """How to talk to next hops (from `filterd.config.MtaConfig`)."""

    helo_name: str
    port: int = 25
    bind_address: str = ""
    starttls: bool = True
    connect_timeout: float = 30.0
    timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass(slots=True)
class TransactionResult:
    """What one transaction did: a reply for every recipient; whether TLS was in use."""

    server: str
    replies: dict[str, Reply] = field(default_factory=dict)
    tls: bool = False


class SessionError(Exception):
    """The session failed before the transaction began: try the next MX host."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class TlsError(SessionError):
    """STARTTLS was offered but could not be set up (retry this host without it)."""


def _tls_context() -> ssl.SSLContext:
    # Opportunistic TLS protects against passive listeners only; verifying would make
    # self-signed peers undeliverable, which is worse than plain text (RFC 7435).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def unsendable(sender: str, recipients: Sequence[str]) -> dict[str, Reply]:
    """A permanent local refusal for each recipient that no server can ever be sent
    (`path_problem`): 5.1.3 for a bad recipient address, or for every recipient, 5.1.7 when
    the sender's is bad. The others may go."""
    if problem := sender and path_problem(sender):
        return dict.fromkeys(recipients, Reply(501, f"5.1.7 bad sender address syntax: {problem}", local=True))
    return {
        r: Reply(501, f"5.1.3 bad recipient address syntax: {problem}", local=True)
        for r in recipients
        if (problem := path_problem(r))
    }


class _Lost(Exception):
    """The connection failed: closed, timed out, reset, or the server broke the protocol."""


class _Session:
    """The socket side of one `ClientConnection`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.conn = ClientConnection()

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            raise _Lost(_reason(exc)) from None

    async def command(self, verb: str, *args: str, encoding: str = "ascii") -> Reply:
        await self.write(self.conn.send(verb, *args, encoding=encoding))
        return await self.reply(verb)

    async def reply(self, verb: str, wait: float | None = None) -> Reply:
        """The next reply, which must be the one to ``verb``; ``wait``: seconds, else `timeout`."""
        try:
            async with asyncio.timeout(wait or self.timeout):
                while True:
                    event = self.conn.next_event()
                    if isinstance(event, Response):
                        assert event.command == verb, (event.command, verb)
                        return event.reply
                    if event is CLOSED:
                        raise _Lost("connection closed by the server")
                    assert event is NEED_DATA
                    self.conn.receive_data(await self.reader.read(_READ))
        except TimeoutError:
            raise _Lost("timed out") from None
        except OSError as exc:
            raise _Lost(_reason(exc)) from None
        except ProtocolError as exc:
            raise _Lost(f"protocol error: {exc}") from None

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        async with asyncio.timeout(self.timeout):
            await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self, quit_timeout: float) -> None:
        """QUIT when the connection is in a state to say it, then close."""
        with contextlib.suppress(_Lost, OSError, TimeoutError, ProtocolError):
            if not self.writer.is_closing() and self.conn.awaiting == 0:
                self.timeout = quit_timeout
                await self.command("QUIT")
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(quit_timeout):
                await self.writer.wait_closed()


async def _hello(session: _Session, name: str, where: str) -> None:
    reply = await session.command("EHLO", name)
    if reply.ok:
        return
    if reply.code < 500:
        raise SessionError(f"{where} refused EHLO: {reply}", reply)
    reply = await session.command("HELO", name)
    if not reply.ok:
        raise SessionError(f"{where} refused HELO: {reply}", reply)


async def send(
    address: str,
    options: SmtpOptions,
    *,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    eight_bit: bool = False,
    smtputf8: bool = False,
    server_name: str = "",
    use_tls: bool | None = None,
) -> TransactionResult:
    """Send ``data`` (CRLF lines, not dot-stuffed) to the server at ``address``.

    ``server_name`` names the host in messages ("mx.example.org[192.0.2.7]"). ``use_tls``
    overrides ``options.starttls`` (the caller's retry without TLS). Raises `SessionError`
    before MAIL FROM; afterwards every recipient has a reply in the result."""
    where = f"{server_name}[{address}]" if server_name and server_name != address else f"[{address}]"
    starttls = options.starttls if use_tls is None else use_tls
    result = TransactionResult(where, unsendable(sender, recipients))
    recipients = [r for r in recipients if r not in result.replies]
    if not recipients:  # nothing can go: no connection
        return result
    try:
        async with asyncio.timeout(options.connect_timeout):
            reader, writer = await asyncio.open_connection(
                address, options.port, local_addr=(options.bind_address, 0) if options.bind_address else None
            )
    except (OSError, TimeoutError) as exc:
        raise SessionError(f"connect to {where}:{options.port}: {_reason(exc)}") from None
    session = _Session(reader, writer, options.timeout)
    try:
        try:
            greeting = await session.reply("greeting", options.connect_timeout)
            if greeting.code != 220:
                raise SessionError(f"{where} refused to talk to us: {greeting}", greeting)
            await _hello(session, options.helo_name, where)
            if starttls and session.conn.supports("starttls"):
                reply = await session.command("STARTTLS")
                if reply.code != 220:
                    raise TlsError(f"STARTTLS with {where}: {reply}")
                try:
                    sni = server_name if server_name and not server_name.startswith("[") else address
                    await session.starttls(_tls_context(), sni)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    raise TlsError(f"STARTTLS with {where}: {_reason(exc)}") from None
                result.tls = True
                await _hello(session, options.helo_name, where)
        except _Lost as exc:  # lost, timed out or garbled before the transaction
            raise SessionError(f"{where}: {exc} before MAIL FROM") from None
        await _transaction(session, result, options, sender, recipients, data, eight_bit, smtputf8)
    except BaseException:
        writer.close()
        raise
    await session.close(min(options.timeout, 5.0))
    return result


async def _transaction(
    session: _Session,
    result: TransactionResult,
    options: SmtpOptions,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    eight_bit: bool,
    smtputf8: bool,
) -> None:
    where = result.server
    replies = result.replies
    conn = session.conn
    pending = list(recipients)

    def settle(reply: Reply) -> None:
        for rcpt in pending:
            replies.setdefault(rcpt, reply)

    limit_text = conn.extensions.get("size", "")
    limit = int(limit_text) if limit_text.isdigit() else 0
    if limit and len(data) > limit:
        settle(Reply(552, f"5.3.4 message size {len(data)} exceeds the limit of {where} ({limit})", local=True))
        return
    utf8 = smtputf8 and conn.supports("smtputf8")
    encoding = "utf-8" if utf8 else "ascii"
    if not utf8:
        if not sender.isascii():
            settle(Reply(553, f"5.6.7 {where} does not support SMTPUTF8, needed by the sender address", local=True))
            return
        for rcpt in [r for r in pending if not r.isascii()]:
            replies[rcpt] = Reply(553, f"5.6.7 {where} does not support SMTPUTF8, needed by this address", local=True)
        pending = [r for r in pending if r not in replies]
        if not pending:
            return
    params = []
    if conn.supports("size"):
        params.append(f"SIZE={len(data)}")
    # An 8-bit body goes out as is even to a server without 8BITMIME, as Sendmail's pass8 does.
    if eight_bit and conn.supports("8bitmime"):
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    stage = "MAIL FROM"
    try:
        mail = conn.send("MAIL", f"FROM:<{sender}>", *params, encoding=encoding)
        if conn.supports("pipelining"):  # RFC 2920: MAIL and every RCPT in one write
            await session.write(mail + b"".join(conn.send("RCPT", f"TO:<{r}>", encoding=encoding) for r in pending))
            sent = len(pending)
        else:
            await session.write(mail)
            sent = 0
        reply = await session.reply("MAIL")
        if reply.code != 250:
            # Settled first: a server that closes after refusing the sender must not turn its
            # refusal into our 451 for a lost connection.
            settle(Reply(reply.code, f"{reply.text} (in reply to MAIL FROM)"))
            if reply.code != 421:  # else the server is closing: no more replies will come
                with contextlib.suppress(_Lost):
                    for _ in range(sent):  # their replies (503, most likely) say nothing more
                        await session.reply("RCPT")
            return
        accepted = []
        stage = "RCPT TO"
        for i, rcpt in enumerate(pending):
            if i >= sent:
                await session.write(conn.send("RCPT", f"TO:<{rcpt}>", encoding=encoding))
            reply = await session.reply("RCPT")
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                replies[rcpt] = Reply(reply.code, f"{reply.text} (in reply to RCPT TO)")
                if reply.code == 421:  # the server is closing: the rest cannot go either
                    settle(replies[rcpt])
                    return
        pending = [r for r in pending if r not in replies]
        if not accepted:
            return
        stage = "DATA"
        reply = await session.command("DATA")
        if reply.code != 354:
            settle(Reply(reply.code, f"{reply.text} (in reply to DATA)"))
            return
        stage = "end of DATA"
        await session.write(conn.send_message(data))
        reply = await session.reply(".", options.data_timeout)
        settle(reply if reply.ok else Reply(reply.code, f"{reply.text} (in reply to end of DATA)"))
    except _Lost as exc:
        settle(Reply(451, f"4.4.2 {where}: {exc} during {stage}", local=True))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
