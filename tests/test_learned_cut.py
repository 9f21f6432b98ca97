"""Which marked connections a re-apply cuts (egressguard/conntrack.py), decided without a kernel;
tests/test_dns_proxy.py proves the cut with real connections on both back ends."""

from __future__ import annotations

import socket
from typing import Any

from egressguard import policy as policy_mod
from egressguard.backends import Installed, InstalledTable, LearnedHolding
from egressguard.conntrack import Marked, allowed_now, must_cut
from egressguard.ruleset import Chain, Facts, Rule, build, learned_entries

BASE: dict[str, Any] = {"version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]},
                        "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": ["198.51.100.53"]}}
KEEP = {"host": "keep.test", "ports": [443]}
GONE = {"host": "gone.test"}


def _policy(*allow: dict[str, Any]) -> policy_mod.Policy:
    return policy_mod.validate({**BASE, "allow": list(allow)})


def _installed(policy: policy_mod.Policy, *, open_rule: bool = True) -> Installed:
    """What a read-back shows after `policy` was applied (its learned sets, and its open rule or not)."""
    rules = (Rule(target="RETURN", comment="dns-learned-open", ctdir="ORIGINAL", ctmark=0x40000000),) if open_rule else ()
    table = InstalledTable(family=4, name="filter", present=True, jump_positions=(0,),
                           chains=(Chain("EGRESSGUARD-CONFINED", rules),))
    held = tuple(LearnedHolding(name, family, f"ipv{family}_addr")
                 for e in learned_entries(policy) for family, name in e.sets.items())
    return Installed(tables=(table,), learned_sets=held)


def test_reapplying_the_same_policy_or_adding_an_entry_cuts_nothing() -> None:
    old = _policy(KEEP)
    assert not must_cut(_installed(old), build(old, Facts()))
    assert not must_cut(_installed(old), build(_policy(KEEP, GONE), Facts()))


def test_removing_or_changing_an_entry_cuts_and_so_does_coming_from_no_open_rule() -> None:
    old = _policy(KEEP, GONE)
    assert must_cut(_installed(old), build(_policy(KEEP), Facts()))
    assert must_cut(_installed(old), build(_policy(KEEP, {"host": "gone.test", "ports": [22]}), Facts()))
    assert must_cut(_installed(_policy(KEEP), open_rule=False), build(_policy(KEEP), Facts()))  # e.g. a lockdown


def test_a_policy_that_honours_no_mark_needs_no_cut() -> None:
    static = policy_mod.validate({**BASE, "dns": {"resolvers": ["198.51.100.53"]}})
    assert not must_cut(_installed(_policy(KEEP, GONE)), build(static, Facts()))


def test_a_kept_entry_keeps_what_its_set_holds_on_its_protocol_and_ports_only() -> None:
    policy = _policy(KEEP)
    entry = learned_entries(policy)[0]
    held = [LearnedHolding(entry.sets[4], 4, "ipv4_addr", (("203.0.113.20/32", 60, 50),)),
            LearnedHolding(entry.sets[6], 6, "ipv6_addr", (("2001:db8:2::20", 60, 50),))]
    allowed = allowed_now(policy, held)
    tcp, udp = socket.IPPROTO_TCP, socket.IPPROTO_UDP
    assert allowed(Marked(4, tcp, "203.0.113.20", 443)) and allowed(Marked(6, tcp, "2001:db8:2::20", 443))
    assert not allowed(Marked(4, tcp, "203.0.113.20", 22)), "another port"
    assert not allowed(Marked(4, udp, "203.0.113.20", 443)), "another protocol"
    assert not allowed(Marked(4, tcp, "203.0.113.21", 443)), "an address no kept set holds (expired, or the removed entry's)"
    assert not allowed(Marked(6, tcp, "203.0.113.20", 443)), "the other family's set"
