"""Wire protocols as sans-IO state machines: bytes in, events out, bytes back.

Nothing here touches a socket, a clock or an event loop, so every protocol is tested by feeding
bytes (whole, one at a time, in random splits) and comparing bytes. The daemon and the MTA own
the I/O and call these machines from a short loop.

``NEED_DATA`` is shared by every machine in this package, so one ``is NEED_DATA`` test reads
the same in each listener. So is ``ConnectionClosed``, the last event of a machine that serves
several requests on one connection (milter, policy): the peer closed at a clean boundary.
"""

from __future__ import annotations

__all__ = ["NEED_DATA", "ConnectionClosed", "NeedData"]

from dataclasses import dataclass
from typing import Final


class NeedData:
    """The type of ``NEED_DATA``: ``next_event()`` needs more bytes before it can say anything."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        # copy and pickle hand back the module's one instance, so `is NEED_DATA` keeps holding.
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side where a packet or request could start (not in the middle of one).

    Whether that was polite (after a milter QUIT) or abrupt (mid-message) is for the state
    machine's owner to judge from its state. ``next_event()`` returns NEED_DATA after this.
    """
