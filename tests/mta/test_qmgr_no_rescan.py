"""Mail the MTA's milter scored before accepting it is not sent to the daemon again at delivery."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from filterd.config import default_config
from filterd.mta.qmgr import QueueManager
from filterd.mta.queue import Queue
from filterd.net.dns import Resolver


def _manager(tmp_path: Path, milter: str) -> QueueManager:
    config = default_config()
    config = dataclasses.replace(config, mta=dataclasses.replace(config.mta, milter=milter))
    resolver = Resolver(dataclasses.replace(config.dns, nameservers=("127.0.0.1:9",)))  # never asked here
    return QueueManager(config, Queue(tmp_path / "queue"), resolver)


def test_delivery_filters_only_without_a_milter(tmp_path: Path) -> None:
    assert _manager(tmp_path / "a", "").local.deliver_config.filter is True
    assert _manager(tmp_path / "b", "/run/filterd/milter.sock").local.deliver_config.filter is False
