"""Sender authentication: SPF, DKIM, ARC and DMARC (one network check, `AuthCheck`)."""

from __future__ import annotations

from filterd.engine.checks.auth.check import AuthCheck

__all__ = ["AuthCheck"]
