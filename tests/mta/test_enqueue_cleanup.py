"""`Queue.enqueue` failing part-way leaves nothing behind: an envelope that cannot be encoded (a
milter's sender with undecodable bytes) is a QueueError before anything is written, and a
failure after writing began removes the temporary and renamed files before it propagates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from filterd.errors import QueueError
from filterd.mta.queue import STATES, Envelope, Queue, Recipient

DATA = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\n"


def _left(q: Queue) -> dict[str, list[str]]:
    """The non-empty directories of the queue and what they hold."""
    found = {d: sorted(os.listdir(q.root / d)) for d in ("tmp", "data", "corrupt", *STATES)}
    return {d: names for d, names in found.items() if names}


def test_a_sender_that_cannot_be_encoded_is_a_queue_error_and_writes_nothing(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    # What smtpd makes of a milter's CHGFROM with invalid UTF-8: surrogate escapes.
    sender = b"caf\xe9@example.org".decode("utf-8", "surrogateescape")
    with pytest.raises(QueueError, match=r"sender address 'caf\\udce9@example.org' is not valid UTF-8"):
        q.enqueue(Envelope(sender, [Recipient("b@example.net")]), DATA)
    assert _left(q) == {}
    assert q.recover().tmp_removed == 0


def test_a_recipient_that_cannot_be_encoded_is_named(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    bad = b"b\xff@example.net".decode("utf-8", "surrogateescape")
    with pytest.raises(QueueError, match="recipient address .* is not valid UTF-8"):
        q.enqueue(Envelope("a@example.org", [Recipient("ok@example.net"), Recipient(bad)]), DATA)
    assert _left(q) == {}


def test_a_failed_envelope_write_removes_the_data_already_written(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.new_id()
    (q.tmp / f"{qid}.env").mkdir()  # the envelope's temporary file cannot be created
    with pytest.raises(FileExistsError):
        q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), DATA, qid=qid)
    assert _left(q) == {"tmp": [f"{qid}.env"]}  # only the obstacle, which enqueue did not make


def test_a_failed_envelope_rename_removes_the_renamed_data_too(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    (q.root / "hold").rmdir()
    (q.root / "hold").write_bytes(b"")  # not a directory: the rename into it fails
    with pytest.raises(NotADirectoryError):
        q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), DATA, state="hold")
    (q.root / "hold").unlink()
    q = Queue(tmp_path)
    assert _left(q) == {}
    qid = q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), DATA, state="hold")
    assert q.load(qid)[1].read_bytes() == DATA


def test_an_id_in_use_leaves_the_other_message_and_no_temporary_files(tmp_path: Path) -> None:
    q = Queue(tmp_path)
    qid = q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), b"first")
    with pytest.raises(QueueError, match="already in use"):
        q.enqueue(Envelope("a@example.org", [Recipient("c@example.net")]), DATA, qid=qid)
    assert _left(q) == {"data": [qid], "incoming": [qid]}
    assert q.load(qid)[1].read_bytes() == b"first"


class _Failing(Queue):
    """Fails (an exception, not a crash) when enqueue reaches the step ``fail_at``."""

    fail_at = ""

    def _step(self, name: str) -> None:
        if name == self.fail_at:
            raise OSError(28, f"No space left on device (at {name})")


@pytest.mark.parametrize("step", ["data-written", "envelope-written", "data-renamed"])
def test_a_failure_at_any_step_before_the_envelope_rename_leaves_nothing(tmp_path: Path, step: str) -> None:
    q = _Failing(tmp_path)
    q.fail_at = step
    with pytest.raises(OSError, match="No space left"):
        q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), DATA)
    assert _left(q) == {}


def test_after_the_envelope_rename_the_message_stays(tmp_path: Path) -> None:
    q = _Failing(tmp_path)
    q.fail_at = "envelope-renamed"  # the directory fsync's turn: the message exists already
    with pytest.raises(OSError, match="No space left"):
        q.enqueue(Envelope("a@example.org", [Recipient("b@example.net")]), DATA)
    [qid] = q.ids("incoming")
    assert q.load(qid)[1].read_bytes() == DATA and not os.listdir(q.tmp)
