"""YAML in, a checked `Config` out; and the way back (dump, describe).

Layers, each over the one before: built-in defaults -> the file -> ``local.d/*.yaml`` next to
it (sorted; mappings merge recursively, scalars and lists replace) -> ``override.d/*.yaml``
(sorted; a setting given there replaces the whole value, e.g. all of ``score_overrides``;
sections are still entered key by key, so one setting can be overridden alone).

Every problem in every layer is collected and raised together as one `ConfigError`, each
naming ``file:line: key.path``. Lines come from PyYAML node marks: files are composed, not
loaded, and the node tree is merged and checked against the schema.
"""

from __future__ import annotations

__all__ = [
    "config_to_dict",
    "default_config",
    "describe_settings",
    "dump_config",
    "load_config",
    "load_section_file",
]

import contextlib
import dataclasses
import difflib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeAlias, TypeVar, Union, cast, get_args, get_origin

import yaml
from yaml.constructor import SafeConstructor

from filterd.config.schema import (
    Config,
    FrozenMap,
    Network,
    SchemaField,
    Section,
    SettingInfo,
    schema_fields,
)
from filterd.config.units import (
    DURATION_UNITS,
    SIZE_UNITS,
    Duration,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from filterd.errors import ConfigError, Problem

S = TypeVar("S", bound=Section)

_Tree: TypeAlias = "dict[str, _Entry]"


@dataclass(frozen=True, slots=True)
class _Entry:
    """A key as written, and its value: a YAML node, or a `_Tree` for a mapping."""

    key: yaml.Node
    value: yaml.Node | _Tree


class _Invalid(Exception):
    """A value does not fit its setting; ``hint`` is appended to the message."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(hint)
        self.hint = hint


# -- public API ----------------------------------------------------------------------------


def default_config() -> Config:
    """The built-in defaults."""
    return Config()


def load_config(path: str | Path | None = None, *, state_dir: str | None = None) -> Config:
    """Load ``path`` with its ``local.d`` and ``override.d`` layers; ``None`` = defaults only.

    ``state_dir`` (from the command line) wins over the file. Raises `ConfigError` listing
    every problem found.
    """
    cfg = Config() if path is None else _load(Config, Path(path))
    if state_dir is not None:
        cfg = dataclasses.replace(cfg, state_dir=state_dir)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data for YAML/JSON: durations as ``50ms``, sizes as ``200K``, lists as lists."""
    return _to_dict(cfg, None)


def dump_config(cfg: Config, *, diff: bool = False) -> str:
    """YAML of the settings in force; with ``diff`` only those that differ from the defaults.

    Loading the result gives back an equal `Config`.
    """
    data = _to_dict(cfg, Config() if diff else None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def describe_settings() -> list[tuple[str, str, str, str]]:
    """Every setting as (key path, type with bounds, default as YAML, doc line)."""
    return [
        (path, _type_name(f), _inline(_render(f.type, f.default)), cast(SettingInfo, f.info).doc)
        for path, f in _walk(Config, "")
    ]


# -- reading and merging layers ------------------------------------------------------------


def load_section_file(schema: type[S], path: str | Path) -> S:
    """Read one YAML file (no local.d/override.d layers) into ``schema``, checked like the
    main configuration (used for per-user settings). Raises ConfigError."""
    return _load(schema, Path(path), layered=False)


def _load(schema: type[S], path: Path, *, layered: bool = True) -> S:
    """Read, merge and check all layers of ``path`` against ``schema``."""
    layers = [(path, False)]
    if layered:
        layers += [(f, False) for f in sorted((path.parent / "local.d").glob("*.yaml"))]
        layers += [(f, True) for f in sorted((path.parent / "override.d").glob("*.yaml"))]
    problems: list[Problem] = []
    tree: _Tree = {}
    for file, replace in layers:
        layer = _read(file, problems)
        if layer is not None:
            tree = _merge(tree, layer, schema, replace=replace)
    result = _build(schema, tree, "", None, SafeConstructor(), problems)
    if problems:
        order = {str(file): i for i, (file, _) in enumerate(layers)}
        problems.sort(key=lambda p: (order.get(p.file, len(order)), p.line or 0))
        raise ConfigError(problems)
    return result


def _read(file: Path, problems: list[Problem]) -> _Tree | None:
    """One YAML file as a `_Tree`, or None (with a problem) when it cannot be used."""
    name = str(file)
    try:
        with open(name, "rb") as stream:
            loader = yaml.SafeLoader(stream)
            try:
                root = loader.get_single_node()
            finally:
                loader.dispose()
    except OSError as e:
        problems.append(Problem(name, None, "", f"cannot read: {e.strerror or e}"))
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        context = f" ({e.context})" if e.context else ""
        problems.append(Problem(name, line, "", f"invalid YAML: {e.problem}{context}"))
        return None
    except yaml.YAMLError as e:  # e.g. undecodable bytes
        problems.append(Problem(name, None, "", f"invalid YAML: {' '.join(str(e).split())}"))
        return None
    if root is None or _is_null(root):
        return {}
    if not isinstance(root, yaml.MappingNode):
        problems.append(_problem(root, "", f"expected a mapping of settings at the top level, got {_show(root)}"))
        return None
    return _tree(root, "", problems, frozenset())


def _tree(node: yaml.MappingNode, path: str, problems: list[Problem], open_: frozenset[int]) -> _Tree:
    """A mapping node as a `_Tree`; reports duplicate, non-scalar and recursive keys."""
    open_ = open_ | {id(node)}
    tree: _Tree = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(_problem(key_node, path, "expected a setting name as key"))
            continue
        key = str(key_node.value)
        key_path = _join(path, key)
        if key in tree:
            first = tree[key].key.start_mark.line + 1
            problems.append(_problem(key_node, key_path, f"duplicate key (first at line {first})"))
        value: yaml.Node | _Tree = value_node
        if isinstance(value_node, yaml.MappingNode):
            if id(value_node) in open_:
                problems.append(_problem(key_node, key_path, "recursive alias"))
                continue
            value = _tree(value_node, key_path, problems, open_)
        earlier = tree.get(key)
        if earlier is not None and isinstance(earlier.value, dict) and isinstance(value, dict):
            value = _merge(earlier.value, value, None, replace=False)  # to check both halves
        tree[key] = _Entry(key_node, value)
    return tree


def _merge(base: _Tree, layer: _Tree, schema: type[Section] | None, *, replace: bool) -> _Tree:
    """``layer`` over ``base``. Sections always merge; setting values merge unless ``replace``."""
    sections = {f.name: f.type for f in schema_fields(schema) if f.is_section} if schema else {}
    merged = dict(base)
    for key, entry in layer.items():
        sub = sections.get(key)
        value = entry.value
        if sub is not None and not isinstance(value, dict) and _is_null(value):
            value = {}  # a section heading with everything below it commented out
        old = merged.get(key)
        if (
            old is not None
            and isinstance(old.value, dict)
            and isinstance(value, dict)
            and (sub is not None or not replace)
        ):
            value = _merge(old.value, value, sub, replace=replace)
        merged[key] = _Entry(entry.key, value)
    return merged


# -- checking against the schema -----------------------------------------------------------


def _build(
    cls: type[S],
    tree: _Tree,
    path: str,
    where: yaml.Node | None,
    constructor: SafeConstructor,
    problems: list[Problem],
    base: S | None = None,
) -> S:
    """An instance of section ``cls`` from ``tree`` (over ``base``, else the defaults).

    Bad values are reported and defaulted.
    """
    fields = schema_fields(cls)
    names = [f.name for f in fields]
    for key, written in tree.items():
        if key not in names:
            problems.append(_problem(written.key, _join(path, key), _unknown(key, names)))
    before = len(problems)
    values: dict[str, object] = {}
    for f in fields:
        entry = tree.get(f.name)
        if entry is None:
            continue
        key_path = _join(path, f.name)
        if f.info is None:
            if isinstance(entry.value, dict):
                values[f.name] = _build(f.type, entry.value, key_path, entry.key, constructor, problems)
            else:
                message = f"expected a section (a mapping of settings), got {_show(entry.value)}"
                problems.append(_problem(entry.key, key_path, message))
            continue
        with contextlib.suppress(_Invalid):  # reported already; the default stays
            values[f.name] = _value(f, entry, key_path, constructor, problems)
    if base is not None:
        result = cast(S, dataclasses.replace(cast(Any, base), **values))
    else:
        result = cast(Callable[..., S], cls)(**values)
    if len(problems) == before:  # cross-checks only make sense on values that passed
        for name, message in result.check():
            blamed = tree.get(name)
            node = blamed.key if blamed is not None else where
            key_path = _join(path, name)
            problems.append(
                _problem(node, key_path, message) if node is not None else Problem("<config>", None, key_path, message)
            )
    return result


def _value(
    f: SchemaField,
    entry: _Entry,
    path: str,
    constructor: SafeConstructor,
    problems: list[Problem],
) -> object:
    """The value of one setting, or `_Invalid` after reporting why not."""
    info = cast(SettingInfo, f.info)
    tp, origin, args = f.type, get_origin(f.type), get_args(f.type)
    node = entry.value

    def wrong_shape() -> _Invalid:
        message = f"expected {_expected(tp, info)}, got {_show(node)}"
        problems.append(_problem(entry.key, path, message))
        return _Invalid()

    if origin is FrozenMap:
        if not isinstance(node, dict):
            raise wrong_shape()
        items: dict[str, object] = {}
        bad = False
        for key, item in node.items():
            item_path = _join(path, key)
            if _is_section_type(args[1]):  # a named group of settings, e.g. one DNSBL zone
                if isinstance(item.value, dict):
                    # A shipped entry is changed by naming it; its other settings stay as shipped.
                    base = cast(FrozenMap[str, Section], f.default).get(key)
                    items[key] = _build(args[1], item.value, item_path, item.key, constructor, problems, base)
                else:
                    message = f"expected a mapping of settings, got {_show(item.value)}"
                    problems.append(_problem(item.key, item_path, message))
                    bad = True
                continue
            try:
                items[key] = _scalar_at(args[1], None, item, item_path, constructor, problems)
            except _Invalid:
                bad = True
        if bad:
            raise _Invalid()
        if _is_section_type(args[1]):  # entries merge over the shipped ones
            return FrozenMap({**cast(FrozenMap[str, object], f.default), **items})
        return FrozenMap(items)
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise wrong_shape()
        result: list[object] = []
        bad = False
        for i, item_node in enumerate(node.value):
            item = _Entry(item_node, item_node)
            try:
                result.append(_scalar_at(args[0], None, item, f"{path}[{i}]", constructor, problems))
            except _Invalid:
                bad = True
        if bad:
            raise _Invalid()
        return tuple(result)
    return _scalar_at(tp, info, entry, path, constructor, problems)


def _scalar_at(
    tp: Any,
    info: SettingInfo | None,
    entry: _Entry,
    path: str,
    constructor: SafeConstructor,
    problems: list[Problem],
) -> object:
    """One scalar value of type ``tp``, reported and raised as `_Invalid` when it is wrong."""
    node = entry.value
    if not isinstance(node, yaml.ScalarNode):
        at = entry.key if isinstance(node, dict) else node
        problems.append(_problem(at, path, f"expected {_expected(tp, info)}, got {_show(node)}"))
        raise _Invalid()
    try:
        raw = constructor.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        problems.append(_problem(node, path, f"cannot read value: {' '.join(str(e).split())}"))
        raise _Invalid() from None
    try:
        value = _scalar(tp, raw)
        _check_bounds(value, info)
    except _Invalid as e:
        message = f"expected {_expected(tp, info)}, got {_show(raw)}{e.hint}"
        problems.append(_problem(node, path, message))
        raise
    return value


def _scalar(tp: Any, raw: object) -> object:
    """``raw`` (as PyYAML constructed it) converted to ``tp``; raises `_Invalid`."""
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            try:
                number = float(raw)
            except OverflowError:
                raise _Invalid() from None
            if math.isfinite(number):
                return number
    elif tp is str:
        if isinstance(raw, str):
            return raw
    elif tp is Duration:
        try:
            return parse_duration(raw)
        except ValueError:
            raise _Invalid(f" (units: {DURATION_UNITS})") from None
    elif tp is Size:
        try:
            return parse_size(raw)
        except ValueError:
            raise _Invalid(f" (units: {SIZE_UNITS}; K = 1024)") from None
    elif tp == Network:
        if isinstance(raw, str):
            try:
                return ip_network(raw.strip(), strict=False)
            except ValueError:
                pass
    elif get_origin(tp) is Literal:
        for choice in get_args(tp):
            if type(choice) is type(raw) and choice == raw:
                return choice
    elif _optional_of(tp) is not None:
        # "X | None": None is the default (meaning "not set here"); a value must be an X.
        return _scalar(_optional_of(tp), raw)
    else:
        raise TypeError(f"unsupported setting type {tp!r}")
    raise _Invalid()


def _is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _optional_of(tp: Any) -> Any:
    """X for a type written ``X | None``, else None."""
    if get_origin(tp) in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def _check_bounds(value: object, info: SettingInfo | None) -> None:
    if info is None or not isinstance(value, int | float):
        return
    if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
        raise _Invalid()


def _unknown(key: str, names: list[str]) -> str:
    """The message for an unknown key, with a suggestion when one is close."""
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    elsewhere = {path.rsplit(".", 1)[-1]: path for path, _ in _walk(Config, "")}
    close = difflib.get_close_matches(key, list(elsewhere), n=1)
    if close:
        return f"unknown key here, did you mean {elsewhere[close[0]]!r}?"
    return f"unknown key; expected one of: {', '.join(names)}"


# -- describing types and values -----------------------------------------------------------


def _walk(cls: type[Section], path: str) -> Iterator[tuple[str, SchemaField]]:
    """Every setting under section ``cls`` with its dotted key path, in declaration order."""
    for f in schema_fields(cls):
        if f.is_section:
            yield from _walk(f.type, _join(path, f.name))
        else:
            yield _join(path, f.name), f


def _expected(tp: Any, info: SettingInfo | None) -> str:
    """What a value of ``tp`` within ``info``'s bounds looks like, for messages."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if origin is FrozenMap:
        if _is_section_type(args[1]):
            return "a mapping of names to groups of settings"
        return f"a mapping of names to {_plural(args[1])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    noun = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Duration: "a duration",
        Size: "a size",
    }.get(tp, "an IP network such as 192.0.2.0/24" if tp == Network else repr(tp))
    return noun + _bounds(tp, info, " between {} and {}", " >= {}", " <= {}")


def _plural(tp: Any) -> str:
    if tp == Network:
        return "IP networks (e.g. 192.0.2.0/24)"
    return {str: "strings", float: "numbers", int: "integers"}.get(tp, repr(tp))


def _type_name(f: SchemaField) -> str:
    """A short type name for tables: ``duration, 1ms..10s``."""
    tp, origin, args = f.type, get_origin(f.type), get_args(f.type)
    if origin is tuple:
        return "list[cidr]" if args[0] == Network else f"list[{args[0].__name__}]"
    if origin is FrozenMap:
        if _is_section_type(args[1]):
            return f"map[{args[0].__name__}, {{{', '.join(f.name for f in schema_fields(args[1]))}}}]"
        return f"map[{args[0].__name__}, {args[1].__name__}]"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    name = {Duration: "duration", Size: "size"}.get(tp) or tp.__name__
    return str(name) + _bounds(tp, f.info, ", {}..{}", ", >= {}", ", <= {}")


def _bounds(tp: Any, info: SettingInfo | None, both: str, low: str, high: str) -> str:
    if info is None or (info.min is None and info.max is None):
        return ""
    show: Callable[[float], str] = _number
    if tp is Duration:
        show = format_duration
    elif tp is Size:
        show = lambda n: format_size(int(n))  # noqa: E731
    if info.min is not None and info.max is not None:
        return both.format(show(info.min), show(info.max))
    if info.min is not None:
        return low.format(show(info.min))
    return high.format(show(cast(float, info.max)))


def _number(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else repr(n)


def _render(tp: Any, value: object) -> object:
    """A setting's value as plain YAML-able data, written the way a person would."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple:
        return [_render(args[0], v) for v in cast(tuple[object, ...], value)]
    if origin is FrozenMap:
        if _is_section_type(args[1]):
            return {k: _to_dict(cast(Section, v), None) for k, v in cast(FrozenMap[str, object], value).items()}
        return {k: _render(args[1], v) for k, v in cast(FrozenMap[str, object], value).items()}
    if tp is Duration:
        return format_duration(cast(float, value))
    if tp is Size:
        count = cast(int, value)
        return format_size(count) if count % 1024 == 0 and count else count
    if tp == Network:
        return str(value)
    return value


def _inline(data: object) -> str:
    """``data`` as one line of YAML."""
    text = yaml.safe_dump(data, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _to_dict(obj: Section, default: Section | None) -> dict[str, Any]:
    """``obj`` as nested dicts; with ``default``, only what differs from it."""
    data: dict[str, Any] = {}
    for f in schema_fields(type(obj)):
        value = getattr(obj, f.name)
        default_value = getattr(default, f.name) if default is not None else None
        if f.is_section:
            sub = _to_dict(value, default_value)
            if sub or default is None:
                data[f.name] = sub
        elif default is None or value != default_value:
            data[f.name] = _render(f.type, value)
    return data


# -- small helpers -------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _problem(node: yaml.Node, path: str, message: str) -> Problem:
    return Problem(str(node.start_mark.name), node.start_mark.line + 1, path, message)


def _show(value: object) -> str:
    """A value as it appears after ``got`` in a message."""
    if isinstance(value, dict | yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if isinstance(value, yaml.ScalarNode):
        return "null" if _is_null(value) else repr(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return str(value)
