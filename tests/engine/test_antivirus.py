"""The antivirus check against a real clamd (tests/clamd_fixture.py) with test signatures."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from filterd.config import Config, Duration, load_config
from filterd.config.schema import clamd_address
from filterd.engine.checks.antivirus import AntivirusCheck
from filterd.engine.engine import Engine, Result
from filterd.engine.markup import MarkupOptions, build_report
from filterd.engine.message import parse_message
from filterd.engine.plugin import CheckSetup, Hit, Scan, ScanContext
from filterd.engine.uris import UriParser
from filterd.errors import ConfigError
from tests._servers import free_port
from tests.clamd_fixture import (
    EICAR,
    EICAR_HASH_NAME,
    EICAR_STRING_NAME,
    ZIP_MARKER,
    ZIP_NAME,
    Clamd,
    MakeClamd,
    marker_zip,
    zip_with,
)
from tests.conftest import offline_config

pytest_plugins = ["tests.clamd_fixture"]

HEADERS = (
    "From: Alice <alice@example.com>\n"
    "To: bob@example.org\n"
    "Subject: {subject}\n"
    "Date: Mon, 02 Mar 2026 10:00:00 +0000\n"
    "Message-ID: <{subject_id}@example.com>\n"
    "MIME-Version: 1.0\n"
)


def plain_message(body: bytes, subject: str = "Minutes of the meeting") -> bytes:
    head = HEADERS.format(subject=subject, subject_id=abs(hash(subject)))
    return (head + "Content-Type: text/plain; charset=us-ascii\n\n").encode() + body + b"\n"


def message_with(*attachments: tuple[str, str, bytes], subject: str = "The files you asked for") -> bytes:
    """A multipart/mixed message: a short text part, then (filename, content type, bytes) each in base64."""
    head = HEADERS.format(subject=subject, subject_id=abs(hash(subject)))
    parts = [b"Content-Type: text/plain; charset=us-ascii\n\nHere they are, as promised.\n"]
    for filename, ctype, data in attachments:
        encoded = base64.encodebytes(data)
        parts.append(
            f'Content-Type: {ctype}; name="{filename}"\n'
            f'Content-Disposition: attachment; filename="{filename}"\n'
            "Content-Transfer-Encoding: base64\n\n".encode()
            + encoded
        )
    body = b"".join(b"--BOUNDARY\n" + p for p in parts) + b"--BOUNDARY--\n"
    return (head + 'Content-Type: multipart/mixed; boundary="BOUNDARY"\n\n').encode() + body


def av_config(clamd: str, **antivirus: Any) -> Config:
    cfg = offline_config()
    section = dataclasses.replace(cfg.antivirus, enabled=True, clamd=clamd, **antivirus)
    return dataclasses.replace(cfg, antivirus=section)


def run_check(config: Config, raw: bytes, *, deadline: float = 0.0) -> tuple[list[Hit], dict[str, str]]:
    """The check alone (no rules): its hits and the facts it left."""
    uri_parser = UriParser()
    check = AntivirusCheck(CheckSetup(config=config, uri_parser=uri_parser))
    scan = Scan(ctx=ScanContext(queue_id="T1"), uri_parser=uri_parser, deadline=deadline)
    scan.msg = parse_message(raw, uri_parser=uri_parser)
    hits = asyncio.run(check.run(scan))
    return list(hits), scan.facts


def only_hit(hits: Sequence[Hit], rule: str) -> Hit:
    assert [h.rule for h in hits] == [rule], hits
    return hits[0]


# -- through the whole engine, shipped rules -----------------------------------------------------


@pytest.fixture(scope="module")
def engine(clamd: Clamd) -> Engine:
    return Engine.load(av_config(clamd.unix_spec))


def facts(result: Result) -> dict[str, str]:
    return dict(result.facts)


def test_eicar_in_a_plain_body_is_a_virus_and_spam(engine: Engine) -> None:
    result = engine.scan_sync(plain_message(b"Please scan this:\n" + EICAR))
    hit = next(h for h in result.hits if h.rule == "AV_VIRUS")
    assert "Eicar" in hit.detail and "in message" in hit.detail
    assert hit.score == 200 and result.is_spam
    assert "Eicar" in facts(result)["av"]
    assert facts(result)["av_action"] == "reject"
    assert "AV_ERROR" not in result.rule_names and "av_error" not in facts(result)


def test_the_virus_is_named_in_the_report(engine: Engine) -> None:
    result = engine.scan_sync(plain_message(EICAR))
    report = build_report(engine, result, MarkupOptions(hostname="mx.test"))
    assert f"[{EICAR_STRING_NAME}.UNOFFICIAL in message]" in report


def test_clean_message_has_no_av_rule_and_no_av_facts(engine: Engine) -> None:
    result = engine.scan_sync(message_with(("notes.pdf", "application/pdf", b"%PDF-1.4\n% nothing here\n")))
    assert not {"AV_VIRUS", "AV_ERROR"} & set(result.rule_names)
    assert not any(k.startswith("av") for k in facts(result))


def test_an_error_is_a_zero_score_rule_with_facts_for_the_mta(tmp_path: Path) -> None:
    engine = Engine.load(av_config(str(tmp_path / "no-such.sock")))
    result = engine.scan_sync(plain_message(b"hello"))
    hit = next(h for h in result.hits if h.rule == "AV_ERROR")
    assert hit.score == 0 and "no-such.sock" in hit.detail
    assert facts(result)["av_on_error"] == "tempfail" and facts(result)["av_error"] == hit.detail


def test_the_scan_deadline_still_gives_av_error_not_check_error(make_clamd: MakeClamd) -> None:
    server = make_clamd()
    cfg = av_config(server.unix_spec, timeout=30.0)
    cfg = dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, scan_deadline=Duration(1.5)))
    engine = Engine.load(cfg)
    with server.paused():
        started = time.monotonic()
        result = engine.scan_sync(plain_message(EICAR))
        elapsed = time.monotonic() - started
    assert "AV_ERROR" in result.rule_names and "CHECK_ERROR_ANTIVIRUS" not in result.rule_names
    # The deadline, not the 30 s timeout, set how long it waited: the limit it reports is under
    # the 1.5 s scan deadline. The elapsed bound only catches a hang (half the timeout; the
    # deadline is 1.5 s, so a loaded machine has 10x room).
    waited = re.search(r"did not answer within ([0-9.]+)s", facts(result)["av_error"])
    assert waited is not None and 0 < float(waited[1]) < 1.5, facts(result)["av_error"]
    assert elapsed < 15.0, elapsed


# -- the check alone -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_both_transports_find_eicar(clamd: Clamd, transport: str) -> None:
    spec = clamd.unix_spec if transport == "unix" else clamd.tcp_spec
    hits, found = run_check(av_config(spec), plain_message(EICAR))
    assert "Eicar" in only_hit(hits, "AV_VIRUS").detail
    assert found["av"] == f"{EICAR_STRING_NAME}.UNOFFICIAL"


def test_eicar_attachment_in_base64(clamd: Clamd) -> None:
    raw = message_with(("eicar.com", "application/octet-stream", EICAR))
    assert EICAR not in raw  # only a decoder finds it
    hits, found = run_check(av_config(clamd.unix_spec, action="quarantine"), raw)
    detail = only_hit(hits, "AV_VIRUS").detail
    assert "Eicar" in detail and "part 2 (eicar.com)" in detail and "message" in detail
    assert found["av_action"] == "quarantine"


def test_custom_signature_inside_a_zip_attachment(clamd: Clamd) -> None:
    raw = message_with(("report.zip", "application/zip", marker_zip()))
    hits, found = run_check(av_config(clamd.unix_spec), raw)
    detail = only_hit(hits, "AV_VIRUS").detail
    assert f"{ZIP_NAME}.UNOFFICIAL in message, part 2 (report.zip)" == detail
    assert found["av"] == f"{ZIP_NAME}.UNOFFICIAL"


def test_without_attachment_scanning_only_the_message_is_sent(clamd: Clamd) -> None:
    raw = message_with(("report.zip", "application/zip", marker_zip()))
    hits, _ = run_check(av_config(clamd.unix_spec, scan_attachments=False), raw)
    # clamd decodes the MIME and unpacks the zip itself.
    assert only_hit(hits, "AV_VIRUS").detail == f"{ZIP_NAME}.UNOFFICIAL in message"


def test_the_zip_signature_needs_a_zip(clamd: Clamd) -> None:
    hits, found = run_check(av_config(clamd.unix_spec), message_with(("readme.txt", "text/plain", ZIP_MARKER)))
    assert hits == [] and found == {}


def test_identical_attachments_are_sent_once_and_names_are_merged(clamd: Clamd) -> None:
    eicar_zip = zip_with("eicar.com", EICAR)
    raw = message_with(
        ("a.com", "application/octet-stream", EICAR),
        ("b.com", "application/octet-stream", EICAR),
        ("c.zip", "application/zip", eicar_zip),
        ("d.zip", "application/zip", marker_zip()),
    )
    hits, found = run_check(av_config(clamd.tcp_spec), raw)
    detail = only_hit(hits, "AV_VIRUS").detail
    assert "b.com" not in detail  # same bytes as a.com
    assert "part 2 (a.com)" in detail and "part 4 (c.zip)" in detail and "part 5 (d.zip)" in detail
    names = found["av"].split(", ")
    assert f"{ZIP_NAME}.UNOFFICIAL" in names and len(names) == len(set(names))
    assert all(n.startswith(("Eicar", ZIP_NAME)) for n in names)


def test_clean_message_and_clean_attachments(clamd: Clamd) -> None:
    raw = message_with(
        ("a.bin", "application/octet-stream", bytes(range(256)) * 10),
        ("b.zip", "application/zip", zip_with("x.txt", b"nothing to see")),
    )
    assert run_check(av_config(clamd.unix_spec), raw) == ([], {})


def test_disabled_sends_nothing(tmp_path: Path) -> None:
    cfg = dataclasses.replace(av_config(str(tmp_path / "no.sock")), antivirus=offline_config().antivirus)
    assert run_check(cfg, plain_message(EICAR)) == ([], {})


# -- failures: never a silent pass -----------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
def test_missing_unix_socket(tmp_path: Path, on_error: str) -> None:
    hits, found = run_check(av_config(str(tmp_path / "clamd.sock"), on_error=on_error), plain_message(EICAR))
    detail = only_hit(hits, "AV_ERROR").detail
    assert "unreachable" in detail and "No such file" in detail
    assert found == {"av_error": detail, "av_on_error": on_error}


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
def test_closed_tcp_port(on_error: str) -> None:
    spec = f"127.0.0.1:{free_port()}"
    hits, found = run_check(av_config(spec, on_error=on_error), plain_message(b"hello"))
    detail = only_hit(hits, "AV_ERROR").detail
    assert spec in detail and "refused" in detail
    assert found["av_on_error"] == on_error


def test_clamd_stopped_then_back(make_clamd: MakeClamd) -> None:
    server = make_clamd()
    cfg = av_config(server.tcp_spec)
    assert only_hit(run_check(cfg, plain_message(EICAR))[0], "AV_VIRUS")
    server.stop()
    assert only_hit(run_check(cfg, plain_message(EICAR))[0], "AV_ERROR")
    server.start()
    assert only_hit(run_check(cfg, plain_message(EICAR))[0], "AV_VIRUS")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_frozen_clamd_times_out_on_time(make_clamd: MakeClamd, transport: str) -> None:
    server = make_clamd()
    spec = server.unix_spec if transport == "unix" else server.tcp_spec
    cfg = av_config(spec, timeout=0.5, on_error="continue")
    # The message and 11 attachments: 12 streams, which share the one 0.5 s limit.
    raw = message_with(*((f"{n}.bin", "application/octet-stream", b"%d" % n * 1000) for n in range(11)))
    with server.paused():
        started = time.monotonic()
        hits, found = run_check(cfg, raw)
        elapsed = time.monotonic() - started
    # It waited out the limit; the upper bound is 10x the limit, room for a loaded machine, yet
    # below the 6 s that 12 streams given 0.5 s each one after another would take.
    assert 0.5 <= elapsed < 10 * 0.5, elapsed
    detail = only_hit(hits, "AV_ERROR").detail
    assert detail == f"message: clamd at {spec} did not answer within 0.5s (and 11 more)"
    assert found["av_on_error"] == "continue"
    # Thawed, it answers the next message at once.
    assert only_hit(run_check(cfg, plain_message(EICAR))[0], "AV_VIRUS")


def test_waiting_for_clamd_does_not_block_the_event_loop(make_clamd: MakeClamd) -> None:
    server = make_clamd()
    uri_parser = UriParser()
    check = AntivirusCheck(CheckSetup(config=av_config(server.unix_spec, timeout=0.5), uri_parser=uri_parser))
    scan = Scan(ctx=ScanContext(), uri_parser=uri_parser)
    scan.msg = parse_message(plain_message(b"hello"), uri_parser=uri_parser)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> Sequence[Hit]:
        ticker = asyncio.create_task(tick())
        try:
            return await check.run(scan)
        finally:
            ticker.cancel()

    with server.paused():
        hits = asyncio.run(main())
    assert only_hit(hits, "AV_ERROR") and ticks >= 25


def test_the_scan_deadline_caps_the_timeout(clamd: Clamd, make_clamd: MakeClamd) -> None:
    server = make_clamd()
    with server.paused():
        started = time.monotonic()
        hits, _ = run_check(av_config(server.unix_spec, timeout=30.0), plain_message(b"x"), deadline=started + 0.6)
        elapsed = time.monotonic() - started
    # The limit it reports (under a second, not the 30 s timeout) shows the deadline capped it;
    # the elapsed bound is only a hang guard, half the timeout.
    assert re.search(r"did not answer within 0\.\d+s$", only_hit(hits, "AV_ERROR").detail)
    assert elapsed < 15.0, elapsed
    # No time left at all: no connection is tried.
    hits, _ = run_check(av_config(clamd.unix_spec), plain_message(EICAR), deadline=time.monotonic())
    assert only_hit(hits, "AV_ERROR").detail == "no time left before the scan deadline"


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
def test_message_over_max_size_is_not_sent(tmp_path: Path, on_error: str) -> None:
    # The socket does not exist: the verdict comes before any connection.
    cfg = av_config(str(tmp_path / "never.sock"), max_size=1024, on_error=on_error)
    raw = plain_message(EICAR + b"\n" + b"x" * 2000)
    hits, found = run_check(cfg, raw)
    assert only_hit(hits, "AV_ERROR").detail == f"message too big to scan ({len(raw)} bytes > max_size 1024)"
    assert found["av_on_error"] == on_error
    assert run_check(cfg, plain_message(b"small"))[0][0].detail.startswith("message: clamd at ")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_clamd_size_limit_is_reported_with_clamds_reason(make_clamd: MakeClamd, transport: str) -> None:
    server = make_clamd(stream_max_length="1M")
    spec = server.unix_spec if transport == "unix" else server.tcp_spec
    cfg = av_config(spec, max_size=16 * 1024 * 1024, scan_attachments=False)
    raw = plain_message(b"y" * (3 * 1024 * 1024) + EICAR)
    hits, found = run_check(cfg, raw)
    detail = only_hit(hits, "AV_ERROR").detail
    assert detail == "message: clamd: INSTREAM size limit exceeded."
    assert found["av_on_error"] == "tempfail"
    assert server.ping()  # clamd itself is fine


def test_virus_wins_over_a_failed_part(make_clamd: MakeClamd) -> None:
    server = make_clamd(stream_max_length="1M")
    big = bytes(range(256)) * 5000  # 1.2M decoded: over clamd's limit on its own, as is the message
    raw = message_with(("eicar.com", "application/octet-stream", EICAR), ("big.bin", "application/octet-stream", big))
    hits, found = run_check(av_config(server.tcp_spec, max_size=4 * 1024 * 1024), raw)
    assert only_hit(hits, "AV_VIRUS").detail.endswith(" in part 2 (eicar.com)")
    assert "av_error" not in found and found["av_action"] == "reject"


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "address"),
    [("/run/clamav/clamd.ctl", "/run/clamav/clamd.ctl"), ("127.0.0.1:3310", ("127.0.0.1", 3310)),
     ("[::1]:3310", ("::1", 3310)), ("clamav.internal:3310", ("clamav.internal", 3310))],
)  # fmt: skip
def test_clamd_address(spec: str, address: object) -> None:
    assert clamd_address(spec) == address


@pytest.mark.parametrize("spec", ["clamd.sock", "run/clamd.sock", "127.0.0.1", "127.0.0.1:0", "host:99999", ":3310"])
def test_bad_clamd_address_stops_loading(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "filterd.yaml"
    path.write_text(f"antivirus:\n  clamd: '{spec}'\n")
    with pytest.raises(ConfigError, match="antivirus.clamd: expected"):
        load_config(path)


# -- the fixture's database is real to clamd's own client ------------------------------------------


def test_clamdscan_agrees_with_the_fixture_database(clamd: Clamd, tmp_path: Path) -> None:
    samples = {
        "eicar.com": EICAR,
        "report.zip": marker_zip(),
        "marker.txt": ZIP_MARKER,  # the zip signature is for zips only
        "clean.txt": b"nothing to see\n",
    }
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
    streamed = clamd.clamdscan("--stream", *(str(tmp_path / n) for n in samples))
    assert streamed.returncode == 1, streamed  # 1: something found
    lines = dict(line.rsplit(": ", 1) for line in streamed.stdout.splitlines())
    assert lines[str(tmp_path / "eicar.com")].startswith("Eicar-Test-")
    assert lines[str(tmp_path / "report.zip")] == f"{ZIP_NAME}.UNOFFICIAL FOUND"
    assert lines[str(tmp_path / "marker.txt")] == "OK"
    assert lines[str(tmp_path / "clean.txt")] == "OK"
    # By path with every match reported: both EICAR signatures (hash and string) load.
    every = clamd.clamdscan("--allmatch", str(tmp_path / "eicar.com"))
    assert f"{EICAR_HASH_NAME}.UNOFFICIAL FOUND" in every.stdout
    assert f"{EICAR_STRING_NAME}.UNOFFICIAL FOUND" in every.stdout
