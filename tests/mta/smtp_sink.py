"""Next hops for the delivery tests: small aiosmtpd servers in the test's own event loop.

The recipient's local part says how the sink answers RCPT TO: ``temp*`` 450 4.2.1, ``no*``
550 5.1.1, anything else 250. Messages accepted are kept in ``sink.messages``. A `Refuser`
answers every connection with a fixed greeting (421, 554) and hangs up."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool
    helo: str


@dataclass
class _Handler:
    messages: list[Received] = field(default_factory=list)
    data_reply: str = "250 2.0.0 Ok: queued"

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook names)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        local = address.partition("@")[0]
        if local.startswith("temp"):
            return "450 4.2.1 mailbox busy, try later"
        if local.startswith("no"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        content = envelope.original_content or b""
        self.messages.append(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                content,
                list(envelope.mail_options),
                session.ssl is not None,
                session.host_name or "",
            )
        )
        return self.data_reply


@dataclass
class _PipeliningHandler(_Handler):
    """Also says PIPELINING in its EHLO reply (aiosmtpd reads pipelined commands in order but
    does not advertise it), and refuses senders whose local part starts with ``refuse``."""

    async def handle_EHLO(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if address.startswith("refuse"):
            return "550 5.7.1 sender refused"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


class Sink:
    """An SMTP server on ``address``:``port`` in the running loop (``pipelining``: advertised)."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        pipelining: bool = False,
        **smtp_options: Any,
    ) -> None:
        self.address, self.port = address, port
        self.handler = _PipeliningHandler() if pipelining else _Handler()
        self._tls = tls
        self._options = smtp_options
        self._server: asyncio.Server | None = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        options = {"decode_data": False, "ident": "sink", "hostname": f"sink-{self.address}", **self._options}

        def factory() -> SMTP:
            return SMTP(self.handler, tls_context=self._tls, require_starttls=False, **options)

        self._server = await loop.create_server(factory, self.address, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class Refuser:
    """Greets every client with ``greeting`` and closes the connection."""

    def __init__(self, address: str, port: int, greeting: bytes = b"421 4.3.2 too busy, go away\r\n") -> None:
        self.address, self.port, self.greeting = address, port, greeting
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Refuser:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.write(self.greeting)
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(serve, self.address, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def free_port(*addresses: str) -> int:
    """A TCP port free on every one of ``addresses`` (the MX hosts share mta.smtp_port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port: int = s.getsockname()[1]
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def self_signed_context(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a throw-away self-signed certificate made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=sink.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
