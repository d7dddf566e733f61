"""Whether a scanned message is clear enough to be learnt on its own (SpamAssassin's autolearn).

The decision uses *autolearn points*: the scores (from the set without Bayes) of the rules that
hit, leaving out rules flagged ``noautolearn`` or ``userconf``, rules scoring 0, and the
``learn`` rules (Bayes itself) whose scores are tallied apart as *learned points*, so that
Bayes does not train on its own opinion. Points are also split into header and body points:

* points < autolearn_ham_below: learn as ham, unless learned points > +1.0 (Bayes thinks it is
  spam) or the final score says spam;
* points >= autolearn_spam_at: learn as spam if at least autolearn_min_header_points came from
  header rules and autolearn_min_body_points from body rules (waived when an
  ``autolearn_force`` rule hit), learned points >= -1.0, and the final score says spam;
* otherwise, or with autolearn off: no learning.

Header rules are ``header`` rules; body rules are body/nbody/rawbody/uri/full rules; tflags
``autolearn_header``/``autolearn_body`` override. Eval and meta rules count on a side only
when ``kinds`` says which (the engine knows the stage of the check that emitted an eval rule
and the rules a meta depends on); otherwise they count in the total only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

from filterd.config import Config
from filterd.engine.plugin import Hit

__all__ = ["RuleFacts", "autolearn_decision", "autolearn_points"]

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


def _side(name: str, info: RuleFacts, kinds: Mapping[str, str] | None) -> str:
    if "autolearn_header" in info.tflags:
        return "header"
    if "autolearn_body" in info.tflags:
        return "body"
    if info.type == "header":
        return "header"
    if info.type in _BODY_TYPES:
        return "body"
    return kinds.get(name, "") if kinds is not None else ""


def _final_score(info: RuleFacts, bayes_active: bool) -> float:
    """The rule's score in the set the engine used: the Bayes set when Bayes gave an opinion
    and the rule has one (`RuleInfo.score_bayes`)."""
    with_bayes = getattr(info, "score_bayes", None)
    return float(with_bayes) if bayes_active and with_bayes is not None else info.score


def autolearn_points(
    hits: Iterable[Hit], rule_infos: Mapping[str, RuleFacts], kinds: Mapping[str, str] | None = None
) -> tuple[float, float, float, float, float, bool]:
    """(points, header points, body points, learned points, final score, autolearn_force hit).

    Points use each rule's score without Bayes; the final score uses the set the engine scored
    the message with.
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
        if info is None or score == 0:
            continue
        if "noautolearn" in info.tflags or "userconf" in info.tflags:
            continue
        if "learn" in info.tflags:
            learned += score
            continue
        force = force or "autolearn_force" in info.tflags
        points += score
        side = _side(hit.rule, info, kinds)
        if side == "header":
            header += score
        elif side == "body":
            body += score
    return points, header, body, learned, total, force


def autolearn_decision(
    hits: Iterable[Hit] | Mapping[str, Hit],
    rule_infos: Mapping[str, RuleFacts],
    config: Config,
    *,
    kinds: Mapping[str, Literal["header", "body"]] | None = None,
) -> bool | None:
    """True: learn as spam; False: learn as ham; None: leave it (see the module docstring).

    ``hits`` are the rules that fired (a scan's hit dict or a result's hits, Bayes included);
    ``rule_infos`` maps rule names to their score, tflags and type.
    """
    bayes = config.bayes
    if not bayes.enabled or not bayes.autolearn:
        return None
    found = hits.values() if isinstance(hits, Mapping) else hits
    points, header, body, learned, total, force = autolearn_points(found, rule_infos, kinds)
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
