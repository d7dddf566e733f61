"""Delivery recipes: a small YAML language in the spirit of procmail and maildrop (pure: parse
and evaluate, no I/O but reading the file).

A recipe file is a list of rules, tried in order. A rule is a mapping of conditions (all must
hold; a rule without any always matches) and exactly one action::

    - name: certain spam goes away            # optional, shown in logs
      score: ">= 15"
      discard: true
    - verdict: spam                           # spam | ham | unfiltered (the daemon did not answer)
      folder: Junk
    - any:                                    # all: / any: take lists of condition mappings,
        - header: {List-Id: '/<dev\\.lists\\.example\\.org>/i'}   # not: takes one mapping
        - sender: "*@lists.example.org"
      folder: Lists/dev
    - size: "> 5M"
      pipe: "archive-big-mail --user alice"   # shell command (or a list: argv, no shell)
      stop: false                             # then go on, like procmail's c flag
    - header: {Subject: '/invoice/i', From: ['/billing@/', '/accounts@/']}
      copy: Invoices                          # a copy to a folder, then go on
    - sender: boss@example.com
      forward: me@phone.example               # or a list of addresses

Conditions:
  ``score``   a comparison with the daemon's score: ``">= 5"``, ``"< 0"`` (``>= > <= < == !=``),
              or a list of them, all true. False when the daemon gave no score.
  ``verdict`` ``spam``, ``ham``, or ``unfiltered`` when the daemon was not asked or failed.
  ``header``  header name -> ``/regex/flags`` (flags ``imsx``) or a list of them; true when any
              named header, any occurrence of it, matches any of its regexes. Values are
              unfolded and RFC 2047-decoded.
  ``size``    a comparison with the size of the message as received: ``"> 1M"`` (K, M, G).
  ``sender``  a glob (``*``, ``?``, ``[]``), or a list, on the envelope sender and each From
              address, case-insensitive.

Actions (one per rule):
  ``folder``  store there and stop: a Maildir++ folder (``Junk``, ``Lists/dev``) or, delivering
              to an mbox, another mbox file (relative names under ``deliver.mbox_folders``).
              ``INBOX`` is the main mailbox.
  ``copy``    like ``folder`` with ``stop: false``.
  ``discard`` ``true``: the message is dropped (exit 0); always stops.
  ``forward`` send to the address(es) with ``deliver.sendmail``, then stop.
  ``pipe``    run a command with the message on stdin, then stop; its sysexits code is ours.
  ``stop``    ``false`` makes a rule go on to the next ones after its action (not with discard).

The first matching rule that stops ends processing; when none does, the message goes to INBOX
(also after copies). Problems are collected with their file:line and raised together as one
`ConfigError`; the caller then delivers to INBOX, so a broken file never loses mail.
"""

from __future__ import annotations

__all__ = [
    "Action",
    "Facts",
    "Recipes",
    "Rule",
    "Step",
    "evaluate",
    "facts_from_message",
    "parse_recipes",
]

import difflib
import email.errors
import email.header
import email.utils
import fnmatch
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import yaml
from yaml.constructor import SafeConstructor

from filterd.config.units import parse_size
from filterd.errors import ConfigError, Problem
from filterd.mda.headers import split_fields

Verdict: TypeAlias = Literal["spam", "ham", "unfiltered"]
FolderCheck: TypeAlias = Callable[[str], str | None]  # a folder name -> why it is bad, or None

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_COMPARISON = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*\Z")
_REGEX = re.compile(r"/(.*)/([imsx]*)\Z", re.S)
_FLAGS = {"i": re.I, "m": re.M, "s": re.S, "x": re.X}
_CONDITIONS = ("score", "verdict", "header", "size", "sender", "all", "any", "not")
_ACTIONS = ("folder", "copy", "discard", "forward", "pipe")
_KEYS = (*_CONDITIONS, *_ACTIONS, "stop", "name")
_ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"\\-][^\s<>()\[\],;:\"\\]*(@[A-Za-z0-9.-]+)?\Z")
_MAX_HEADER_VALUE = 16 * 1024  # longer values are matched on their start only


# -------------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Facts:
    """What conditions look at, for one message."""

    score: float | None
    verdict: Verdict
    headers: tuple[tuple[str, str], ...]  # (lower-case name, unfolded decoded value), in order
    size: int
    senders: tuple[str, ...]  # envelope sender, then From addresses; lower case

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


class _Condition:
    __slots__ = ()

    def matches(self, facts: Facts) -> bool:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Compare(_Condition):
    what: Literal["score", "size"]
    tests: tuple[tuple[Callable[[float, float], bool], float], ...]

    def matches(self, facts: Facts) -> bool:
        value = facts.score if self.what == "score" else facts.size
        return value is not None and all(op(value, limit) for op, limit in self.tests)


@dataclass(frozen=True, slots=True)
class _Verdict(_Condition):
    verdict: Verdict

    def matches(self, facts: Facts) -> bool:
        return facts.verdict == self.verdict


@dataclass(frozen=True, slots=True)
class _Header(_Condition):
    patterns: tuple[tuple[str, tuple[re.Pattern[str], ...]], ...]

    def matches(self, facts: Facts) -> bool:
        return any(
            p.search(value[:_MAX_HEADER_VALUE])
            for name, patterns in self.patterns
            for value in facts.header_values(name)
            for p in patterns
        )


@dataclass(frozen=True, slots=True)
class _Sender(_Condition):
    globs: tuple[str, ...]

    def matches(self, facts: Facts) -> bool:
        return any(fnmatch.fnmatchcase(s, g) for s in facts.senders for g in self.globs)


@dataclass(frozen=True, slots=True)
class _All(_Condition):
    items: tuple[_Condition, ...]

    def matches(self, facts: Facts) -> bool:
        return all(c.matches(facts) for c in self.items)


@dataclass(frozen=True, slots=True)
class _Any(_Condition):
    items: tuple[_Condition, ...]

    def matches(self, facts: Facts) -> bool:
        return any(c.matches(facts) for c in self.items)


@dataclass(frozen=True, slots=True)
class _Not(_Condition):
    item: _Condition

    def matches(self, facts: Facts) -> bool:
        return not self.item.matches(facts)


@dataclass(frozen=True, slots=True)
class Action:
    """What a rule does. ``target``: folder name, command (str: shell; tuple: argv), or the
    addresses of a forward; empty for discard."""

    kind: Literal["folder", "discard", "forward", "pipe"]
    target: str | tuple[str, ...] = ""
    stop: bool = True


@dataclass(frozen=True, slots=True)
class Rule:
    number: int  # 1-based position in the file
    where: str  # "file:line" of the rule, for logs
    name: str
    condition: _Condition
    action: Action


@dataclass(frozen=True, slots=True)
class Recipes:
    file: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class Step:
    """One action to carry out; ``rule`` is None for the INBOX default."""

    action: Action
    rule: Rule | None = None

    @property
    def where(self) -> str:
        """``rule 2 'spam away' (recipes.yaml:5)``, or ``default`` for INBOX."""
        if self.rule is None:
            return "default"
        name = f" {self.rule.name!r}" if self.rule.name else ""
        return f"rule {self.rule.number}{name} ({self.rule.where})"


INBOX = Action("folder", "INBOX")


def evaluate(recipes: Recipes | None, facts: Facts) -> list[Step]:
    """The actions for a message, in order; the last one stops (INBOX when no rule does)."""
    steps: list[Step] = []
    for rule in recipes.rules if recipes else ():
        if rule.condition.matches(facts):
            steps.append(Step(rule.action, rule))
            if rule.action.stop:
                return steps
    steps.append(Step(INBOX))
    return steps


# ----------------------------------------------------------------------------- facts


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape").encode("utf-8", "replace").decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


def facts_from_message(
    message: bytes, *, score: float | None, verdict: Verdict, size: int, sender: str | None
) -> Facts:
    """The header fields of ``message`` (unfolded, decoded; `filterd.mda.headers.split_fields`)
    and the other facts, as `Facts`."""
    fields, _ = split_fields(message)
    headers = tuple((f.key.decode("ascii", "replace"), _decode(f.value)) for f in fields if f.name)
    senders = [sender.lower()] if sender else []
    from_values = [v for n, v in headers if n == "from"]
    senders += [addr.lower() for _, addr in email.utils.getaddresses(from_values) if addr]
    return Facts(score, verdict, headers, size, tuple(senders))


# ----------------------------------------------------------------------------- parsing


def parse_recipes(text: bytes | str, file: str = "<recipes>", *, check_folder: FolderCheck | None = None) -> Recipes:
    """Parse recipe text; ``check_folder`` vets folder names for the mailbox kind in use."""
    parser = _Parser(file, check_folder)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(Problem(file, line, "", f"invalid YAML: {exc.problem}")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(Problem(file, None, "", f"invalid YAML: {' '.join(str(exc).split())}")) from None
    if root is None:
        return Recipes(file)
    if not isinstance(root, yaml.SequenceNode):
        parser.problem(root, "", "expected a list of rules (each starting with '- ')")
    else:
        rules = []
        for i, node in enumerate(root.value):
            try:
                rules.append(parser.rule(i + 1, node))
            except (ValueError, TypeError, RecursionError, yaml.YAMLError) as exc:
                # YAML that parses but holds no usable value (a date like 2024-02-30, an unknown
                # tag, a recursive alias): a problem of the file like any other, never a crash
                # that would defer the user's mail instead of delivering it to the inbox.
                parser.problem(node, "", f"unusable value: {' '.join(str(exc).split())[:200]}")
        if not parser.problems:
            return Recipes(file, tuple(r for r in rules if r is not None))
    raise ConfigError(sorted(parser.problems, key=lambda p: p.line or 0))


@dataclass
class _Parser:
    file: str
    check_folder: FolderCheck | None
    problems: list[Problem] = field(default_factory=list)
    constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def problem(self, node: yaml.Node, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, node.start_mark.line + 1, key, message))

    def value(self, node: yaml.Node) -> object:
        return self.constructor.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, key: str, what: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"expected {what} (a mapping of key: value)")
            return None
        items = []
        seen: dict[str, int] = {}
        for k, v in node.value:
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else ""
            if name in seen:
                self.problem(k, _join(key, name), f"given twice (first at line {seen[name]})")
            seen[name] = k.start_mark.line + 1
            items.append((name, k, v))
        return items

    def rule(self, number: int, node: yaml.Node) -> Rule | None:
        key = f"rule {number}"
        items = self.mapping(node, key, "a rule")
        if items is None:
            return None
        before = len(self.problems)
        conditions: list[_Condition] = []
        actions: list[tuple[str, yaml.Node, yaml.Node]] = []
        stop: bool | None = None
        name = ""
        for k, knode, vnode in items:
            if k in _ACTIONS:
                actions.append((k, knode, vnode))
            elif k == "stop":
                value = self.value(vnode)
                if isinstance(value, bool):
                    stop = value
                else:
                    self.problem(vnode, _join(key, k), f"expected true or false, got {_show(value)}")
            elif k == "name":
                name = str(self.value(vnode))
            elif k in _CONDITIONS:
                cond = self.condition(k, vnode, _join(key, k))
                if cond is not None:
                    conditions.append(cond)
            else:
                self.unknown(knode, key, k, _KEYS)
        if not actions:
            self.problem(node, key, f"expected one action: {', '.join(_ACTIONS)}")
        elif len(actions) > 1:
            names = ", ".join(a for a, _, _ in actions)
            self.problem(actions[1][1], key, f"expected one action per rule, got {names} (use copy or stop: false)")
        action = self.action(*actions[0], key, stop) if len(actions) == 1 else None
        if action is None or len(self.problems) > before:
            return None
        where = f"{self.file}:{node.start_mark.line + 1}"
        return Rule(number, where, name, _All(tuple(conditions)), action)

    def unknown(self, knode: yaml.Node, key: str, name: str, choices: Sequence[str]) -> None:
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(choices)}"
        self.problem(knode, _join(key, name), f"unknown key{hint}")

    def conditions(self, node: yaml.Node, key: str) -> _Condition | None:
        """A mapping of conditions, all true (inside all:/any:/not:)."""
        items = self.mapping(node, key, "conditions")
        if items is None:
            return None
        found = []
        for k, knode, vnode in items:
            if k in _CONDITIONS:
                cond = self.condition(k, vnode, _join(key, k))
                if cond is not None:
                    found.append(cond)
            else:
                self.unknown(knode, key, k, _CONDITIONS)
        if not items:
            self.problem(node, key, "expected at least one condition")
        return _All(tuple(found))

    def condition(self, kind: str, node: yaml.Node, key: str) -> _Condition | None:
        if kind in ("all", "any"):
            if not isinstance(node, yaml.SequenceNode) or not node.value:
                self.problem(node, key, "expected a non-empty list of condition mappings")
                return None
            parts = [self.conditions(item, f"{key}[{i + 1}]") for i, item in enumerate(node.value)]
            items = tuple(p for p in parts if p is not None)
            return _All(items) if kind == "all" else _Any(items)
        if kind == "not":
            inner = self.conditions(node, key)
            return _Not(inner) if inner is not None else None
        if kind == "header":
            return self.header(node, key)
        if kind == "verdict":
            value = self.value(node)
            if value not in ("spam", "ham", "unfiltered"):
                self.problem(node, key, f"expected spam, ham or unfiltered, got {_show(value)}")
                return None
            return _Verdict(value)
        if kind == "sender":
            globs = self.strings(node, key, "a sender glob such as '*@example.com'")
            return _Sender(tuple(g.lower() for g in globs)) if globs else None
        return self.compare(kind, node, key)  # score, size

    def compare(self, kind: str, node: yaml.Node, key: str) -> _Condition | None:
        example = "'>= 5'" if kind == "score" else "'> 1M'"
        texts = self.strings(node, key, f"a comparison such as {example}")
        tests = []
        for text in texts:
            m = _COMPARISON.match(text)
            try:
                if m is None:
                    raise ValueError
                limit = float(m.group(2)) if kind == "score" else float(parse_size(m.group(2)))
            except ValueError:
                self.problem(node, key, f"expected a comparison such as {example}, got {text!r}")
                continue
            tests.append((_OPS[m.group(1)], limit))
        if not tests:
            return None
        return _Compare("score" if kind == "score" else "size", tuple(tests))

    def header(self, node: yaml.Node, key: str) -> _Condition | None:
        items = self.mapping(node, key, "header names with /regex/ values")
        if not items:
            if items is not None:
                self.problem(node, key, "expected at least one header name")
            return None
        patterns = []
        for name, knode, vnode in items:
            if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                self.problem(knode, key, f"expected a header field name, got {name!r}")
                continue
            compiled = []
            for text in self.strings(vnode, _join(key, name), "a regex written /regex/flags"):
                m = _REGEX.match(text)
                if m is None:
                    self.problem(vnode, _join(key, name), f"expected /regex/ with flags from imsx, got {text!r}")
                    continue
                flags = 0
                for f in m.group(2):
                    flags |= _FLAGS[f]
                try:
                    compiled.append(re.compile(m.group(1), flags))
                except re.error as exc:
                    self.problem(vnode, _join(key, name), f"bad regex {text!r}: {exc}")
            if compiled:
                patterns.append((name.lower(), tuple(compiled)))
        return _Header(tuple(patterns)) if patterns else None

    def strings(self, node: yaml.Node, key: str, what: str) -> list[str]:
        """A string or a non-empty list of strings."""
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out = []
        for n in nodes:
            value = self.value(n) if isinstance(n, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                self.problem(n, key, f"expected {what}, got {_show(value if value is not None else n)}")
            else:
                out.append(value)
        if not nodes:
            self.problem(node, key, f"expected {what}, got an empty list")
        return out

    def action(self, kind: str, knode: yaml.Node, vnode: yaml.Node, key: str, stop: bool | None) -> Action | None:
        key = _join(key, kind)
        if kind == "discard":
            if self.value(vnode) is not True:
                self.problem(vnode, key, "expected true (to keep the message, remove the rule)")
                return None
            if stop is False:
                self.problem(knode, key, "a discarded message cannot go on to later rules (stop: false)")
                return None
            return Action("discard")
        if kind == "copy" and stop is True:
            self.problem(knode, key, "copy goes on to later rules; use folder to stop")
            return None
        go_on = stop is False or kind == "copy"
        if kind in ("folder", "copy"):
            names = self.strings(vnode, key, "a folder name")
            if len(names) != 1 or isinstance(vnode, yaml.SequenceNode):
                if names:
                    self.problem(vnode, key, "expected one folder (use copy rules for more)")
                return None
            why = self.check_folder(names[0]) if self.check_folder else None
            if why:
                self.problem(vnode, key, why)
                return None
            return Action("folder", names[0], stop=not go_on)
        if kind == "forward":
            addresses = self.strings(vnode, key, "an address or a list of addresses")
            bad = [a for a in addresses if not _ADDRESS.match(a)]
            for a in bad:
                self.problem(vnode, key, f"expected a mail address such as user@example.org, got {a!r}")
            if not addresses or bad:
                return None
            return Action("forward", tuple(addresses), stop=not go_on)
        # pipe: a shell command line, or an argv list
        commands = self.strings(vnode, key, "a command line, or a list of arguments")
        if not commands:
            return None
        target = tuple(commands) if isinstance(vnode, yaml.SequenceNode) else commands[0]
        return Action("pipe", target, stop=not go_on)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: object) -> str:
    if isinstance(value, yaml.Node):
        return "a list" if isinstance(value, yaml.SequenceNode) else "a mapping"
    return repr(value)
