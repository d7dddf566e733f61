"""Client network lists and DNSBL at connect (milter.reject_at_connect), welcomelist_auth, and
the per-user network lists — through the engine's staged API and through a real milter client
(Debian's miltertest) talking to a real daemon, with DNS from the local knotd fixture."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import subprocess
from pathlib import Path

from filterd.config import load_config
from filterd.engine.engine import Engine
from filterd.engine.plugin import ScanContext, Stage
from filterd.engine.prefs import UserPrefs
from tests.conftest import offline_config
from tests.daemon_fixture import need_binary, start_daemon
from tests.dns_fixture import MakeDelayingProxy, MakeDnsServer

pytest_plugins = ["tests.dns_fixture"]

LISTED = "11.22.33.44"  # a routable address (documentation ranges are never looked up)
MESSAGE = (
    f"Received: from mail.sender.test (mail.sender.test [{LISTED}])\n"
    "\tby mx.local.test (Postfix) with ESMTP id 4F00D; Thu, 26 Nov 2026 10:00:00 +0000\n"
    "From: Alice <alice@sender.test>\nTo: bob@local.test\nSubject: lunch\n"
    "Message-ID: <1@sender.test>\nDate: Thu, 26 Nov 2026 10:00:00 +0000\n\nLunch at noon?\n"
).encode()


def _engine(tmp_path: Path, text: str) -> Engine:
    path = tmp_path / "filterd.yaml"
    path.write_text(text)
    return Engine.load(load_config(path))


def _offline(tmp_path: Path, text: str) -> Engine:
    path = tmp_path / "filterd.yaml"
    path.write_text(text)
    return Engine.load(offline_config(load_config(path)))


async def _staged(engine: Engine, ctx: ScanContext) -> tuple[list[str], list[str]]:
    scan = engine.new_scan(ctx)
    at_connect = [h.rule for h in await engine.run_stage(scan, Stage.CONNECT)]
    result = await engine.finish(scan, MESSAGE)
    return at_connect, result.rule_names


def test_blocklist_ip_from_the_received_chain(tmp_path: Path) -> None:
    engine = _offline(tmp_path, "lists: {blocklist_ip: [11.22.33.0/24]}\n")
    result = engine.scan_sync(MESSAGE, ScanContext(no_autolearn=True))
    assert "CLIENT_IN_BLOCKLIST" in result.rule_names and result.is_spam
    assert "11.22.33.44" in next(h.detail for h in result.hits if h.rule == "CLIENT_IN_BLOCKLIST")


def test_welcomelist_ip_and_per_user_lists(tmp_path: Path) -> None:
    engine = _offline(tmp_path, "lists: {welcomelist_ip: ['11.22.0.0/16']}\n")
    assert "CLIENT_IN_WELCOMELIST" in engine.scan_sync(MESSAGE, ScanContext(no_autolearn=True)).rule_names
    plain = _offline(tmp_path, "{}\n")
    assert "CLIENT_IN_BLOCKLIST" not in plain.scan_sync(MESSAGE, ScanContext(no_autolearn=True)).rule_names
    prefs = UserPrefs(blocklist_ip=(ipaddress.ip_network("11.22.33.44/32"),))
    ctx = ScanContext(user="bob", prefs=prefs, no_autolearn=True)
    assert "CLIENT_IN_BLOCKLIST" in plain.scan_sync(MESSAGE, ctx).rule_names


def test_network_lists_apply_at_connect_once(tmp_path: Path) -> None:
    engine = _offline(tmp_path, "lists: {blocklist_ip: [11.22.33.0/24]}\n")
    at_connect, final = asyncio.run(_staged(engine, ScanContext(client_ip=LISTED, no_autolearn=True)))
    assert at_connect == ["CLIENT_IN_BLOCKLIST"]
    assert final.count("CLIENT_IN_BLOCKLIST") == 1
    # An internal client says nothing at connect; the Received chain decides later.
    at_connect, final = asyncio.run(_staged(engine, ScanContext(client_ip="127.0.0.1", no_autolearn=True)))
    assert at_connect == [] and "CLIENT_IN_BLOCKLIST" in final


def test_dnsbl_at_connect_is_not_asked_again(
    tmp_path: Path, make_dns_server: MakeDnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    server = make_dns_server({".": [], "zen.spamhaus.org": ["44.33.22.11 A 127.0.0.2"]})
    proxy = make_delaying_proxy(server, delay=0.0)
    engine = _engine(
        tmp_path,
        f"dns: {{nameservers: ['{proxy.spec}']}}\nauth: {{spf: false, dkim: false, dmarc: false, arc: false}}\n"
        "dnsbl: {zones: {dbl: {enabled: false}, uribl: {enabled: false}, surbl: {enabled: false}}}\n",
    )
    at_connect, final = asyncio.run(_staged(engine, ScanContext(client_ip=LISTED, no_autolearn=True)))
    assert at_connect == ["RCVD_IN_SBL"]
    assert final.count("RCVD_IN_SBL") == 1
    asked = [name for name, _ in proxy.queries if name.endswith("zen.spamhaus.org.")]
    assert asked == ["44.33.22.11.zen.spamhaus.org."]


def test_welcomelist_auth_needs_spf_or_dkim(tmp_path: Path, make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({".": [], "sender.test": [f"@ TXT v=spf1 ip4:{LISTED} -all"]})
    text = (
        f"dns: {{nameservers: ['{server.spec}']}}\ndnsbl: {{enabled: false}}\n"
        "lists: {welcomelist_auth: ['*@sender.test']}\n"
    )
    engine = _engine(tmp_path, text)
    ok = engine.scan_sync(MESSAGE, ScanContext(mail_from="alice@sender.test", no_autolearn=True))
    assert "SPF_PASS" in ok.rule_names and "USER_IN_WELCOMELIST" in ok.rule_names
    assert "SPF pass" in next(h.detail for h in ok.hits if h.rule == "USER_IN_WELCOMELIST")
    forged = MESSAGE.replace(LISTED.encode(), b"11.22.33.99")
    bad = engine.scan_sync(forged, ScanContext(mail_from="alice@sender.test", no_autolearn=True))
    assert "SPF_FAIL" in bad.rule_names and "USER_IN_WELCOMELIST" not in bad.rule_names
    # The same sender in welcomelist_from would be welcome however it is forged: the point of _auth.
    cfg = dataclasses.replace(engine.config, lists=dataclasses.replace(engine.config.lists, welcomelist_auth=()))
    assert "USER_IN_WELCOMELIST" not in Engine.load(cfg).scan_sync(
        MESSAGE, ScanContext(mail_from="alice@sender.test", no_autolearn=True)
    ).rule_names


def test_milter_refuses_a_blocklisted_client_at_connect(tmp_path: Path) -> None:
    config = "milter: {reject_at_connect: true}\nlists: {blocklist_ip: [11.22.33.0/24]}\n"
    daemon = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", config=config, workers=1, metrics=False)
    try:
        port = daemon.milter_port()
        script = tmp_path / "connect.lua"
        script.write_text(
            'function check(ok, what) if not ok then print("FAIL: " .. what); os.exit(1) end end\n'
            f'conn = mt.connect("inet:{port}@127.0.0.1")\n'
            'check(conn ~= nil, "connect")\n'
            f'check(mt.conninfo(conn, "bad.example.net", "{LISTED}") == nil, "conninfo")\n'
            'check(mt.getreply(conn) == SMFIR_REPLYCODE, "refused at connect")\n'
            'mt.disconnect(conn)\n'
            f'conn = mt.connect("inet:{port}@127.0.0.1")\n'
            'check(mt.conninfo(conn, "good.example.net", "11.22.34.1") == nil, "conninfo 2")\n'
            'check(mt.getreply(conn) == SMFIR_CONTINUE, "other client goes on")\n'
            'mt.disconnect(conn)\nprint("PASS")\n'
        )
        proc = subprocess.run([need_binary("miltertest"), "-s", str(script)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 0 and "PASS" in proc.stdout, (proc.stdout, proc.stderr, daemon.log()[-3000:])
        assert "refused at connect" in daemon.log()
    finally:
        daemon.stop()
