"""One outgoing SMTP transaction to one next-hop address, with per-recipient replies.

    result = await send(hop_address, options, sender="a@x.org", recipients=["b@y.net"], data=raw,
                        size=len(raw), eight_bit=True, smtputf8=False)
    result.replies["b@y.net"]  # -> Reply(250, "2.0.0 Ok: queued as 12345")

The conversation: greeting, EHLO (HELO if EHLO is refused with 5xx), STARTTLS when offered and
``options.starttls`` (opportunistic, certificates not verified, as Postfix's ``may``; a failed
handshake is retried once in the clear by the caller), EHLO again, MAIL FROM with SIZE= and
BODY=8BITMIME / SMTPUTF8 when the server offers them, one RCPT TO per recipient, and DATA when
at least one was accepted. The connection and its I/O are aiosmtplib's; MAIL and RCPT are
written here so that addresses go out exactly as they are in the envelope.

Anything failing before MAIL FROM (no connection, a greeting or EHLO that is not 2xx, a lost
connection) raises `SessionError`: the caller tries the next MX. Once MAIL FROM is sent every
recipient gets a `Reply`: the RCPT refusal, or the reply to the final dot (shared by all the
accepted ones), or a synthesised 4xx when the connection is lost or times out on the way (a
loss after the final dot was sent may mean the message was delivered: a retry then
duplicates it, which is the price of never losing one).
"""

from __future__ import annotations

__all__ = ["Reply", "SessionError", "SmtpOptions", "TlsError", "TransactionResult", "send"]

import asyncio
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply (or one we made up for a failure, marked ``local``)."""

    code: int
    text: str
    local: bool = False

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status the text starts with ("" if none, or of another class)."""
        m = _STATUS.match(self.text)
        if m and m[1] == str(self.code)[0]:
            return f"{m[1]}.{m[2]}.{m[3]}"
        return ""

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status in the text, or one derived from the reply code."""
        return self.enhanced or f"{str(self.code)[0]}.0.0"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}"


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


def _safe(address: str) -> bool:
    """Nothing that could end or extend the command line it goes on."""
    return not any(c in address for c in "<>\r\n\0") and " " not in address.strip('"')


def _size_limit(client: aiosmtplib.SMTP) -> int:
    value = client.esmtp_extensions.get("size", "").strip()
    return int(value) if value.isdigit() else 0


async def _hello(client: aiosmtplib.SMTP, name: str, where: str) -> None:
    try:
        await client.ehlo(hostname=name)
        return
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code < 500 or not client.is_connected:
            reply = Reply(exc.code, exc.message)
            raise SessionError(f"{where} refused EHLO: {reply}", reply) from None
    try:
        await client.helo(hostname=name)
    except aiosmtplib.SMTPHeloError as exc:
        reply = Reply(exc.code, exc.message)
        raise SessionError(f"{where} refused HELO: {reply}", reply) from None


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
    client = aiosmtplib.SMTP(
        hostname=address,
        port=options.port,
        local_hostname=options.helo_name,
        source_address=(options.bind_address, 0) if options.bind_address else None,
        timeout=options.timeout,
        start_tls=False,
        validate_certs=False,
    )
    result = TransactionResult(where)
    try:
        try:
            await client.connect(timeout=options.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            reply = Reply(exc.code, exc.message)
            raise SessionError(f"{where} refused to talk to us: {reply}", reply) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionError(f"connect to {where}:{options.port}: {_reason(exc)}") from None
        await _hello(client, options.helo_name, where)
        if starttls and client.supports_extension("starttls"):
            try:
                sni = server_name if server_name and not server_name.startswith("[") else address
                await client.starttls(tls_context=_tls_context(), server_hostname=sni)
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                raise TlsError(f"STARTTLS with {where}: {_reason(exc)}") from None
            result.tls = True
            await _hello(client, options.helo_name, where)
    except SessionError:
        client.close()
        raise
    except (aiosmtplib.SMTPException, OSError) as exc:  # lost or timed out before the transaction
        client.close()
        raise SessionError(f"{where}: {_reason(exc)} before MAIL FROM") from None
    try:
        await _transaction(client, result, options, sender, recipients, data, eight_bit, smtputf8)
    finally:
        if client.is_connected:
            try:
                await asyncio.wait_for(client.quit(), timeout=min(options.timeout, 5.0))
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
    return result


async def _transaction(
    client: aiosmtplib.SMTP,
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
    pending = list(recipients)

    def settle(reply: Reply) -> None:
        for rcpt in pending:
            replies.setdefault(rcpt, reply)

    for rcpt in [r for r in pending if not _safe(r)]:
        replies[rcpt] = Reply(501, "5.1.3 bad recipient address syntax", local=True)
    pending = [r for r in pending if r not in replies]
    if not _safe(sender) or not pending:
        settle(Reply(501, "5.1.7 bad sender address syntax", local=True))
        return
    limit = _size_limit(client)
    if limit and len(data) > limit:
        settle(Reply(552, f"5.3.4 message size {len(data)} exceeds the limit of {where} ({limit})", local=True))
        return
    utf8 = smtputf8 and client.supports_extension("smtputf8")
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
    if client.supports_extension("size"):
        params.append(f"SIZE={len(data)}")
    # An 8-bit body goes out as is even to a server without 8BITMIME, as Sendmail's pass8 does.
    if eight_bit and client.supports_extension("8bitmime"):
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    stage = "MAIL FROM"
    try:
        response = await client.execute_command(
            b"MAIL", f"FROM:<{sender}>".encode(encoding), *(p.encode() for p in params)
        )
        if response.code != 250:
            settle(Reply(response.code, f"{response.message} (in reply to MAIL FROM)"))
            return
        accepted = []
        stage = "RCPT TO"
        for rcpt in pending:
            response = await client.execute_command(b"RCPT", f"TO:<{rcpt}>".encode(encoding))
            if response.code in (250, 251):
                accepted.append(rcpt)
            else:
                replies[rcpt] = Reply(response.code, f"{response.message} (in reply to RCPT TO)")
                if response.code == 421:  # the server is closing: the rest cannot go either
                    break
        pending = [r for r in pending if r not in replies]
        if not accepted:
            settle(Reply(421, "4.4.2 connection closed during RCPT TO", local=True))
            return
        stage = "DATA"
        try:
            response = await client.data(data, timeout=options.data_timeout)
        except aiosmtplib.SMTPDataError as exc:
            settle(Reply(exc.code, f"{exc.message} (in reply to DATA)"))
            return
        settle(Reply(response.code, response.message))
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        settle(Reply(451, f"4.4.2 {where}: {_reason(exc)} during {stage}", local=True))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
