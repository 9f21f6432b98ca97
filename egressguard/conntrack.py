"""dns.mode proxy: connections the learned mark keeps open, cut when the policy no longer allows them.

The confined chain lets a connection carrying LEARNED_CTMARK through whatever its address's expiry
(`dns-learned-open`), and the mark does not say which entry set it. So when a re-apply removes a
learned entry (or changes it so its set goes away), every marked connection that entry could have
admitted (its family, protocol and port) and that no entry of the new policy allows now (its set
holds the address, on its protocol and port) loses that mark bit (only that bit: the entry and its
other bits stay): its next packet is judged afresh, and the new rules refuse it. The entry is not
deleted: its CONFINED_CTMARK bit must stay, or what the kernel sends after the process closed the
socket (no uid on it) would start a new, unmarked entry that no rule confines. Among them may be a
kept entry's connection on the same protocol and port whose address already expired: nothing in the kernel says which entry
opened it, so it is cut too (fail-closed); a client reconnects after resolving again. A re-apply
that removes no learned set cuts nothing. pyroute2's ctnetlink client: the kernel's conntrack
table has no other interface.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from egressguard import logs
from egressguard.backends import Installed, LearnedHolding
from egressguard.errors import ApplyFailed
from egressguard.policy import Policy
from egressguard.ruleset import LEARNED_CTMARK, LEARNED_OPEN, Family, Ruleset, learned_entries

log = logs.get_logger("egressguard")

_PROTOCOLS = {"tcp": {socket.IPPROTO_TCP}, "udp": {socket.IPPROTO_UDP},
              "icmp": {socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6}}  # a policy's protocol (any: every one)
_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP,
            "ipv6-icmp": socket.IPPROTO_ICMPV6}  # a rule's protocol


@dataclass(frozen=True)
class Marked:
    """A conntrack entry carrying LEARNED_CTMARK: where its connection was addressed."""

    family: Family
    protocol: int  # IP protocol number
    address: str  # original destination
    port: int | None  # original destination port (TCP, UDP)


def suspects(before: Installed, ruleset: Ruleset) -> Callable[[Marked], bool] | None:
    """Which marked connections a commit of `ruleset` over `before` must judge again, or None: the new
    ruleset honours no mark (its rules judge every packet themselves), or it keeps every learned set
    the installed rules allowed by (the same policy again, or entries added). Else the connections
    an entry that goes away could have admitted, by family, protocol and port as the installed rules
    that allowed by its set say; all of them if no installed rule kept marked connections open (a
    lockdown, a static policy, nothing: marks may be left from before)."""
    if not ruleset.learned_sets:
        return None
    rules = [(t.family, r) for t in before.tables if t.name == "filter" for c in t.chains for r in c.rules]
    if not any(r.comment == LEARNED_OPEN for _f, r in rules):
        return lambda m: True
    wanted = {s.name for s in ruleset.learned_sets}
    going = {h.name for h in before.learned_sets} - wanted
    gone = [(f, _NUMBERS.get(r.protocol or ""), {*r.dports, *(() if r.ctorigdstport is None else (r.ctorigdstport,))})
            for f, r in rules if (r.match_set or r.ctorigdst_set) in going]
    if not gone:
        return None

    def could_have_admitted(m: Marked) -> bool:
        return any(m.family == f and (number is None or m.protocol == number) and (not ports or m.port in ports)
                   for f, number, ports in gone)

    return could_have_admitted


def allowed_now(policy: Policy, held: Sequence[LearnedHolding]) -> Callable[[Marked], bool]:
    """Whether a learned entry of `policy` allows a marked connection now: the entry's set (as read
    back, `held`) holds the address and the entry covers the protocol and port."""
    members: dict[str, set[str]] = {h.name: {_address(a) for a, _t, _left in h.elements} for h in held}
    allows = []
    for entry in learned_entries(policy):
        e = policy.allow[entry.index]
        protocols = _PROTOCOLS.get(e.protocol)  # None: any protocol
        allows.append((entry.sets, protocols, set(e.ports or ())))

    def allowed(m: Marked) -> bool:
        return any(m.address in members.get(sets[m.family], ()) and (protocols is None or m.protocol in protocols)
                   and (not ports or m.port in ports) for sets, protocols, ports in allows)

    return allowed


def cut_marked(policy: Policy, held: Sequence[LearnedHolding], suspect: Callable[[Marked], bool]) -> int:
    """Clear LEARNED_CTMARK from the conntrack entries of `suspect` marked connections `policy` does
    not allow now (`allowed_now`). Returns how many; ApplyFailed if the kernel's conntrack table
    cannot be read or changed (the apply then falls back to the lockdown: a connection it should cut
    is never left open)."""
    from pyroute2 import Conntrack  # noqa: PLC0415 - only proxy-mode applies that must cut need it
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    allowed = allowed_now(policy, held)
    cut = 0
    families: tuple[tuple[Family, int], ...] = ((4, socket.AF_INET), (6, socket.AF_INET6))
    for family, af in families:
        try:
            with Conntrack(nfgen_family=af) as ct:
                # Listed whole first: a change while the dump is read ends pyroute2's generator.
                entries = list(ct.dump_entries(mark=LEARNED_CTMARK, mark_mask=LEARNED_CTMARK))
                for e in entries:
                    m = _marked(family, e.tuple_orig)
                    if not suspect(m) or allowed(m):
                        continue
                    try:  # the kernel's new mark: (mark & ~mark_mask) ^ 0, i.e. that one bit cleared
                        ct.entry("set", tuple_orig=e.tuple_orig, mark=0, mark_mask=LEARNED_CTMARK)
                    except NetlinkError as exc:
                        if exc.code != errno.ENOENT:  # ended on its own meanwhile
                            raise
                    cut += 1
        except (OSError, NetlinkError) as exc:
            raise ApplyFailed(f"cannot cut the connections of removed learned entries (conntrack netlink, "
                              f"IPv{family}): {exc}") from exc
    if cut:
        log.info("learned_connections_cut", connections=cut)
    return cut


def _marked(family: Family, t: Any) -> Marked:
    """pyroute2's original tuple (NFCTAttrTuple) as a Marked."""
    return Marked(family=family, protocol=int(t.proto or 0), address=_address(str(t.daddr)), port=t.dport)


def _address(text: str) -> str:
    """One spelling per address (ipset may list a host as 1.2.3.4/32)."""
    return str(ipaddress.ip_address(text.partition("/")[0]))
