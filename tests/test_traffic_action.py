"""`action`: reject fails fast (well under a second); drop does not answer at all."""

from __future__ import annotations

import pytest
from egtraffic import SILENT, lab_with, policy, stopped

from egressguard.lab import OTHER_RESOLVER_V4, OTHER_RESOLVER_V6, Lab

pytestmark = pytest.mark.netns

# The module's pod (tests/conftest.py): not eth0, so the guard is shown not to depend on it.
LAB_TOPOLOGIES = [{"iface": "veth1a2b3c4d", "second_iface": "tun0"}]

UNLISTED = {4: "203.0.113.12", 6: "2001:db8:2::12"}
OTHER_RESOLVER = {4: OTHER_RESOLVER_V4, 6: OTHER_RESOLVER_V6}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
FAST_ENOUGH = 0.25  # "well under a second", measured around a whole connect()


class TestReject:
    lab = lab_with(policy(action="reject"))

    @FAMILIES
    def test_tcp_connect_fails_at_once(self, lab: Lab, family: int) -> None:
        for port in (22, 5000, 8444):
            res = stopped(lab, "tcp", UNLISTED[family], port, timeout=2.0)  # the exempt uid reaches it
            assert res.outcome == "refused" and res.elapsed < FAST_ENOUGH, (port, str(res), res.elapsed)

    @FAMILIES
    def test_udp_send_fails_at_once(self, lab: Lab, family: int) -> None:
        res = stopped(lab, "udp", UNLISTED[family], 9999, timeout=2.0)
        assert res.outcome in ("eperm", "refused", "unreachable") and res.elapsed < FAST_ENOUGH, (str(res), res.elapsed)

    @FAMILIES
    def test_dns_to_another_resolver_fails_at_once_over_tcp(self, lab: Lab, family: int) -> None:
        res = stopped(lab, "dns", "allowed.test", OTHER_RESOLVER[family], tcp=True, timeout=2.0)
        assert res.outcome != "timeout" and res.elapsed < FAST_ENOUGH, (str(res), res.elapsed)


class TestDrop:
    lab = lab_with(policy(action="drop"))

    @FAMILIES
    def test_tcp_connect_gets_no_answer(self, lab: Lab, family: int) -> None:
        res = stopped(lab, "tcp", UNLISTED[family], 22, verdict="silence", timeout=SILENT)
        assert res.outcome == "timeout" and res.elapsed >= SILENT * 0.9, (str(res), res.elapsed)

    @FAMILIES
    def test_udp_gets_no_answer(self, lab: Lab, family: int) -> None:
        res = stopped(lab, "udp", UNLISTED[family], 9999, verdict="blocked", timeout=SILENT)
        assert res.outcome in ("timeout", "eperm"), str(res)
        # Sent or not, nothing comes back: no refusal reaches the client as an ICMP error.
        assert res.outcome != "refused"

    @FAMILIES
    def test_dns_to_another_resolver_gets_no_answer(self, lab: Lab, family: int) -> None:
        res = stopped(lab, "dns", "allowed.test", OTHER_RESOLVER[family], tcp=True, verdict="silence", timeout=SILENT)
        assert res.outcome == "timeout", str(res)

    @FAMILIES
    def test_allowed_traffic_is_unaffected_by_drop(self, lab: Lab, family: int) -> None:
        assert lab.tcp("::1" if family == 6 else "127.0.0.1", 8443, timeout=1.0).ok
