"""Client network lists and DNSBL at connect (milter.reject_at_connect), welcomelist_auth, and
the per-user network lists — through the engine's staged API and through a real milter client
(Debian's miltertest) talking to a real daemon, with DNS from the local knotd fixture."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import struct
import subprocess
import urllib.request
from email.utils import formatdate
from pathlib import Path
from typing import Any

from filterd.config import load_config
from filterd.daemon.metrics import WorkerMetrics
from filterd.daemon.milter_service import MilterService
from filterd.engine.engine import Engine
from filterd.engine.plugin import Scan, ScanContext, Stage
from filterd.engine.prefs import UserPrefs, UserPrefsStore
from filterd.mta.milter_client import MilterSession
from filterd.protocols.milter import AddHeader
from tests._servers import wait_until
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
    assert (
        "USER_IN_WELCOMELIST"
        not in Engine.load(cfg)
        .scan_sync(MESSAGE, ScanContext(mail_from="alice@sender.test", no_autolearn=True))
        .rule_names
    )


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
            "mt.disconnect(conn)\n"
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


def test_milter_looks_a_client_up_once_per_connection(
    tmp_path: Path, make_dns_server: MakeDnsServer, make_delaying_proxy: MakeDelayingProxy
) -> None:
    # milter.reject_at_connect: the client's DNSBL lookups at CONNECT (listed in the PBL, below
    # reject_score) are the ones every message of that connection is scored with; the end of
    # each message does not ask again, after a RSET (abort) either. An authenticated sender's
    # message is not judged by the client address (the client is not external then): the
    # connect results are not carried into it. No DNS cache, so every lookup reaches the server.
    server = make_dns_server({".": [], "zen.spamhaus.org": ["44.33.22.11 A 127.0.0.11"]})
    proxy = make_delaying_proxy(server, delay=0.0)
    config = (
        f"network: {{enabled: true}}\ndns: {{nameservers: ['{proxy.spec}'], cache_entries: 0}}\n"
        "auth: {spf: false, dkim: false, dmarc: false, arc: false}\n"
        "dnsbl: {zones: {dbl: {enabled: false}, uribl: {enabled: false}, surbl: {enabled: false}}}\n"
        "milter: {reject_at_connect: true}\n"
    )
    daemon = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", config=config, workers=1)
    message = (
        "From: Alice <alice@sender.test>\r\nTo: bob@local.test\r\nSubject: lunch\r\n"
        f"Message-ID: <1@sender.test>\r\nDate: {formatdate()}\r\n\r\nLunch at noon?\r\n"
    ).encode()

    async def session() -> list[str]:
        s = MilterSession(f"127.0.0.1:{daemon.milter_port()}", connect_timeout=10, timeout=60)
        statuses = []
        try:
            assert (await s.connect(LISTED, 4711, "mail.sender.test", {"j": "mx.local.test"})).kind == "continue"
            assert (await s.helo("mail.sender.test", {})).kind == "continue"
            for n, login in enumerate(["", "", "alice", ""]):
                assert (await s.mail("alice@sender.test", [], {"auth_authen": login})).kind == "continue"
                assert (await s.rcpt("bob@local.test", [], {"i": f"4CC{n}"})).kind == "continue"
                if n == 1:  # RSET after RCPT: the connection goes on, the message is dropped
                    await s.abort()
                    assert (await s.mail("alice@sender.test", [], {})).kind == "continue"
                    assert (await s.rcpt("bob@local.test", [], {"i": f"4CC{n}"})).kind == "continue"
                assert (await s.data({})).kind == "continue"
                verdict, edits = await s.message(message, {"i": f"4CC{n}"})
                assert verdict.kind == "continue", daemon.log()[-3000:]
                statuses += [" ".join(e.value.split()) for e in edits.headers
                             if isinstance(e, AddHeader) and e.name == "X-Spam-Status"]  # fmt: skip
        finally:
            await s.close()
        return statuses

    try:
        statuses = asyncio.run(session())
        assert len(statuses) == 4, statuses
        assert ["RCVD_IN_PBL" in status for status in statuses] == [True, True, False, True], statuses
        asked = [name for name, _ in proxy.queries if name.startswith("44.33.22.11.")]
        assert asked == ["44.33.22.11.zen.spamhaus.org.", "44.33.22.11.list.dnswl.org."] or asked == [
            "44.33.22.11.list.dnswl.org.",
            "44.33.22.11.zen.spamhaus.org.",
        ], asked
        # /metrics times the CONNECT-stage DNSBL check where it ran: once at connect, once more in
        # the authenticated sender's scan (which carries no connect results); the others reuse them.
        count = 'filterd_async_check_seconds_count{check="dnsbl_connect"} '
        wait_until(lambda: f"{count}2\n" in _metrics(daemon.metrics_port), daemon.proc, name="daemon",
                   waiting_for="report 2 dnsbl_connect runs", log=daemon.log)  # fmt: skip
    finally:
        assert daemon.stop() == 0, daemon.log()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def test_milter_connect_results_belong_to_their_client(tmp_path: Path) -> None:
    # Raw packets (shared/reference/protocols.md §2) on one socket: a welcome-listed client sends
    # two messages (one RSET between them), then QUIT_NC and a CONNECT from an unlisted client,
    # whose message must not carry the first client's CONNECT-stage hit. The list check counts
    # its runs: once per CONNECT.
    engine = _offline(tmp_path, "lists: {welcomelist_ip: [11.22.33.0/24]}\n")
    check = engine.check("lists_connect")
    assert check is not None
    runs: list[str] = []
    real_run = check.run

    def counted(scan: Scan) -> Any:
        runs.append(scan.ctx.client_ip)
        return real_run(scan)

    check.run = counted  # type: ignore[method-assign]
    milter = dataclasses.replace(engine.config.milter, reject_at_connect=True)
    config = dataclasses.replace(engine.config, milter=milter)
    service = MilterService(engine, config, WorkerMetrics(), greylist=None, prefs=UserPrefsStore(""),
                            scans=asyncio.Semaphore(4))  # fmt: skip

    def packet(command: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", 1 + len(data)) + command + data

    def connect(ip: str) -> bytes:
        return packet(b"C", b"mx.example.net\x004" + struct.pack(">H", 4321) + ip.encode() + b"\x00")

    def transaction(n: int) -> bytes:
        return b"".join([
            packet(b"M", b"<alice@sender.test>\x00"), packet(b"R", b"<bob@local.test>\x00"),
            packet(b"L", b"Subject\x00lunch\x00"), packet(b"L", b"Message-ID\x00<%d@sender.test>\x00" % n),
            packet(b"N"), packet(b"B", b"Lunch at noon?\r\n"), packet(b"E"),
        ])  # fmt: skip

    async def converse() -> list[bytes]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        task = asyncio.create_task(service.serve(reader, writer, "test"))
        mta_reader, mta_writer = await asyncio.open_connection(sock=theirs)
        mta_writer.write(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
        statuses: list[bytes] = []

        async def until_final() -> None:
            while True:
                length = struct.unpack(">I", await asyncio.wait_for(mta_reader.readexactly(4), 10))[0]
                data = await mta_reader.readexactly(length)
                if data[:1] == b"h" and data[1:].startswith(b"X-Spam-Status\x00"):
                    statuses.append(data)
                if data[:1] in (b"c", b"a", b"r", b"t", b"d", b"y", b"O"):
                    return

        await until_final()  # the negotiation
        # (step, answers): CONNECT is answered (reject_at_connect), MAIL and ABORT are not; a
        # message has its body chunk answered (SKIP was offered) and its end
        steps = [(connect("11.22.33.44"), 1), (transaction(1), 2),
                 (packet(b"M", b"<x@sender.test>\x00") + packet(b"A"), 0), (transaction(2), 2),
                 (packet(b"K") + connect("11.22.99.1"), 1), (transaction(3), 2)]  # fmt: skip
        for step, answers in steps:
            mta_writer.write(step)
            for _ in range(answers):
                await until_final()
        mta_writer.write(packet(b"Q"))
        mta_writer.close()
        await asyncio.wait_for(task, 10)
        writer.close()
        return statuses

    statuses = asyncio.run(converse())
    assert ["CLIENT_IN_WELCOMELIST" in s.decode() for s in statuses] == [True, True, False], statuses
    assert runs == ["11.22.33.44", "11.22.99.1"]
