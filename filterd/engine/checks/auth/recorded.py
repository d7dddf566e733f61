"""What our own border server recorded: the Authentication-Results fields a message arrives
with, read only where they carry our authserv-id.

Every host on the way may write an Authentication-Results field, and what another host saw is
no evidence of ours: a mailing list that re-sends a message breaks SPF at the next hop, and
the fail recorded there rides along on ham. So only fields claiming our authserv-id
(``auth.authserv_id``, else this host's name; the same test that drops forged ones from
spamd's and the milter's output) are read. A sender could forge one, but only to hurt
itself: these rules add points.

Rules (rules/46_auth.yaml; the names are older than this check, hence the HDR_ prefix):

- ``HDR_AR_SPF_FAIL``: a field of ours says ``spf=fail`` or ``spf=softfail``.
- ``HDR_AR_DMARC_FAIL``: a field of ours says ``dmarc=fail``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from filterd.engine.checks.auth.authserv import HEADER, claims_authserv_id, effective_authserv_id
from filterd.engine.plugin import AutolearnSide, CheckSetup, Hit, Scan, Stage

__all__ = ["RecordedAuthCheck"]

_RULES = (
    ("HDR_AR_SPF_FAIL", re.compile(r"\bspf=(?:fail|softfail)\b", re.I)),
    ("HDR_AR_DMARC_FAIL", re.compile(r"\bdmarc=fail\b", re.I)),
)


class RecordedAuthCheck:
    """HDR_AR_* from the Authentication-Results fields that carry our authserv-id."""

    name: ClassVar[str] = "recorded_auth"
    stage: ClassVar[Stage] = Stage.HEADERS
    autolearn_side: ClassVar[AutolearnSide] = "header"
    emits: ClassVar[frozenset[str]] = frozenset(rule for rule, _ in _RULES)

    def __init__(self, setup: CheckSetup) -> None:
        self._authserv_id = effective_authserv_id(setup.config.auth)

    def run(self, scan: Scan) -> Sequence[Hit]:
        msg = scan.message
        ours = [
            value
            for raw, value in zip(msg.get_raw_all(HEADER), msg.get_all(HEADER), strict=True)
            if claims_authserv_id(raw, self._authserv_id)
        ]
        hits: list[Hit] = []
        for rule, pattern in _RULES:
            found = next((m for value in ours if (m := pattern.search(value))), None)
            if found is not None:
                hits.append(Hit(rule, found.group(0).lower()))
        return hits
