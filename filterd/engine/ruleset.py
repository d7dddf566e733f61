"""Compiling rule definitions once, at load, into something a scan runs in microseconds.

Regex rules are grouped by the text they read (one `MultiMatcher` per target); meta rules are
compiled into one generated Python function evaluated in dependency order. Any problem (bad
regex, a meta naming an unknown rule, a cycle, an eval rule no check emits) is collected with
its file and line; `compile_rules` raises one `RuleError` listing them all.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses

import regex

from filterd.engine.matcher import CompiledPattern, MultiMatcher, compile_fallback
from filterd.engine.message import ParsedMessage
from filterd.engine.plugin import ScanContext
from filterd.engine.rules import RuleDef, RuleFileSet
from filterd.errors import Problem, RuleError

__all__ = ["CompiledRules", "RuleInfo", "compile_rules", "header_text"]

_AREA = {"body": "BODY: ", "nbody": "BODY: ", "rawbody": "RAW: ", "uri": "URI: ", "full": "FULL: "}
_META_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||<=|>=|==|!=|[!()+\-*/<>]))")
_SPECIAL_HEADERS = frozenset({"ALL", "ToCc", "MESSAGEID", "EnvelopeFrom"})


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What scoring and reports need to know about a rule."""

    name: str
    type: str
    describe: str
    score: float  # when Bayes gives no opinion (untrained, disabled)
    tflags: frozenset[str]
    area: str  # report prefix: "BODY: ", "URI: ", ...
    where: str  # file:line
    score_bayes: float | None = None  # when a BAYES_xx rule fired; None = the same as score

    def score_for(self, bayes_active: bool) -> float:
        return self.score_bayes if bayes_active and self.score_bayes is not None else self.score

    @property
    def is_sub(self) -> bool:
        return self.name.startswith("__")


@dataclass(frozen=True, slots=True)
class HeaderRule:
    name: str
    spec: str
    negate: bool
    exists: bool | None
    if_unset: str | None


@dataclass(slots=True)
class CompiledRules:
    """The whole rule set, ready to run."""

    info: dict[str, RuleInfo]
    header_matchers: dict[str, MultiMatcher]  # spec -> matcher over that header text
    header_rules: dict[str, HeaderRule]
    exists_rules: list[HeaderRule]
    text_matchers: dict[str, MultiMatcher]  # body, nbody, rawbody, full
    uri_matcher: MultiMatcher | None
    multiple: dict[str, tuple[regex.Pattern[str], int, str]]  # name -> (rx, maxhits, type)
    nosubject: dict[str, regex.Pattern[str]]  # body rules that must not match the Subject line
    metas: Callable[[dict[str, float]], list[str]]
    meta_names: tuple[str, ...]
    meta_deps: dict[str, frozenset[str]]  # meta rule -> the rules its expression names
    eval_rules: dict[str, str]  # rule name -> check name
    fallback_rules: tuple[str, ...] = ()
    problems: list[Problem] = field(default_factory=list)  # warnings (lint)


def header_text(msg: ParsedMessage, ctx: ScanContext, spec: str) -> str | None:
    """The text a header rule tests; None when the header is absent."""
    name, _, modifier = spec.partition(":")
    if name == "ALL":
        if modifier == "raw":
            return msg.header_block
        return "\n".join(f"{h.name}: {h.value}" for h in msg.headers)
    if name == "ToCc":
        values = (
            msg.get_all("to") + msg.get_all("cc")
            if modifier != "raw"
            else (msg.get_raw_all("to") + msg.get_raw_all("cc"))
        )
    elif name == "MESSAGEID":
        values = msg.get_all("message-id") + msg.get_all("resent-message-id") + msg.get_all("x-message-id")
    elif name == "EnvelopeFrom":
        if ctx.mail_from is not None:
            values = [ctx.mail_from]
        else:
            values = msg.get_all("return-path")[:1] or msg.get_all("x-envelope-from")[:1]
    elif modifier == "raw":
        values = msg.get_raw_all(name)
    else:
        values = msg.get_all(name)
    if not values:
        return None
    if modifier in ("addr", "name"):
        try:
            pairs = getaddresses(values[:1])
        except Exception:
            pairs = []
        if not pairs:
            return ""
        display, address = pairs[0]
        if modifier == "addr":
            return address if address else values[0].strip().strip("<>")
        return display
    return "\n".join(values)


def _meta_code(rule: RuleDef, known: Mapping[str, object], problems: list[Problem]) -> tuple[str, set[str]] | None:
    """Translate a meta expression into a Python expression over h['NAME']."""
    expr = rule.target
    out: list[str] = []
    deps: set[str] = set()
    pos = 0
    while pos < len(expr):
        m = _META_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            problems.append(Problem(rule.file, rule.line, rule.name, f"meta: cannot read {expr[pos:]!r}"))
            return None
        pos = m.end()
        number, word, op = m.groups()
        if number is not None:
            out.append(number)
        elif word is not None:
            if word not in known:
                problems.append(Problem(rule.file, rule.line, rule.name, f"meta: unknown rule {word!r}"))
                return None
            deps.add(word)
            out.append(f"h.get({word!r},0)")
        else:
            out.append({"&&": " and ", "||": " or ", "!": " not "}.get(op, f" {op} "))
    code = "".join(out).strip()
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        problems.append(Problem(rule.file, rule.line, rule.name, f"meta: not a valid expression: {expr!r}"))
        return None
    allowed = (
        ast.Expression,
        ast.BoolOp,
        ast.And,
        ast.Or,
        ast.UnaryOp,
        ast.Not,
        ast.USub,
        ast.UAdd,
        ast.BinOp,
        ast.Add,
        ast.Sub,
        ast.Mult,
        ast.Div,
        ast.Compare,
        ast.Lt,
        ast.Gt,
        ast.LtE,
        ast.GtE,
        ast.Eq,
        ast.NotEq,
        ast.Constant,
        ast.Call,
        ast.Attribute,
        ast.Name,
        ast.Load,
    )
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            problems.append(Problem(rule.file, rule.line, rule.name, f"meta: not allowed: {expr!r}"))
            return None
    # Division by a rule that did not hit must not raise.
    code = ast.unparse(_SafeDiv().visit(tree))
    return code, deps


class _SafeDiv(ast.NodeTransformer):
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return ast.Call(func=ast.Name("_div", ast.Load()), args=[node.left, node.right], keywords=[])
        return node


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _build_meta_function(
    metas: list[RuleDef], known: Mapping[str, object], problems: list[Problem]
) -> tuple[Callable[[dict[str, float]], list[str]], tuple[str, ...], dict[str, frozenset[str]]]:
    compiled: dict[str, tuple[str, set[str]]] = {}
    for rule in metas:
        result = _meta_code(rule, known, problems)
        if result is not None:
            compiled[rule.name] = result
    # Topological order; a cycle is an error for every rule on it.
    order: list[str] = []
    state: dict[str, int] = {}
    by_name = {r.name: r for r in metas}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2 or name not in compiled:
            return
        if state.get(name) == 1:
            rule = by_name[name]
            problems.append(Problem(rule.file, rule.line, name, "meta: cycle " + " -> ".join([*chain, name])))
            return
        state[name] = 1
        for dep in sorted(compiled[name][1]):
            visit(dep, [*chain, name])
        state[name] = 2
        order.append(name)

    for name in sorted(compiled):
        visit(name, [])
    lines = ["def _metas(h):", "    hit = []"]
    for name in order:
        code = compiled[name][0]
        lines.append(f"    v = {code}")
        lines.append("    if v:")
        lines.append(f"        h[{name!r}] = float(v) if not isinstance(v, bool) else 1.0")
        lines.append(f"        hit.append({name!r})")
    lines.append("    return hit")
    namespace: dict[str, object] = {
        "_div": _div,
        "__builtins__": {"float": float, "isinstance": isinstance, "bool": bool},
    }
    exec(compile("\n".join(lines), "<meta rules>", "exec"), namespace)
    deps = {name: frozenset(compiled[name][1]) for name in order}
    return namespace["_metas"], tuple(order), deps  # type: ignore[return-value]


def compile_rules(
    files: RuleFileSet,
    *,
    emitted: Mapping[str, frozenset[str]],
    score_overrides: Mapping[str, float] | None = None,
    rule_timeout: float = 0.05,
) -> CompiledRules:
    """Compile the rule set. ``emitted`` maps check names to the rules each can emit."""
    problems = list(files.problems)
    warnings: list[Problem] = []
    rules = files.rules
    emitter: dict[str, str] = {}
    for check, names in emitted.items():
        for n in names:
            emitter[n] = check
    info: dict[str, RuleInfo] = {}
    groups: dict[str, list[CompiledPattern]] = {}
    header_rules: dict[str, HeaderRule] = {}
    exists_rules: list[HeaderRule] = []
    multiple: dict[str, tuple[regex.Pattern[str], int, str]] = {}
    nosubject: dict[str, regex.Pattern[str]] = {}
    eval_rules: dict[str, str] = {}
    overrides = dict(score_overrides or {})
    for name, rule in rules.items():
        if name in files.scores:
            score, score_bayes = files.scores[name][0]
        elif rule.score is not None:
            score = score_bayes = rule.score
        else:
            score = score_bayes = 0.0 if rule.is_sub else 1.0
        if name in overrides:
            score = score_bayes = overrides[name]
        if rule.is_sub:
            score = score_bayes = 0.0
        if not rule.describe and not rule.is_sub:
            warnings.append(Problem(rule.file, rule.line, name, "no describe: text"))
        if "nice" in rule.tflags and score > 0:
            warnings.append(Problem(rule.file, rule.line, name, "tflags nice but positive score"))
        info[name] = RuleInfo(
            name,
            rule.type,
            rule.describe or "No description available.",
            score,
            rule.tflags,
            _AREA.get(rule.type, ""),
            rule.where,
            score_bayes if score_bayes != score else None,
        )
        if rule.type == "eval":
            if rule.target not in emitted:
                problems.append(
                    Problem(
                        rule.file,
                        rule.line,
                        name,
                        f"eval: no check named {rule.target!r} (known: {', '.join(sorted(emitted))})",
                    )
                )
            elif name not in emitted[rule.target]:
                problems.append(Problem(rule.file, rule.line, name, f"eval: check {rule.target!r} never emits {name}"))
            eval_rules[name] = rule.target
            continue
        if rule.type == "meta":
            continue
        if rule.type == "header":
            base = rule.target.partition(":")[0]
            modifier = rule.target.partition(":")[2]
            if modifier not in ("", "raw", "addr", "name"):
                problems.append(Problem(rule.file, rule.line, name, f"header: unknown modifier :{modifier}"))
                continue
            if not re.match(r"^[!-9;-~]+$", base):
                problems.append(Problem(rule.file, rule.line, name, f"header: bad header name {base!r}"))
                continue
            spec = rule.target if base in _SPECIAL_HEADERS else (base.lower() + (":" + modifier if modifier else ""))
            hr = HeaderRule(name, spec, rule.negate, rule.exists, rule.if_unset)
            if rule.exists is not None:
                exists_rules.append(hr)
                continue
            header_rules[name] = hr
            group = "h:" + spec
        else:
            group = rule.type
        flags = rule.flags
        if rule.type in ("body", "nbody", "rawbody") and "m" not in flags:
            flags += "m"  # ^ and $ anchor at each paragraph line, as SpamAssassin's per-line matching
        try:
            rx = compile_fallback(rule.pattern, flags)
        except (regex.error, ValueError, OverflowError) as exc:
            problems.append(Problem(rule.file, rule.line, name, f"bad regex: {exc}"))
            continue
        groups.setdefault(group, []).append(CompiledPattern(name, rule.pattern, flags, rx))
        if "multiple" in rule.tflags:
            multiple[name] = (rx, rule.maxhits, rule.type)
        if "nosubject" in rule.tflags:
            nosubject[name] = rx
    # Rules emitted by checks but not declared: scores and descriptions must live in rules/.
    for n, check in emitter.items():
        if n not in rules and not n.startswith("CHECK_ERROR_"):
            problems.append(Problem("<checks>", None, n, f"emitted by check {check!r} but not declared in rules/"))
    known = {**rules}
    metas = [r for r in rules.values() if r.type == "meta"]
    meta_fn, meta_order, meta_deps = _build_meta_function(metas, known, problems)
    if problems:
        raise RuleError(problems)
    matchers = {g: MultiMatcher.build(p, rule_timeout) for g, p in groups.items()}
    fallback = [n for m in matchers.values() for n in m.fallback_names]
    return CompiledRules(
        info=info,
        header_matchers={g[2:]: m for g, m in matchers.items() if g.startswith("h:")},
        header_rules=header_rules,
        exists_rules=exists_rules,
        text_matchers={g: m for g, m in matchers.items() if not g.startswith("h:") and g != "uri"},
        uri_matcher=matchers.get("uri"),
        multiple=multiple,
        nosubject=nosubject,
        metas=meta_fn,
        meta_names=meta_order,
        meta_deps=meta_deps,
        eval_rules=eval_rules,
        fallback_rules=tuple(fallback),
        problems=warnings,
    )
