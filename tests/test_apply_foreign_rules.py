"""egressguard owns only its chains and jumps: foreign rules (Docker's embedded-DNS NAT rules, a
filter rule) survive apply, re-apply and reset untouched and in their order; `reset` leaves nothing of ours."""

from __future__ import annotations

import json

import pytest
from egtraffic import FAST, applied, apply_quick, foreign_lines, normalized, owned_lines, policy, reached, stopped

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

POLICY = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}], redirect=[{"ports": [80], "to_port": 8444}])

# What Docker's embedded DNS installs in a container's namespace (ports as Docker picks them), plus
# a filter rule of someone else's, in both families where it makes sense.
FOREIGN = [
    ("iptables-legacy", "-t", "nat", "-N", "DOCKER_OUTPUT"),
    ("iptables-legacy", "-t", "nat", "-N", "DOCKER_POSTROUTING"),
    ("iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"),
    ("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-d", "127.0.0.11/32", "-j", "DOCKER_POSTROUTING"),
    ("iptables-legacy", "-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "tcp", "--dport", "53",
     "-j", "DNAT", "--to-destination", "127.0.0.11:41234"),
    ("iptables-legacy", "-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "udp", "--dport", "53",
     "-j", "DNAT", "--to-destination", "127.0.0.11:52345"),
    ("iptables-legacy", "-t", "nat", "-A", "DOCKER_POSTROUTING", "-s", "127.0.0.11/32", "-p", "tcp", "--sport", "41234",
     "-j", "SNAT", "--to-source", ":53"),
    ("iptables-legacy", "-A", "OUTPUT", "-d", "192.0.2.99/32", "-p", "tcp", "--dport", "9", "-j", "REJECT"),
    ("iptables-legacy", "-A", "OUTPUT", "-d", "192.0.2.98/32", "-j", "ACCEPT"),
    ("ip6tables-legacy", "-A", "OUTPUT", "-d", "2001:db8:ffff::9/128", "-p", "udp", "-j", "DROP"),
]


def _install_foreign(lab: Lab) -> None:
    for cmd in FOREIGN:
        done = lab.in_pod(*cmd)
        assert done.returncode == 0, (cmd, done.stderr)


def test_foreign_rules_survive_apply_in_their_order(lab: Lab) -> None:
    _install_foreign(lab)
    before = normalized(lab.ruleset_dump())
    applied(lab, POLICY)
    after = normalized(lab.ruleset_dump())
    assert foreign_lines(after) == foreign_lines(before)
    assert owned_lines(after)  # and ours are there


def test_our_jump_goes_first_and_foreign_output_rules_keep_their_order(lab: Lab) -> None:
    _install_foreign(lab)
    applied(lab, POLICY)
    outputs = [line for line in lab.ruleset_dump().splitlines() if line.startswith("-A OUTPUT")]
    ours = "-A OUTPUT -m comment --comment egressguard -j EGRESSGUARD"
    v4_filter = outputs[outputs.index("-A OUTPUT -d 192.0.2.99/32 -p tcp -m tcp --dport 9 -j REJECT --reject-with "
                                      "icmp-port-unreachable") - 1]
    assert v4_filter == ours
    assert "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT" in outputs
    assert outputs[outputs.index("-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT") - 1] == ours


def test_a_foreign_rule_inserted_ahead_of_our_jump_keeps_its_place_relative_to_the_others(lab: Lab) -> None:
    applied(lab, POLICY)
    _install_foreign(lab)
    assert lab.in_pod("iptables-legacy", "-I", "OUTPUT", "1", "-d", "192.0.2.97/32", "-j", "ACCEPT").returncode == 0
    before = foreign_lines(lab.ruleset_dump())
    apply_quick(lab, POLICY)
    after = lab.ruleset_dump()
    assert foreign_lines(after) == before
    filter_v4 = after.split("*filter")[1].split("COMMIT")[0]
    assert [line for line in filter_v4.splitlines() if line.startswith("-A OUTPUT")][0].endswith("-j EGRESSGUARD")


def test_foreign_rules_survive_reset(lab: Lab) -> None:
    _install_foreign(lab)
    before = lab.ruleset_dump()
    applied(lab, POLICY)
    assert lab.egressguard("reset").returncode == 0
    assert normalized(lab.ruleset_dump()) == normalized(before)


def test_reset_leaves_nothing_of_ours(lab: Lab) -> None:
    pristine = lab.ruleset_dump()
    applied(lab, POLICY)
    assert lab.status_file.exists()
    done = lab.egressguard("reset")
    assert done.returncode == 0, done.stderr
    dump = lab.ruleset_dump()
    assert normalized(dump) == normalized(pristine)
    assert not owned_lines(dump) and "egressguard" not in dump.lower()
    assert not lab.status_file.exists()


def test_after_reset_confined_traffic_is_unrestricted_again(lab: Lab) -> None:
    applied(lab, POLICY)
    stopped(lab, "tcp", "203.0.113.12", 22)
    assert lab.egressguard("reset").returncode == 0
    assert reached(lab.tcp("203.0.113.12", 22, timeout=FAST), "203.0.113.12")
    assert reached(lab.tcp("2001:db8:2::12", 80, timeout=FAST), "2001:db8:2::12")  # not redirected any more


def test_reset_with_nothing_installed_changes_nothing(lab: Lab) -> None:
    _install_foreign(lab)
    before = lab.ruleset_dump()
    done = lab.egressguard("reset")
    assert done.returncode == 0, done.stderr
    assert normalized(lab.ruleset_dump()) == normalized(before)


def test_status_reports_foreign_output_rules_without_owning_them(lab: Lab) -> None:
    _install_foreign(lab)
    applied(lab, POLICY)
    report = json.loads(lab.egressguard("status", "--json").stdout)
    counts = {(t["family"], t["table"]): t["foreign_output_rules"] for t in report["tables"]}
    assert counts[("ipv4", "filter")] == 2 and counts[("ipv4", "nat")] == 1 and counts[("ipv6", "filter")] == 1


def _tables_in_use(lab: Lab) -> dict[int, set[str]]:
    return {f: set(lab.in_pod("cat", f"/proc/net/ip{'6' if f == 6 else ''}_tables_names").stdout.split()) for f in (4, 6)}


def test_apply_creates_no_table_it_does_not_write(lab: Lab) -> None:
    """Opening an x_tables table creates it in the namespace, and every packet then walks its hooks
    (nat's also sets up NAT for each new connection). python-iptables opened all five while looking
    up a jump's target; only filter, and nat for a redirect, may appear."""
    assert _tables_in_use(lab) == {4: set(), 6: set()}
    plain = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}])
    applied(lab, plain)
    assert _tables_in_use(lab) == {4: {"filter"}, 6: {"filter"}}
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0
    assert _tables_in_use(lab) == {4: {"filter"}, 6: {"filter"}}
    applied(lab, POLICY)
    assert _tables_in_use(lab) == {4: {"filter", "nat"}, 6: {"filter", "nat"}}
    applied(lab, plain)  # nat stays (the kernel keeps a table once created) but holds nothing of ours
    assert "EGRESSGUARD" not in lab.in_pod("iptables-legacy-save", "-t", "nat").stdout
    assert lab.egressguard("reset").returncode == 0
    assert _tables_in_use(lab) == {4: {"filter", "nat"}, 6: {"filter", "nat"}}
