"""dns.mode proxy on the nftables back end: the forwarder writes learned addresses into the entries'
sets of `inet egressguard` (each with its timeout), and reads what they hold."""

from __future__ import annotations

from collections.abc import Sequence

from egressguard.backends.nftables.render import TABLE
from egressguard.backends.nftables.transport import TimedElements, timed_elements


class LearnedElements:
    """Adds learned addresses to the entries' nftables sets, one transaction per batch of answers
    (transport.TimedElements: netlink, not libnftables, for the forwarder's per-answer cost)."""

    def __init__(self) -> None:
        self.table = TABLE.split()[1]
        self.elements = TimedElements(self.table)

    def held(self, names: Sequence[str]) -> list[tuple[str, str, int]]:
        return [(name, addr, left) for name in names for addr, left in timed_elements(self.table, name) or []]

    def add(self, items: Sequence[tuple[str, str, int]]) -> None:
        """(set, address, seconds): each address in its set with that timeout, in one transaction."""
        self.elements.add(list(items))

    def close(self) -> None:
        self.elements.close()
