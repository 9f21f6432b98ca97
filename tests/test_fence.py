"""The routing fence: both families closed for the confined uids in one system call while the first
lockdown is committed; lowered by the same apply, by the next apply, or by `reset`."""

from __future__ import annotations

import pytest
from egtraffic import stopped

from egressguard.backends.iptables import fence
from egressguard.lab import Lab
from egressguard.policy import validate


def test_fence_ranges_are_the_confined_uids() -> None:
    pol = validate({"version": 1, "confine": {"uids": [1000, 1001, 1003]}})
    assert fence.uid_ranges(pol) == [(1000, 1001), (1003, 1003)]


def test_fence_under_confine_all_spares_exactly_the_exempt_uids() -> None:
    pol = validate({"version": 1, "exempt": {"uids": [0, 1001, 1002]}})
    assert fence.uid_ranges(pol) == [(1, 1000), (1003, fence.MAX_UID)]


def _run_in_pod(lab: Lab, code: str) -> str:
    done = lab.in_pod(__import__("sys").executable, "-c", code)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.netns
def test_raised_fence_refuses_both_families_for_confined_only_and_keeps_loopback(lab: Lab) -> None:
    added = _run_in_pod(lab, "from egressguard import policy; from egressguard.backends.iptables import fence; "
                             "print(fence.raise_fence(policy.validate({'version': 1, 'confine': {'uids': [1000]}})))")
    assert added == "2"  # one rule per family, sent together
    for dest in ("203.0.113.10", "2001:db8:2::10"):
        stopped(lab, "tcp", dest, 22)
    assert lab.tcp("127.0.0.1", 8443, timeout=1).ok


@pytest.mark.netns
def test_apply_and_reset_lower_a_fence_left_behind(lab: Lab) -> None:
    _run_in_pod(lab, "from egressguard import policy; from egressguard.backends.iptables import fence; "
                     "fence.raise_fence(policy.validate({'version': 1, 'confine': {'uids': [1000]}}))")
    done = lab.apply({"version": 1, "confine": {"uids": [1000]}, "allow": [{"cidr": "203.0.113.10/32"}]})
    assert done.returncode == 0, done.stderr
    assert f"proto {fence.PROTOCOL}" not in lab.in_pod("ip", "rule").stdout
    assert lab.tcp("203.0.113.10", 22, timeout=1).ok  # the policy, not the fence, decides now
    _run_in_pod(lab, "from egressguard import policy; from egressguard.backends.iptables import fence; "
                     "fence.raise_fence(policy.validate({'version': 1, 'confine': {'uids': [1000]}}))")
    assert lab.egressguard("reset").returncode == 0
    assert f"proto {fence.PROTOCOL}" not in lab.in_pod("ip", "rule").stdout + lab.in_pod("ip", "-6", "rule").stdout
    assert lab.tcp("2001:db8:2::10", 22, timeout=1).ok
