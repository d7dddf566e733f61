"""HDR_AR_SPF_FAIL / HDR_AR_DMARC_FAIL: what our own border server recorded in the
Authentication-Results fields a message arrives with. Only fields under our authserv-id
(``auth.authserv_id``) count; another host's verdict (a mailing list that broke SPF) is no
evidence of ours. The shipped rule set and checks, network off: these rules need no DNS.
"""

from __future__ import annotations

import dataclasses

import pytest

from filterd.engine.engine import Engine
from tests.conftest import offline_config

OURS = "mx.local.test"
HEAD = (
    b"Received: from mail.sender.example (mail.sender.example [192.0.2.10])\n"
    b"\tby mx.local.test (Postfix) with ESMTP id 4AB12\n"
    b"\tfor <dana@local.test>; Mon, 12 Jan 2026 10:00:05 +0000\n"
    b"From: Alex Sender <alex@sender.example>\n"
    b"To: Dana <dana@local.test>\n"
    b"Subject: minutes\n"
    b"Date: Mon, 12 Jan 2026 10:00:00 +0000\n"
    b"Message-ID: <abc123@sender.example>\n"
)
BODY = b"\nThe minutes of Monday's meeting are below.\n"
RULES = {"HDR_AR_SPF_FAIL", "HDR_AR_DMARC_FAIL"}


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = offline_config()
    return Engine.load(dataclasses.replace(config, auth=dataclasses.replace(config.auth, authserv_id=OURS)))


def fired(engine: Engine, *fields: bytes) -> set[str]:
    result = engine.scan_sync(HEAD + b"".join(fields) + BODY)
    return {h.rule for h in result.hits} & RULES


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"Authentication-Results: mx.local.test; spf=fail smtp.mailfrom=sender.example\n", {"HDR_AR_SPF_FAIL"}),
        (b"Authentication-Results: mx.local.test; spf=softfail smtp.mailfrom=sender.example\n", {"HDR_AR_SPF_FAIL"}),
        (
            b"Authentication-Results: mx.local.test;\n\tspf=fail smtp.mailfrom=sender.example;\n\tdkim=none;\n"
            b"\tdmarc=fail (p=reject dis=reject) header.from=sender.example\n",
            RULES,
        ),
        (
            b"Authentication-Results: (border) MX.Local.Test. 1; dmarc=fail header.from=sender.example\n",
            {"HDR_AR_DMARC_FAIL"},
        ),
        (b"Authentication-Results: mx.local.test; spf=pass smtp.mailfrom=sender.example; dmarc=pass\n", set()),
    ],
    ids=["spf-fail", "spf-softfail", "both-folded", "case-comment-version", "pass"],
)
def test_fields_with_our_authserv_id_fire(engine: Engine, field: bytes, expected: set[str]) -> None:
    assert fired(engine, field) == expected


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: lists.example.org; spf=fail smtp.mailfrom=sender.example; dmarc=fail\n",
        b"Authentication-Results: mx.local.test.evil.example; spf=softfail; dmarc=fail\n",
        b"Authentication-Results: evil-mx.local.test; spf=fail; dmarc=fail\n",
    ],
    ids=["list-server", "our-id-as-prefix", "our-id-as-suffix"],
)
def test_fields_with_another_authserv_id_do_not_fire(engine: Engine, field: bytes) -> None:
    assert fired(engine, field) == set()


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: ; spf=fail; dmarc=fail\n",
        b"Authentication-Results: (mx.local.test; spf=fail; dmarc=fail\n",  # the comment never ends
        b'Authentication-Results: "mx.local.test; spf=fail; dmarc=fail\n',  # nor the quoted-string
        b"Authentication-Results: (only a comment)\n",
    ],
    ids=["empty", "open-comment", "open-quote", "comment-only"],
)
def test_a_field_without_a_parseable_authserv_id_does_not_fire(engine: Engine, field: bytes) -> None:
    assert fired(engine, field) == set()


def test_only_our_field_is_read_when_several_arrive(engine: Engine) -> None:
    list_server = b"Authentication-Results: lists.example.org; spf=fail smtp.mailfrom=sender.example; dmarc=fail\n"
    ours_pass = b"Authentication-Results: mx.local.test; spf=pass smtp.mailfrom=lists.example.org; dmarc=pass\n"
    ours_fail = b"Authentication-Results: mx.local.test; spf=softfail smtp.mailfrom=lists.example.org\n"
    assert fired(engine, ours_pass, list_server) == set()
    assert fired(engine, list_server, ours_fail) == {"HDR_AR_SPF_FAIL"}
    hits = {h.rule: h for h in engine.scan_sync(HEAD + list_server + ours_fail + BODY).hits}
    assert hits["HDR_AR_SPF_FAIL"].detail == "spf=softfail", hits["HDR_AR_SPF_FAIL"]
