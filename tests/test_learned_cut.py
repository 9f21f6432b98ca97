"""Which marked connections a re-apply cuts (egressguard/conntrack.py), decided without a kernel;
tests/test_dns_proxy.py proves the cut with real connections on both back ends."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from egressguard import policy as policy_mod
from egressguard.backends import Installed, InstalledTable, LearnedHolding
from egressguard.conntrack import Marked, allowed_now, suspects
from egressguard.ruleset import Facts, build, learned_entries

BASE: dict[str, Any] = {"version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]},
                        "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": ["198.51.100.53"]}}
KEEP = {"host": "keep.test", "ports": [443]}
SSH = {"host": "ssh.test", "ports": [22]}
GONE = {"host": "gone.test", "ports": [443]}
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
BACKENDS = pytest.mark.parametrize("orig_sets", [False, True], ids=["iptables", "nftables"])


def _policy(*allow: dict[str, Any]) -> policy_mod.Policy:
    return policy_mod.validate({**BASE, "allow": list(allow)})


def _installed(policy: policy_mod.Policy, orig_sets: bool, lockdown: bool = False) -> Installed:
    """What a read-back shows once `policy` (or its lockdown) is applied: its rules and learned sets."""
    rs = build(policy, Facts(), lockdown=lockdown, orig_sets=orig_sets)
    tables = tuple(InstalledTable(family=t.family, name=t.name, present=True, jump_positions=(0,), chains=t.chains)
                   for t in rs.tables)
    held = tuple(LearnedHolding(name, family, f"ipv{family}_addr")
                 for e in learned_entries(policy) for family, name in e.sets.items())
    return Installed(tables=tables, learned_sets=held)


@BACKENDS
def test_reapplying_the_same_policy_or_adding_an_entry_judges_nothing_again(orig_sets: bool) -> None:
    old = _policy(KEEP)
    assert suspects(_installed(old, orig_sets), build(old, Facts(), orig_sets=orig_sets)) is None
    assert suspects(_installed(old, orig_sets), build(_policy(KEEP, GONE), Facts(), orig_sets=orig_sets)) is None


@BACKENDS
def test_a_removed_entry_makes_suspect_what_it_could_have_admitted(orig_sets: bool) -> None:
    suspect = suspects(_installed(_policy(KEEP, SSH, GONE), orig_sets), build(_policy(KEEP, SSH), Facts(),
                                                                               orig_sets=orig_sets))
    assert suspect is not None
    assert suspect(Marked(4, TCP, "203.0.113.21", 443)) and suspect(Marked(6, TCP, "2001:db8:2::21", 443))
    assert not suspect(Marked(4, TCP, "203.0.113.22", 22)), "only the kept ssh entry could have admitted it"
    assert not suspect(Marked(4, UDP, "203.0.113.21", 443)), "the removed entry allowed TCP only"


@BACKENDS
def test_a_changed_entry_is_a_removed_one_and_a_lockdown_before_makes_every_mark_suspect(orig_sets: bool) -> None:
    changed = suspects(_installed(_policy(KEEP, GONE), orig_sets),
                       build(_policy(KEEP, {**GONE, "ports": [8443]}), Facts(), orig_sets=orig_sets))
    assert changed is not None and changed(Marked(4, TCP, "203.0.113.21", 443))
    after_lockdown = suspects(_installed(_policy(KEEP), orig_sets, lockdown=True),
                              build(_policy(KEEP), Facts(), orig_sets=orig_sets))
    assert after_lockdown is not None and after_lockdown(Marked(4, UDP, "192.0.2.1", 9))


def test_a_policy_that_honours_no_mark_needs_no_cut() -> None:
    static = policy_mod.validate({**BASE, "dns": {"resolvers": ["198.51.100.53"]}})
    assert suspects(_installed(_policy(KEEP, GONE), False), build(static, Facts())) is None


def test_a_kept_entry_keeps_what_its_set_holds_on_its_protocol_and_ports_only() -> None:
    policy = _policy(KEEP)
    entry = learned_entries(policy)[0]
    held = [LearnedHolding(entry.sets[4], 4, "ipv4_addr", (("203.0.113.20/32", 60, 50),)),
            LearnedHolding(entry.sets[6], 6, "ipv6_addr", (("2001:db8:2::20", 60, 50),))]
    allowed = allowed_now(policy, held)
    assert allowed(Marked(4, TCP, "203.0.113.20", 443)) and allowed(Marked(6, TCP, "2001:db8:2::20", 443))
    assert not allowed(Marked(4, TCP, "203.0.113.20", 22)), "another port"
    assert not allowed(Marked(4, UDP, "203.0.113.20", 443)), "another protocol"
    assert not allowed(Marked(4, TCP, "203.0.113.21", 443)), "an address no kept set holds (expired, or the removed entry's)"
