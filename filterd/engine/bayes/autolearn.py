"""Whether a scanned message is clear enough to be learnt on its own (SpamAssassin's autolearn).

The decision uses *autolearn points*: the scores (from the set without Bayes) of the rules that
hit, leaving out rules flagged ``noautolearn`` or ``userconf``, rules scoring 0 in that set, and
the ``learn`` rules (Bayes itself), so that Bayes does not train on its own opinion. Those are
tallied apart as *learned points*, with the scores the engine used (the set with Bayes: without
it they are all 0), so that autolearn does not go against what Bayes already believes. Points
are also split into header and body points:

* points < autolearn_ham_below: learn as ham, unless learned points > +1.0 (Bayes thinks it is
  spam) or the final score says spam;
* points >= autolearn_spam_at: learn as spam if at least autolearn_min_header_points came from
  header rules and autolearn_min_body_points from body rules (waived when an
  ``autolearn_force`` rule hit), learned points >= -1.0, and the final score says spam;
* otherwise, or with autolearn off: no learning.

Header rules are ``header`` rules; body rules are body/nbody/rawbody/uri/full rules; tflags
``autolearn_header``/``autolearn_body`` override. Eval and meta rules count on the sides
``shares`` gives them (header share, body share): the engine gives an eval rule the side of
the check that emits it, and a meta rule the shares of its header and body dependencies, as
SpamAssassin splits a meta's score; a rule with no shares counts in the total only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from filterd.config import Config
from filterd.engine.plugin import Hit

__all__ = ["RuleFacts", "Shares", "autolearn_decision", "autolearn_points", "autolearn_shares"]

Shares = tuple[float, float]  # of a rule's score: (on the header side, on the body side)

_BODY_TYPES = frozenset({"body", "nbody", "rawbody", "uri", "full"})
_LEARNED_HAM_LIMIT = 1.0  # learned points above this refuse learning as ham
_LEARNED_SPAM_LIMIT = -1.0  # learned points below this refuse learning as spam


class RuleFacts(Protocol):
    """What autolearn needs to know about a rule (`filterd.engine.ruleset.RuleInfo` fits)."""

    @property
    def score(self) -> float: ...
    @property
    def tflags(self) -> frozenset[str]: ...
    @property
    def type(self) -> str: ...


def _own_side(info: RuleFacts) -> str:
    """The side a rule's tflags or type put it on; "" for eval and meta rules (`autolearn_shares`)."""
    if "autolearn_header" in info.tflags or info.type == "header":
        return "header"
    if "autolearn_body" in info.tflags or info.type in _BODY_TYPES:
        return "body"
    return ""


def _shares(name: str, info: RuleFacts, shares: Mapping[str, Shares] | None) -> Shares:
    side = _own_side(info)
    if side:
        return (1.0, 0.0) if side == "header" else (0.0, 1.0)
    return shares.get(name, (0.0, 0.0)) if shares is not None else (0.0, 0.0)


def autolearn_shares(
    rule_infos: Mapping[str, RuleFacts],
    eval_sides: Mapping[str, str],
    meta_deps: Mapping[str, Iterable[str]],
) -> dict[str, Shares]:
    """The header and body shares of eval and meta rules: an eval rule wholly on the side of
    the check emitting it (``eval_sides``: rule -> "header", "body" or ""), a meta rule split in
    proportion to how many of the rules it names are header and how many body rules (metas it
    names count on neither side), as SpamAssassin splits a meta's score."""

    def side(name: str) -> str:
        info = rule_infos.get(name)
        if info is None:
            return ""
        return _own_side(info) or (eval_sides.get(name, "") if info.type == "eval" else "")

    shares: dict[str, Shares] = {}
    for name in eval_sides:
        on = side(name)
        if on:
            shares[name] = (1.0, 0.0) if on == "header" else (0.0, 1.0)
    for name, deps in meta_deps.items():
        sides = [side(dep) for dep in deps]
        on_header, on_body = sides.count("header"), sides.count("body")
        if on_header + on_body:
            shares[name] = (on_header / (on_header + on_body), on_body / (on_header + on_body))
    return shares


def _final_score(info: RuleFacts, bayes_active: bool) -> float:
    """The rule's score in the set the engine used: the Bayes set when Bayes gave an opinion
    and the rule has one (`RuleInfo.score_bayes`)."""
    with_bayes = getattr(info, "score_bayes", None)
    return float(with_bayes) if bayes_active and with_bayes is not None else info.score


def autolearn_points(
    hits: Iterable[Hit], rule_infos: Mapping[str, RuleFacts], shares: Mapping[str, Shares] | None = None
) -> tuple[float, float, float, float, float, bool]:
    """(points, header points, body points, learned points, final score, autolearn_force hit).

    Points use each rule's score without Bayes; learned points and the final score use the set
    the engine scored the message with.
    """
    found = [(hit, rule_infos.get(hit.rule)) for hit in hits if not hit.rule.startswith("__")]
    bayes_active = any(info is not None and "learn" in info.tflags for _, info in found)
    points = header = body = learned = total = 0.0
    force = False
    for hit, info in found:
        if hit.score is not None:
            score = final = hit.score  # a dynamic score (AWL and the like) is the same in both sets
        elif info is not None:
            score, final = info.score, _final_score(info, bayes_active)
        else:
            score = final = 0.0
        total += final
        if info is None or "noautolearn" in info.tflags or "userconf" in info.tflags:
            continue
        if "learn" in info.tflags:
            learned += final
            continue
        force = force or "autolearn_force" in info.tflags
        if score == 0:
            continue
        points += score
        on_header, on_body = _shares(hit.rule, info, shares)
        header += score * on_header
        body += score * on_body
    return points, header, body, learned, total, force


def autolearn_decision(
    hits: Iterable[Hit] | Mapping[str, Hit],
    rule_infos: Mapping[str, RuleFacts],
    config: Config,
    *,
    shares: Mapping[str, Shares] | None = None,
) -> bool | None:
    """True: learn as spam; False: learn as ham; None: leave it (see the module docstring).

    ``hits`` are the rules that fired (a scan's hit dict or a result's hits, Bayes included);
    ``rule_infos`` maps rule names to their score, tflags and type.
    """
    bayes = config.bayes
    if not bayes.enabled or not bayes.autolearn:
        return None
    found = hits.values() if isinstance(hits, Mapping) else hits
    points, header, body, learned, total, force = autolearn_points(found, rule_infos, shares)
    is_spam = total >= config.scoring.required_score
    if points < bayes.autolearn_ham_below:
        if learned > _LEARNED_HAM_LIMIT or is_spam:
            return None
        return False
    if points >= bayes.autolearn_spam_at:
        if not force and (header < bayes.autolearn_min_header_points or body < bayes.autolearn_min_body_points):
            return None
        if learned < _LEARNED_SPAM_LIMIT or not is_spam:
            return None
        return True
    return None
