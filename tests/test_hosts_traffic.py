"""`host` entries resolved through the pod's resolvers (the lab's DNS server): A + AAAA + CNAME,
required names that do not resolve (exit 4, lockdown), optional ones (skipped and reported)."""

from __future__ import annotations

import json

import pytest
from egtraffic import FAST, applied, policy, reached, stopped

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

# Pod shapes, one per test in turn (tests/conftest.py): the guard must not depend on eth0.
LAB_TOPOLOGIES = [{"iface": "tun0"}, {"iface": "eth0", "second_iface": "net1"}]


def test_host_through_a_cname_allows_its_a_and_aaaa_addresses_only(lab: Lab) -> None:
    applied(lab, policy(allow=[{"host": "alias.test", "ports": [22]}]))
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")
    assert reached(lab.tcp("2001:db8:2::10", 22, timeout=FAST), "2001:db8:2::10")
    stopped(lab, "tcp", "203.0.113.11", 22)
    stopped(lab, "tcp", "2001:db8:2::11", 22)
    status = json.loads(lab.status_file.read_text())
    assert status["hosts"] == {"alias.test": ["203.0.113.10", "2001:db8:2::10"]}


def test_required_host_that_does_not_resolve_exits_4_with_lockdown(lab: Lab) -> None:
    done = lab.apply(policy(allow=[{"host": "missing.test", "ports": [22]}, {"cidr": "203.0.113.11/32"}]))
    assert done.returncode == 4, done.stderr[-1000:]
    assert "missing.test" in done.stderr
    stopped(lab, "tcp", "203.0.113.11", 22)  # lockdown, not the policy (which allows it), is in place
    assert json.loads(lab.status_file.read_text())["state"] == "lockdown"


def test_optional_host_that_does_not_resolve_is_skipped_and_reported(lab: Lab) -> None:
    done = applied(lab, policy(allow=[{"host": "missing.test", "optional": True}, {"host": "allowed.test"}]))
    assert "optional_host_skipped" in done.stderr
    status = json.loads(lab.status_file.read_text())
    assert "missing.test" in status["hosts_skipped"]
    assert status["hosts"]["allowed.test"] == ["203.0.113.10", "2001:db8:2::10"]
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")


def test_host_over_the_address_cap_fails_the_apply(lab: Lab) -> None:
    done = lab.apply(policy(dns={"max_addresses_per_host": 1}, allow=[{"host": "allowed.test"}]))
    assert done.returncode == 4
    assert "max_addresses_per_host" in done.stderr


def test_names_sharing_an_address_are_warned_about(lab: Lab) -> None:
    done = applied(lab, policy(allow=[{"host": "allowed.test"}, {"host": "alias.test"}]))
    assert "hosts_share_address" in done.stderr


def test_policy_digest_in_the_status_covers_resolved_addresses(lab: Lab) -> None:
    pol = policy(allow=[{"host": "allowed.test", "ports": [22]}])
    applied(lab, pol)
    first = json.loads(lab.status_file.read_text())["ruleset_digest"]
    records = json.loads(json.dumps(lab.records))
    records["allowed.test"]["A"] = ["203.0.113.12"]
    lab.set_records(records)
    applied(lab, pol)
    assert json.loads(lab.status_file.read_text())["ruleset_digest"] != first
    assert reached(lab.tcp("203.0.113.12", 22, timeout=FAST), "203.0.113.12")
    stopped(lab, "tcp", "203.0.113.10", 22)
