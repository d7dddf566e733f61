"""The check plugins that ship with filterd; one module per check family."""

from __future__ import annotations

from filterd.engine.bayes.check import BayesCheck
from filterd.engine.checks.antivirus import AntivirusCheck
from filterd.engine.checks.auth import AuthCheck, RecordedAuthCheck
from filterd.engine.checks.dnsbl import DnsblCheck, DnsblConnectCheck
from filterd.engine.checks.headers import HeaderCheck
from filterd.engine.checks.html import HtmlCheck
from filterd.engine.checks.lists import AuthListsCheck, ConnectListsCheck, ListsCheck
from filterd.engine.checks.mime import MimeCheck
from filterd.engine.checks.reputation import ReputationCheck
from filterd.engine.checks.text import TextCheck
from filterd.engine.checks.uri import UriCheck

__all__ = ["builtin_checks"]


def builtin_checks() -> list[type]:
    """Classes of every shipped check, in a stable order."""
    return [
        ConnectListsCheck, DnsblConnectCheck, ListsCheck, HeaderCheck, RecordedAuthCheck, MimeCheck, AntivirusCheck,
        HtmlCheck, UriCheck, DnsblCheck, AuthCheck, TextCheck, BayesCheck, AuthListsCheck, ReputationCheck,
    ]  # fmt: skip
