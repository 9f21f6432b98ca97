"""dns.mode proxy on the iptables back end: the forwarder writes learned addresses into the entries'
ipsets (each with its timeout), and reads what they hold."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from egressguard.backends.iptables.sets import Ipsets
from egressguard.errors import EgressGuardError


def holds_any(names: Iterable[str]) -> bool:
    """Whether this namespace holds an ipset of `names` (apply chose the iptables back end)."""
    try:
        with Ipsets() as ipsets:
            return bool(set(names) & set(ipsets.owned()))
    except EgressGuardError:  # no ipset in this kernel: the nftables back end
        return False


class LearnedIpsets:
    """Adds learned addresses to the entries' ipsets (iptables back end), one message per set; a
    member already there takes the new timeout (never shorter than promised: Promises)."""

    def __init__(self) -> None:
        self.ipsets = Ipsets()

    def add(self, items: Sequence[tuple[str, str, int]]) -> None:
        by_set: dict[str, list[tuple[str, int]]] = {}
        for name, addr, ttl in items:
            by_set.setdefault(name, []).append((addr, ttl))
        for name, elems in by_set.items():
            self.ipsets.add_timed(name, elems)

    def held(self, names: Sequence[str]) -> list[tuple[str, str, int]]:
        out = []
        for name in names:
            listed = self.ipsets.timed(name)
            out += [(name, addr, left) for addr, left in (listed[3] if listed else [])]
        return out

    def close(self) -> None:
        self.ipsets.close()
