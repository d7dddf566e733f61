"""Tests for filterd.config: schema, layering, every kind of problem, units, dump round-trip."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Literal

import pytest
import yaml

import filterd.config
from filterd.config import (
    Config,
    FrozenMap,
    Section,
    config_to_dict,
    default_config,
    describe_settings,
    dump_config,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
    setting,
)
from filterd.config.load import _load
from filterd.errors import ConfigError, Problem

K = 1024
M = 1024 * K


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path so problems name files as relative paths, the way users write them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: str | Path = "filterd.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def only_problem(text: str) -> str:
    write(Path("filterd.yaml"), text)
    found = problems()
    assert len(found) == 1, found
    return found[0]


# -- defaults and plain loading ------------------------------------------------------------


def test_defaults_load_without_a_file() -> None:
    cfg = load_config()
    assert cfg == default_config() == Config()
    assert cfg.state_dir == ""
    assert cfg.state_path == Path("filterd-state")
    assert cfg.scoring.required_score == 5.0
    assert cfg.scoring.report_safe == 1
    assert cfg.scoring.rewrite_subject == ""
    assert cfg.scoring.report_hostname == ""
    assert cfg.scoring.report_contact == "the administrator of that system"
    assert cfg.scoring.score_overrides == {}
    assert cfg.rules.dirs == ()
    assert cfg.rules.extra_dirs == ()
    assert cfg.rules.rule_timeout == 0.05
    assert cfg.rules.scan_deadline == 10.0
    assert cfg.rules.body_scan_size == 200 * K
    assert cfg.rules.max_scan_size == 10 * M
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert cfg.network.trusted_networks == cfg.network.internal_networks == loopback


def test_empty_file_and_empty_sections_give_defaults(cwd: Path) -> None:
    write(cwd / "filterd.yaml", "# nothing yet\n")
    assert load_config("filterd.yaml") == Config()
    write(cwd / "filterd.yaml", "scoring:\nrules:\n  # later\nnetwork: {}\n")
    assert load_config("filterd.yaml") == Config()


def test_file_overrides_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "filterd.yaml",
        """\
        state_dir: /var/lib/filterd
        scoring:
          required_score: 6          # an int is fine for a float
          report_safe: 0
          rewrite_subject: "[SPAM] "
          score_overrides:
            BAYES_99: 4.5
            HTML_MESSAGE: 0
        rules:
          dirs: [/usr/share/filterd/rules]
          extra_dirs:
            - /etc/filterd/rules
          rule_timeout: 250ms
          scan_deadline: 2m
          body_scan_size: 512K
          max_scan_size: 1G
        network:
          trusted_networks: [10.1.2.3/8, "2001:db8::/32", 192.0.2.7]
          internal_networks: []
        """,
    )
    cfg = load_config(path)
    assert cfg.state_dir == "/var/lib/filterd"
    assert cfg.state_path == Path("/var/lib/filterd")
    assert cfg.scoring.required_score == 6.0
    assert isinstance(cfg.scoring.required_score, float)
    assert cfg.scoring.report_safe == 0
    assert cfg.scoring.rewrite_subject == "[SPAM] "
    assert cfg.scoring.score_overrides == {"BAYES_99": 4.5, "HTML_MESSAGE": 0.0}
    assert cfg.rules.dirs == ("/usr/share/filterd/rules",)
    assert cfg.rules.extra_dirs == ("/etc/filterd/rules",)
    assert cfg.rules.rule_timeout == 0.25
    assert cfg.rules.scan_deadline == 120.0
    assert cfg.rules.body_scan_size == 512 * K
    assert cfg.rules.max_scan_size == 1024 * M
    assert cfg.network.trusted_networks == (
        ip_network("10.0.0.0/8"),
        ip_network("2001:db8::/32"),
        ip_network("192.0.2.7/32"),
    )
    # untouched settings keep their defaults
    assert cfg.scoring.report_contact == "the administrator of that system"


def test_state_dir_argument_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path / "filterd.yaml", "state_dir: /from/file\n")
    assert load_config(path).state_dir == "/from/file"
    assert load_config(path, state_dir="/from/cli").state_dir == "/from/cli"
    assert load_config(state_dir="/from/cli").state_path == Path("/from/cli")


def test_yaml_11_booleans_are_bools_and_keys_stay_names(cwd: Path) -> None:
    # `yes` is a bool in YAML 1.1, so it is rejected for an int; as a key it is just a name.
    assert only_problem("scoring:\n  report_safe: yes\n") == (
        "filterd.yaml:2: scoring.report_safe: expected an integer between 0 and 2, got true"
    )
    write(cwd / "filterd.yaml", "scoring:\n  score_overrides:\n    yes: 1\n    on: 2\n")
    assert load_config("filterd.yaml").scoring.score_overrides == {"yes": 1.0, "on": 2.0}


# -- layering ------------------------------------------------------------------------------


def test_local_d_merges_in_sorted_order(cwd: Path) -> None:
    write(
        cwd / "filterd.yaml",
        """\
        scoring:
          required_score: 6
          report_safe: 2
          score_overrides: {A: 1, B: 2}
        rules:
          extra_dirs: [one, two]
        """,
    )
    write(
        cwd / "local.d/20-late.yaml",
        """\
        scoring:
          required_score: 8
          score_overrides: {C: 4}
        """,
    )
    write(
        cwd / "local.d/10-early.yaml",
        """\
        scoring:
          required_score: 7
          score_overrides: {B: 3}
        rules:
          extra_dirs: [three]
        """,
    )
    write(cwd / "local.d/ignored.yml", "scoring: {required_score: 100}\n")
    cfg = load_config("filterd.yaml")
    assert cfg.scoring.required_score == 8.0  # 20-late.yaml is read last
    assert cfg.scoring.report_safe == 2  # kept from filterd.yaml: sections merge
    assert cfg.scoring.score_overrides == {"A": 1.0, "B": 3.0, "C": 4.0}  # mappings merge
    assert cfg.rules.extra_dirs == ("three",)  # lists replace


def test_override_d_replaces_whole_values(cwd: Path) -> None:
    write(
        cwd / "filterd.yaml",
        """\
        scoring:
          required_score: 6
          report_safe: 2
          score_overrides: {A: 1, B: 2}
        """,
    )
    write(cwd / "local.d/10.yaml", "scoring: {required_score: 7, score_overrides: {C: 3}}\n")
    write(cwd / "override.d/10.yaml", "scoring: {score_overrides: {D: 4}}\n")
    write(cwd / "override.d/20.yaml", "scoring:\n  required_score: 9\n")
    cfg = load_config("filterd.yaml")
    assert cfg.scoring.score_overrides == {"D": 4.0}  # replaced, not merged
    assert cfg.scoring.required_score == 9.0  # override.d beats local.d
    assert cfg.scoring.report_safe == 2  # a section in override.d is entered, not replaced


def test_problems_in_layers_name_their_own_file(cwd: Path) -> None:
    write(cwd / "filterd.yaml", "scoring:\n  required_score: 6\n")
    write(cwd / "local.d/10.yaml", "\nscoring:\n  report_safe: 3\n")
    write(cwd / "override.d/10.yaml", "rules:\n  max_scan_size: 1T\n")
    assert problems() == [
        "local.d/10.yaml:3: scoring.report_safe: expected an integer between 0 and 2, got 3",
        "override.d/10.yaml:2: rules.max_scan_size: expected a size between 1K and 1G,"
        " got '1T' (units: K, M, G; K = 1024)",
    ]


def test_a_later_layer_fixes_an_earlier_value(cwd: Path) -> None:
    # Only the value in force is checked: a bad value replaced by a later layer is no problem.
    write(cwd / "filterd.yaml", "scoring:\n  report_safe: 7\n")
    write(cwd / "override.d/10.yaml", "scoring:\n  report_safe: 2\n")
    assert load_config("filterd.yaml").scoring.report_safe == 2


# -- problems, one kind at a time ----------------------------------------------------------


def test_wrong_type_names_file_line_and_key(cwd: Path) -> None:
    text = "# filterd\n\nscoring:\n  report_safe: 1\n  required_score: banana\n"
    assert only_problem(text) == (
        "filterd.yaml:5: scoring.required_score: expected a number between -1000 and 1000, got 'banana'"
    )


def test_problem_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "filterd.yaml", "scoring:\n  required_score: banana\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        Problem(
            str(path),
            2,
            "scoring.required_score",
            "expected a number between -1000 and 1000, got 'banana'",
        )
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "scoring:\n  report_safe: 1.0\n",
            "filterd.yaml:2: scoring.report_safe: expected an integer between 0 and 2, got 1.0",
            id="float-for-int",
        ),
        pytest.param(
            "scoring:\n  report_safe: '1'\n",
            "filterd.yaml:2: scoring.report_safe: expected an integer between 0 and 2, got '1'",
            id="string-for-int",
        ),
        pytest.param(
            "scoring:\n  required_score: true\n",
            "filterd.yaml:2: scoring.required_score: expected a number between -1000 and 1000, got true",
            id="bool-for-float",
        ),
        pytest.param(
            "scoring:\n  required_score: .nan\n",
            "filterd.yaml:2: scoring.required_score: expected a number between -1000 and 1000, got nan",
            id="nan",
        ),
        pytest.param(
            "scoring:\n  required_score: 1000.5\n",
            "filterd.yaml:2: scoring.required_score: expected a number between -1000 and 1000, got 1000.5",
            id="above-max",
        ),
        pytest.param(
            "scoring:\n  report_safe: -1\n",
            "filterd.yaml:2: scoring.report_safe: expected an integer between 0 and 2, got -1",
            id="below-min",
        ),
        pytest.param(
            "scoring:\n  rewrite_subject: 42\n",
            "filterd.yaml:2: scoring.rewrite_subject: expected a string, got 42",
            id="int-for-str",
        ),
        pytest.param(
            "scoring:\n  report_contact:\n",
            "filterd.yaml:2: scoring.report_contact: expected a string, got null",
            id="null-for-str",
        ),
        pytest.param(
            "scoring:\n  required_score: [1, 2]\n",
            "filterd.yaml:2: scoring.required_score: expected a number between -1000 and 1000, got a list",
            id="list-for-scalar",
        ),
        pytest.param(
            "scoring:\n  required_score:\n    a: 1\n",
            "filterd.yaml:2: scoring.required_score: expected a number between -1000 and 1000, got a mapping",
            id="mapping-for-scalar",
        ),
        pytest.param(
            "scoring: 5\n",
            "filterd.yaml:1: scoring: expected a section (a mapping of settings), got '5'",
            id="scalar-for-section",
        ),
        pytest.param(
            "rules: ''\n",
            "filterd.yaml:1: rules: expected a section (a mapping of settings), got ''",
            id="empty-string-for-section",
        ),
        pytest.param(
            "rules:\n  dirs: /etc/filterd\n",
            "filterd.yaml:2: rules.dirs: expected a list of strings, got '/etc/filterd'",
            id="scalar-for-list",
        ),
        pytest.param(
            "rules:\n  dirs:\n    - ok\n    - [nested]\n",
            "filterd.yaml:4: rules.dirs[1]: expected a string, got a list",
            id="list-in-list",
        ),
        pytest.param(
            "scoring:\n  score_overrides: [A, B]\n",
            "filterd.yaml:2: scoring.score_overrides: expected a mapping of names to numbers, got a list",
            id="list-for-mapping",
        ),
        pytest.param(
            "scoring:\n  score_overrides:\n    GOOD: 1\n    BAD: high\n",
            "filterd.yaml:4: scoring.score_overrides.BAD: expected a number, got 'high'",
            id="mapping-value",
        ),
        pytest.param(
            "network:\n  trusted_networks:\n    - 10.0.0.0/8\n    - 10.0.0.300/32\n",
            "filterd.yaml:4: network.trusted_networks[1]: expected an IP network such as"
            " 192.0.2.0/24, got '10.0.0.300/32'",
            id="bad-cidr",
        ),
        pytest.param(
            "network:\n  internal_networks: [10.0.0.0/33]\n",
            "filterd.yaml:2: network.internal_networks[0]: expected an IP network such as"
            " 192.0.2.0/24, got '10.0.0.0/33'",
            id="bad-prefix",
        ),
        pytest.param(
            "network:\n  trusted_networks: 10.0.0.0/8\n",
            "filterd.yaml:2: network.trusted_networks: expected a list of IP networks"
            " (e.g. 192.0.2.0/24), got '10.0.0.0/8'",
            id="cidr-not-a-list",
        ),
        pytest.param(
            "rules:\n  rule_timeout: 20s\n",
            "filterd.yaml:2: rules.rule_timeout: expected a duration between 1ms and 10s, got '20s'",
            id="duration-above-max",
        ),
        pytest.param(
            "rules:\n  rule_timeout: 0\n",
            "filterd.yaml:2: rules.rule_timeout: expected a duration between 1ms and 10s, got 0",
            id="duration-below-min",
        ),
        pytest.param(
            "rules:\n  rule_timeout: -5ms\n",
            "filterd.yaml:2: rules.rule_timeout: expected a duration between 1ms and 10s,"
            " got '-5ms' (units: ms, s, m, h, d)",
            id="negative-duration",
        ),
        pytest.param(
            "rules:\n  scan_deadline: 5 minutes\n",
            "filterd.yaml:2: rules.scan_deadline: expected a duration between 100ms and 10m,"
            " got '5 minutes' (units: ms, s, m, h, d)",
            id="bad-duration-unit",
        ),
        pytest.param(
            "rules:\n  body_scan_size: 64.5M\n",
            "filterd.yaml:2: rules.body_scan_size: expected a size between 1K and 64M, got '64.5M'",
            id="size-above-max",
        ),
        pytest.param(
            "rules:\n  body_scan_size: 0.1K\n",
            "filterd.yaml:2: rules.body_scan_size: expected a size between 1K and 64M,"
            " got '0.1K' (units: K, M, G; K = 1024)",
            id="fraction-of-a-byte",
        ),
        pytest.param(
            "rules:\n  max_scan_size: 10MB\n",
            "filterd.yaml:2: rules.max_scan_size: expected a size between 1K and 1G,"
            " got '10MB' (units: K, M, G; K = 1024)",
            id="bad-size-unit",
        ),
        pytest.param(
            "rules:\n  max_scan_size: 1.5\n",
            "filterd.yaml:2: rules.max_scan_size: expected a size between 1K and 1G,"
            " got 1.5 (units: K, M, G; K = 1024)",
            id="float-size",
        ),
        pytest.param(
            "rules:\n  rule_timeout: 5s\n  scan_deadline: 1s\n",
            "filterd.yaml:2: rules.rule_timeout: expected a duration <= scan_deadline (1s), got '5s'",
            id="cross-check",
        ),
        pytest.param(
            "state_dir: !!binary aGVsbG8=\n",
            "filterd.yaml:1: state_dir: expected a string, got b'hello'",
            id="binary-for-str",
        ),
        pytest.param(
            "state_dir: !custom x\n",
            "filterd.yaml:1: state_dir: cannot read value: could not determine a constructor"
            " for the tag '!custom' in \"filterd.yaml\", line 1, column 12",
            id="unknown-tag",
        ),
    ],
)
def test_bad_value(cwd: Path, text: str, expected: str) -> None:
    assert only_problem(text) == expected


def test_unknown_key_suggests_the_closest(cwd: Path) -> None:
    assert only_problem("scoring:\n  requird_score: 5\n") == (
        "filterd.yaml:2: scoring.requird_score: unknown key, did you mean 'required_score'?"
    )


def test_unknown_key_suggests_another_section(cwd: Path) -> None:
    assert only_problem("rules:\n  trusted_networks: []\n") == (
        "filterd.yaml:2: rules.trusted_networks: unknown key here, did you mean 'network.trusted_networks'?"
    )


def test_unknown_key_lists_what_is_valid(cwd: Path) -> None:
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    assert only_problem("\n\nfrobnicate:\n  enabled: true\n") == (
        f"filterd.yaml:3: frobnicate: unknown key; expected one of: {sections}"
    )


def test_duplicate_keys(cwd: Path) -> None:
    text = """\
        scoring:
          required_score: 5
          required_score: 6
        rules:
          dirs: []
        scoring:
          report_safe: 7
        """
    write(cwd / "filterd.yaml", text)
    assert problems() == [
        "filterd.yaml:3: scoring.required_score: duplicate key (first at line 2)",
        "filterd.yaml:6: scoring: duplicate key (first at line 1)",
        # both halves of a duplicated section are still checked
        "filterd.yaml:7: scoring.report_safe: expected an integer between 0 and 2, got 7",
    ]


def test_yaml_syntax_error_has_its_line(cwd: Path) -> None:
    assert only_problem("scoring:\n  required_score: 5\n rules: x\n") == (
        "filterd.yaml:3: invalid YAML: expected <block end>, but found '<block mapping start>'"
        " (while parsing a block mapping)"
    )


def test_bad_yaml_in_a_layer_does_not_hide_other_problems(cwd: Path) -> None:
    write(cwd / "filterd.yaml", "scoring:\n  report_safe: 9\n")
    write(cwd / "local.d/10.yaml", "rules: [unclosed\n")
    assert problems() == [
        "filterd.yaml:2: scoring.report_safe: expected an integer between 0 and 2, got 9",
        "local.d/10.yaml:2: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)",
    ]


def test_undecodable_file(cwd: Path) -> None:
    (cwd / "filterd.yaml").write_bytes(b"state_dir: \xff\xfe\xfa\n")
    [problem] = problems()
    assert problem.startswith("filterd.yaml: invalid YAML: ")


def test_several_documents(cwd: Path) -> None:
    assert only_problem("scoring: {}\n---\nrules: {}\n").startswith(
        "filterd.yaml:2: invalid YAML: but found another document"
    )


@pytest.mark.parametrize(
    ("text", "got"),
    [("- scoring\n", "a list"), ("just words\n", "'just words'")],
)
def test_top_level_must_be_a_mapping(cwd: Path, text: str, got: str) -> None:
    assert only_problem(text) == (f"filterd.yaml:1: expected a mapping of settings at the top level, got {got}")


def test_keys_must_be_names(cwd: Path) -> None:
    assert only_problem("scoring:\n  ? [a, b]\n  : 1\n") == ("filterd.yaml:2: scoring: expected a setting name as key")


def test_recursive_alias(cwd: Path) -> None:
    found = only_problem("scoring: &s\n  score_overrides: *s\n")
    assert found == "filterd.yaml:2: scoring.score_overrides: recursive alias"


def test_missing_file(cwd: Path) -> None:
    assert problems("nope.yaml") == ["nope.yaml: cannot read: No such file or directory"]


def test_many_problems_reported_at_once_in_file_order(cwd: Path) -> None:
    write(
        cwd / "filterd.yaml",
        """\
        network:
          trusted_networks: [not-a-net]
        scoring:
          required_score: banana
          report_safe: 1.5
          colour: red
        rules:
          rule_timeout: forever
          max_scan_size: 0
        """,
    )
    write(cwd / "local.d/10.yaml", "state_dir: 5\n")
    assert problems() == [
        "filterd.yaml:2: network.trusted_networks[0]: expected an IP network such as 192.0.2.0/24, got 'not-a-net'",
        "filterd.yaml:4: scoring.required_score: expected a number between -1000 and 1000, got 'banana'",
        "filterd.yaml:5: scoring.report_safe: expected an integer between 0 and 2, got 1.5",
        "filterd.yaml:6: scoring.colour: unknown key; expected one of: required_score,"
        " report_safe, rewrite_subject, report_hostname, report_contact, score_overrides",
        "filterd.yaml:8: rules.rule_timeout: expected a duration between 1ms and 10s,"
        " got 'forever' (units: ms, s, m, h, d)",
        "filterd.yaml:9: rules.max_scan_size: expected a size between 1K and 1G, got 0",
        "local.d/10.yaml:1: state_dir: expected a string, got 5",
    ]


# -- the generic machinery, with a test-only schema ----------------------------------------


@dataclass(frozen=True, slots=True)
class _Extra(Section):
    mode: Literal["accept", "tempfail"] = setting("tempfail", doc="What to do on failure.")
    level: Literal[1, 2] = setting(1, doc="A numeric choice.")
    verbose: bool = setting(False, doc="Say more.")
    ratio: float = setting(0.5, min=0, doc="Lower bound only.")


@dataclass(frozen=True, slots=True)
class _TestSchema(Section):
    extra: _Extra = dataclasses.field(default_factory=_Extra)


def test_literal_bool_and_one_sided_bounds(cwd: Path) -> None:
    path = write(Path("t.yaml"), "extra: {mode: accept, level: 2, verbose: true, ratio: 9}\n")
    assert _load(_TestSchema, path) == _TestSchema(_Extra("accept", 2, True, 9.0))
    write(path, "extra: {mode: reject, level: true, verbose: 1, ratio: -1}\n")
    with pytest.raises(ConfigError) as info:
        _load(_TestSchema, path)
    assert [str(p) for p in info.value.problems] == [
        "t.yaml:1: extra.mode: expected one of 'accept', 'tempfail', got 'reject'",
        "t.yaml:1: extra.level: expected one of 1, 2, got true",
        "t.yaml:1: extra.verbose: expected true or false, got 1",
        "t.yaml:1: extra.ratio: expected a number >= 0, got -1",
    ]


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("500ms", 0.5),
        ("50ms", 0.05),
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("35d", 35 * 86400.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        (" 10 s ", 10.0),
        ("90", 90.0),
        ("0", 0.0),
        (90, 90.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(written: str | float, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    "written",
    ["", "s", "-5s", "5sec", "5S", "1h30m", "1e3s", "5 m s", "inf", "nan", True, None, -1,
     float("inf"), float("nan"), 10**400, [5]],
)  # fmt: skip
def test_parse_duration_rejects(written: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(written)


@pytest.mark.parametrize(
    ("written", "count"),
    [
        ("300", 300),
        (300, 300),
        ("512K", 512 * K),
        ("512k", 512 * K),
        ("10M", 10 * M),
        ("1G", 1024 * M),
        ("1.5K", 1536),
        ("0", 0),
        (10**30, 10**30),  # bounds are the schema's business, not the parser's
    ],
)
def test_parse_size(written: str | int, count: int) -> None:
    assert parse_size(written) == count


@pytest.mark.parametrize(
    "written",
    ["", "K", "-1K", "10MB", "1T", "0.1K", "1.5", "1e6", True, None, -1, 1.0, [1]],
)
def test_parse_size_rejects(written: object) -> None:
    with pytest.raises(ValueError, match="size|bytes"):
        parse_size(written)


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (0.0, "0s"),
        (0.05, "50ms"),
        (0.001, "1ms"),
        (0.0005, "0.0005s"),
        (1.5, "1500ms"),
        (90.0, "90s"),
        (600.0, "10m"),
        (7200.0, "2h"),
        (35 * 86400.0, "35d"),
        (0.1 + 0.2, "0.30000000000000004s"),
    ],
)
def test_format_duration_round_trips(seconds: float, written: str) -> None:
    assert format_duration(seconds) == written
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    ("count", "written"),
    [(0, "0"), (300, "300"), (1536, "1536"), (200 * K, "200K"), (10 * M, "10M"), (2048 * M, "2G")],
)
def test_format_size_round_trips(count: int, written: str) -> None:
    assert format_size(count) == written
    assert parse_size(written) == count


# -- immutability --------------------------------------------------------------------------


def test_config_is_immutable() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scoring.required_score = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scoring = cfg.scoring  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.scoring.score_overrides["X"] = 1.0  # type: ignore[index]
    with pytest.raises((AttributeError, TypeError)):  # 3.11 slotted frozen dataclasses: TypeError
        cfg.extra = 1  # type: ignore[attr-defined]
    assert isinstance(cfg.rules.dirs, tuple)
    assert hash(cfg) == hash(load_config())


def test_loaded_config_is_immutable_and_hashable(tmp_path: Path) -> None:
    path = write(
        tmp_path / "filterd.yaml",
        "scoring: {score_overrides: {A: 1}}\nnetwork: {trusted_networks: [10.0.0.0/8]}\n",
    )
    cfg = load_config(path)
    assert isinstance(cfg.scoring.score_overrides, FrozenMap)
    assert isinstance(cfg.network.trusted_networks, tuple)
    assert hash(cfg) == hash(load_config(path))
    assert {cfg: 1}[load_config(path)] == 1


def test_replace_makes_a_new_config() -> None:
    cfg = load_config()
    changed = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, report_safe=2))
    assert changed.scoring.report_safe == 2
    assert cfg.scoring.report_safe == 1


# -- dump, describe ------------------------------------------------------------------------

CUSTOM = """\
state_dir: state
scoring:
  required_score: -2.5
  rewrite_subject: "*** SPAM ***"
  report_contact: "yes"
  score_overrides: {BAYES_99: 3.5, "on": 0, "1.5": -1}
rules:
  dirs: ["0x10", "null"]
  rule_timeout: 1.5s
  scan_deadline: 2.3333s
  body_scan_size: 1537
  max_scan_size: 512M
network:
  trusted_networks: [10.1.2.3/8, "2001:db8::1"]
"""


def test_config_to_dict_writes_units() -> None:
    data = config_to_dict(Config())
    assert data["rules"]["rule_timeout"] == "50ms"
    assert data["rules"]["scan_deadline"] == "10s"
    assert data["rules"]["body_scan_size"] == "200K"
    assert data["rules"]["max_scan_size"] == "10M"
    assert data["rules"]["dirs"] == []
    assert data["scoring"]["score_overrides"] == {}
    assert list(data) == [f.name for f in dataclasses.fields(Config)]
    assert list(data)[:4] == ["state_dir", "scoring", "rules", "network"]


@pytest.mark.parametrize("diff", [False, True])
def test_dump_round_trips(tmp_path: Path, diff: bool) -> None:
    cfg = load_config(write(tmp_path / "in.yaml", CUSTOM))
    dumped = dump_config(cfg, diff=diff)
    assert load_config(write(tmp_path / "out.yaml", dumped)) == cfg
    data = yaml.safe_load(dumped)
    assert data["network"]["trusted_networks"] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert data["rules"]["body_scan_size"] == 1537


def test_dump_of_defaults_round_trips(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "out.yaml", dump_config(Config()))) == Config()


def test_dump_diff_shows_only_changes(tmp_path: Path) -> None:
    assert dump_config(Config(), diff=True) == "{}\n"
    path = write(tmp_path / "filterd.yaml", "rules:\n  scan_deadline: 2m\n  rule_timeout: 50ms\n")
    assert dump_config(load_config(path), diff=True) == "rules:\n  scan_deadline: 2m\n"


def test_describe_settings_covers_every_setting() -> None:
    rows = describe_settings()
    paths = [row[0] for row in rows]
    assert len(paths) == len(set(paths))

    def leaves(data: dict[str, object], prefix: str = "") -> list[str]:
        out = []
        for key, value in data.items():
            if isinstance(value, dict) and key not in ("score_overrides", "zones", "dkim_keys", "mailboxes"):
                out += leaves(value, f"{prefix}{key}.")
            else:
                out.append(prefix + key)
        return out

    assert paths == leaves(config_to_dict(Config()))
    assert all(type_ and default and doc for _, type_, default, doc in rows)
    table = {row[0]: row[1:3] for row in rows}
    assert table["rules.rule_timeout"] == ("duration, 1ms..10s", "50ms")
    assert table["rules.body_scan_size"] == ("size, 1K..64M", "200K")
    assert table["scoring.required_score"] == ("float, -1000..1000", "5.0")
    assert table["network.trusted_networks"] == ("list[cidr]", "[127.0.0.0/8, '::1/128']")
    assert table["scoring.score_overrides"] == ("map[str, float]", "{}")
    assert table["state_dir"] == ("str", "''")


def test_public_names() -> None:
    assert sorted(filterd.config.__all__) == [
        "AntivirusConfig",
        "AuthConfig",
        "BayesConfig",
        "Config",
        "DaemonConfig",
        "DeliverConfig",
        "DnsConfig",
        "DnsblConfig",
        "DnsblZone",
        "Duration",
        "FrozenMap",
        "GreylistConfig",
        "ListsConfig",
        "MilterConfig",
        "MtaConfig",
        "Network",
        "NetworkConfig",
        "ReputationConfig",
        "RulesConfig",
        "ScoringConfig",
        "Section",
        "Size",
        "StateConfig",
        "config_to_dict",
        "default_config",
        "describe_settings",
        "dump_config",
        "format_duration",
        "format_size",
        "load_config",
        "load_section_file",
        "parse_duration",
        "parse_size",
        "section",
        "setting",
    ]
    public = {n for n in vars(filterd.config) if not n.startswith("_")}
    assert public - set(filterd.config.__all__) <= {"load", "schema", "units"}
