"""The milter against Debian's miltertest (a libmilter-era MTA simulator driven by Lua scripts),
and the small pieces of the milter service on their own.

Each script talks to the milter socket of one `filterd daemon` shared by the module, steps through
a whole SMTP transaction (negotiate, connect, helo, mail, rcpt, headers, eoh, body, eom) and
checks what the filter answered; a failed check prints ``FAIL: ...`` and exits 1.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from filterd.config import load_config
from filterd.daemon.milter_service import header_fields, user_for
from filterd.errors import ConfigError
from tests.daemon_fixture import Daemon, need_binary, start_daemon

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
MAX_SIZE = 2048


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("milter")
    config = f"milter: {{max_size: {MAX_SIZE}, reject_message: 'Spam refused, threshold {{required:.1f}}'}}\n"
    d = start_daemon(tmp, "--milter-listen", "127.0.0.1:0", config=config, workers=1, metrics=False)
    yield d
    assert d.stop() == 0, d.log()


def run_lua(daemon: Daemon, tmp_path: Path, body: str, rcpt: str = "bob@example.org") -> str:
    port = daemon.milter_port()
    script = tmp_path / "test.lua"
    script.write_text(
        'function check(ok, what) if not ok then print("FAIL: " .. what); os.exit(1) end end\n'
        f'conn = mt.connect("inet:{port}@127.0.0.1")\n'
        'check(conn ~= nil, "connect")\n'
        'check(mt.conninfo(conn, "mx.example.net", "192.0.2.10") == nil, "conninfo")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "conninfo reply")\n'
        'check(mt.helo(conn, "client.example.net") == nil, "helo")\n'
        'mt.macro(conn, SMFIC_MAIL, "i", "4ABC123", "{auth_authen}", "")\n'
        'check(mt.mailfrom(conn, "<alice@example.net>") == nil, "mail")\n'
        f'check(mt.rcptto(conn, "<{rcpt}>") == nil, "rcpt")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "rcpt reply")\n'
        'check(mt.header(conn, "From", "Alice <alice@example.net>") == nil, "header From")\n'
        'check(mt.header(conn, "To", "bob@example.org") == nil, "header To")\n'
        'check(mt.header(conn, "Subject", "Lunch") == nil, "header Subject")\n'
        'check(mt.header(conn, "Date", "Mon, 05 Jan 2026 10:00:00 +0000") == nil, "header Date")\n'
        'check(mt.header(conn, "Message-ID", "<lunch.1@example.net>") == nil, "header Message-ID")\n'
        'check(mt.header(conn, "X-Spam-Flag", "YES") == nil, "header X-Spam-Flag")\n'
        'check(mt.header(conn, "X-Filterd-Skipped", "forged") == nil, "header X-Filterd-Skipped")\n'
        'check(mt.eoh(conn) == nil, "eoh")\n' + body + 'mt.disconnect(conn)\nprint("PASS")\n'
    )
    proc = subprocess.run([need_binary("miltertest"), "-s", str(script)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "PASS" in proc.stdout, (proc.stdout, proc.stderr, daemon.log()[-3000:])
    return proc.stdout


def test_miltertest_gtube_is_refused_at_end_of_message(daemon: Daemon, tmp_path: Path) -> None:
    run_lua(daemon, tmp_path, (
        f'check(mt.bodystring(conn, "Hello,\\r\\n{GTUBE}\\r\\n") == nil, "body")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "body reply")\n'
        'check(mt.eom(conn) == nil, "eom")\n'
        'check(mt.getreply(conn) == SMFIR_REPLYCODE, "eom reply is a reply code")\n'
        'check(mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "Spam refused, threshold 5.0"), "550 5.7.1")\n'
    ))  # fmt: skip
    daemon.wait_for_log(
        r"milter qid=4ABC123 client=192\.0\.2\.10 from=<alice@example\.net> "
        r"rcpt=<bob@example\.org> score=10\d\d\.\d/5\.0 verdict=rejected"
    )


def test_miltertest_clean_message_gets_headers(daemon: Daemon, tmp_path: Path) -> None:
    run_lua(daemon, tmp_path, (
        'check(mt.bodystring(conn, "Friday at noon?\\r\\n") == nil, "body")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "body reply")\n'
        'check(mt.eom(conn) == nil, "eom")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "eom reply")\n'
        'check(mt.eom_check(conn, MT_HDRADD, "X-Spam-Checker-Version"), "X-Spam-Checker-Version added")\n'
        'check(mt.eom_check(conn, MT_HDRADD, "X-Spam-Status"), "X-Spam-Status added")\n'
        'check(string.find(mt.getheader(conn, "X-Spam-Status", 0), "^No, score=") ~= nil, "status No")\n'
        'check(not mt.eom_check(conn, MT_HDRADD, "X-Spam-Flag"), "no X-Spam-Flag added")\n'
        'check(mt.eom_check(conn, MT_HDRDELETE, "X-Spam-Flag"), "the forged X-Spam-Flag deleted")\n'
        'check(mt.eom_check(conn, MT_HDRDELETE, "X-Filterd-Skipped"), "the forged X-Filterd-Skipped deleted")\n'
        'check(not mt.eom_check(conn, MT_HDRADD, "X-Filterd-Skipped"), "no X-Filterd-Skipped added")\n'
    ))  # fmt: skip


def test_miltertest_body_past_max_size_is_skipped_and_the_rest_scanned(daemon: Daemon, tmp_path: Path) -> None:
    chunk = "x" * 60 + "\\r\\n"
    run_lua(daemon, tmp_path, (
        f'check(mt.bodystring(conn, "{GTUBE}\\r\\n") == nil, "body 1")\n'
        'check(mt.getreply(conn) == SMFIR_CONTINUE, "body 1 reply")\n'
        f'check(mt.bodystring(conn, string.rep("{chunk}", {MAX_SIZE // 60 + 1})) == nil, "body 2")\n'
        'check(mt.getreply(conn) == SMFIR_SKIP, "body 2 reply is skip")\n'
        'check(mt.eom(conn) == nil, "eom")\n'
        'check(mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "Spam refused, threshold 5.0"), "550 5.7.1")\n'
    ))  # fmt: skip
    daemon.wait_for_log(r"verdict=rejected .* size=2048 truncated")


# -- pieces --------------------------------------------------------------------------------------


def test_header_fields_unfold_into_name_value_pairs() -> None:
    text = "X-Spam-Level: \nX-Spam-Status: Yes, score=7.1\n\ttests=A,B\nX-Spam-Report: \n\t* 1.0 A\n\t* 6.1 B\n"
    assert header_fields(text) == [
        ("X-Spam-Level", ""),
        ("X-Spam-Status", "Yes, score=7.1\n\ttests=A,B"),
        ("X-Spam-Report", "\n\t* 1.0 A\n\t* 6.1 B"),
    ]


def test_user_for_recipient() -> None:
    assert user_for("bob@example.org", "local_part") == "bob"
    assert user_for("bob@example.org", "address") == "bob@example.org"
    assert user_for("bob@example.org", "none") == ""
    assert user_for("postmaster", "local_part") == "postmaster"


def test_reject_score_below_required_score_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "filterd.yaml"
    cfg.write_text("scoring:\n  required_score: 8\nmilter:\n  reject_score: 6\n")
    with pytest.raises(ConfigError, match=r"milter: reject_score: expected a number >= scoring.required_score"):
        load_config(str(cfg))
    cfg.write_text("milter:\n  reject_message: 'scored {points}'\n")
    with pytest.raises(ConfigError, match=r"milter.reject_message: expected a template"):
        load_config(str(cfg))


def test_reload_lets_an_open_milter_conversation_finish(tmp_path: Path) -> None:
    def packet(command: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", 1 + len(data)) + command + data

    def reply(sock: socket.socket) -> bytes:
        head = b""
        while len(head) < 4:
            head += sock.recv(4 - len(head))
        (length,) = struct.unpack(">I", head)
        data = b""
        while len(data) < length:
            data += sock.recv(length - len(data))
        return data

    d = start_daemon(tmp_path, "--milter-listen", "127.0.0.1:0", workers=1, metrics=False)
    try:
        port = d.milter_port()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
            assert reply(sock)[:1] == b"O"
            sock.sendall(
                packet(b"C", b"mx.example.net\x004" + struct.pack(">H", 4321) + b"192.0.2.10\x00")
                + packet(b"M", b"<alice@example.net>\x00")
                + packet(b"R", b"<bob@example.org>\x00")
            )
            d.signal(signal.SIGHUP)
            d.wait_for_log(r"reload done: generation 2 serving", timeout=120)
            # The old worker drains: this conversation still gets its verdict.
            sock.sendall(packet(b"L", b"Subject\x00test\x00") + packet(b"N") + packet(b"B", f"{GTUBE}\r\n".encode()))
            assert reply(sock) == b"c"
            sock.sendall(packet(b"E"))
            final = reply(sock)
            assert final.startswith(b"y550 5.7.1 Message scored ") and final.endswith(b", rejected as spam\x00")
            sock.sendall(packet(b"Q"))
        d.wait_for_log(r"worker \d+ \(generation 1\) exited", timeout=120)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # the new generation serves
            sock.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
            assert reply(sock)[:1] == b"O"
    finally:
        assert d.stop() == 0, d.log()


def test_miltertest_spam_subject_is_rewritten_as_by_spamd(tmp_path: Path) -> None:
    """scoring.rewrite_subject through the milter: the tag in front and X-Spam-Prev-Subject, as
    spamd's PROCESS writes them (one helper, `markup.rewritten_subject`)."""
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    (prefs / "paranoid.yaml").write_text("required_score: -50\n")  # everything is spam to them
    daemon = start_daemon(
        tmp_path, "--milter-listen", "127.0.0.1:0", "--user-prefs", str(prefs),
        config="scoring: {rewrite_subject: '[SPAM]'}\n", workers=1, metrics=False,
    )  # fmt: skip
    try:
        run_lua(daemon, tmp_path, (
            'check(mt.bodystring(conn, "Lunch on Friday?\\r\\n") == nil, "body")\n'
            'check(mt.eom(conn) == nil, "eom")\n'
            'check(mt.eom_check(conn, MT_HDRCHANGE, "Subject", "[SPAM] Lunch"), "Subject tagged")\n'
            'check(mt.eom_check(conn, MT_HDRADD, "X-Spam-Prev-Subject", "Lunch"), "previous Subject kept")\n'
            'check(mt.eom_check(conn, MT_HDRADD, "X-Spam-Flag", "YES"), "X-Spam-Flag")\n'
        ), rcpt="paranoid@example.org")  # fmt: skip
    finally:
        assert daemon.stop() == 0, daemon.log()
