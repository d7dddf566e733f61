"""Listening addresses: `HOST:PORT` or a Unix socket path, opened once by the master.

Workers inherit the open sockets across fork and all accept on them, so a reload or a worker
restart never closes a listening socket: clients queue in the backlog meanwhile.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
import socket
import stat
from dataclasses import dataclass

from filterd.errors import ConfigError

__all__ = ["ListenAddress", "Listener", "open_listener", "parse_address"]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> ListenAddress:
    """`127.0.0.1:783`, `[::1]:783`, `:783` (loopback), `783`, or a path (contains a slash)."""
    text = text.strip()
    if "/" in text:
        return ListenAddress(path=text)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    host = host.strip("[]") or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT or a socket path")
    return ListenAddress(host=host, port=int(port_text))


@dataclass(slots=True)
class Listener:
    address: ListenAddress
    sock: socket.socket
    protocol: str = "spamd"  # what is served on it: spamd, milter or policy

    @property
    def bound(self) -> str:
        """The address actually bound (port 0 resolves to a real port)."""
        if self.address.is_unix:
            return self.address.path
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self.sock.close()
        if self.address.is_unix:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.address.path).st_mode):
                    os.unlink(self.address.path)


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a leftover from a daemon that died
        return
    finally:
        probe.close()
    raise ConfigError(f"{path}: another daemon is already listening there")


def open_listener(
    address: ListenAddress,
    *,
    backlog: int = 1024,
    mode: str = "0660",
    owner: str = "",
    group: str = "",
    protocol: str = "spamd",
) -> Listener:
    """Bind and listen; raises ConfigError with a clear reason when that is impossible."""
    try:
        if address.is_unix:
            _remove_stale_socket(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address.path)
            os.chmod(address.path, int(mode, 8))
            if owner or group:
                uid = pwd.getpwnam(owner).pw_uid if owner else -1
                gid = grp.getgrnam(group).gr_gid if group else -1
                os.chown(address.path, uid, gid)
        else:
            try:
                family = (
                    socket.AF_INET6
                    if isinstance(ipaddress.ip_address(address.host), ipaddress.IPv6Address)
                    else socket.AF_INET
                )
            except ValueError:
                family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    return Listener(address, sock, protocol)
