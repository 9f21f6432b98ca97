"""Re-applying: the same policy 20 times installs exactly the same rules (no duplicates); a changed
policy replaces ours, and behaviour follows at once."""

from __future__ import annotations

import pytest
from egtraffic import FAST, applied, apply_quick, owned_lines, policy, reached, stopped

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

FIRST = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}],
               redirect=[{"ports": [80, 443], "to_port": 8444}])
SECOND = policy(allow=[{"cidr": "203.0.113.12/32", "ports": [22]}, {"cidr": "2001:db8:2::12/128", "ports": [22]}],
                deny=[{"cidr": "192.0.2.0/24"}], action="drop")


def test_applying_the_same_policy_20_times_gives_identical_rules(lab: Lab) -> None:
    applied(lab, FIRST)
    first = lab.ruleset_dump()
    for i in range(2, 21):  # the CLI once above, then 19 more in-process applies
        apply_quick(lab, FIRST)
        if i in (2, 10, 20):  # an accumulating or flapping difference shows at one of these
            assert lab.ruleset_dump() == first, f"apply {i} changed the rules"


def test_each_owned_chain_and_jump_exists_once(lab: Lab) -> None:
    applied(lab, FIRST)
    apply_quick(lab, FIRST)
    dump = lab.ruleset_dump()
    # per family: filter and nat each have one jump and two chain declarations
    assert dump.count("-A OUTPUT -m comment --comment egressguard -j EGRESSGUARD") == 4
    assert dump.count(":EGRESSGUARD -") == 4 and dump.count(":EGRESSGUARD-CONFINED -") == 2
    assert dump.count(":EGRESSGUARD-REDIRECT -") == 2


def test_a_changed_policy_replaces_the_rules_and_the_behaviour(lab: Lab) -> None:
    applied(lab, FIRST)
    first = owned_lines(lab.ruleset_dump())
    apply_quick(lab, SECOND)
    second = owned_lines(lab.ruleset_dump())
    assert second != first
    assert not any("REDIRECT" in line for line in second)  # no redirect in SECOND: nat objects gone
    for old, new in (("203.0.113.10", "203.0.113.12"), ("2001:db8:2::10", "2001:db8:2::12")):
        assert reached(lab.tcp(new, 22, timeout=FAST), new)
        stopped(lab, "tcp", old, 22, verdict="silence", timeout=0.6)  # now dropped, not rejected
    stopped(lab, "tcp", "203.0.113.10", 80, verdict="silence", timeout=0.6)  # no longer redirected


def test_going_back_to_the_first_policy_restores_its_exact_rules(lab: Lab) -> None:
    applied(lab, FIRST)
    first = lab.ruleset_dump()
    apply_quick(lab, SECOND)
    apply_quick(lab, FIRST)
    assert lab.ruleset_dump() == first
    stopped(lab, "tcp", "203.0.113.12", 22)
