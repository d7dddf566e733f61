"""Remote delivery: MX selection against a real DNS server (knotd), the SMTP client against
small aiosmtpd servers, and the two together (next MX, per-recipient results, DKIM)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import dkim
import pytest

from filterd.cli import main
from filterd.config import Config, Duration, FrozenMap, default_config
from filterd.dkimsign import generate_key, sign_message, write_key
from filterd.errors import PermanentDeliveryError, TemporaryDeliveryError
from filterd.mta import delivery
from filterd.mta.delivery import RemoteDelivery, outcome_of, sysexit_status
from filterd.mta.mx import NextHop, next_hops, parse_mx
from filterd.mta.queue import Queue
from filterd.mta.smtp_client import Reply, SessionError, SmtpOptions, send
from filterd.net.dns import Resolver
from tests.dns_fixture import MakeDnsServer, MakeSilentDnsServer
from tests.mta.qmgr_helpers import MESSAGE, all_ids, count_opens, enqueue, make_qmgr, mta_config, run_until
from tests.mta.smtp_sink import Refuser, Sink, free_port, self_signed_context

pytest_plugins = ["tests.dns_fixture"]


def _resolver(spec: str) -> Resolver:
    cfg = default_config().dns
    return Resolver(dataclasses.replace(cfg, nameservers=(spec,), timeout=Duration(2.0)))


def _config(dns_spec: str, port: int, **mta: object) -> Config:
    cfg = default_config()
    return dataclasses.replace(
        cfg,
        dns=dataclasses.replace(cfg.dns, nameservers=(dns_spec,), timeout=Duration(2.0)),
        mta=dataclasses.replace(cfg.mta, hostname="relay.example.org", smtp_port=port, **mta),  # type: ignore[arg-type]
    )


# -- pure pieces --------------------------------------------------------------------------------


def test_parse_mx_records() -> None:
    assert parse_mx("10 mx.example.org.") == (10, "mx.example.org")
    assert parse_mx("0 .") == (0, ".")
    assert parse_mx("MX.Example.ORG") is None
    assert parse_mx("x mx.example.org.") is None


def test_outcome_is_decided_by_the_status_class() -> None:
    assert [outcome_of(s) for s in ("2.0.0", "4.4.1", "5.1.1", "")] == ["delivered", "deferred", "bounced", "bounced"]


def test_sysexits_map_to_enhanced_status() -> None:
    assert sysexit_status(67) == ("5.1.1", "user unknown")
    assert sysexit_status(75)[0] == "4.3.0"
    assert sysexit_status(1)[0] == "5.3.0"


def test_reply_status_comes_from_the_text_or_the_code() -> None:
    assert Reply(550, "5.1.1 no such user").status == "5.1.1"
    assert Reply(550, "no such user").status == "5.0.0"
    assert Reply(450, "5.1.1 mismatched class").status == "4.0.0"  # the code's class wins
    assert str(Reply(250, "2.0.0 Ok\nqueued")) == "250 2.0.0 Ok queued"


# -- MX selection against knotd -----------------------------------------------------------------


def _hops(spec: str, domain: str, seed: int = 0) -> list[NextHop]:
    return asyncio.run(next_hops(_resolver(spec), domain, rng=random.Random(seed)))


def test_mx_in_preference_order(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server(
        {"example.net": "@ MX 20 mx2\n@ MX 10 mx1\n@ MX 30 mx3\nmx1 A 192.0.2.1\nmx2 A 192.0.2.2\nmx3 A 192.0.2.3\n"}
    )
    hops = _hops(server.spec, "example.net")
    assert [(h.host, h.preference, h.address) for h in hops] == [
        ("mx1.example.net", 10, "192.0.2.1"),
        ("mx2.example.net", 20, "192.0.2.2"),
        ("mx3.example.net", 30, "192.0.2.3"),
    ]


def test_mx_of_equal_preference_are_shuffled(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server(
        {"example.net": "@ MX 10 a\n@ MX 10 b\n@ MX 5 first\nfirst A 192.0.2.9\na A 192.0.2.1\nb A 192.0.2.2\n"}
    )
    orders = Counter(tuple(h.host.split(".")[0] for h in _hops(server.spec, "example.net", seed)) for seed in range(40))
    assert set(orders) == {("first", "a", "b"), ("first", "b", "a")}  # both orders, "first" always first


def test_host_addresses_ipv4_first_then_ipv6(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ MX 10 mx\nmx AAAA 2001:db8::25\nmx A 192.0.2.25\n"})
    assert [h.address for h in _hops(server.spec, "example.net")] == ["192.0.2.25", "2001:db8::25"]


def test_implicit_mx_is_the_domain_itself(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ A 192.0.2.7\nwww A 192.0.2.8\n"})
    assert _hops(server.spec, "example.net") == [NextHop("example.net", 0, "192.0.2.7")]


def test_null_mx_bounces_at_once(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ MX 0 .\n@ A 192.0.2.7\n"})
    with pytest.raises(PermanentDeliveryError) as info:
        _hops(server.spec, "example.net")
    assert info.value.status == "5.1.10" and "null MX" in str(info.value)


def test_nonexistent_domain_is_permanent(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ A 192.0.2.7\n"})
    with pytest.raises(PermanentDeliveryError) as info:
        _hops(server.spec, "nope.example.net")
    assert info.value.status == "5.1.2"


def test_domain_without_mx_or_address_is_permanent(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ TXT nothing here\n"})
    with pytest.raises(PermanentDeliveryError):
        _hops(server.spec, "example.net")


def test_mx_host_without_address_is_skipped(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ MX 10 gone\n@ MX 20 mx2\nmx2 A 192.0.2.2\n"})
    assert [h.host for h in _hops(server.spec, "example.net")] == ["mx2.example.net"]


def test_mx_hosts_all_without_address_is_permanent(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"example.net": "@ MX 10 gone\n@ MX 20 gone2\n"})
    with pytest.raises(PermanentDeliveryError) as info:
        _hops(server.spec, "example.net")
    assert info.value.status == "5.4.4"


def test_dns_timeout_is_temporary(make_silent_dns_server: MakeSilentDnsServer) -> None:
    server = make_silent_dns_server()
    cfg = default_config().dns
    resolver = Resolver(dataclasses.replace(cfg, nameservers=(server.spec,), timeout=Duration(0.3)))
    with pytest.raises(TemporaryDeliveryError) as info:
        asyncio.run(next_hops(resolver, "example.net", rng=random.Random(0)))
    assert info.value.status == "4.4.3"


def test_address_literal_needs_no_dns() -> None:
    resolver = _resolver("127.0.0.1:9")
    hops = asyncio.run(next_hops(resolver, "[192.0.2.1]", rng=random.Random(0)))
    assert hops == [NextHop("[192.0.2.1]", 0, "192.0.2.1")]


# -- the SMTP client against aiosmtpd -----------------------------------------------------------


def _options(port: int, **kw: object) -> SmtpOptions:
    return SmtpOptions(helo_name="relay.example.org", port=port, connect_timeout=2, timeout=5, data_timeout=5, **kw)  # type: ignore[arg-type]


def test_per_recipient_replies() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()
        try:
            result = await send(
                "127.0.0.2",
                _options(port),
                sender="alice@example.org",
                recipients=["ok@example.net", "temp@example.net", "no@example.net", "ok2@example.net"],
                data=MESSAGE,
                eight_bit=True,
            )
        finally:
            await sink.stop()
        codes = {r: (reply.code, reply.status) for r, reply in result.replies.items()}
        assert codes == {
            "ok@example.net": (250, "2.0.0"),
            "ok2@example.net": (250, "2.0.0"),
            "temp@example.net": (450, "4.2.1"),
            "no@example.net": (550, "5.1.1"),
        }
        [got] = sink.messages
        assert got.rcpt_tos == ["ok@example.net", "ok2@example.net"] and got.helo == "relay.example.org"
        assert got.data == MESSAGE  # dot-stuffing undone by the server: the same bytes arrive
        assert "BODY=8BITMIME" in got.mail_options and f"SIZE={len(MESSAGE)}" in got.mail_options
        assert not got.tls

    asyncio.run(scenario())


def test_no_accepted_recipient_means_no_data() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()
        try:
            result = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["no@example.net"], data=MESSAGE
            )
        finally:
            await sink.stop()
        assert result.replies["no@example.net"].code == 550 and not sink.messages

    asyncio.run(scenario())


def test_data_refused_applies_to_every_accepted_recipient() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()
        sink.handler.data_reply = "554 5.7.1 message content rejected"
        try:
            result = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["a@x.net", "b@x.net"], data=MESSAGE
            )
        finally:
            await sink.stop()
        assert {r.code for r in result.replies.values()} == {554}
        assert all(r.status == "5.7.1" for r in result.replies.values())

    asyncio.run(scenario())


def test_message_over_the_advertised_size_is_refused_before_sending() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port, data_size_limit=100).start()
        try:
            result = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["a@x.net"], data=MESSAGE * 3
            )
        finally:
            await sink.stop()
        reply = result.replies["a@x.net"]
        assert reply.code == 552 and reply.status == "5.3.4" and reply.local and not sink.messages

    asyncio.run(scenario())


def test_opportunistic_starttls_without_verification(tmp_path: Path) -> None:
    context = self_signed_context(tmp_path)

    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port, tls=context).start()
        try:
            result = await send(
                "127.0.0.2", _options(port), sender="a@example.org", recipients=["ok@x.net"], data=MESSAGE
            )
            plain = await send(
                "127.0.0.2",
                _options(port, starttls=False),
                sender="a@example.org",
                recipients=["ok@x.net"],
                data=MESSAGE,
            )
        finally:
            await sink.stop()
        assert result.tls and sink.messages[0].tls
        assert not plain.tls and not sink.messages[1].tls

    asyncio.run(scenario())


def test_refused_greeting_and_connection_are_session_errors() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2", "127.0.0.3")
        refuser = await Refuser("127.0.0.2", port).start()
        try:
            with pytest.raises(SessionError) as info:
                await send("127.0.0.2", _options(port), sender="a@b.org", recipients=["c@d.net"], data=MESSAGE)
            assert info.value.reply == Reply(421, "4.3.2 too busy, go away")
            with pytest.raises(SessionError, match="connect to"):
                await send("127.0.0.3", _options(port), sender="a@b.org", recipients=["c@d.net"], data=MESSAGE)
        finally:
            await refuser.stop()

    asyncio.run(scenario())


def test_non_ascii_address_needs_smtputf8() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()  # aiosmtpd offers SMTPUTF8 only when asked to
        try:
            result = await send(
                "127.0.0.2",
                _options(port),
                sender="a@example.org",
                recipients=["jörg@x.net", "ok@x.net"],
                data=MESSAGE,
                smtputf8=True,
            )
        finally:
            await sink.stop()
        assert result.replies["jörg@x.net"].status == "5.6.7"
        assert result.replies["ok@x.net"].code == 250

    asyncio.run(scenario())


# -- remote delivery: DNS + SMTP ----------------------------------------------------------------


def _deliver(config: Config, domain: str, rcpts: list[str], data_path: Path, sender: str = "alice@example.org"):  # type: ignore[no-untyped-def]
    remote = RemoteDelivery(config, Resolver(config.dns), hostname="relay.example.org", rng=random.Random(1))
    return remote.deliver("QID", sender, domain, rcpts, data_path)


def test_next_mx_when_the_first_is_down_or_refuses(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server(
        {"example.net": "@ MX 10 down\n@ MX 20 busy\n@ MX 30 up\ndown A 127.0.0.2\nbusy A 127.0.0.3\nup A 127.0.0.4\n"}
    )
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)

    async def scenario() -> None:
        port = free_port("127.0.0.2", "127.0.0.3", "127.0.0.4")
        refuser = await Refuser("127.0.0.3", port).start()
        sink = await Sink("127.0.0.4", port).start()
        try:
            results = await _deliver(
                _config(server.spec, port), "example.net", ["ok@example.net", "no@example.net"], data
            )
        finally:
            await sink.stop()
            await refuser.stop()
        by = {r.recipient: r for r in results}
        assert by["ok@example.net"].outcome == "delivered" and by["ok@example.net"].remote_mta == "up.example.net"
        assert by["no@example.net"].outcome == "bounced" and by["no@example.net"].status == "5.1.1"
        assert by["no@example.net"].diagnostic == "smtp; 550 5.1.1 no such user here (in reply to RCPT TO)"
        assert "host up.example.net[127.0.0.4] said: 550 5.1.1" in by["no@example.net"].detail
        assert refuser.connections == 1 and len(sink.messages) == 1

    asyncio.run(scenario())


def test_every_mx_down_defers(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server({"example.net": "@ MX 10 a\n@ MX 20 b\na A 127.0.0.2\nb A 127.0.0.3\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    port = free_port("127.0.0.2", "127.0.0.3")
    [result] = asyncio.run(_deliver(_config(server.spec, port), "example.net", ["ok@example.net"], data))
    assert result.outcome == "deferred" and result.status == "4.4.1"
    assert "127.0.0.2" in result.detail and "127.0.0.3" in result.detail
    assert (result.reply_code, result.reply_status) == (0, "")  # no server replied


def test_every_mx_refusing_with_5xx_bounces(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server({"example.net": "@ MX 10 a\na A 127.0.0.2\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)

    async def scenario() -> None:
        port = free_port("127.0.0.2")
        refuser = await Refuser("127.0.0.2", port, b"554 5.7.1 no service for you\r\n").start()
        try:
            [result] = await _deliver(_config(server.spec, port), "example.net", ["ok@example.net"], data)
        finally:
            await refuser.stop()
        assert result.outcome == "bounced" and result.status == "5.7.1"
        assert (result.reply_code, result.reply_status) == (554, "5.7.1")

    asyncio.run(scenario())


def test_temporary_rcpt_failure_defers(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server({"example.net": "@ MX 10 a\na A 127.0.0.2\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)

    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()
        try:
            [result] = await _deliver(_config(server.spec, port), "example.net", ["temp@example.net"], data)
        finally:
            await sink.stop()
        assert result.outcome == "deferred" and result.status == "4.2.1"

    asyncio.run(scenario())


def test_results_carry_the_server_reply_code_and_enhanced_status(tmp_path: Path) -> None:
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    rcpts = ["ok@[127.0.0.2]", "temp@[127.0.0.2]", "no@[127.0.0.2]"]

    async def scenario() -> None:
        port = free_port("127.0.0.2")
        sink = await Sink("127.0.0.2", port).start()
        sink.handler.data_reply = "250 Ok: queued"  # no enhanced status in the text
        try:
            results = await _deliver(_config("127.0.0.1:9", port), "[127.0.0.2]", rcpts, data)
        finally:
            await sink.stop()
        got = {r.recipient: (r.status, r.reply_code, r.reply_status) for r in results}
        assert got == {
            "ok@[127.0.0.2]": ("2.0.0", 250, ""),  # the status is derived from the code; the reply had none
            "temp@[127.0.0.2]": ("4.2.1", 450, "4.2.1"),
            "no@[127.0.0.2]": ("5.1.1", 550, "5.1.1"),
        }

    asyncio.run(scenario())


def test_queue_keeps_the_last_reply_of_each_recipient_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the queue manager: the reply is in the envelope on disk, and in `queue list`."""

    async def scenario() -> None:
        port = free_port("127.0.0.2")
        config = mta_config(tmp_path, smtp_port=port, smtp_connect_timeout=2.0, min_backoff=60.0, max_backoff=60.0)
        queue = Queue(config.state_path / "queue")
        qid = enqueue(queue, "ok@[127.0.0.2]", "temp@[127.0.0.2]")
        sink = await Sink("127.0.0.2", port).start()
        try:
            await run_until(make_qmgr(config, queue), lambda: queue.ids("deferred") == [qid])
        finally:
            await sink.stop()

    asyncio.run(scenario())
    state = tmp_path / "state"
    [path] = (state / "queue" / "deferred").iterdir()
    stored = {r["address"]: r for r in json.loads(path.read_bytes())["rcpts"]}
    ok, temp = stored["ok@[127.0.0.2]"], stored["temp@[127.0.0.2]"]
    assert (ok["last_reply_code"], ok["last_reply_status"], ok["last_status"]) == (250, "2.0.0", "")
    assert (temp["last_reply_code"], temp["last_reply_status"], temp["last_status"]) == (450, "4.2.1", "4.2.1")
    assert main(["mta", "queue", "list", "--json", "--state-dir", str(state)]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    listed = [(r["status"], r["last_status"], r["last_reply_code"], r["last_reply_status"]) for r in row["recipients"]]
    assert listed == [("delivered", "", 250, "2.0.0"), ("pending", "4.2.1", 450, "4.2.1")]
    assert main(["mta", "queue", "list", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "ok@[127.0.0.2]  [delivered, last reply 250 2.0.0]" in out
    assert "temp@[127.0.0.2]  [last reply 450 4.2.1]" in out


def test_null_mx_bounces_without_connecting(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server({"example.net": "@ MX 0 .\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    [result] = asyncio.run(_deliver(_config(server.spec, 2525), "example.net", ["a@example.net"], data))
    assert result.outcome == "bounced" and result.status == "5.1.10"


def test_mail_from_our_domain_is_dkim_signed(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    key = generate_key("example.org", "s1", bits=1024)
    path = write_key(key, tmp_path)
    server = make_dns_server({"example.net": "@ MX 10 a\na A 127.0.0.2\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)

    async def scenario() -> bytes:
        port = free_port("127.0.0.2")
        config = _config(server.spec, port)
        config = dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, dkim_keys=FrozenMap({"example.org": f"s1:{path}"}))
        )
        sink = await Sink("127.0.0.2", port).start()
        try:
            [result] = await _deliver(config, "example.net", ["ok@example.net"], data)
        finally:
            await sink.stop()
        assert result.outcome == "delivered"
        return sink.messages[0].data

    signed = asyncio.run(scenario())
    assert signed.startswith(b"DKIM-Signature:") and b"d=example.org" in signed and b"s=s1" in signed

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.example.org."
        return key.record.encode()

    assert dkim.verify(signed, dnsfunc=dnsfunc)


def test_unreadable_dkim_key_defers(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    server = make_dns_server({"example.net": "@ MX 10 a\na A 127.0.0.2\n"})
    data = tmp_path / "msg"
    data.write_bytes(MESSAGE)
    config = _config(server.spec, 2525)
    config = dataclasses.replace(
        config, auth=dataclasses.replace(config.auth, dkim_keys=FrozenMap({"example.org": "s1:/nonexistent/key.pem"}))
    )
    [result] = asyncio.run(_deliver(config, "example.net", ["ok@example.net"], data))
    assert result.outcome == "deferred" and result.status == "4.7.0" and "DKIM" in result.detail


def test_an_attempt_reads_and_signs_once_for_every_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Three SMTP transactions for one message (two domains, one recipient per transaction): one
    # read of the data file, one signature, the same signed bytes everywhere.
    key = generate_key("example.org", "s1", bits=1024)
    key_path = write_key(key, tmp_path)
    signed_for: list[str] = []
    sign = sign_message  # what delivery.sign_message is until the patch below

    def counting(raw: bytes, domain: str, selector: str, key_pem: bytes) -> bytes:
        signed_for.append(domain)
        return sign(raw, domain, selector, key_pem)

    monkeypatch.setattr(delivery, "sign_message", counting)
    port = free_port("127.0.0.2", "127.0.0.3")
    config = mta_config(tmp_path, smtp_port=port, destination_recipient_limit=1)
    config = dataclasses.replace(
        config, auth=dataclasses.replace(config.auth, dkim_keys=FrozenMap({"example.org": f"s1:{key_path}"}))
    )
    queue = Queue(tmp_path / "q")
    qid = enqueue(queue, "a@[127.0.0.2]", "b@[127.0.0.2]", "c@[127.0.0.3]")
    data_path = str(queue.data / qid)

    async def scenario() -> list[bytes]:
        sinks = [await Sink("127.0.0.2", port).start(), await Sink("127.0.0.3", port).start()]
        try:
            await run_until(make_qmgr(config, queue), lambda: not all_ids(queue))
        finally:
            for sink in sinks:
                await sink.stop()
        return [m.data for sink in sinks for m in sink.messages]

    with count_opens() as opened:
        received = asyncio.run(scenario())
    assert len(received) == 3 and len(set(received)) == 1
    assert signed_for == ["example.org"] and opened[data_path] == 1

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return key.record.encode()

    assert received[0].startswith(b"DKIM-Signature:") and dkim.verify(received[0], dnsfunc=dnsfunc)


def test_message_data_is_kept_only_while_a_delivery_holds_it(tmp_path: Path) -> None:
    # A message whose other destinations wait for a delivery slot must not pin its data in
    # memory: the copy lives while some delivery holds it; the DKIM signature (small) stays.
    key = generate_key("example.org", "s1", bits=1024)
    path = tmp_path / "data"
    path.write_bytes(MESSAGE)
    message = delivery.MessageData(path)

    async def scenario() -> None:
        with count_opens() as opened:
            assert await message.read() == MESSAGE and await message.read() == MESSAGE
        assert opened[str(path)] == 2  # held by nobody: nothing is kept
        with count_opens() as opened:
            with message.in_use():
                with message.in_use():
                    signed = await message.dkim_signed("example.org", "s1", key.private_pem)
                assert await message.head(10) == MESSAGE[:10]
            assert await message.head(10) == MESSAGE[:10]  # dropped: from the file again
        assert opened[str(path)] == 2
        with count_opens() as opened, message.in_use():
            assert await message.dkim_signed("example.org", "s1", key.private_pem) == signed  # not signed again
        assert opened[str(path)] == 1
        assert signed.startswith(b"DKIM-Signature:") and signed.endswith(MESSAGE)

    asyncio.run(scenario())
