"""`deny` wins over `redirect` as it wins over `allow`: a denied destination on a redirect port is
refused, not handed to the (exempt) proxy that would connect to it on the confined uid's behalf."""

from __future__ import annotations

import pytest
from egtraffic import FAST, applied, policy, stopped

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

# Pod shapes, one per test in turn (tests/conftest.py): the guard must not depend on eth0.
LAB_TOPOLOGIES = [{"iface": "tun0"}, {"iface": "eth0"}]

CASES = {4: ("203.0.113.11", "203.0.113.10"), 6: ("2001:db8:2::11", "2001:db8:2::10")}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_denied_destination_on_a_redirect_port_is_refused_not_proxied(lab: Lab, family: int) -> None:
    denied, other = CASES[family]
    net = f"{denied}/32" if family == 4 else f"{denied}/128"
    applied(lab, policy(deny=[{"cidr": net}], redirect=[{"ports": [80, 443], "to_port": 8444}]))
    for port in (80, 443):
        stopped(lab, "tcp", denied, port)  # the exempt uid's same connection reaches the host, not the proxy
        assert lab.tcp(other, port, timeout=FAST).proxied, f"{other}:{port} should still go to the proxy"


def test_deny_limited_to_other_ports_leaves_the_redirect_alone(lab: Lab) -> None:
    denied, _ = CASES[4]
    applied(lab, policy(deny=[{"cidr": f"{denied}/32", "protocol": "tcp", "ports": [22]}],
                        redirect=[{"ports": [80], "to_port": 8444}]))
    assert lab.tcp(denied, 80, timeout=FAST).proxied
    stopped(lab, "tcp", denied, 22)
