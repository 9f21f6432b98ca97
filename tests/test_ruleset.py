"""Unit tests of the pure core: Policy + Facts -> Ruleset (no kernel, no root)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
import refusals

from egressguard.backends.iptables.render import args, render, to_json
from egressguard.policy import DEFAULT_POLICY, validate
from egressguard.ruleset import (
    CONFINED,
    CONFINED_CTMARK,
    DISPATCH,
    EXEMPT_CTMARK,
    FAMILIES,
    KERNEL_OPENED,
    LEARNED_CTMARK,
    LOG_GROUP,
    LOG_PREFIX_MAX,
    REDIRECT,
    Facts,
    Family,
    Rule,
    Ruleset,
    build,
    hosts_of,
    metadata_nets,
    refuse_index,
)

RESOLVERS = ("198.51.100.53", "2001:db8:53::53")


def _build(extra: dict[str, Any] | None = None, *, facts: Facts | None = None, lockdown: bool = False,
           orig_sets: bool = False) -> Ruleset:
    data = {"version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001]}, **(extra or {})}
    return build(validate(data), facts or Facts(resolvers=RESOLVERS), lockdown=lockdown, orig_sets=orig_sets)


def _chain(rs: Ruleset, family: int, table: str, name: str) -> tuple[Rule, ...]:
    for c in rs.table(family, table).chains:  # type: ignore[arg-type]
        if c.name == name:
            return c.rules
    raise KeyError(name)


def _confined(rs: Ruleset, family: int) -> tuple[Rule, ...]:
    """The confined chain's deciding rules, each refusal as the refusal its line's chain gives it
    (log rules and iptables' CONNMARK, which decide nothing, have tests of their own)."""
    return tuple(r for r in refusals.confined(rs, family) if (r.target, r.comment) != ("CONNMARK", "confine"))


def _comments(rules: tuple[Rule, ...]) -> list[str]:
    return [r.comment for r in rules]


def _first(rules: tuple[Rule, ...], prefix: str) -> int:
    return next(i for i, r in enumerate(rules) if r.comment.startswith(prefix))


def _last(rules: tuple[Rule, ...], prefix: str) -> int:
    return max(i for i, r in enumerate(rules) if r.comment.startswith(prefix))


BROAD = {
    "allow": [{"cidr": "0.0.0.0/0", "protocol": "any"}, {"cidr": "::/0", "protocol": "any"}],
    "deny": [{"cidr": "203.0.113.11/32"}, {"cidr": "2001:db8:2::11/128"}],
}


# -- shape -------------------------------------------------------------------------------------


def test_both_families_get_a_filter_and_a_nat_table() -> None:
    rs = _build()
    assert sorted((t.family, t.name) for t in rs.tables) == [(4, "filter"), (4, "nat"), (6, "filter"), (6, "nat")]


def test_every_filter_table_jumps_to_dispatch_from_output() -> None:
    rs = _build()
    for family in FAMILIES:
        t = rs.table(family, "filter")
        assert t.jump is not None and t.jump.target == DISPATCH
        assert [c.name for c in t.chains][:2] == [DISPATCH, CONFINED]


@pytest.mark.parametrize("family", FAMILIES)
def test_deny_and_metadata_come_before_every_allow(family: int) -> None:
    rules = _confined(_build(BROAD), family)
    assert _last(rules, "metadata") < _first(rules, "allow[")
    assert _last(rules, "deny[") < _first(rules, "allow[")


@pytest.mark.parametrize("family", FAMILIES)
def test_deny_is_written_per_family(family: int) -> None:
    rules = _confined(_build(BROAD), family)
    denied = list(dict.fromkeys(r.ctorigdst for r in rules if r.comment.startswith("deny[")))
    # IPv6 also refuses the IPv4 entry behind the well-known NAT64 prefix (64:ff9b::203.0.113.11).
    assert denied == (["203.0.113.11/32"] if family == 4 else ["64:ff9b::cb00:710b/128", "2001:db8:2::11/128"])


@pytest.mark.parametrize("family", FAMILIES)
def test_confined_chain_ends_by_refusing_everything_else(family: int) -> None:
    last = _confined(_build(), family)[-1]
    assert last.comment == "default" and last.target == "REJECT" and last.dst is None and last.protocol is None
    assert last.reject_with == "port-unreachable"


def test_policy_without_ipv6_allows_still_refuses_confined_ipv6() -> None:
    rs = _build({"allow": [{"cidr": "203.0.113.0/24"}]})
    v6 = _confined(rs, 6)
    assert not any(r.comment.startswith("allow[") for r in v6)
    assert v6[-1].target == "REJECT" and v6[-1].reject_with == "port-unreachable"
    assert rs.table(6, "filter").jump is not None


def test_allowed_traffic_returns_and_never_accepts() -> None:
    rs = _build({**BROAD, "redirect": [{"ports": [80], "to_port": 8444}]})
    targets = {r.target for t in rs.tables for c in t.chains for r in c.rules}
    assert "ACCEPT" not in targets
    refusal_chains = {c.name for t in rs.tables for c in t.chains if refuse_index(c.name) is not None}
    # CONNMARK only marks (iptables' dispatch: whose connection it is) and goes on to the next rule
    assert targets <= {"RETURN", "REJECT", "DROP", "REDIRECT", "NFLOG", "CONNMARK", CONFINED, REDIRECT, *refusal_chains}


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_are_the_first_rule_that_accepts_and_only_in_the_reply_direction(family: int) -> None:
    rules = _confined(_build(), family)
    first = next(r for r in rules if r.target == "RETURN")
    assert (first.comment, first.ct_states, first.ct_direction, first.target) == (
        "replies", ("related", "established"), "reply", "RETURN")


@pytest.mark.parametrize("confine", [{"uids": [1000]}, {"uids": "all"}])
@pytest.mark.parametrize("action", ["reject", "drop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forged_sources_are_dropped_before_anything_accepts_or_rejects(family: int, action: str,
                                                                        confine: dict[str, Any]) -> None:
    rules = _confined(_build({**BROAD, "confine": confine, "action": action,
                              "redirect": [{"ports": [80], "to_port": 8444}]}), family)
    at = [i for i, r in enumerate(rules) if r.comment == "forged-source"]
    assert len(at) == 1 and (rules[at[0]].src_local, rules[at[0]].target) == (False, "DROP")
    before = rules[: at[0]]
    # Only kernel (socketless) packets pass before it: neighbour discovery (from `::` during DAD)
    # and packets to a local destination (our own REJECT's reset to the local client).
    assert all(r.socketless and r.uid is None and r.target == "RETURN" for r in before)
    assert all(r.icmp6_type in ("133", "134", "135", "136") or r.dst_local is True for r in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_source_routes_are_refused_before_replies(family: int) -> None:
    rules = _confined(_build(), family)
    comments = _comments(rules)
    name = "routing-header" if family == 6 else "ip-options"
    assert comments.index("forged-source") < comments.index(name) < comments.index("replies")
    routed = [r for r in rules if r.comment == name]
    assert routed and all(r.target == "REJECT" for r in routed)
    if family == 6:
        assert all(r.routing_header for r in routed)
    else:
        assert all(r.header == ((4, 4, ((6, 15),)),) for r in routed)  # IPv4 header length 6-15 words


@pytest.mark.parametrize("confine", [{"uids": [1000]}, {"uids": "all"}])
def test_membership_reports_are_judged_before_any_rule_a_socketless_packet_meets(confine: dict[str, Any]) -> None:
    """Reports have no socket owner. The named uids' rules (owner matches only) come first and
    never match one; the reports' rules follow, before every rule a socketless packet can meet (the
    closing rule, `confine: all`'s catch-all)."""
    rs = _build({"confine": confine})
    for family in (4, 6):
        chain = _chain(rs, family, "filter", DISPATCH)
        owned = [r for r in chain if r.uid is not None]
        assert owned and chain[: len(owned)] == tuple(owned)
        after = chain[len(owned):]
        reports = [r for r in after if r.comment in ("igmp", "mld", "mld-solicited-node")]
        assert after[: len(reports)] == tuple(reports) and len(after) > len(reports)
        if family == 4:
            assert [(r.comment, r.protocol, r.socketless, r.target) for r in reports] == [("igmp", "igmp", True, "DROP")]
            continue
        passed = [r for r in reports if r.target == "RETURN"]
        assert all(r.limit == (10, "second") and r.limit_burst == 20 and r.socketless for r in passed)
        assert {r.limit_name for r in passed} == {"egressguard-mld"}  # one bucket for all five, not one each
        assert [r.icmp6_type for r in passed] == ["143"] * 4 + ["131"] and passed[-1].dst == "ff02::1:ff00:0/104"
        assert [(r.icmp6_type, r.target) for r in reports[len(passed):]] == [("143", "DROP"), ("131", "DROP"), ("132", "DROP")]


def test_mld_report_tests_pin_the_kernels_layout_and_fit_u32() -> None:
    from egressguard.backends.u32 import u32_matches  # noqa: PLC0415
    from egressguard.ruleset import _mld_report_tests  # noqa: PLC0415

    one, two = _mld_report_tests(1), _mld_report_tests(2)
    assert one[0] == (32, 16, ((36, 36),))  # payload length 36: hop-by-hop 8 + MLD 8 + one record 20
    assert two[0] == (32, 16, ((56, 56),)) and two[-5][0] == 76 * 8  # 56: the second record at byte 76
    assert all(len(m.split("&&")) <= 10 for n in range(1, 5) for m in u32_matches(_mld_report_tests(n)))  # xt_u32's limit
    assert u32_matches(one) == ("0x4>>0x10=0x24&&0x4>>0x8&0xff=0x0&&0x28>>0x10=0x3a00&&0x34&0xffff=0x1&&"
                                "0x38=0x2000000,0x3000000,0x4000000&&0x3c=0xff020000&&0x40=0x0&&0x44=0x1&&0x48>>0x18=0xff",)


def test_nat64_forms_of_metadata_and_ipv4_deny_entries_are_refused_over_ipv6() -> None:
    from egressguard.ruleset import nat64  # noqa: PLC0415

    assert nat64("169.254.169.254/32") == "64:ff9b::a9fe:a9fe/128"
    assert nat64("10.0.0.0/8") == "64:ff9b::a00:0/104"
    rs = _build({"deny": [{"cidr": "10.0.0.0/8"}, {"cidr": "0.0.0.0/0", "protocol": "tcp", "ports": [25]}]})
    denied = [r.ctorigdst for r in _confined(rs, 6) if r.comment.startswith("deny[")]
    assert "64:ff9b::a00:0/104" in denied and "64:ff9b::/96" in denied
    assert "64:ff9b::a9fe:a9fe/128" in [r.ctorigdst for r in _confined(rs, 6) if r.comment == "metadata"]


def test_outbound_rules_do_not_depend_on_connection_state() -> None:
    # Every outbound packet is checked, so an existing connection is cut when the policy changes.
    # (nat-elsewhere tests conntrack's DNAT bit, a property of the connection, not its state.)
    rules = _confined(_build(BROAD), 4)
    assert [r.comment for r in rules if r.ct_states] == ["replies"]


# -- who is confined ---------------------------------------------------------------------------


def test_exempt_uids_leave_dispatch_before_everyone_is_confined() -> None:
    rules = _chain(_build({"confine": {"uids": "all"}, "exempt": {"uids": [1003, 1001]}}), 4, "filter", DISPATCH)
    assert [(r.comment, r.uid, r.target) for r in rules if r.comment != "igmp"] == [
        ("exempt", 1001, "CONNMARK"),
        ("exempt", 1001, "RETURN"),
        ("exempt", 1003, "CONNMARK"),
        ("exempt", 1003, "RETURN"),
        ("exempt-closing", None, "RETURN"),
        ("confine", None, CONFINED),
    ]


@pytest.mark.parametrize(("confine", "bit", "verdict", "closing"), [
    ("all", EXEMPT_CTMARK, "RETURN", "exempt-closing"), ([1000], CONFINED_CTMARK, CONFINED, "confine-closing")],
    ids=["confine-all", "uid-list"])
def test_the_uids_named_mark_their_connections_and_socketless_packets_on_them_go_the_same_way(
        confine: Any, bit: int, verdict: str, closing: str) -> None:
    """What the kernel sends for a connection after close() has no socket owner: the connection's
    mark, set by the named uid's own packets, sends it where that uid's packets go (`confine: all`:
    out with the exempt uid; a uid list: to the confined chain). With nftables the mark and the verdict
    are one rule; only the opener's direction, only that bit; never in nat, which sees first packets."""
    data = {"confine": {"uids": confine}, "exempt": {"uids": [1001]}}
    named = 1001 if confine == "all" else 1000
    for orig_sets, marking in ((False, [("CONNMARK", bit), (verdict, None)]), (True, [(verdict, bit)])):
        built = _build(data, orig_sets=orig_sets)
        rules = [r for r in _chain(built, 4, "filter", DISPATCH) if r.comment != "igmp"]
        head = refusals.confined(built, 4)[0]
        if confine != "all" and not orig_sets:  # iptables, a uid list: the confined chain's first rule marks
            marking = marking[1:]
            assert (head.target, head.uid, head.ctmark_set) == ("CONNMARK", None, bit)
        else:
            assert head.target != "CONNMARK"
        assert [(r.target, r.ctmark_set) for r in rules if r.uid == named] == marking
        closings = [r for r in rules if r.comment == closing]
        assert [(r.socketless, r.ct_direction, r.ctmark, r.target) for r in closings] == [(True, "original", bit, verdict)]
        after = rules[rules.index(closings[0]) + 1:]
        assert [r.comment for r in after] == (["confine"] if confine == "all" else [KERNEL_OPENED])
    nat = _chain(_build({**data, "redirect": [{"ports": [80], "to_port": 8444}]}), 4, "nat", DISPATCH)
    assert not [r for r in nat if r.ctmark_set or r.ctmark or "closing" in r.comment]


def test_under_a_uid_list_socketless_packets_that_open_a_connection_are_judged_as_confined() -> None:
    """A connection the kernel opens for a process (an MPTCP subflow, SMC, RDS, RxRPC) starts with a
    packet no owner match attributes: under a uid list the dispatch's last rule sends such first
    packets to the confined chain, marked as confined (nftables in the rule; iptables by the confined
    chain's first rule), so the rest of their connection is judged as well. Under `confine: all`
    everything not exempt goes there already; nat sees them unredirected."""
    data = {"confine": {"uids": [1000]}, "redirect": [{"ports": [80], "to_port": 8444}]}
    for family in FAMILIES:
        for orig_sets in (False, True):
            built = _build(data, orig_sets=orig_sets)
            last = _chain(built, family, "filter", DISPATCH)[-1]
            assert (last.comment, last.socketless, last.ct_states, last.ct_direction, last.target, last.ctmark_set) == (
                KERNEL_OPENED, True, ("new",), "original", CONFINED, CONFINED_CTMARK if orig_sets else None)
            assert KERNEL_OPENED not in {r.comment for r in _chain(built, family, "nat", DISPATCH)}
        everyone = _build({"confine": {"uids": "all"}})
        assert KERNEL_OPENED not in {r.comment for r in _chain(everyone, family, "filter", DISPATCH)}


def test_a_confined_uid_list_dispatches_only_those_uids_with_no_exempt_rule() -> None:
    """A uid is never in both lists (the policy refuses it), so under a uid list an exempt rule
    could only cost each confined packet one more owner lookup (bench/RESULTS.md, run T)."""
    data = {"confine": {"uids": [1002, 1000]}, "exempt": {"uids": [1003, 1001]}}
    for family in FAMILIES:
        for table, into in (("filter", CONFINED), ("nat", REDIRECT)):
            rules = _chain(_build({**data, "redirect": [{"ports": [80], "to_port": 8444}]}), family, table, DISPATCH)
            assert [(r.comment, r.uid, r.target) for r in rules if not r.socketless] == [
                ("confine", 1000, into),
                ("confine", 1002, into),
            ]


def test_root_is_not_confined_unless_listed() -> None:
    rules = _chain(_build(), 4, "filter", DISPATCH)
    assert 0 not in {r.uid for r in rules}
    listed = _chain(_build({"confine": {"uids": [0, 1000]}}), 4, "filter", DISPATCH)
    assert [r.uid for r in listed if r.comment == "confine" and r.target == CONFINED] == [0, 1000]


def test_confine_all_sends_everyone_but_exempt_to_the_confined_chain() -> None:
    rules = _chain(_build({"confine": {"uids": "all"}}), 6, "filter", DISPATCH)
    assert [(r.comment, r.uid, r.socketless) for r in rules if not r.comment.startswith("mld")] == [
        ("exempt", 1001, False), ("exempt", 1001, False), ("exempt-closing", None, True), ("confine", None, False)]


def test_confine_all_lets_only_kernel_sockets_send_neighbour_discovery() -> None:
    rules = _confined(_build({"confine": {"uids": "all"}}), 6)
    ndp = [r for r in rules if r.comment == "kernel-ndp"]
    # MLD reports (143) are judged in the dispatch chain, for every uid mode.
    assert sorted(r.icmp6_type for r in ndp) == ["133", "134", "135", "136"]  # type: ignore[type-var]
    assert all(r.socketless and r.protocol == "ipv6-icmp" and r.target == "RETURN" for r in ndp)
    assert not any(r.comment == "kernel-ndp" for r in _confined(_build({"confine": {"uids": "all"}}), 4))


def test_listed_confinement_needs_no_kernel_exceptions() -> None:
    assert not any(r.comment == "kernel-ndp" for r in _confined(_build(), 6))


# -- action ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "iptables", "nft"), [
    (4, "icmp-port-unreachable", "reject with icmp type port-unreachable"),
    (6, "icmp6-port-unreachable", "reject with icmpv6 type port-unreachable")])
def test_reject_resets_tcp_and_answers_other_protocols_with_the_family_unreachable(family: Family, iptables: str,
                                                                                   nft: str) -> None:
    from egressguard.backends.nftables.render import rule_text  # noqa: PLC0415

    icmp = "port-unreachable"
    refusals = [r for r in _confined(_build(BROAD), family) if r.target == "REJECT"]
    assert refusals
    for r in refusals:
        assert r.reject_with == ("tcp-reset" if r.protocol == "tcp" else icmp)
    # Every refusal that covers TCP comes as a reset plus an unreachable for the rest, in that order.
    default = [r for r in refusals if r.comment == "default"]
    assert [(r.protocol, r.reject_with) for r in default] == [("tcp", "tcp-reset"), (None, icmp)]
    # Each back end answers in the family's own ICMP.
    assert args(default[1], family)[-2:] == ["--reject-with", iptables]
    assert nft in rule_text(family, "filter", default[1])


def test_reject_of_a_udp_entry_needs_no_reset() -> None:
    rs = _build({"deny": [{"cidr": "192.0.2.0/24", "protocol": "udp"}]})
    assert [r.reject_with for r in _confined(rs, 4) if r.comment == "deny[0]"] == ["port-unreachable"]


def test_drop_never_rejects() -> None:
    rs = _build({**BROAD, "action": "drop"})
    targets = [r.target for f in FAMILIES for r in _confined(rs, f)]
    assert "REJECT" not in targets and targets.count("DROP") >= 4
    assert all(r.reject_with is None for f in FAMILIES for r in _confined(rs, f))


# -- metadata ----------------------------------------------------------------------------------


def test_metadata_endpoints_are_refused_in_both_families() -> None:
    rs = _build(BROAD)
    v4 = [r.ctorigdst for r in _confined(rs, 4) if r.comment == "metadata"]
    v6 = [r.ctorigdst for r in _confined(rs, 6) if r.comment == "metadata"]
    assert list(dict.fromkeys(v4)) == ["169.254.169.254/32", "169.254.170.2/32", "100.100.100.200/32"]
    assert list(dict.fromkeys(v6)) == ["fd00:ec2::254/128", "64:ff9b::a9fe:a9fe/128", "64:ff9b::a9fe:aa02/128",
                                       "64:ff9b::6464:64c8/128"]  # the IPv4 ones behind NAT64


def test_deny_metadata_false_leaves_them_to_the_allow_list() -> None:
    rs = _build({"deny_metadata": False})
    assert not any(r.comment == "metadata" for f in FAMILIES for r in _confined(rs, f))


# -- entries -----------------------------------------------------------------------------------


def test_protocol_icmp_means_icmpv6_in_ipv6() -> None:
    rs = _build({"allow": [{"cidr": "0.0.0.0/0", "protocol": "icmp"}, {"cidr": "::/0", "protocol": "icmp"}]})
    assert [r.protocol for r in _confined(rs, 4) if r.comment.startswith("allow")] == ["icmp"]
    assert [r.protocol for r in _confined(rs, 6) if r.comment.startswith("allow")] == ["ipv6-icmp"]


def test_protocol_any_matches_no_protocol() -> None:
    rs = _build({"allow": [{"cidr": "192.0.2.0/24", "protocol": "any"}]})
    (rule,) = [r for r in _confined(rs, 4) if r.comment == "allow[0]"]
    assert rule.protocol is None and rule.dports == ()


def test_ports_are_sorted_deduplicated_and_judged_one_original_port_per_rule() -> None:
    # --ctorigdstport takes one port: the filter table gets a rule per port, in order.
    ports = list(range(1000, 1020)) + [1000, 22]
    rs = _build({"allow": [{"cidr": "192.0.2.0/24", "ports": ports}]})
    judged = [(r.ctorigdst, r.ctorigdstport, r.dports) for r in _confined(rs, 4) if r.comment == "allow[0]"]
    assert judged == [("192.0.2.0/24", p, ()) for p in (22, *range(1000, 1020))]


def test_a_port_list_is_one_rule_which_iptables_splits_in_multiport_groups_of_fifteen() -> None:
    """The Ruleset holds a policy's ports as one rule's (nftables: one `tcp dport { ... }`); the
    iptables back end installs, plans and reads back one rule per 15 (its multiport match's limit)."""
    from egressguard.backends.iptables.render import split_ports  # noqa: PLC0415
    from egressguard.backends.nftables.render import rule_text  # noqa: PLC0415

    rs = _build({"redirect": [{"ports": [*range(1019, 999, -1), 22], "to_port": 8444}]})
    (rule,) = [r for r in _chain(rs, 4, "nat", "EGRESSGUARD-REDIRECT") if r.comment == "redirect[0]"]
    assert rule.dports == (22, *range(1000, 1020))
    assert "tcp dport { 22, 1000, " in rule_text(4, "nat", rule)
    split = [r for r in _chain(split_ports(rs), 4, "nat", "EGRESSGUARD-REDIRECT") if r.comment == "redirect[0]"]
    assert [r.dports for r in split] == [(22, *range(1000, 1014)), tuple(range(1014, 1020))]
    assert {dataclasses.replace(r, dports=()) for r in split} == {dataclasses.replace(rule, dports=())}
    assert render(rs).count("--comment redirect[0]") == 4  # two rules in each family's nat table


def test_single_port_and_multiport_render_differently() -> None:
    one = args(Rule(target="RETURN", comment="c", protocol="udp", dports=(53,)), 4)
    many = args(Rule(target="RETURN", comment="c", protocol="tcp", dports=(80, 443)), 4)
    assert one[:5] == ["-p", "udp", "-m", "udp", "--dport"]
    assert many[:5] == ["-p", "tcp", "-m", "multiport", "--dports"] and many[5] == "80,443"


def test_host_entries_use_the_resolved_addresses_of_each_family() -> None:
    facts = Facts(resolvers=RESOLVERS, hosts={"api.test": ("203.0.113.10", "2001:db8:2::10")})
    rs = _build({"allow": [{"host": "api.test", "ports": [443]}]}, facts=facts)
    assert [r.ctorigdst for r in _confined(rs, 4) if r.comment == "allow[0]"] == ["203.0.113.10/32"]
    assert [r.ctorigdst for r in _confined(rs, 6) if r.comment == "allow[0]"] == ["2001:db8:2::10/128"]
    assert rs.unresolved_hosts == ()


def test_unresolved_host_entries_are_listed_and_add_no_rules() -> None:
    rs = _build({"allow": [{"host": "api.test"}], "deny": [{"host": "bad.test"}]})
    assert rs.unresolved_hosts == ("api.test", "bad.test")
    assert not any(r.comment in ("allow[0]", "deny[0]") for f in FAMILIES for r in _confined(rs, f))


def test_hosts_of_lists_each_name_once_and_is_optional_only_if_every_use_is() -> None:
    p = validate({
        "version": 1,
        "allow": [{"host": "a.test", "optional": True}, {"host": "b.test", "optional": True}, {"host": "a.test"}],
        "deny": [{"host": "c.test"}],
    })
    assert hosts_of(p) == [("a.test", False), ("b.test", True), ("c.test", False)]


# -- loopback, DNS, redirect --------------------------------------------------------------------


def test_loopback_allow_is_one_rule_on_lo() -> None:
    rules = [r for r in _confined(_build(), 4) if r.comment == "loopback"]
    assert [(r.out_iface, r.protocol, r.dports) for r in rules] == [("lo", None, ())]


def test_loopback_deny_has_no_loopback_rule() -> None:
    assert not any(r.comment == "loopback" for f in FAMILIES for r in _confined(_build({"loopback": "deny"}), f))


def test_loopback_ports_allow_those_ports_over_tcp_and_udp() -> None:
    rules = [r for r in _confined(_build({"loopback": [8444, 8443]}), 6) if r.comment == "loopback"]
    assert [(r.out_iface, r.protocol, r.dports) for r in rules] == [("lo", "tcp", (8443, 8444)), ("lo", "udp", (8443, 8444))]


@pytest.mark.parametrize(("family", "server"), [(4, "198.51.100.53/32"), (6, "2001:db8:53::53/128")])
def test_dns_goes_only_to_the_resolvers_of_the_family(family: int, server: str) -> None:
    rules = [r for r in _confined(_build(), family) if r.comment == "dns"]
    assert [(r.protocol, r.ctorigdst, r.ctorigdstport) for r in rules] == [("udp", server, 53), ("tcp", server, 53)]


def test_no_resolvers_means_no_dns_rules() -> None:
    rs = _build(facts=Facts(resolvers=()))
    assert not any(r.comment == "dns" for f in FAMILIES for r in _confined(rs, f))


def test_redirect_rewrites_non_loopback_tcp_of_confined_uids_only() -> None:
    rs = _build({"redirect": [{"ports": [80, 443], "to_port": 8444}]})
    for family in FAMILIES:
        nat = rs.table(family, "nat")
        assert nat.jump is not None
        assert [(r.comment, r.uid) for r in _chain(rs, family, "nat", DISPATCH)] == [("confine", 1000)]
        (rule,) = [r for r in _chain(rs, family, "nat", REDIRECT) if r.target == "REDIRECT"]
        assert (rule.target, rule.out_iface_not, rule.protocol, rule.dports, rule.to_ports) == (
            "REDIRECT", "lo", "tcp", (80, 443), 8444
        )


@pytest.mark.parametrize("deny_metadata", [True, False])
def test_metadata_endpoints_are_not_redirected_to_the_proxy(deny_metadata: bool) -> None:
    # Found by tests/test_bypass.py: 169.254.169.254:80 reached the (exempt) proxy.
    rs = _build({"deny_metadata": deny_metadata, "redirect": [{"ports": [80], "to_port": 8444}]})
    for family in FAMILIES:
        chain = _chain(rs, family, "nat", REDIRECT)
        skipped = [r.dst for r in chain if r.target == "RETURN"]
        want = metadata_nets(family) if deny_metadata else []
        assert skipped == want and chain[-1].target == "REDIRECT"


@pytest.mark.parametrize(("family", "local"), [(4, "127.0.0.1/32"), (6, "::1/128")])
def test_redirected_traffic_is_allowed_to_the_local_port_even_with_loopback_denied(family: int, local: str) -> None:
    rs = _build({"loopback": "deny", "redirect": [{"ports": [80], "to_port": 8444}]})
    rules = [r for r in _confined(rs, family) if r.comment == "redirect"]
    # Only connections our REDIRECT rewrote (DNAT): a direct connection to the port is loopback traffic.
    assert [(r.dst, r.protocol, r.ct_dnat, r.dports) for r in rules] == [(local, "tcp", True, (8444,))]


def test_without_redirects_egressguard_owns_nothing_in_nat() -> None:
    rs = _build()
    for family in FAMILIES:
        assert rs.table(family, "nat").chains == () and rs.table(family, "nat").jump is None


# -- lockdown ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lockdown_keeps_replies_loopback_and_dns_and_refuses_everything_else(family: int) -> None:
    rs = _build({**BROAD, "redirect": [{"ports": [80], "to_port": 8444}]}, lockdown=True)
    comments = _comments(_confined(rs, family))
    assert rs.kind == "lockdown"
    assert {"replies", "loopback", "dns", "metadata"} <= set(comments)
    assert comments[-1] == "lockdown"
    assert not any(c.startswith(("allow[", "deny[")) for c in comments)
    assert rs.table(family, "nat").chains == ()


def test_lockdown_confines_the_same_uids_as_the_policy() -> None:
    rs = _build({"confine": {"uids": [1000, 1002]}}, lockdown=True)
    assert [(r.uid, r.socketless) for r in _chain(rs, 4, "filter", DISPATCH) if r.target == CONFINED] == [
        (1000, False), (1002, False), (None, True), (None, True)]  # confine-closing, kernel-opened


# -- determinism, digest, rendering ------------------------------------------------------------


def test_build_is_deterministic() -> None:
    a, b = _build(BROAD), _build(BROAD)
    assert a == b and a.digest() == b.digest() and render(a) == render(b)


def test_ruleset_digest_covers_resolvers_and_resolved_addresses() -> None:
    policy = {"allow": [{"host": "api.test"}]}
    base = _build(policy, facts=Facts(resolvers=RESOLVERS, hosts={"api.test": ("203.0.113.10",)}))
    other_addr = _build(policy, facts=Facts(resolvers=RESOLVERS, hosts={"api.test": ("203.0.113.12",)}))
    other_dns = _build(policy, facts=Facts(resolvers=RESOLVERS[:1], hosts={"api.test": ("203.0.113.10",)}))
    assert len({base.digest(), other_addr.digest(), other_dns.digest()}) == 3


def test_ruleset_digest_is_the_sha256_of_the_asdict_json_as_before() -> None:
    # The digest is read by people and tools across versions: the same ruleset, the same digest.
    sets = {"allow": [{"cidr": f"198.18.0.{i}/32", "ports": [443]} for i in range(20)]
            + [{"cidr": f"2001:db8:{i}::/48", "protocol": "udp"} for i in range(20)]}
    hosts = Facts(resolvers=RESOLVERS, hosts={"api.test": ("203.0.113.10", "2001:db8::10")})
    for rs in (_build(), _build(BROAD), _build(lockdown=True), _build(sets),
               _build({"allow": [{"host": "api.test", "ports": [80, 443]}], "loopback": [22]}, facts=hosts)):
        data: list[object] = [dataclasses.asdict(t) for t in rs.tables]
        if rs.sets:
            data.append([dataclasses.asdict(s) for s in rs.sets])
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        assert rs.digest() == "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def test_rule_count_counts_every_owned_rule() -> None:
    rs = _build()
    assert rs.rule_count() == sum(len(c.rules) for t in rs.tables for c in t.chains)


def test_render_puts_our_jump_first_in_output_and_commits_each_table() -> None:
    text = render(_build({"redirect": [{"ports": [80], "to_port": 8444}]}))
    assert text.count("COMMIT") == 4
    assert text.count("-I OUTPUT 1 -m comment --comment egressguard -j EGRESSGUARD") == 4
    assert '--comment "allow' not in text


def test_render_quotes_comments_with_spaces() -> None:
    assert render(Ruleset(tables=())) == "\n"
    from egressguard.backends.iptables.render import _join  # noqa: PLC0415 - the quoting helper

    assert _join(["-m", "comment", "--comment", "a b"]) == '-m comment --comment "a b"'


def test_json_form_has_one_entry_per_family_and_table() -> None:
    out = to_json(_build({"allow": [{"host": "api.test"}]}))
    assert [(t["family"], t["table"]) for t in out["tables"]] == [  # type: ignore[index,union-attr]
        ("ipv4", "filter"), ("ipv4", "nat"), ("ipv6", "filter"), ("ipv6", "nat")
    ]
    assert out["unresolved_hosts"] == ["api.test"] and str(out["digest"]).startswith("sha256:")


def test_default_policy_refuses_everything_but_loopback_dns_and_redirect() -> None:
    rs = build(validate(DEFAULT_POLICY), Facts(resolvers=RESOLVERS))
    assert set(_comments(_confined(rs, 4))) == {"forged-source", "ip-options", "replies", "metadata", "loopback",
                                                 "nat-elsewhere", "redirect", "dns", "default"}


# -- original destinations (service meshes) -----------------------------------------------------


def test_destinations_are_judged_by_the_original_destination_and_port() -> None:
    # A mesh's nat redirect makes the packet's destination 127.0.0.1:15001 before the filter table
    # sees it; conntrack's original tuple still names what the process asked for.
    rs = _build({"allow": [{"cidr": "203.0.113.0/24", "ports": [443, 80]}], "deny": [{"cidr": "203.0.113.7/32"}]})
    judged = [r for r in _confined(rs, 4) if r.comment.startswith(("allow[", "deny[", "metadata"))]
    assert judged and all(r.dst is None and not r.dports and r.ctorigdst for r in judged)
    assert [(r.ctorigdst, r.ctorigdstport) for r in judged if r.comment == "allow[0]"] == [
        ("203.0.113.0/24", 80), ("203.0.113.0/24", 443)]
    # The nat table acts before any NAT of ours, on the packet as sent: its matches stay on the packet.
    nat = _build({"deny": [{"cidr": "203.0.113.7/32"}], "redirect": [{"ports": [80], "to_port": 8444}]})
    assert all(r.ctorigdst is None for r in _chain(nat, 4, "nat", "EGRESSGUARD-REDIRECT"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_connection_natted_to_another_host_is_refused_before_the_allow_list(family: int) -> None:
    rules = _confined(_build(BROAD), family)
    at = _first(rules, "nat-elsewhere")
    assert _last(rules, "dns") < at < _first(rules, "allow[")
    assert all(r.ct_dnat and r.dst_local is False and r.target == "REJECT"
               for r in rules if r.comment == "nat-elsewhere")


def _listed(n: int, base: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"cidr": f"{base}.{i}/32", **extra} for i in range(1, n + 1)]


def test_iptables_sets_refuse_dnatted_connections_before_the_allow_list() -> None:
    data = {"allow": _listed(20, "198.19.0", ports=[443]) + [{"cidr": "203.0.113.0/24", "ports": [80]}],
            "deny": _listed(20, "198.18.0")}
    rules = _confined(_build(data), 4)
    (at,) = {i for i, r in enumerate(rules) if r.comment == "dnat-set" and r.protocol == "tcp"}
    assert rules[at].ct_dnat and rules[at].target == "REJECT"
    assert _last(rules, "dns") < at < _first(rules, "allow[")
    assert {r.match_set for r in rules if r.match_set} and not any(r.ctorigdst_set for r in rules)
    # Without sets, or where sets are looked up by the original destination, nothing is refused so.
    assert "dnat-set" not in _comments(_confined(_build({"allow": _listed(3, "198.19.0")}), 4))
    nft = _confined(build(validate({"version": 1, **data}), Facts(resolvers=RESOLVERS), orig_sets=True), 4)
    assert "dnat-set" not in _comments(nft)
    assert {r.ctorigdst_set for r in nft if r.ctorigdst_set} and not any(r.match_set for r in nft)


# -- the log of refusals (issue 14) --------------------------------------------------------------

LOGGED = {"deny": [{"cidr": "203.0.113.11/32"}, {"cidr": "2001:db8:2::11/128", "protocol": "udp", "ports": [53]}],
          "allow": [{"cidr": "203.0.113.10/32", "ports": [443]}]}


def _refusal_chains(rs: Ruleset, family: int) -> dict[str, tuple[Rule, ...]]:
    return refusals.refusal_chains(rs.table(family, "filter"))  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ["reject", "drop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_refusal_jumps_to_its_lines_chain_which_logs_then_refuses(family: int, action: str) -> None:
    rs = _build({**LOGGED, "action": action})
    rules = _chain(rs, family, "filter", CONFINED)
    chains = _refusal_chains(rs, family)
    jumps = [r for r in rules if r.target in chains]
    assert {r.comment for r in jumps} >= {"deny[0]" if family == 4 else "deny[1]", "metadata", "default"}
    assert not [r for r in rules if r.target in ("REJECT", "DROP", "NFLOG")]  # every refusal goes through its chain
    for r in jumps:
        log, *verdicts = chains[r.target]
        assert log.target == "NFLOG" and log.nflog_group == LOG_GROUP and log.comment == r.comment
        assert log.nflog_prefix == ("deny_metadata" if r.comment == "metadata" else r.comment)
        assert (log.limit, log.limit_burst) == ((10, "second"), 50)
        # it matches every packet that enters: no match but its limit
        assert dataclasses.replace(log, limit=None, limit_burst=None, nflog_prefix=None, nflog_group=None) == \
            Rule(target="NFLOG", comment=r.comment)
        unreachable = "port-unreachable"
        want = [("DROP", None, None)] if action == "drop" or r.comment == "forged-source" else \
            [("REJECT", "tcp-reset", "tcp"), ("REJECT", unreachable, None)]
        got = [(v.target, v.reject_with, v.protocol) for v in verdicts]
        assert got and got == [w for w in want if w in got]  # what the line needs, a reset first
        if r.protocol == "tcp" and want[0][0] == "REJECT":
            assert got[0] == ("REJECT", "tcp-reset", "tcp")  # TCP still gets its reset
    # one chain per policy line, so one rate limit per line
    assert len({r.comment for r in jumps}) == len(chains) == len({r.target for r in jumps})


LOG_SHAPES = [
    {},
    LOGGED,
    {**LOGGED, "action": "drop"},
    {**BROAD, "redirect": [{"ports": [80], "to_port": 8444}]},
    {"deny": [{"cidr": f"192.0.2.{n}/32", "protocol": "udp"} for n in range(0, 40, 2)], "allow": [{"cidr": "203.0.113.0/24"}]},
    {"confine": {"uids": "all"}, "exempt": {"uids": [1001, 0]}, "allow": [{"cidr": "203.0.113.10/32", "ports": [443]}]},
]


@pytest.mark.parametrize("shape", range(len(LOG_SHAPES)))
@pytest.mark.parametrize("lockdown", [False, True], ids=["policy", "lockdown"])
def test_allowed_traffic_meets_the_same_rules_with_log_on_and_off(shape: int, lockdown: bool) -> None:
    """What an allowed packet is tested against: our dispatch chain and the confined chain, which it
    leaves by a RETURN. With log on they hold the same rules in the same order with the same matches
    as with log off, and no log rule; only a refusal's verdict becomes a jump to its line's chain,
    and a refusal pair (TCP reset, then the same match for any protocol) becomes one jump."""
    extra = LOG_SHAPES[shape]
    on = _build(extra, lockdown=lockdown)
    off = _build({**extra, "log": {"refused": False}}, lockdown=lockdown)
    for family in FAMILIES:
        t_on, t_off = on.table(family, "filter"), off.table(family, "filter")  # type: ignore[arg-type]
        assert [c.name for c in t_off.chains] == [DISPATCH, CONFINED]
        assert [c.name for c in t_on.chains][:2] == [DISPATCH, CONFINED]
        assert t_on.chains[0] == t_off.chains[0]
        got, was = t_on.chains[1].rules, refusals.folded(t_off.chains[1].rules)
        assert len(got) == len(was) and not [r for r in got if r.target == "NFLOG"]
        for r, w in zip(got, was, strict=True):
            if r != w:  # a refusal: the same matches, and its verdict given by its line's chain
                assert w.target in ("REJECT", "DROP") and refuse_index(r.target) is not None
                assert dataclasses.replace(r, target=w.target, reject_with=w.reject_with) == w
        assert refusals.resolved(t_on, got) == was
        assert refusals.unfolded(t_on, got) == t_off.chains[1].rules
        assert [t for t in on.tables if t.name == "nat"] == [t for t in off.tables if t.name == "nat"]
    assert dataclasses.replace(on, tables=()) == dataclasses.replace(off, tables=())  # same sets, same kind


def test_log_refused_false_installs_no_log_rule_and_no_refusal_chain() -> None:
    rs = _build({**LOGGED, "log": {"refused": False}})
    assert not [r for t in rs.tables for c in t.chains for r in c.rules if r.target == "NFLOG" or r.nflog_prefix]
    assert not [c for t in rs.tables for c in t.chains if refuse_index(c.name) is not None]
    on = _build(LOGGED)
    assert [r for f in FAMILIES for r in _confined(on, f)] == [r for f in FAMILIES for r in _confined(rs, f)]


def test_log_rate_and_burst_are_the_policys() -> None:
    rs = _build({**LOGGED, "log": {"rate": "5/minute", "burst": 3}})
    rules = [r for c in _refusal_chains(rs, 4).values() for r in c]
    assert {(r.limit, r.limit_burst) for r in rules if r.target == "NFLOG"} == {((5, "minute"), 3)}


def test_a_long_policy_line_is_cut_to_what_nflog_carries() -> None:
    deny = [{"cidr": f"192.0.2.{n}/32", "protocol": "udp"} for n in range(0, 40, 2)]  # a set rule: deny[0-19]
    deny += [{"cidr": "198.18.0.1/32", "protocol": "tcp"}]
    rules = [r for c in _refusal_chains(_build({"deny": deny}), 4).values() for r in c]
    assert any(r.nflog_prefix for r in rules)
    assert all(len(r.nflog_prefix.encode()) <= LOG_PREFIX_MAX for r in rules if r.nflog_prefix)


def test_learned_sets_on_iptables_sit_behind_dnat_set_and_mark_before_they_allow() -> None:
    """dns.mode proxy on iptables: ipset reads the packet's destination, so a DNATed connection is
    refused before the learned sets (`dnat-set`, as for every set there); each match is a CONNMARK
    (mark, go on) then the same match's RETURN; marked connections pass first (`dns-learned-open`).
    nftables looks the sets up by the original destination and marks in the allowing rule."""
    data = {"confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]},
            "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": []},
            "allow": [{"host": "pypi.org", "ports": [443, 8443]}]}
    rules = _confined(_build(data), 4)
    at = _first(rules, "dnat-set")
    assert rules[at].ct_dnat and _last(rules, "dns-proxy") < at < _first(rules, "dns-learned-open")
    learned = [r for r in rules if r.comment == "allow[0]"]
    assert [r.target for r in learned] == ["CONNMARK", "RETURN"]
    assert learned[0].ctmark_set == LEARNED_CTMARK and learned[1].ctmark_set is None
    assert learned[0].match_set == learned[1].match_set and learned[0].match_set.startswith("egressguard-d4-")
    assert learned[0].dports == learned[1].dports == (443, 8443)
    assert args(learned[0], 4)[-4:] == ["-j", "CONNMARK", "--set-xmark", "0x40000000/0x40000000"]
    assert {(s["family"], s["host"]) for s in to_json(_build(data))["learned_sets"]} == {
        ("ipv4", "pypi.org"), ("ipv6", "pypi.org")}
    nft = _confined(build(validate({"version": 1, **data}), Facts(resolvers=RESOLVERS), orig_sets=True), 4)
    assert "dnat-set" not in _comments(nft)
    assert [(r.target, r.ctmark_set, r.ctorigdstport) for r in nft if r.comment == "allow[0]"] == [
        ("RETURN", LEARNED_CTMARK, 443), ("RETURN", LEARNED_CTMARK, 8443)]
