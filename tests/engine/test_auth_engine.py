"""The auth check inside a full engine (hits, scores, the Authentication-Results header, facts),
its timing against a slow DNS server, DKIM signing and `filterd dkim genkey`."""

from __future__ import annotations

import dataclasses
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from filterd.config import Config, load_config
from filterd.dkimsign import DkimKey, sign_message
from filterd.engine.engine import Engine
from filterd.engine.markup import MarkupOptions, process_message
from filterd.engine.plugin import ScanContext
from filterd.engine.uris import UriParser
from filterd.errors import ConfigError
from tests.dns_fixture import DnsServer, MakeDelayingProxy, MakeDnsServer
from tests.engine.auth_helpers import BAD_IP, GOOD_IP, auth_config, make_message, run_auth, sign

pytest_plugins = ["tests.dns_fixture", "tests.engine.auth_helpers"]

Keys = dict[str, DkimKey]
CTX = ScanContext(client_ip=GOOD_IP, helo="mail.example.com", mail_from="a@inc.example.com", no_autolearn=True)


def engine_for(config: Config, tmp_path: Path) -> Engine:
    config = dataclasses.replace(config, state_dir=str(tmp_path / "state"))
    return Engine.load(config, state_dir=config.state_dir)


def test_engine_scores_auth_rules_and_adds_the_header(auth_dns: DnsServer, dkim_keys: Keys, tmp_path: Path) -> None:
    engine = engine_for(auth_config(auth_dns.spec), tmp_path)
    raw = sign(make_message("Alice <alice@example.com>"), dkim_keys["example.com"])
    result = engine.scan_sync(raw, CTX)
    hits = {h.rule: h for h in result.hits}
    for rule in ("SPF_PASS", "SPF_HELO_PASS", "DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU", "DMARC_PASS"):
        assert rule in hits, (rule, sorted(hits), result.problems)
    assert hits["DKIM_VALID"].score == -0.1 and hits["DKIM_SIGNED"].score == 0.1  # from rules/46_auth.yaml
    assert not any(r.startswith("CHECK_ERROR") for r in hits), result.problems
    ((name, value),) = result.extra_headers
    b = re.search(r"header\.b=(\S+);", value)
    assert b is not None
    assert name == "Authentication-Results" and value == (
        "mx.test; spf=pass smtp.mailfrom=a@inc.example.com; "
        f"dkim=pass header.d=example.com header.s=sel header.b={b[1]}; "
        "dmarc=pass (p=reject) header.from=example.com; arc=none"
    )
    facts = dict(result.facts)
    assert facts["spf"] == "pass" and facts["dkim_domains"] == "example.com" and facts["dmarc"] == "pass"
    marked = process_message(engine, result, MarkupOptions(report_safe=0, hostname="mx.test"))
    head = marked.split(b"\r\n\r\n", 1)[0]
    assert head.index(b"Authentication-Results: mx.test;") < head.index(b"X-Spam-Checker-Version")


def test_engine_dmarc_reject_reaches_the_result(auth_dns: DnsServer, tmp_path: Path) -> None:
    engine = engine_for(auth_config(auth_dns.spec), tmp_path)
    ctx = dataclasses.replace(CTX, client_ip=BAD_IP, mail_from="a@example.com")
    result = engine.scan_sync(make_message("Alice <alice@example.com>"), ctx)
    rules = set(result.rule_names)
    assert {"SPF_FAIL", "SPF_HELO_FAIL", "DMARC_REJECT"} <= rules and "DKIM_SIGNED" not in rules
    assert dict(result.facts)["dmarc_disposition"] == "reject"
    assert "dmarc=fail (p=reject) header.from=example.com" in dict(result.extra_headers)["Authentication-Results"]


def test_engine_without_network_checks_has_no_auth(auth_dns: DnsServer, tmp_path: Path) -> None:
    config = auth_config(auth_dns.spec)
    config = dataclasses.replace(config, network=dataclasses.replace(config.network, enabled=False))
    result = engine_for(config, tmp_path).scan_sync(make_message(), CTX)
    assert not [r for r in result.rule_names if r.startswith(("SPF_", "DKIM_", "DMARC_"))]
    assert result.extra_headers == () and not dict(result.facts)


def test_auth_waits_for_the_slowest_chain_not_the_sum(
    auth_dns: DnsServer, make_delaying_proxy: MakeDelayingProxy, dkim_keys: Keys, uri_parser: UriParser, tmp_path: Path
) -> None:
    """Every answer 500 ms late. Chains: SPF a@inc.example.com (2 lookups in a row), SPF HELO
    mail.example.com (2), the DKIM key (1), _dmarc.example.com (1): 3 s one after another.
    (The delay is long so that the four chains' starts, some from threads, reach the server
    before it answers the first even on a loaded machine.)"""
    delay = 0.5
    proxy = make_delaying_proxy(auth_dns, delay=delay)
    raw = sign(make_message("Alice <alice@example.com>"), dkim_keys["example.com"])
    out = run_auth(auth_config(proxy.spec), raw, CTX, uri_parser=uri_parser)
    assert {"SPF_PASS", "SPF_HELO_PASS", "DKIM_VALID_AU", "DMARC_PASS"} <= out.rules
    assert out.elapsed >= 2 * delay, out.elapsed  # the SPF chains' two lookups in a row
    # Not the sum, shown without timing it (a loaded machine stretches any elapsed time): the
    # first lookup of each of the four chains was at the server before it answered any of them.
    # (In sequence there would never be more than one in flight.)
    assert len(proxy.queries) == 6 and proxy.peak_in_flight == 4, (proxy.queries, proxy.peak_in_flight)
    engine_proxy = make_delaying_proxy(auth_dns, delay=delay)
    result = engine_for(auth_config(engine_proxy.spec), tmp_path).scan_sync(raw, CTX)
    assert {"SPF_PASS", "DKIM_VALID_AU", "DMARC_PASS"} <= set(result.rule_names)
    assert result.scan_time >= 2 * delay, result.scan_time
    # The engine adds its DBL lookup of example.com: with the auth chains run one after another
    # at most two queries would be in flight, with them together the four starts (and maybe it).
    assert engine_proxy.peak_in_flight >= 4, (engine_proxy.queries, engine_proxy.peak_in_flight)


def test_sign_message_oversigns_and_verifies(auth_dns: DnsServer, dkim_keys: Keys, uri_parser: UriParser) -> None:
    key = dkim_keys["example.com"]
    raw = sign_message(make_message(newline="\n"), "example.com", "sel", key.private_pem)
    assert raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;")
    assert b"\r\n" not in raw  # folded with the message's own line ending
    h = re.search(rb"h=([^;]*);", raw)
    assert h is not None
    signed = [name.strip() for name in h[1].replace(b"\n", b"").split(b":")]
    assert signed.count(b"from") == 2 and b"return-path" not in signed
    cfg = auth_config(auth_dns.spec, spf=False, dmarc=False)
    assert "DKIM_VALID_AU" in run_auth(cfg, raw, CTX, uri_parser=uri_parser).rules
    forged = raw.replace(b"From: Alice", b"From: mallory@example.net\nFrom: Alice", 1)
    assert "DKIM_INVALID" in run_auth(cfg, forged, CTX, uri_parser=uri_parser).rules


def test_genkey_output_publishes_a_working_key(
    make_dns_server: MakeDnsServer, uri_parser: UriParser, tmp_path: Path
) -> None:
    def genkey(*extra: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "filterd", "dkim", "genkey", "example.com", "k2025", "--dir", str(tmp_path),
                *extra]  # fmt: skip
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    done = genkey("--bits", "1024")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith('k2025._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line))
    key_path = tmp_path / "example.com.k2025.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert str(key_path) in done.stderr

    server = make_dns_server({"example.com": ['@ TXT "v=spf1 -all"', line]})
    raw = sign_message(make_message(), "example.com", "k2025", key_path.read_bytes())
    cfg = auth_config(server.spec, spf=False, dmarc=False)
    out = run_auth(cfg, raw, CTX, uri_parser=uri_parser)
    assert {"DKIM_SIGNED", "DKIM_VALID", "DKIM_VALID_AU"} <= out.rules
    assert "dkim=pass header.d=example.com header.s=k2025" in out.auth_results

    again = genkey()
    assert again.returncode == 73 and "exists" in again.stderr  # never overwrites a key
    assert genkey("--bits", "512").returncode == 64


def test_genkey_2048_bit_record_spans_two_strings(make_dns_server: MakeDnsServer, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "filterd", "dkim", "genkey", "example.org", "big", "--dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    strings = re.findall(r'"([^"]*)"', done.stdout)
    assert len(strings) == 2 and len(strings[0]) == 255
    server = make_dns_server({"example.org": [done.stdout.strip()]})
    (answer,) = server.resolver().resolve("big._domainkey.example.org", "TXT")
    assert b"".join(answer.strings).decode() == "".join(strings)


def test_auth_keeps_what_finished_when_the_deadline_comes(
    auth_dns: DnsServer, make_delaying_proxy: MakeDelayingProxy, dkim_keys: Keys, uri_parser: UriParser
) -> None:
    """The DKIM key answers after the scan's time is up: SPF still counts, DKIM is a temperror,
    and so is DMARC (its aligned signature could not be checked)."""

    def delay(query: object) -> float:
        return 30.0 if "_domainkey" in str(query) else 0.0

    proxy = make_delaying_proxy(auth_dns, delay=delay)
    raw = sign(make_message("Alice <alice@example.com>"), dkim_keys["example.com"])
    ctx = dataclasses.replace(CTX, mail_from="a@example.net")  # SPF passes, not aligned with example.com
    out = run_auth(auth_config(proxy.spec, timeout=5.0), raw, ctx, uri_parser=uri_parser, budget=0.5)
    # The key is held 30 s, so only the 0.5 s budget or the 5 s DNS timeout can end its lookup:
    # finishing under 5 s means the budget did (10x headroom for a loaded machine), and the
    # "(out of time)" below says so without timing.
    assert out.elapsed < 5.0, out.elapsed
    assert ("sel._domainkey.example.com.", "TXT") in proxy.queries  # asked; its answer never came
    assert {"SPF_PASS", "SPF_HELO_PASS", "DKIM_SIGNED"} <= out.rules
    assert not out.family("DMARC_") and not {"DKIM_VALID", "DKIM_INVALID"} & out.rules
    assert out.facts["dkim"] == "temperror" and out.facts["dmarc"] == "temperror"
    assert "dkim=temperror (out of time) header.d=example.com" in out.auth_results


def test_auth_config_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text('auth:\n  authserv_id: "mx example; x"\n  dkim_keys:\n    example.com: "sel"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = [str(p) for p in info.value.problems]
    assert len(found) == 2
    assert found[0].endswith("filterd.yaml:2: auth.authserv_id: expected a host name such as mx.example.org, "
                             "got 'mx example; x'")  # fmt: skip
    assert "filterd.yaml:3: auth.dkim_keys: example.com: expected 'selector:/absolute/path/key.pem'" in found[1]
    path.write_text("auth:\n  authserv_id: mx.example.org\n  dkim_keys:\n    example.com: sel:/etc/filterd/k.pem\n")
    assert load_config(path).auth.dkim_keys["example.com"] == "sel:/etc/filterd/k.pem"
