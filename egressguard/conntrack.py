"""dns.mode proxy: connections the learned mark keeps open, cut when the policy no longer allows them.

The confined chain lets a connection carrying LEARNED_CTMARK through whatever its address's expiry
(`dns-learned-open`), and the mark does not say which entry set it. So when a re-apply removes a
learned entry (or changes it so its set goes away), every marked connection that no entry of the
new policy allows now (its set holds the address, on its protocol and port) is deleted from
conntrack: its next packet starts a new, unmarked entry, which the new rules refuse. Among them
are kept entries' connections whose address already expired: nothing in the kernel says which
entry opened those, so they are cut too (fail-closed); a client reconnects after resolving again.
A re-apply that removes no learned set cuts nothing. pyroute2's ctnetlink client, as the kernel's
conntrack table has no other interface.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from egressguard import logs
from egressguard.backends import Installed, LearnedHolding
from egressguard.errors import ApplyFailed
from egressguard.policy import Policy
from egressguard.ruleset import LEARNED_CTMARK, Family, Ruleset, learned_entries

log = logs.get_logger("egressguard")

# The comment of the rule that keeps marked connections open (ruleset._learned_allow).
OPEN_COMMENT = "dns-learned-open"
_PROTOCOLS = {"tcp": {socket.IPPROTO_TCP}, "udp": {socket.IPPROTO_UDP},
              "icmp": {socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6}}


@dataclass(frozen=True)
class Marked:
    """A conntrack entry carrying LEARNED_CTMARK: where its connection was addressed."""

    family: Family
    protocol: int  # IP protocol number
    address: str  # original destination
    port: int | None  # original destination port (TCP, UDP)


def must_cut(before: Installed, ruleset: Ruleset) -> bool:
    """Whether a commit of `ruleset` over `before` may leave marked connections open that the new
    policy does not allow: it keeps marked connections open (has learned sets), and before it either
    no rule kept them open (a lockdown, another policy, nothing: marks may be left from earlier) or
    a learned set goes away. Re-applying the same policy, or adding entries, cuts nothing."""
    if not ruleset.learned_sets:
        return False  # no rule honours the mark: the new rules judge every packet themselves
    kept_open = any(r.comment == OPEN_COMMENT for t in before.tables if t.name == "filter"
                    for c in t.chains for r in c.rules)
    wanted = {s.name for s in ruleset.learned_sets}
    return not kept_open or any(h.name not in wanted for h in before.learned_sets)


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


def cut_marked(policy: Policy, held: Sequence[LearnedHolding]) -> int:
    """Delete the conntrack entries of marked connections `policy` no longer allows (`allowed_now`).
    Returns how many; ApplyFailed if the kernel's conntrack table cannot be read or changed (the
    apply then falls back to the lockdown: a connection it should cut is never left open)."""
    from pyroute2 import Conntrack  # noqa: PLC0415 - only re-applies that remove an entry need it
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    allowed = allowed_now(policy, held)
    cut = 0
    families: tuple[tuple[Family, int], ...] = ((4, socket.AF_INET), (6, socket.AF_INET6))
    for family, af in families:
        try:
            with Conntrack(nfgen_family=af) as ct:
                # Listed whole first: a delete while the dump is read ends pyroute2's generator.
                entries = list(ct.dump_entries(mark=LEARNED_CTMARK, mark_mask=LEARNED_CTMARK))
                for e in entries:
                    if allowed(_marked(family, e.tuple_orig)):
                        continue
                    try:
                        ct.entry("del", tuple_orig=e.tuple_orig)
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


def _marked(family: Family, t: object) -> Marked:
    return Marked(family=family, protocol=int(getattr(t, "proto", 0) or 0), address=_address(str(getattr(t, "daddr", ""))),
                  port=getattr(t, "dport", None))


def _address(text: str) -> str:
    """One spelling per address (ipset may list a host as 1.2.3.4/32)."""
    return str(ipaddress.ip_address(text.partition("/")[0]))
