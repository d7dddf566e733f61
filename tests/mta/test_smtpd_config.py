"""The SMTP server's keys in the mta section: defaults and the checks that involve several keys."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from filterd.config import default_config, load_config
from filterd.errors import ConfigError


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "filterd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_defaults_are_safe() -> None:
    mta = default_config().mta
    assert mta.mynetworks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert mta.require_tls_for_auth and not mta.auth_users_file
    assert mta.milter_default_action == "tempfail" and mta.max_hops == 50
    assert mta.max_message_size == 10 * 1024 * 1024


def test_values_load(tmp_path: Path) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text(
        "mta:\n  listen: ['127.0.0.1:2525']\n  local_domains: [example.org]\n  mynetworks: [192.0.2.0/24]\n"
        "  max_message_size: 1M\n  milter: 127.0.0.1:11332\n  milter_default_action: accept\n"
    )
    mta = load_config(path).mta
    assert mta.listen == ("127.0.0.1:2525",) and mta.local_domains == ("example.org",)
    assert mta.mynetworks == (ipaddress.ip_network("192.0.2.0/24"),) and mta.max_message_size == 1024 * 1024
    assert mta.milter == "127.0.0.1:11332" and mta.milter_default_action == "accept"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mta:\n  listen: ['2525']\n", "mta.listen: expected HOST:PORT, got '2525'"),
        ("mta:\n  tls_cert: /etc/cert.pem\n", "mta.tls_key: tls_cert and tls_key go together"),
        ("mta:\n  tls_listen: ['127.0.0.1:465']\n", "mta.tls_listen: needs tls_cert and tls_key"),
        ("mta:\n  milter: relative/sock\n", "mta.milter: expected an absolute socket path or HOST:PORT"),
        ("mta:\n  milter_default_action: discard\n", "mta.milter_default_action: expected one of"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    found = _problems(tmp_path, text)
    assert len(found) == 1 and expected in found[0], found
