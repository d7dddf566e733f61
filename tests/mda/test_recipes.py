"""Recipe files: every condition and action, evaluation order, and errors naming file:line."""

from __future__ import annotations

import textwrap

import pytest

from filterd.errors import ConfigError
from filterd.mda.recipes import Action, Facts, Recipes, evaluate, facts_from_message, parse_recipes

MESSAGE = (
    b"Return-Path: <owner-dev@lists.example.org>\n"
    b"From: Alice Example <Alice@Example.com>\n"
    b"To: bob@example.net\n"
    b"Subject: =?utf-8?q?Caf=C3=A9_invoice?= for\n"
    b"  March\n"
    b"List-Id: Developers <dev.lists.example.org>\n"
    b"X-Spam-Flag: YES\n"
    b"\n"
    b"Subject: not a header, body text\n"
)


def facts(
    *, score: float | None = 7.5, verdict: str = "spam", size: int = 2000, sender: str | None = "x@lists.example.org"
) -> Facts:
    return facts_from_message(MESSAGE, score=score, verdict=verdict, size=size, sender=sender)  # type: ignore[arg-type]


def recipes(text: str) -> Recipes:
    return parse_recipes(textwrap.dedent(text), "r.yaml")


def targets(r: Recipes, f: Facts) -> list[tuple[str, object, bool]]:
    return [(s.action.kind, s.action.target, s.action.stop) for s in evaluate(r, f)]


def test_facts_unfold_and_decode_headers_and_collect_senders() -> None:
    f = facts()
    assert f.header_values("subject") == ["Café invoice for March"]
    assert f.header_values("List-ID") == ["Developers <dev.lists.example.org>"]
    assert f.senders == ("x@lists.example.org", "alice@example.com")


@pytest.mark.parametrize(
    ("condition", "score", "matches"),
    [
        ('">= 5"', 7.5, True),
        ('">= 5"', 5.0, True),
        ('">= 5"', 4.9, False),
        ('"< 0"', -0.1, True),
        ('"< 0"', 0.0, False),
        ('"> 7.5"', 7.5, False),
        ('"== 7.5"', 7.5, True),
        ('"!= 7.5"', 7.5, False),
        ('["> 5", "<= 10"]', 7.5, True),
        ('["> 5", "<= 10"]', 12.0, False),
        ('">= 5"', None, False),  # no score (daemon not asked): no score condition holds
        ('"< 5"', None, False),
    ],
)
def test_score(condition: str, score: float | None, matches: bool) -> None:
    r = recipes(f"- score: {condition}\n  folder: Hit\n")
    assert targets(r, facts(score=score))[0][1] == ("Hit" if matches else "INBOX")


@pytest.mark.parametrize(("verdict", "expected"), [("spam", "Junk"), ("ham", "Ham"), ("unfiltered", "Later")])
def test_verdict(verdict: str, expected: str) -> None:
    r = recipes(
        """
        - {verdict: spam, folder: Junk}
        - {verdict: ham, folder: Ham}
        - {verdict: unfiltered, folder: Later}
        """
    )
    assert targets(r, facts(verdict=verdict)) == [("folder", expected, True)]


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ("{Subject: '/café invoice/i'}", True),  # decoded and unfolded
        ("{Subject: '/CAFÉ/'}", False),  # case matters without i
        ("{subject: '/invoice for march/i'}", True),  # header names are case-insensitive
        ("{Subject: '/^not a header/'}", False),  # the body is not a header
        ("{X-Spam-Flag: '/^YES$/'}", True),
        ("{X-Missing: '/./', List-Id: '/<dev\\.lists/'}", True),  # any of several headers
        ("{X-Missing: '/./', To: '/nobody/'}", False),
        ("{To: ['/nobody/', '/bob@/']}", True),  # any of several regexes
        ("{To: '/^bob@example\\.net$/m'}", True),
    ],
)
def test_header(header: str, matches: bool) -> None:
    r = recipes(f"- header: {header}\n  folder: Hit\n")
    assert targets(r, facts())[-1][1] == ("Hit" if matches else "INBOX")


@pytest.mark.parametrize(
    ("condition", "size", "matches"),
    [
        ('"> 1M"', 1024 * 1024 + 1, True),
        ('"> 1M"', 1024 * 1024, False),
        ('"<= 500K"', 1000, True),
        ('"< 10"', 10, False),
    ],
)
def test_size(condition: str, size: int, matches: bool) -> None:
    r = recipes(f"- size: {condition}\n  folder: Hit\n")
    assert targets(r, facts(size=size))[0][1] == ("Hit" if matches else "INBOX")


@pytest.mark.parametrize(
    ("glob", "sender", "matches"),
    [
        ("'*@lists.example.org'", "x@lists.example.org", True),
        ("'*@LISTS.example.org'", "x@lists.example.org", True),  # case-insensitive
        ("'*@example.com'", None, True),  # the From address counts too
        ("'alice@*'", "y@z.example", True),
        ("['nobody@*', '?@lists.example.org']", "x@lists.example.org", True),
        ("'*@example.net'", "x@lists.example.org", False),
    ],
)
def test_sender(glob: str, sender: str | None, matches: bool) -> None:
    r = recipes(f"- sender: {glob}\n  folder: Hit\n")
    assert targets(r, facts(sender=sender))[0][1] == ("Hit" if matches else "INBOX")


def test_conditions_of_a_rule_all_hold_and_combinators() -> None:
    r = recipes(
        """
        - verdict: spam
          score: "> 100"
          folder: Certain
        - any:
            - {header: {Subject: '/nothing/'}}
            - {sender: '*@example.com', size: '< 1K'}
          folder: Any
        - all:
            - {verdict: spam}
            - not: {header: {X-Spam-Flag: '/NO/'}}
          folder: All
        """
    )
    assert targets(r, facts())[0][1] == "All"  # score 7.5 < 100; size 2000 >= 1K
    assert targets(r, facts(size=100))[0][1] == "Any"
    assert targets(r, facts(score=1000))[0][1] == "Certain"


def test_first_stopping_rule_wins_copies_go_on_and_inbox_is_the_default() -> None:
    r = recipes(
        """
        - name: keep a copy
          copy: Archive
        - verdict: ham
          forward: me@phone.example
          stop: false
        - verdict: ham
          pipe: [/bin/cat]
          stop: false
        - verdict: spam
          folder: Junk
        - folder: Never
        """
    )
    assert targets(r, facts(verdict="spam")) == [("folder", "Archive", False), ("folder", "Junk", True)]
    steps = evaluate(r, facts(verdict="ham"))
    assert [(s.action.kind, s.action.target) for s in steps] == [
        ("folder", "Archive"),
        ("forward", ("me@phone.example",)),
        ("pipe", ("/bin/cat",)),
        ("folder", "Never"),
    ]
    assert steps[0].where == "rule 1 'keep a copy' (r.yaml:2)"
    assert targets(recipes("- {verdict: ham, copy: A}\n"), facts()) == [("folder", "INBOX", True)]
    assert evaluate(None, facts())[-1].where == "default"


def test_actions_parse() -> None:
    r = recipes(
        """
        - {score: '> 50', discard: true}
        - {verdict: ham, forward: [a@example.org, b@example.org]}
        - {verdict: unfiltered, pipe: 'cat > /dev/null'}
        """
    )
    assert [rule.action for rule in r.rules] == [
        Action("discard"),
        Action("forward", ("a@example.org", "b@example.org")),
        Action("pipe", "cat > /dev/null"),
    ]
    assert targets(r, facts(score=51)) == [("discard", "", True)]


def test_empty_file_means_no_rules() -> None:
    assert parse_recipes("", "r.yaml").rules == ()
    assert parse_recipes("# nothing yet\n", "r.yaml").rules == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("folder: Junk\n", "r.yaml:1: expected a list of rules"),
        ("- folder: [Junk\n", "r.yaml:2: invalid YAML"),
        ("- verdict: spam\n", "r.yaml:1: rule 1: expected one action"),
        ("- {folder: A, discard: true}\n", "r.yaml:1: rule 1: expected one action per rule, got folder, discard"),
        ("- folder: A\n- scroe: '> 5'\n  folder: B\n", "r.yaml:2: rule 2.scroe: unknown key; did you mean 'score'?"),
        ("- score: 5\n  folder: A\n", "r.yaml:1: rule 1.score: expected a comparison such as '>= 5', got 5"),
        ("- score: '>= lots'\n  folder: A\n", "r.yaml:1: rule 1.score: expected a comparison"),
        ("- size: '> 1Q'\n  folder: A\n", "r.yaml:1: rule 1.size: expected a comparison such as '> 1M'"),
        ("- verdict: maybe\n  folder: A\n", "r.yaml:1: rule 1.verdict: expected spam, ham or unfiltered"),
        ("- header: {Subject: 'plain'}\n  folder: A\n", "r.yaml:1: rule 1.header.Subject: expected /regex/"),
        ("- header: {Subject: '/(/'}\n  folder: A\n", "r.yaml:1: rule 1.header.Subject: bad regex"),
        ("- header: {'Bad Name': '/x/'}\n  folder: A\n", "r.yaml:1: rule 1.header: expected a header field name"),
        ("- {discard: false}\n", "r.yaml:1: rule 1.discard: expected true"),
        ("- {discard: true, stop: false}\n", "r.yaml:1: rule 1.discard: a discarded message cannot go on"),
        ("- {copy: A, stop: true}\n", "r.yaml:1: rule 1.copy: copy goes on to later rules"),
        ("- {folder: A, stop: 3}\n", "r.yaml:1: rule 1.stop: expected true or false, got 3"),
        ("- {forward: 'not an address'}\n", "r.yaml:1: rule 1.forward: expected a mail address"),
        ("- {forward: '-oQ/tmp@x'}\n", "r.yaml:1: rule 1.forward: expected a mail address"),
        ("- {pipe: []}\n", "r.yaml:1: rule 1.pipe: expected a command line"),
        ("- {all: [], folder: A}\n", "r.yaml:1: rule 1.all: expected a non-empty list"),
        ("- {any: [{verdit: spam}], folder: A}\n", "r.yaml:1: rule 1.any[1].verdit: unknown key; did you mean"),
        ("- folder: A\n  folder: B\n", "r.yaml:2: rule 1.folder: given twice (first at line 1)"),
        ("- 3\n", "r.yaml:1: rule 1: expected a rule"),
    ],
)
def test_errors_name_file_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_recipes(text, "r.yaml")
    assert str(info.value).splitlines()[0].startswith(expected), str(info.value)


def test_every_problem_is_reported_in_line_order() -> None:
    text = "- score: 5\n  folder: A\n- verdict: x\n  folder: B\n- {folder: C, stop: 3}\n"
    with pytest.raises(ConfigError) as info:
        parse_recipes(text, "r.yaml")
    assert [p.line for p in info.value.problems] == [1, 3, 5]


def test_folder_names_are_checked_by_the_caller() -> None:
    def check(name: str) -> str | None:
        return "no dots here" if "." in name else None

    with pytest.raises(ConfigError, match=r"r.yaml:2: rule 2.copy: no dots here"):
        parse_recipes("- folder: ok\n- copy: a.b\n", "r.yaml", check_folder=check)
