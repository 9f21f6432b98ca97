"""`loopback`: allow, deny, or a list of ports, for confined uids; exempt uids are never affected."""

from __future__ import annotations

import pytest
from egtraffic import FAST, dns_answered, lab_with, policy, stopped

from egressguard.lab import EXEMPT, POD_V4, POD_V6, RESOLVER_V4, Lab

pytestmark = pytest.mark.netns

# Names whose first bytes agree with `lo` in their lowest bits (see IFACE_NAMES): a `-o lo` rule
# with a bad mask would take them for loopback.
LAB_TOPOLOGIES = [{"iface": "tun0"}, {"iface": "veth1a2b3c4d"}]

LOCAL = {4: "127.0.0.1", 6: "::1"}
POD = {4: POD_V4, 6: POD_V6}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def _local_ok(lab: Lab, host: str, port: int, uid: int = 1000) -> bool:
    res = lab.tcp(host, port, uid=uid, timeout=FAST)
    return res.ok and str(res.answer).startswith(f"pod {host} {port} ")


class TestLoopbackAllow:
    lab = lab_with(policy(loopback="allow"))

    @FAMILIES
    def test_confined_uid_reaches_local_listeners(self, lab: Lab, family: int) -> None:
        for port in (7000, 8443):
            assert _local_ok(lab, LOCAL[family], port)

    @FAMILIES
    def test_the_pods_own_addresses_count_as_loopback(self, lab: Lab, family: int) -> None:
        assert _local_ok(lab, POD[family], 7000)


class TestLoopbackDeny:
    lab = lab_with(policy(loopback="deny"))

    @FAMILIES
    def test_confined_local_traffic_is_refused(self, lab: Lab, family: int) -> None:
        for host, port in ((LOCAL[family], 7000), (LOCAL[family], 8443), (POD[family], 7000)):
            stopped(lab, "tcp", host, port)

    @FAMILIES
    def test_exempt_uids_keep_loopback(self, lab: Lab, family: int) -> None:
        assert _local_ok(lab, LOCAL[family], 7000, uid=EXEMPT)

    def test_dns_to_the_resolvers_still_works(self, lab: Lab) -> None:
        assert dns_answered(lab.dns("allowed.test", RESOLVER_V4, timeout=FAST))


class TestLoopbackPorts:
    lab = lab_with(policy(loopback=[8443]))

    @FAMILIES
    def test_a_listed_port_is_reachable(self, lab: Lab, family: int) -> None:
        assert _local_ok(lab, LOCAL[family], 8443)

    @FAMILIES
    def test_other_local_ports_are_refused(self, lab: Lab, family: int) -> None:
        for port in (7000, 8444):
            stopped(lab, "tcp", LOCAL[family], port)
