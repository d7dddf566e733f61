"""`filterd mta queue list|show|flush|delete`, with and without a running MTA holding the queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from filterd.cli import main
from filterd.mta.queue import Envelope, Queue, Recipient
from tests.mta.qmgr_helpers import MESSAGE


def _queue(tmp_path: Path) -> tuple[Queue, dict[str, str]]:
    queue = Queue(tmp_path / "queue")
    ids = {
        "new": queue.enqueue(Envelope("alice@example.org", [Recipient("bob@example.net")]), MESSAGE),
        "deferred": queue.enqueue(
            Envelope(
                "carol@example.org",
                [
                    Recipient(
                        "dave@example.net",
                        attempts=2,
                        last_error="4.4.1 connect to mx.example.net: refused",
                        next_attempt=time.time() + 600,
                        last_status="4.4.1",
                    ),
                    Recipient("erin@example.net", "delivered", 1, last_reply_code=250, last_reply_status="2.0.0"),
                    Recipient(
                        "gina@example.net",
                        attempts=1,
                        last_error="4.2.1 host mx said: 450 4.2.1 busy",
                        last_status="4.2.1",
                        last_reply_code=450,
                        last_reply_status="4.2.1",
                    ),
                    Recipient("hal@example.net", attempts=1, last_error="5.0.0 said: 451 odd", last_reply_code=451),
                ],
            ),
            MESSAGE,
            state="deferred",
        ),  # fmt: skip
        "held": queue.enqueue(
            Envelope("", [Recipient("frank@example.org")], hold_reason="quarantined by the filter"),
            MESSAGE,
            state="hold",
        ),
    }
    return queue, ids


def test_list_an_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mta", "queue", "list", "--state-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"
    assert not (tmp_path / "none").exists()  # looking creates nothing


def test_list_shows_messages_like_mailq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ids = _queue(tmp_path)
    assert main(["mta", "queue", "list", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-Queue ID-")
    assert f"{ids['new']} " in out and "alice@example.org" in out and "bob@example.net" in out
    assert "(4.4.1 connect to mx.example.net: refused)" in out
    assert "erin@example.net  [delivered, last reply 250 2.0.0]" in out
    assert "(4.2.1 host mx said: 450 4.2.1 busy)" in out and "gina@example.net  [last reply 450 4.2.1]" in out
    assert "hal@example.net  [last reply 451]" in out
    assert "dave@example.net\n" in out  # no server reply: nothing to show
    assert f"{ids['held']}!" in out and "MAILER-DAEMON" in out and "(held: quarantined by the filter)" in out
    assert out.rstrip().endswith("in 3 Requests.")


def test_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ids = _queue(tmp_path)
    assert main(["mta", "queue", "list", "--json", "--state-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_id = {row["id"]: row for row in rows}
    assert set(by_id) == set(ids.values())
    deferred = by_id[ids["deferred"]]
    assert deferred["state"] == "deferred" and deferred["sender"] == "carol@example.org"
    assert [r["status"] for r in deferred["recipients"]] == ["pending", "delivered", "pending", "pending"]
    assert deferred["recipients"][0]["attempts"] == 2
    replies = [(r["last_status"], r["last_reply_code"], r["last_reply_status"]) for r in deferred["recipients"]]
    assert replies == [("4.4.1", 0, ""), ("", 250, "2.0.0"), ("4.2.1", 450, "4.2.1"), ("5.0.0", 451, "")]


def test_list_json_of_an_envelope_from_before_last_status_and_replies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue, ids = _queue(tmp_path)
    path = queue.root / "deferred" / ids["deferred"]
    obj = json.loads(path.read_bytes())
    for r in obj["rcpts"]:
        for key in ("last_status", "last_reply_code", "last_reply_status"):
            del r[key]
    path.write_text(json.dumps(obj))
    assert main(["mta", "queue", "list", "--json", "--state-dir", str(tmp_path)]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if ids["deferred"] in line]
    # last_status from the status word that starts last_error; "" when it starts with none
    replies = [(r["last_status"], r["last_reply_code"], r["last_reply_status"]) for r in row["recipients"]]
    assert replies == [("4.4.1", 0, ""), ("", 0, ""), ("4.2.1", 0, ""), ("5.0.0", 0, "")]
    assert main(["mta", "queue", "list", "--state-dir", str(tmp_path)]) == 0
    assert "last reply" not in capsys.readouterr().out


def test_show_prints_envelope_and_header_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ids = _queue(tmp_path)
    assert main(["mta", "queue", "show", ids["deferred"], "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"id:        {ids['deferred']} (deferred)" in text
    assert "recipient: <dave@example.net> pending, 2 attempts, next " in text
    assert "4.4.1 connect to mx.example.net: refused" in text
    assert "recipient: <gina@example.net> pending, 1 attempts" in text and "last reply 450 4.2.1" in text
    assert "Subject: hello" in text and "Hi Bob." not in text


def test_show_unknown_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _queue(tmp_path)
    assert main(["mta", "queue", "show", "18C2F3A4B5C6D7-3FA91C", "--state-dir", str(tmp_path)]) == 1
    assert "no message" in capsys.readouterr().err


def test_flush_without_a_running_mta_moves_deferred_to_incoming(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue, ids = _queue(tmp_path)
    assert main(["mta", "queue", "flush", "--state-dir", str(tmp_path)]) == 0
    assert queue.state_of(ids["deferred"]) == "incoming" and queue.state_of(ids["held"]) == "hold"
    assert "1 deferred message will be tried" in capsys.readouterr().out


def test_delete_without_a_running_mta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue, ids = _queue(tmp_path)
    assert main(["mta", "queue", "delete", ids["new"], "--state-dir", str(tmp_path)]) == 0
    assert queue.state_of(ids["new"]) is None and not (queue.data / ids["new"]).exists()
    assert main(["mta", "queue", "delete", ids["new"], "--state-dir", str(tmp_path)]) == 1
    assert main(["mta", "queue", "delete", "ALL", "--state-dir", str(tmp_path)]) == 0
    assert not any(queue.ids(s) for s in ("incoming", "deferred", "hold", "active"))
    assert main(["mta", "queue", "delete", "../../etc/passwd", "--state-dir", str(tmp_path)]) == 1
    assert "not a queue id" in capsys.readouterr().err


def test_with_a_running_mta_flush_and_delete_become_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue, ids = _queue(tmp_path)
    with queue.lock():  # as filterd mta holds it
        assert main(["mta", "queue", "flush", "--state-dir", str(tmp_path)]) == 0
        assert main(["mta", "queue", "delete", ids["new"], "--state-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in (queue.root / "control").iterdir()) == ["delete-" + ids["new"], "flush"]
    assert queue.state_of(ids["deferred"]) == "deferred" and queue.state_of(ids["new"]) == "incoming"
    assert capsys.readouterr().out.count("requested from the running queue manager") == 2
