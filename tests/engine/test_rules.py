"""Rule loading, compiling and matching: semantics of every rule type, and the errors."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

import pytest

from filterd.engine.plugin import CheckSetup, Hit, Scan, Stage
from filterd.errors import RuleError
from tests.conftest import MakeEngine

MSG = (
    b"Received: from helo.example (rdns.example [192.0.2.9]) by mx.example.org; Mon, 5 Jan 2026 10:00:00 +0000\n"
    b'From: "Prize Office" <winner@lotto.example>\n'
    b"To: alice@example.org\n"
    b"Cc: bob@example.org\n"
    b"Subject: You WON a prize\n"
    b"Message-ID: <abc@lotto.example>\n"
    b"\n"
    b"Claim your prize now. Claim it today. Claim!\n"
    b"\n"
    b"Visit http://claim.lotto.example/now\n"
)


def names(engine: object, data: bytes = MSG) -> set[str]:
    result = engine.scan_sync(data)  # type: ignore[attr-defined]
    return {h.rule for h in result.hits} | set(result.subrules)


def test_rule_types_match_their_targets(make_engine: MakeEngine) -> None:
    engine = make_engine(
        r"""
        SUBJ_WON: {header: Subject, match: '/\bwon\b/i', describe: won}
        SUBJ_LOWER_WON: {header: Subject, match: '/\bwon\b/', describe: case-sensitive miss}
        FROM_ADDR: {header: 'From:addr', match: '/^winner@/', describe: addr}
        FROM_NAME: {header: 'From:name', match: '/^Prize Office$/', describe: name}
        TOCC: {header: ToCc, match: '/bob@/', describe: tocc}
        ALLH: {header: ALL, match: '/^Message-ID: <abc@/m', describe: all}
        HAS_MID: {header: Message-ID, exists: true, describe: exists}
        NO_XM: {header: X-Mailer, exists: false, describe: absent}
        NOT_MAILER: {header: X-Mailer, not_match: '/\S/', describe: absent matches empty}
        UNSET_SUB: {header: X-Mailer, match: '/^none$/', if_unset: none, describe: if unset}
        BODY_CLAIM: {body: '/^claim your prize/i', describe: body at line start}
        BODY_SUBJECT_LINE: {body: '/^You WON/', describe: subject is the first body line}
        URI_LOTTO: {uri: '/^http:\/\/claim\.lotto\.example\//', describe: uri}
        FULL_RCVD: {full: '/^Received: from helo\.example/m', describe: full}
        RAW_X: {rawbody: '/Claim it today/', describe: raw}
        """
    )
    hit = names(engine)
    assert hit == {
        "SUBJ_WON",
        "FROM_ADDR",
        "FROM_NAME",
        "TOCC",
        "ALLH",
        "HAS_MID",
        "NO_XM",
        "NOT_MAILER",
        "UNSET_SUB",
        "BODY_CLAIM",
        "BODY_SUBJECT_LINE",
        "URI_LOTTO",
        "FULL_RCVD",
        "RAW_X",
    }


def test_meta_rules_boolean_and_arithmetic(make_engine: MakeEngine) -> None:
    engine = make_engine(
        r"""
        __A: {body: '/claim/i'}
        __B: {header: Subject, match: '/prize/i'}
        __C: {body: '/never present/'}
        CLAIM_COUNT: {body: '/claim/i', tflags: [multiple], maxhits: 5, describe: counted, score: 0.1}
        META_AND: {meta: '__A && __B', describe: and}
        META_NOT: {meta: '__A && !__C', describe: not}
        META_SUM: {meta: '(__A + __B + __C) >= 2', describe: sum}
        META_COUNT: {meta: 'CLAIM_COUNT > 2', describe: uses a hit count}
        META_NESTED: {meta: 'META_AND || __C', describe: nested}
        META_DIV: {meta: '__A / __C', describe: division by a miss is 0}
        META_FALSE: {meta: '__C || (__A && __C)', describe: never hits}
        """
    )
    result = engine.scan_sync(MSG)
    hit = {h.rule for h in result.hits}
    assert {"META_AND", "META_NOT", "META_SUM", "META_COUNT", "META_NESTED"} <= hit
    assert "META_DIV" not in hit and "META_FALSE" not in hit
    assert "__A" in result.subrules and not any(h.rule.startswith("__") for h in result.hits)
    count = next(h for h in result.hits if h.rule == "CLAIM_COUNT")
    assert count.value == 4  # subject line is not counted: "prize" only; body has claim x4 (incl. URI line)


def test_nosubject_body_rule_ignores_the_subject_line(make_engine: MakeEngine) -> None:
    engine = make_engine(
        r"""
        WON_ANYWHERE: {body: '/\bWON\b/', describe: x}
        WON_BODY_ONLY: {body: '/\bWON\b/', tflags: [nosubject], describe: x}
        """
    )
    assert names(engine) & {"WON_ANYWHERE", "WON_BODY_ONLY"} == {"WON_ANYWHERE"}


def test_scores_file_wins_and_config_override_wins_over_both(make_engine: MakeEngine) -> None:
    engine = make_engine(
        {
            "10_r.yaml": "R1: {body: '/claim/i', describe: x, score: 9}\nR2: {body: '/prize/i', describe: x}\n",
            "scores.yaml": "R1: 1.5\n",
        }
    )
    result = engine.scan_sync(MSG)
    assert {h.rule: h.score for h in result.hits} == {"R1": 1.5, "R2": 1.0}
    assert result.score == 2.5 and not result.is_spam


def test_load_errors_name_file_line_and_rule_and_come_all_at_once(make_engine: MakeEngine) -> None:
    with pytest.raises(RuleError) as err:
        make_engine(
            {
                "10_bad.yaml": (
                    "OK_RULE: {body: '/fine/', describe: fine}\n"
                    "BAD_RE: {body: '/(unclosed/', describe: x}\n"
                    "BAD_META: {meta: 'OK_RULE && NO_SUCH_RULE', describe: x}\n"
                    "BAD_FIELD: {body: '/x/', colour: red}\n"
                    "TWO_TYPES: {body: '/x/', uri: '/y/'}\n"
                    "BAD_FLAG: {body: '/x/q', describe: x}\n"
                    "CYCLE_A: {meta: 'CYCLE_B', describe: x}\n"
                    "CYCLE_B: {meta: 'CYCLE_A', describe: x}\n"
                    "EVAL_NOBODY: {eval: nosuchcheck, describe: x}\n"
                ),
                "20_syntax.yaml": "A: [unclosed\n",
            }
        )
    text = str(err.value)
    lines = text.splitlines()
    for rule, line, words in [
        ("BAD_RE", 2, "bad regex"),
        ("BAD_META", 3, "unknown rule 'NO_SUCH_RULE'"),
        ("BAD_FIELD", 4, "unknown field 'colour'"),
        ("TWO_TYPES", 5, "one type"),
        ("BAD_FLAG", 6, "unknown regex flag"),
        ("EVAL_NOBODY", 9, "no check named 'nosuchcheck'"),
    ]:
        assert any(f"10_bad.yaml:{line}: {rule}: " in ln and words in ln for ln in lines), (rule, text)
    assert "cycle" in text and "20_syntax.yaml:2: YAML syntax error" in text


class _Emitter:
    name: ClassVar[str] = "emitter"
    stage: ClassVar[Stage] = Stage.BODY
    emits: ClassVar[frozenset[str]] = frozenset({"EMITTED", "UNDECLARED"})

    def __init__(self, setup: CheckSetup) -> None:
        pass

    def run(self, scan: Scan) -> Sequence[Hit]:
        return [Hit("EMITTED", "evidence here")]


def test_check_emitting_an_undeclared_rule_fails_the_load(make_engine: MakeEngine) -> None:
    with pytest.raises(RuleError, match="UNDECLARED: emitted by check 'emitter' but not declared"):
        make_engine("EMITTED: {eval: emitter, describe: x}\n", checks=[_Emitter])


class _Broken:
    name: ClassVar[str] = "broken"
    stage: ClassVar[Stage] = Stage.BODY
    emits: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, setup: CheckSetup) -> None:
        pass

    def run(self, scan: Scan) -> Sequence[Hit]:
        raise ValueError("boom")


class _SlowNet:
    name: ClassVar[str] = "slownet"
    stage: ClassVar[Stage] = Stage.BODY
    emits: ClassVar[frozenset[str]] = frozenset({"NET_HIT"})

    def __init__(self, setup: CheckSetup) -> None:
        pass

    async def run(self, scan: Scan) -> Sequence[Hit]:
        import asyncio

        await asyncio.sleep(30)
        return [Hit("NET_HIT")]


def test_failing_check_is_a_zero_score_hit_and_the_scan_goes_on(make_engine: MakeEngine) -> None:
    engine = make_engine(
        "EMITTED: {eval: emitter, describe: x, score: 2}\nUNDECLARED: {eval: emitter, describe: x}\n"
        "CLAIM: {body: '/claim/i', describe: c}\n",
        checks=[_Emitter, _Broken],
    )
    result = engine.scan_sync(MSG)
    by_name = {h.rule: h for h in result.hits}
    assert by_name["CHECK_ERROR_BROKEN"].score == 0.0 and "boom" in by_name["CHECK_ERROR_BROKEN"].detail
    assert by_name["EMITTED"].detail == "evidence here"
    assert result.score == 3.0


def test_async_check_past_the_scan_deadline_is_cancelled(make_engine: MakeEngine) -> None:
    engine = make_engine("NET_HIT: {eval: slownet, describe: x, tflags: [net]}\n", checks=[_SlowNet], scan_deadline=0.2)
    started = time.monotonic()
    result = engine.scan_sync(MSG)
    # The check sleeps 30 s: no NET_HIT and a CHECK_ERROR show it was cut off at the deadline;
    # the elapsed bound is half the sleep, a hang guard with room for any load.
    assert time.monotonic() - started < 15
    assert "CHECK_ERROR_SLOWNET" in result.rule_names and "NET_HIT" not in result.rule_names


def test_redos_rule_is_stopped_and_reported(make_engine: MakeEngine) -> None:
    # Catastrophic backtracking: nested quantifiers plus a look-ahead, which sends the pattern to the
    # fallback engine (Hyperscan refuses look-arounds). On 1 MB of "a" it would run for ages.
    engine = make_engine(
        r"""
        EVIL: {rawbody: '/^(?=a)(a+)+$(?<!a)b/m', describe: catastrophic}
        LINEAR: {rawbody: '/(a+)+b/', describe: the same shape in Hyperscan is linear}
        FINE: {body: '/big/', describe: still runs}
        """,
        rule_timeout=0.05,
    )
    assert "EVIL" in engine.rules.fallback_rules and "LINEAR" not in engine.rules.fallback_rules
    data = b"Subject: big\n\n" + b"a" * 1_000_000 + b"\n"
    started = time.monotonic()
    result = engine.scan_sync(data)
    elapsed = time.monotonic() - started
    # A hang guard only (the pattern would run for ages): 60 s, far above any loaded machine.
    # That the rule was stopped at its 50 ms is the RULE_TIMEOUT naming it, not the clock.
    assert elapsed < 60, elapsed
    by_name = {h.rule: h for h in result.hits}
    assert "RULE_TIMEOUT" in by_name and "EVIL" in by_name["RULE_TIMEOUT"].detail
    assert "FINE" in by_name and "EVIL" not in by_name and "LINEAR" not in by_name


def test_hyperscan_and_fallback_engines_agree_on_samples(make_engine: MakeEngine, shipped_engine: object) -> None:
    """Every shipped regex rule gives the same answer from Hyperscan as from the regex module."""
    from pathlib import Path

    from filterd.engine.ruleset import header_text

    rules = shipped_engine.rules  # type: ignore[attr-defined]
    samples = sorted((Path(__file__).resolve().parents[2] / "corpora").rglob("*.eml"))
    assert samples
    for path in samples:
        msg = shipped_engine.scan_sync(path.read_bytes()).message  # type: ignore[attr-defined]
        from filterd.engine.plugin import ScanContext

        ctx = ScanContext()
        targets = {
            "body": msg.body_text,
            "nbody": msg.normalized_body,
            "rawbody": msg.rawbody_text,
            "full": msg.raw.decode("utf-8", "replace"),
        }
        for target, matcher in rules.text_matchers.items():
            fast = matcher.match(targets[target])
            slow = {p.name for p in matcher.patterns if p.rx.search(targets[target])}
            assert fast == slow, (path.name, target, fast ^ slow)
        for spec, matcher in rules.header_matchers.items():
            text = header_text(msg, ctx, spec)
            if text is None:
                continue
            fast = matcher.match(text)
            slow = {p.name for p in matcher.patterns if p.rx.search(text)}
            assert fast == slow, (path.name, spec, fast ^ slow)
        if rules.uri_matcher is not None:
            for uri in msg.uris:
                fast = rules.uri_matcher.match(uri.url)
                slow = {p.name for p in rules.uri_matcher.patterns if p.rx.search(uri.url)}
                assert fast == slow, (path.name, uri.url, fast ^ slow)


def test_gtube_scores_1000(shipped_engine: object) -> None:
    data = b"Subject: test\n\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
    result = shipped_engine.scan_sync(data)  # type: ignore[attr-defined]
    assert "GTUBE" in result.rule_names and result.is_spam and result.score >= 1000


class _ConnectCheck:
    name: ClassVar[str] = "connectcheck"
    stage: ClassVar[Stage] = Stage.CONNECT
    emits: ClassVar[frozenset[str]] = frozenset({"CLIENT_DOC_NET"})

    def __init__(self, setup: CheckSetup) -> None:
        pass

    def run(self, scan: Scan) -> Sequence[Hit]:
        return [Hit("CLIENT_DOC_NET", scan.ctx.client_ip)] if scan.ctx.client_ip.startswith("192.0.2.") else []


class _HeaderCheck:
    name: ClassVar[str] = "headercheck"
    stage: ClassVar[Stage] = Stage.HEADERS
    emits: ClassVar[frozenset[str]] = frozenset({"HAS_LOTTO_FROM"})

    def __init__(self, setup: CheckSetup) -> None:
        pass

    def run(self, scan: Scan) -> Sequence[Hit]:
        return [Hit("HAS_LOTTO_FROM")] if "lotto" in scan.message.from_addr else []


def test_staged_input_runs_each_stage_once_as_data_arrives(make_engine: MakeEngine) -> None:
    """The milter/MTA path: connect, envelope, headers, then the whole message."""
    import asyncio

    from filterd.engine.plugin import ScanContext

    engine = make_engine(
        "CLIENT_DOC_NET: {eval: connectcheck, describe: client in a documentation net, score: 1}\n"
        "HAS_LOTTO_FROM: {eval: headercheck, describe: lotto sender, score: 1}\n"
        "CLAIM: {body: '/claim/i', describe: claim, score: 1}\n",
        checks=[_ConnectCheck, _HeaderCheck],
    )

    async def run() -> None:
        scan = engine.new_scan(ScanContext(client_ip="192.0.2.9", helo="helo.example", mail_from="w@lotto.example"))
        assert [h.rule for h in await engine.run_stage(scan, Stage.CONNECT)] == ["CLIENT_DOC_NET"]
        assert await engine.run_stage(scan, Stage.CONNECT) == []  # once only
        assert await engine.run_stage(scan, Stage.ENVELOPE) == []
        engine.set_message(scan, MSG.split(b"\n\n", 1)[0] + b"\n\n")  # the header block alone
        assert [h.rule for h in await engine.run_stage(scan, Stage.HEADERS)] == ["HAS_LOTTO_FROM"]
        result = await engine.finish(scan, MSG)
        assert {h.rule for h in result.hits} == {"CLIENT_DOC_NET", "HAS_LOTTO_FROM", "CLAIM"}
        assert result.score == 3.0

    asyncio.run(run())
