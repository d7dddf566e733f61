"""Unit tests of the built-in check plugins on small hand-built messages.

Each test shows a rule firing on a message built to show the trick, and not firing on a
near miss that differs only in that trick.
"""

from __future__ import annotations

import email.utils
import time

import pytest

from filterd.engine.checks import builtin_checks
from filterd.engine.checks.headers import HeaderCheck, _epoch, _receipt_time
from filterd.engine.engine import Engine, Result
from filterd.engine.plugin import ScanContext
from filterd.engine.received import parse_received
from tests.conftest import offline_config

HEAD = (
    b"Received: from mail.sender.example (mail.sender.example [192.0.2.10])\n"
    b"\tby mx1.example.net (Postfix) with ESMTP id 4AB12\n"
    b"\tfor <dana@example.net>; Mon, 12 Jan 2026 10:00:05 +0000\n"
    b"From: Alex Sender <alex@sender.example>\n"
    b"To: Dana <dana@example.net>\n"
    b"Date: Mon, 12 Jan 2026 10:00:00 +0000\n"
    b"Message-ID: <abc123@sender.example>\n"
    b"MIME-Version: 1.0\n"
)
PLAIN = b"Content-Type: text/plain; charset=us-ascii\n"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(offline_config())


def scan(engine: Engine, raw: bytes) -> Result:
    return engine.scan_sync(raw)


def hits(engine: Engine, raw: bytes) -> set[str]:
    result = scan(engine, raw)
    return set(result.rule_names) | set(result.subrules)


def msg(
    headers: bytes = b"",
    body: bytes = b"Hello Dana,\n\nsee you on Tuesday.\n",
    *,
    ctype: bytes = PLAIN,
    head: bytes = HEAD,
) -> bytes:
    return head + headers + ctype + b"\n" + body


# --- registry ---------------------------------------------------------------------------------


def test_builtin_checks_declare_what_they_emit(engine: Engine) -> None:
    names = {c.name for c in engine.checks}
    assert {"headers", "mime", "html", "uri", "text"} <= names
    for check in engine.checks:
        assert type(check) in builtin_checks()
        for rule in check.emits:
            assert rule in engine.rules.info, rule


# --- headers ----------------------------------------------------------------------------------


def test_epoch_reads_usual_and_odd_dates() -> None:
    assert _epoch("Wed, 21 Aug 2002 08:33:03 -0400") == 1029933183.0
    assert _epoch("31 Dec 99 10:00:00 +0100") == 946630800.0
    assert _epoch("Mon, 1 Mar 2004 12:00 PST") == 1078171200.0
    assert _epoch("not a date at all") is None
    assert _epoch("Thu, 32 Aug 2002 10:00:00") is None


def test_date_far_in_future_fires_but_small_skew_does_not(engine: Engine) -> None:
    future = HEAD.replace(b"Date: Mon, 12 Jan 2026 10:00:00", b"Date: Mon, 12 Jan 2036 10:00:00")
    assert "HDR_DATE_FUTURE_2D" in hits(engine, msg(head=future))
    skewed = HEAD.replace(b"Date: Mon, 12 Jan 2026 10:00:00", b"Date: Mon, 12 Jan 2026 11:30:00")
    found = hits(engine, msg(head=skewed))
    assert not found & {"HDR_DATE_FUTURE_2D", "HDR_DATE_FUTURE_3H"}


NOW = 1_800_000_000.0  # Fri, 15 Jan 2027 08:00:00 +0000


def receipt(*received: str, client_ip: str = "") -> float | None:
    """The reference time the Date checks use for Received header values (top first)."""
    relays = [parse_received(value) for value in received]
    return _receipt_time(relays, [_epoch(r.date_text) if r.date_text else None for r in relays], client_ip, NOW)


OURS = "from client.example (unknown [192.0.2.10]) by mx.test (filterd 0.1.0) with ESMTP id Q1; {}"
SENDERS = "from laptop (laptop.example [198.51.100.7]) by smtp.example with ESMTPSA id 9; {}"


@pytest.mark.parametrize(
    ("date", "epoch"),
    [
        ("Mon, 12 Jan 2026 10:00:05 +0000", 1768212005.0),
        ("Mon, 12 Jan 2026 11:00:05 +0100 (CET)", 1768212005.0),  # Postfix's comment
        ("12 Jan 2026 05:00:05 -0500", 1768212005.0),  # no day name
        ("Mon, 12 Jan 26 02:00:05 PST", 1768212005.0),  # two-digit year, zone name
        ("Mon, 12 Jan 2026 10:00:05", 1768212005.0),  # no zone: UTC
        ("Mon,  12 Jan 2026 10:00:05 -0000", 1768212005.0),  # "unknown zone", doubled space
    ],
)
def test_receipt_time_is_the_top_received_date(date: str, epoch: float) -> None:
    # A stored message (no connection known): the top header is the receiving MTA's.
    assert receipt(OURS.format(date), SENDERS.format("Sun, 1 Jan 2023 00:00:00 +0000")) == epoch


def test_receipt_time_without_a_readable_received_date() -> None:
    # No Received date and no connection (an archived or hand-made message): no reference, no
    # Date check (as SpamAssassin); today's clock would call every archived message old.
    assert receipt() is None
    assert receipt(OURS.format("sometime")) is None
    assert receipt("from a (a [192.0.2.1]) by b with SMTP id 1") is None  # no date at all
    # the top one unreadable: the next one down is the newest date there is
    assert receipt(OURS.format("sometime"), SENDERS.format("12 Jan 2026 10:00:00 +0000")) == 1768212000.0


def test_receipt_time_when_the_connection_is_known() -> None:
    old = SENDERS.format("Mon, 12 Jan 2026 10:00:00 +0000")
    # Behind a milter (Postfix, Sendmail, filterd mta) the MTA's own header is not shown: the
    # message is being received now, whatever the sending side wrote.
    assert receipt(old, client_ip="192.0.2.10") == NOW
    assert receipt(client_ip="192.0.2.10") == NOW
    # The MTA's header for this connection is there (spamd with an IP header after the queue).
    assert receipt(OURS.format("Mon, 12 Jan 2026 10:00:05 +0000"), old, client_ip="192.0.2.10") == 1768212005.0
    assert receipt(OURS.format("sometime"), old, client_ip="192.0.2.10") == NOW
    v6 = "from c (unknown [IPv6:2001:db8::a]) by mx.test with ESMTP id Q2; Mon, 12 Jan 2026 10:00:05 +0000"
    assert receipt(v6, client_ip="2001:DB8:0::a") == 1768212005.0
    mapped = OURS.format("Mon, 12 Jan 2026 10:00:05 +0000")
    assert receipt(mapped, client_ip="::ffff:192.0.2.10") == 1768212005.0


def test_date_in_the_past_is_measured_from_receipt(engine: Engine) -> None:
    now = time.time()
    two_years = email.utils.formatdate(now - 730 * 86400).encode()
    upstream = b"Received: from a (a [198.51.100.7]) by smtp.example with ESMTP id 9; %s\n" % two_years
    head = upstream + b"From: alex@sender.example\nTo: dana@example.net\nDate: %s\n" % two_years
    raw = msg(head=head + b"Message-ID: <1@sender.example>\nMIME-Version: 1.0\n")
    # Read from a file, the top Received header is the receiving MTA's: Date is as old as receipt.
    assert not hits(engine, raw) & {"HDR_DATE_PAST_1Y", "HDR_DATE_PAST_4D"}
    # Scanned as it arrives over a milter, the sender's header is no reference: receipt is now.
    arriving = set(engine.scan_sync(raw, ScanContext(client_ip="192.0.2.10")).rule_names)
    assert "HDR_DATE_PAST_1Y" in arriving
    # No Received header: from a file nothing says when it arrived; over a milter, now.
    assert not hits(engine, raw.replace(upstream, b"")) & {"HDR_DATE_PAST_1Y", "HDR_DATE_PAST_4D"}
    arriving = set(engine.scan_sync(raw.replace(upstream, b""), ScanContext(client_ip="192.0.2.10")).rule_names)
    assert "HDR_DATE_PAST_1Y" in arriving


def test_unparseable_date(engine: Engine) -> None:
    bad = HEAD.replace(b"Date: Mon, 12 Jan 2026 10:00:00 +0000", b"Date: sometime soon")
    assert "HDR_DATE_UNPARSEABLE" in hits(engine, msg(head=bad))
    assert "HDR_DATE_UNPARSEABLE" not in hits(engine, msg())


def test_display_name_showing_another_address(engine: Engine) -> None:
    spoof = HEAD.replace(
        b"From: Alex Sender <alex@sender.example>", b'From: "billing@bank.example" <refunds@other.test>'
    )
    assert "HDR_FROM_NAME_OTHER_ADDR" in hits(engine, msg(head=spoof))
    same = HEAD.replace(
        b"From: Alex Sender <alex@sender.example>", b'From: "alex@sender.example" <alex@sender.example>'
    )
    assert "HDR_FROM_NAME_OTHER_ADDR" not in hits(engine, msg(head=same))


def test_free_mail_sender_replying_into_the_same_service(engine: Engine) -> None:
    free = HEAD.replace(b"From: Alex Sender <alex@sender.example>", b"From: Offers <deals4u@yahoo.com>")
    assert "HDR_FREEMAIL_REPLYTO_SAME" in hits(engine, msg(b"Reply-To: deals4u@yahoo.com\n", head=free))
    assert "HDR_FREEMAIL_REPLYTO_SAME" in hits(engine, msg(b"Reply-To: orders77@yahoo.com\n", head=free))
    # No Reply-To (webmail), or a Reply-To elsewhere (that is HDR_REPLYTO_FREEMAIL's or nobody's)
    assert "HDR_FREEMAIL_REPLYTO_SAME" not in hits(engine, msg(head=free))
    assert "HDR_FREEMAIL_REPLYTO_SAME" not in hits(engine, msg(b"Reply-To: list@lists.example\n", head=free))
    # A company sender with a Reply-To of its own domain is not free mail
    assert "HDR_FREEMAIL_REPLYTO_SAME" not in hits(engine, msg(b"Reply-To: alex@sender.example\n"))


def test_bulk_pitch_phrases(engine: Engine) -> None:
    cases = {
        "BODY_DEAR_SIR_LINE": (b"Dear Sir,\n\nWe are a bathtub manufacturer.\n", b"Dear Sir Humphrey,\nthanks.\n"),
        "BODY_MAKE_MONEY_ONLINE": (
            b"Start making extra money on the internet today.\n",
            b"They make money on the side by teaching.\n",
        ),
        "BODY_BUSINESS_OPPORTUNITY": (
            b"A ground floor opportunity like no other.\n",
            b"The workshop is an opportunity to meet.\n",
        ),
        "BODY_RECEIVING_BECAUSE": (
            b"You are receiving this email because you visited us.\n",
            b"Are you receiving my emails at all?\n",
        ),
        "BODY_REMOVE_INSTRUCTIONS": (
            b"Please reply to webmaster@x.example with 'remove' in the subject.\n",
            b"Remove the old cable first.\n",
        ),
        "BODY_OPT_IN_CLAIM": (
            b"This is a one-time mailing, so no removal is necessary.\n",
            b"Removal of the tree is necessary.\n",
        ),
    }
    for rule, (spammy, plain) in cases.items():
        assert rule in hits(engine, msg(body=spammy)), rule
        assert rule not in hits(engine, msg(body=plain)), rule


def test_reply_to_freemail_in_other_domain(engine: Engine) -> None:
    assert "HDR_REPLYTO_FREEMAIL" in hits(engine, msg(b"Reply-To: claims.office@gmail.com\n"))
    assert "HDR_REPLYTO_FREEMAIL" not in hits(engine, msg(b"Reply-To: help@sender.example\n"))


def test_helo_claiming_big_provider_without_matching_rdns(engine: Engine) -> None:
    forged = (
        b"Received: from mail-yw1-f50.google.com (unknown [203.0.113.88])\n"
        b"\tby mx1.example.net (Postfix) with ESMTP id 1; Mon, 12 Jan 2026 10:00:05 +0000\n"
    )
    genuine = (
        b"Received: from mail-yw1-f50.google.com (mail-yw1-f50.google.com [203.0.113.88])\n"
        b"\tby mx1.example.net (Postfix) with ESMTP id 1; Mon, 12 Jan 2026 10:00:05 +0000\n"
    )
    rest = HEAD.split(b"\n", 3)[3]
    assert "HDR_RCVD_HELO_PROVIDER_FORGED" in hits(engine, msg(head=forged + rest))
    assert "HDR_RCVD_HELO_PROVIDER_FORGED" not in hits(engine, msg(head=genuine + rest))


def test_border_hop_without_rdns_and_with_bare_word_helo(engine: Engine) -> None:
    rest = HEAD.split(b"\n", 3)[3]
    bot = (
        b"Received: from WIN-7Q2M0D8 (unknown [203.0.113.201])\n"
        b"\tby mx1.example.net (Postfix) with ESMTP id 2; Mon, 12 Jan 2026 10:00:05 +0000\n"
    )
    found = hits(engine, msg(head=bot + rest))
    assert {"HDR_RCVD_NO_RDNS", "HDR_RCVD_HELO_NO_DOT"} <= found
    # A bare-word HELO from a private address (a laptop inside the office) is normal.
    office = bot.replace(b"unknown [203.0.113.201]", b"unknown [10.20.3.4]")
    assert not hits(engine, msg(head=office + rest)) & {"HDR_RCVD_NO_RDNS", "HDR_RCVD_HELO_NO_DOT"}


def test_received_time_going_backwards(engine: Engine) -> None:
    chain = (
        b"Received: from relay.example.org (relay.example.org [198.51.100.9])\n"
        b"\tby mx1.example.net with ESMTP id 3; Mon, 12 Jan 2026 10:00:05 +0000\n"
        b"Received: from a.example.org (a.example.org [198.51.100.7])\n"
        b"\tby relay.example.org with ESMTP id 4; Mon, 12 Jan 2026 19:00:00 +0000\n"
    )
    rest = HEAD.split(b"\n", 3)[3]
    assert "HDR_RCVD_TIME_BACKWARDS" in hits(engine, msg(head=chain + rest))
    ordered = chain.replace(b"19:00:00", b"09:59:00")
    assert "HDR_RCVD_TIME_BACKWARDS" not in hits(engine, msg(head=ordered + rest))


def test_header_check_runs_at_headers_stage() -> None:
    from filterd.engine.plugin import Stage

    assert HeaderCheck.stage == Stage.HEADERS


# --- mime -------------------------------------------------------------------------------------


def test_double_extension_executable(engine: Engine) -> None:
    def with_attachment(name: bytes) -> bytes:
        body = (
            b"--b1\nContent-Type: text/plain\n\nPlease see the invoice.\n"
            b'--b1\nContent-Type: application/octet-stream; name="' + name + b'"\n'
            b"Content-Transfer-Encoding: base64\n"
            b'Content-Disposition: attachment; filename="' + name + b'"\n\nTVqQAAMAAAAEAAAA\n'
            b"--b1--\n"
        )
        return msg(body=body, ctype=b'Content-Type: multipart/mixed; boundary="b1"\n')

    found = hits(engine, with_attachment(b"invoice.pdf.exe"))
    assert {"MIME_EXEC_ATTACHMENT", "MIME_DOUBLE_EXTENSION"} <= found
    found = hits(engine, with_attachment(b"invoice.pdf"))
    assert not found & {"MIME_EXEC_ATTACHMENT", "MIME_DOUBLE_EXTENSION"}


def test_missing_closing_boundary(engine: Engine) -> None:
    body = b"--b1\nContent-Type: text/plain\n\nfirst part\n--b1\nContent-Type: text/plain\n\nsecond\n"
    ctype = b'Content-Type: multipart/mixed; boundary="b1"\n'
    assert "MIME_NO_CLOSING_BOUNDARY" in hits(engine, msg(body=body, ctype=ctype))
    closed = body + b"--b1--\n"
    assert "MIME_NO_CLOSING_BOUNDARY" not in hits(engine, msg(body=closed, ctype=ctype))


def test_base64_for_plain_ascii_text(engine: Engine) -> None:
    ctype = PLAIN + b"Content-Transfer-Encoding: base64\n"
    assert "MIME_BASE64_ASCII_TEXT" in hits(engine, msg(body=b"SGVsbG8gRGFuYSwgc2VlIHlvdSBzb29uLgo=\n", ctype=ctype))
    assert "MIME_BASE64_ASCII_TEXT" not in hits(engine, msg())


def test_html_without_text_alternative(engine: Engine) -> None:
    html = b"<html><body><p>Hello Dana, the agenda is attached below.</p></body></html>\n"
    assert "MIME_HTML_ONLY" in hits(engine, msg(body=html, ctype=b"Content-Type: text/html\n"))
    alt = (
        b"--b1\nContent-Type: text/plain\n\nHello Dana, the agenda is attached below.\n"
        b"--b1\nContent-Type: text/html\n\n" + html + b"--b1--\n"
    )
    ctype = b'Content-Type: multipart/alternative; boundary="b1"\n'
    assert "MIME_HTML_ONLY" not in hits(engine, msg(body=alt, ctype=ctype))


def test_undeclared_8bit_charset(engine: Engine) -> None:
    ctype = b"Content-Type: text/plain\n"
    assert "MIME_8BIT_UNDECLARED" in hits(engine, msg(body=b"Caf\xe9 at noon?\n", ctype=ctype))
    declared = b"Content-Type: text/plain; charset=iso-8859-1\n"
    assert "MIME_8BIT_UNDECLARED" not in hits(engine, msg(body=b"Caf\xe9 at noon?\n", ctype=declared))


# --- html -------------------------------------------------------------------------------------

HTML = b"Content-Type: text/html; charset=utf-8\n"


def test_link_text_showing_another_domain(engine: Engine) -> None:
    trick = (
        b'<p>Sign in at <a href="http://203.0.113.7/login">https://www.bank.example/login</a>'
        b" to keep your account.</p>\n"
    )
    assert "HTML_LINK_SHOWS_OTHER_DOMAIN" in hits(engine, msg(body=trick, ctype=HTML))
    honest = trick.replace(b"http://203.0.113.7/login", b"https://secure.bank.example/login")
    assert "HTML_LINK_SHOWS_OTHER_DOMAIN" not in hits(engine, msg(body=honest, ctype=HTML))


def test_hidden_text(engine: Engine) -> None:
    filler = b"lantern granary atlas procession harvest budget " * 4
    hidden = b'<p>Cheap watches here.</p><div style="display:none">' + filler + b"</div>\n"
    assert "HTML_HIDDEN_TEXT_MOSTLY" in hits(engine, msg(body=hidden, ctype=HTML))
    shown = hidden.replace(b' style="display:none"', b"")
    assert not hits(engine, msg(body=shown, ctype=HTML)) & {"HTML_HIDDEN_TEXT", "HTML_HIDDEN_TEXT_MOSTLY"}


def test_image_only_html(engine: Engine) -> None:
    pic = b'<a href="http://shop.example/"><img src="http://shop.example/a.png" width=600 height=400></a>\n'
    assert "HTML_IMAGE_ONLY" in hits(engine, msg(body=pic, ctype=HTML))
    words = b"<p>" + b"The quarterly report covers revenue, hiring and the new office. " * 5 + b"</p>"
    assert "HTML_IMAGE_ONLY" not in hits(engine, msg(body=pic + words, ctype=HTML))


def test_password_field_in_form(engine: Engine) -> None:
    form = b'<form action="http://x.example/p"><input type="password" name="pw"></form>\n'
    assert "HTML_PASSWORD_FIELD" in hits(engine, msg(body=form, ctype=HTML))
    search = b'<form action="http://x.example/s"><input type="text" name="q"></form>\n'
    assert "HTML_PASSWORD_FIELD" not in hits(engine, msg(body=search, ctype=HTML))


# --- uri --------------------------------------------------------------------------------------


def test_ip_literal_and_userinfo_links(engine: Engine) -> None:
    found = hits(engine, msg(body=b"Log in: http://www.bank.example@203.0.113.9/secure\n"))
    assert {"URI_USERINFO", "URI_IP_HOST"} <= found
    found = hits(engine, msg(body=b"Log in: https://www.bank.example/secure\n"))
    assert not found & {"URI_USERINFO", "URI_IP_HOST"}
    # Links to private addresses (an intranet wiki) are not an IP-literal trick.
    assert "URI_IP_HOST" not in hits(engine, msg(body=b"Wiki: http://10.20.0.5/wiki/Start\n"))


def test_shortener_and_odd_port(engine: Engine) -> None:
    assert "URI_SHORTENER" in hits(engine, msg(body=b"Apply: https://bit.ly/3xYzAbc\n"))
    assert "URI_SHORTENER" not in hits(engine, msg(body=b"Apply: https://jobs.example.org/3xYzAbc\n"))
    assert "URI_ODD_PORT" in hits(engine, msg(body=b"See http://promo.example.org:8181/x\n"))
    assert "URI_ODD_PORT" not in hits(engine, msg(body=b"See https://promo.example.org:443/x\n"))


def test_brand_in_someone_elses_host(engine: Engine) -> None:
    assert "URI_BRAND_IN_HOST" in hits(engine, msg(body=b"Go to http://paypal.com.secure-login.test/x\n"))
    assert "URI_BRAND_IN_HOST" not in hits(engine, msg(body=b"Go to https://www.paypal.com/x\n"))


# --- text -------------------------------------------------------------------------------------


def test_all_caps_text(engine: Engine) -> None:
    shout = b"BUY NOW AND SAVE ON EVERY ITEM IN OUR STORE TODAY ONLY. " * 5 + b"\n"
    assert "TEXT_CAPS_70" in hits(engine, msg(body=shout))
    calm = b"Buy now and save on every item in our store today only. " * 5 + b"\n"
    assert not hits(engine, msg(body=calm)) & {"TEXT_CAPS_50", "TEXT_CAPS_70"}


def test_exclamation_runs(engine: Engine) -> None:
    body = b"Amazing!!! Really!!! Act today!!! Last chance!!!\n"
    assert "TEXT_EXCLAIM_RUNS" in hits(engine, msg(body=body))
    assert "TEXT_EXCLAIM_RUNS" not in hits(engine, msg(body=b"Amazing! Really! Act today!\n"))


def test_zero_width_and_mixed_script_words(engine: Engine) -> None:
    ctype = b"Content-Type: text/plain; charset=utf-8\n"
    zw = "Buy Ci\u200bal\u200bis today\n".encode()
    assert "TEXT_ZERO_WIDTH_IN_WORD" in hits(engine, msg(body=zw, ctype=ctype))
    mixed = "Cheap Vi\u0430gra here\n".encode()  # Cyrillic a inside a Latin word
    assert "TEXT_MIXED_SCRIPT_WORD" in hits(engine, msg(body=mixed, ctype=ctype))
    russian = "Привет, Дана! Встреча во вторник.\n".encode()
    found = hits(engine, msg(body=russian, ctype=ctype))
    assert not found & {"TEXT_MIXED_SCRIPT_WORD", "TEXT_ZERO_WIDTH_IN_WORD"}


# --- rules and metas that build on the checks -------------------------------------------------


def test_obfuscated_drug_name_caught_in_nbody(engine: Engine) -> None:
    ctype = b"Content-Type: text/plain; charset=utf-8\n"
    spaced = b"Get V i a g r a and more, no prescription needed.\n"
    found = hits(engine, msg(body=spaced, ctype=ctype))
    assert {"NBODY_VIAGRA", "NBODY_NO_PRESCRIPTION"} <= found
    assert "NBODY_VIAGRA" not in hits(engine, msg(body=b"Via Grande is the main street.\n"))


def test_reply_with_quote_is_a_ham_sign(engine: Engine) -> None:
    reply = msg(
        b"In-Reply-To: <xyz@example.net>\nSubject: Re: Tuesday\n",
        body=b"Dana wrote:\n> Tuesday at ten?\n> Or later?\n\nTen is fine.\n",
    )
    result = scan(engine, reply)
    assert "META_REPLY_WITH_QUOTE" in result.rule_names
    assert result.score < 0
    fake = msg(b"Subject: Re: Tuesday\n", body=b"Ten is fine.\n")
    found = hits(engine, fake)
    assert "META_REPLY_WITH_QUOTE" not in found
    assert "META_FAKE_REPLY" in found


def test_advance_fee_meta_needs_several_marks(engine: Engine) -> None:
    letter = (
        b"I am Barrister James Okoro, solicitor to the late client who died in a plane crash.\n\n"
        b"I seek your assistance as next of kin to receive the sum of US$15,500,000.00.\n\n"
        b"This is strictly confidential. You will take 30% of the total sum.\n"
    )
    found = hits(engine, msg(body=letter))
    assert {"META_ADVANCE_FEE_3", "META_ADVANCE_FEE_5"} <= found
    one_mark = b"The late client left the house to her nephew.\n"
    assert "META_ADVANCE_FEE_3" not in hits(engine, msg(body=one_mark))
