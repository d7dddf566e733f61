"""A spamd request as SpamdService.handle takes it, for in-process tests of the service."""

from __future__ import annotations

from filterd.protocols.spamd import SpamdRequest, SpamdServerConnection


def spamd_request(method: str, message: bytes, user: str = "alice") -> SpamdRequest:
    """``METHOD SPAMC/1.5`` for ``user`` with ``message``, parsed by the server side."""
    conn = SpamdServerConnection()
    conn.receive_data(b"%s SPAMC/1.5\r\nUser: %s\r\nContent-length: %d\r\n\r\n%s" % (
        method.encode(), user.encode(), len(message), message))  # fmt: skip
    event = conn.next_event()
    assert isinstance(event, SpamdRequest), event
    return event
