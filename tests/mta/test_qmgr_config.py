"""The queue manager's and delivery's mta.* settings: defaults, and problems named at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterd.config import Duration, load_config
from filterd.errors import ConfigError


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "filterd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_defaults_follow_postfix() -> None:
    mta = load_config(None).mta
    assert (mta.min_backoff, mta.max_backoff, mta.max_lifetime) == (Duration(300), Duration(4000), Duration(5 * 86400))
    assert mta.per_destination_concurrency == 20 and mta.smtp_port == 25 and mta.smtp_starttls
    assert mta.local_delivery_command[:2] == ("filterd", "deliver") and mta.delay_warning == Duration(0)


def test_settings_load_with_units(tmp_path: Path) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text(
        "mta:\n  min_backoff: 1s\n  max_backoff: 2m\n  smtp_port: 2525\n  smtp_bind_address: 127.0.0.2\n"
        "  mailboxes: {bob: /srv/mail/bob}\n  local_delivery_command: [/usr/bin/procmail, -d, '{user}']\n"
    )
    mta = load_config(path).mta
    assert (mta.min_backoff, mta.max_backoff, mta.smtp_port) == (Duration(1), Duration(120), 2525)
    assert dict(mta.mailboxes) == {"bob": "/srv/mail/bob"}


def test_max_backoff_below_min_is_refused(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path, "mta:\n  min_backoff: 10m\n  max_backoff: 5m\n")
    assert "mta.max_backoff" in problem and "min_backoff" in problem


def test_unknown_placeholders_are_refused(tmp_path: Path) -> None:
    found = _problems(tmp_path, "mta:\n  local_delivery_command: [deliver, '{usr}']\n  mailbox: '{home}/{mailbox}'\n")
    assert any("local_delivery_command" in p and "{usr}" in p for p in found)
    assert any("mta.mailbox" in p and "{mailbox}" in p for p in found)  # a mailbox cannot name itself


def test_empty_command_and_bad_bind_address_are_refused(tmp_path: Path) -> None:
    found = _problems(tmp_path, "mta:\n  local_delivery_command: []\n  smtp_bind_address: mx.example.org\n")
    assert any("local_delivery_command" in p for p in found)
    assert any("smtp_bind_address" in p and "IP address" in p for p in found)
