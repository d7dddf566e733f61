"""Sender authentication: SPF, DKIM, ARC and DMARC (one network check, `AuthCheck`), and what our
border server recorded in Authentication-Results fields (`RecordedAuthCheck`, no network)."""

from __future__ import annotations

from filterd.engine.checks.auth.check import AuthCheck
from filterd.engine.checks.auth.recorded import RecordedAuthCheck

__all__ = ["AuthCheck", "RecordedAuthCheck"]
