"""Rule definitions: reading `rules/*.yaml`, checking them, and describing each rule.

A rule file is a YAML mapping from rule name to definition. The key that names the target
says the type:

    SUBJ_ALL_CAPS:
      header: Subject            # or Subject:raw, From:addr, From:name, ALL, ToCc, MESSAGEID
      match: /^[^a-z]{12,}$/     # or not_match: /re/, or exists: true|false
      describe: Subject is all capitals
      tflags: [noautolearn]
      score: 1.2                 # optional; else rules/scores.yaml; else 1.0

    BODY_VIAGRA:  {body: '/\\bviagra\\b/i', describe: ...}       # rendered text, a line per paragraph
    NBODY_X:      {nbody: '/.../i', ...}      # the same text de-obfuscated (homoglyphs, zero-width)
    RAW_X:        {rawbody: '/.../', ...}     # decoded text parts, HTML kept
    URI_X:        {uri: '/.../', ...}         # each URI found, canonical form
    FULL_X:       {full: '/.../', ...}        # the whole raw message
    META_X:       {meta: 'A && (B || C > 1)', ...}
    HTML_X:       {eval: html, ...}           # emitted by the check plugin named "html"

Scores may also come from `scores.yaml` (NAME: score) in any rule directory. Every problem is
collected with its file and line, so `filterd rules lint` can list them all at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from filterd.errors import Problem

__all__ = ["RULE_TYPES", "TFLAGS", "RuleDef", "RuleFileSet", "load_rule_files", "parse_regex"]

RULE_TYPES = ("header", "body", "nbody", "rawbody", "uri", "full", "meta", "eval")
TFLAGS = frozenset(
    {
        "nice",
        "net",
        "learn",
        "noautolearn",
        "userconf",
        "multiple",
        "nosubject",
        "autolearn_force",
        "noawl",
        "nolog",
        "autolearn_header",
        "autolearn_body",
    }
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_FIELDS = frozenset(
    {
        *RULE_TYPES,
        "match",
        "not_match",
        "exists",
        "if_unset",
        "describe",
        "tflags",
        "score",
        "maxhits",
        "priority",
        "area",
    }
)
_REGEX_LITERAL = re.compile(r"^/(.*)/([a-z]*)$", re.S)


@dataclass(frozen=True, slots=True)
class RuleDef:
    """One rule as written, before compilation."""

    name: str
    type: str  # one of RULE_TYPES
    target: str  # header spec for header rules, check name for eval, expression for meta
    pattern: str  # regex source ("" for exists/meta/eval)
    flags: str  # regex flags: subset of "ims"
    negate: bool  # not_match
    exists: bool | None  # exists: true/false
    if_unset: str | None
    describe: str
    tflags: frozenset[str]
    score: float | None
    maxhits: int
    priority: int
    file: str
    line: int

    @property
    def is_sub(self) -> bool:
        return self.name.startswith("__")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def parse_regex(text: str) -> tuple[str, str]:
    """Split '/pattern/flags' into (pattern, flags). Raises ValueError on a bad form."""
    m = _REGEX_LITERAL.match(text.strip())
    if not m:
        raise ValueError("a regex is written /pattern/flags, e.g. /\\bfree\\b/i")
    pattern, flags = m.group(1), m.group(2)
    bad = set(flags) - set("ims")
    if bad:
        raise ValueError(f"unknown regex flag(s) {''.join(sorted(bad))!r}; use i, m or s")
    return pattern, "".join(sorted(set(flags)))


@dataclass(slots=True)
class RuleFileSet:
    """Everything read from rule directories: definitions, scores, and the problems found."""

    rules: dict[str, RuleDef]
    scores: dict[str, tuple[tuple[float, float], str]]  # name -> ((without Bayes, with Bayes), "file:line")
    problems: list[Problem]


def _scalar(node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        return yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value
    if isinstance(node, yaml.SequenceNode):
        return [_scalar(n) for n in node.value]
    if isinstance(node, yaml.MappingNode):
        return {_scalar(k): _scalar(v) for k, v in node.value}
    return None


def _load_nodes(path: Path, problems: list[Problem]) -> yaml.MappingNode | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), None, "", f"cannot read: {exc}"))
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problems.append(Problem(str(path), line, "", f"YAML syntax error: {getattr(exc, 'problem', exc)}"))
        return None
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        problems.append(Problem(str(path), node.start_mark.line + 1, "", "a rule file is a mapping of rule names"))
        return None
    return node


def _read_scores(path: Path, node: yaml.MappingNode, out: RuleFileSet) -> None:
    """NAME: score, or NAME: [without_bayes, with_bayes] (two score sets, as SpamAssassin's)."""
    for key, value in node.value:
        line = key.start_mark.line + 1
        name = str(key.value)
        raw = _scalar(value)
        values = raw if isinstance(raw, list) else [raw]
        if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
            out.problems.append(
                Problem(str(path), line, name, f"a score is a number or [without_bayes, with_bayes], got {raw!r}")
            )
            continue
        if name in out.scores and out.scores[name][1].startswith(f"{path}:"):
            out.problems.append(Problem(str(path), line, name, "score given twice in one file"))
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        pair = (numbers[0], numbers[-1])
        out.scores[name] = (pair, f"{path}:{line}")


def _read_rule(path: Path, key: yaml.Node, value: yaml.Node, problems: list[Problem]) -> RuleDef | None:
    name = str(key.value)
    line = key.start_mark.line + 1
    where = str(path)

    def bad(message: str, at: yaml.Node | None = None) -> None:
        problems.append(Problem(where, (at or key).start_mark.line + 1, name, message))

    if not _NAME.match(name):
        bad("rule names are letters, digits and _, starting with a letter or _ (at most 64)")
        return None
    if not isinstance(value, yaml.MappingNode):
        bad("a rule is a mapping (header:/body:/uri:/meta:/eval: ..., describe:, score:)")
        return None
    fields: dict[str, object] = {}
    nodes: dict[str, yaml.Node] = {}
    for k, v in value.value:
        field_name = str(k.value)
        if field_name not in _FIELDS:
            bad(f"unknown field {field_name!r}", k)
            continue
        if field_name in fields:
            bad(f"field {field_name!r} given twice", k)
        fields[field_name] = _scalar(v)
        nodes[field_name] = v
    types = [t for t in RULE_TYPES if t in fields]
    if len(types) != 1:
        bad(
            "a rule has exactly one of: " + ", ".join(RULE_TYPES)
            if not types
            else f"a rule has one type, this one has {', '.join(types)}"
        )
        return None
    rtype = types[0]
    target = fields[rtype]
    if not isinstance(target, str) or not target.strip():
        bad(f"{rtype}: expected text", nodes[rtype])
        return None
    pattern, flags, negate, exists = "", "", False, None
    if rtype == "header":
        given = [k for k in ("match", "not_match", "exists") if k in fields]
        if len(given) != 1:
            bad("a header rule has exactly one of match:, not_match:, exists:")
            return None
        if given[0] == "exists":
            if not isinstance(fields["exists"], bool):
                bad("exists: expected true or false", nodes["exists"])
                return None
            exists = bool(fields["exists"])
        else:
            source = fields[given[0]]
            negate = given[0] == "not_match"
            if not isinstance(source, str):
                bad(f"{given[0]}: expected /regex/flags", nodes[given[0]])
                return None
            try:
                pattern, flags = parse_regex(source)
            except ValueError as exc:
                bad(f"{given[0]}: {exc}", nodes[given[0]])
                return None
    elif rtype in ("body", "nbody", "rawbody", "uri", "full"):
        for extra in ("match", "not_match", "exists", "if_unset"):
            if extra in fields:
                bad(f"{extra}: only header rules take it", nodes[extra])
        try:
            pattern, flags = parse_regex(target)
        except ValueError as exc:
            bad(f"{rtype}: {exc}", nodes[rtype])
            return None
        target = ""
    describe = fields.get("describe", "")
    if not isinstance(describe, str):
        bad("describe: expected text", nodes.get("describe"))
        describe = ""
    raw_tflags = fields.get("tflags", [])
    if isinstance(raw_tflags, str):
        raw_tflags = raw_tflags.split()
    tflags: set[str] = set()
    if not isinstance(raw_tflags, list):
        bad("tflags: expected a list", nodes.get("tflags"))
    else:
        for flag in raw_tflags:
            if str(flag) not in TFLAGS:
                bad(f"tflags: unknown flag {flag!r} (known: {', '.join(sorted(TFLAGS))})", nodes.get("tflags"))
            else:
                tflags.add(str(flag))
    score = fields.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
        bad(f"score: expected a number, got {score!r}", nodes.get("score"))
        score = None
    maxhits = fields.get("maxhits", 0)
    if isinstance(maxhits, bool) or not isinstance(maxhits, int) or maxhits < 0:
        bad("maxhits: expected a whole number >= 0", nodes.get("maxhits"))
        maxhits = 0
    priority = fields.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        bad("priority: expected a whole number", nodes.get("priority"))
        priority = 0
    if_unset = fields.get("if_unset")
    if if_unset is not None and not isinstance(if_unset, str):
        bad("if_unset: expected text", nodes.get("if_unset"))
        if_unset = None
    return RuleDef(
        name=name,
        type=rtype,
        target=str(target).strip(),
        pattern=pattern,
        flags=flags,
        negate=negate,
        exists=exists,
        if_unset=if_unset,
        describe=describe.strip(),
        tflags=frozenset(tflags),
        score=float(score) if score is not None else None,
        maxhits=int(maxhits),
        priority=int(priority),
        file=where,
        line=line,
    )


def load_rule_files(dirs: Iterable[Path]) -> RuleFileSet:
    """Read every *.yaml in the directories, in order; a later directory may redefine a rule."""
    out = RuleFileSet({}, {}, [])
    for directory in dirs:
        if not directory.is_dir():
            out.problems.append(Problem(str(directory), None, "", "rule directory does not exist"))
            continue
        defined_here: dict[str, str] = {}
        for path in sorted(directory.glob("*.yaml")):
            node = _load_nodes(path, out.problems)
            if node is None:
                continue
            if path.name == "scores.yaml":
                _read_scores(path, node, out)
                continue
            for key, value in node.value:
                rule = _read_rule(path, key, value, out.problems)
                if rule is None:
                    continue
                if rule.name in defined_here:
                    out.problems.append(
                        Problem(str(path), rule.line, rule.name, f"defined again (first at {defined_here[rule.name]})")
                    )
                    continue
                defined_here[rule.name] = rule.where
                out.rules[rule.name] = rule
    return out
