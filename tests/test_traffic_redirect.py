"""`redirect`: confined TCP to 80/443 goes to the local stand-in proxy on 8444, which sees the
original destination; exempt uids and unlisted root go straight to the world."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from egtraffic import FAST, lab_with, policy, reached, stopped

from egressguard.lab import EXEMPT, ROOT, Lab, Result
from egressguard.policy import DEFAULT_POLICY

pytestmark = pytest.mark.netns

# The module's pod (tests/conftest.py): not eth0, so the guard is shown not to depend on it.
LAB_TOPOLOGIES = [{"iface": "tun0", "second_iface": "net1"}]

HOSTS = {4: ("203.0.113.10", "203.0.113.12"), 6: ("2001:db8:2::10", "2001:db8:2::12")}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def _orig(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _proxied_from(res: Result, host: str, port: int) -> bool:
    """Answered by the pod's proxy on 8444, which names `host:port` as the original destination."""
    banner = str(res.answer or "")
    return res.proxied and " 8444 " in banner and banner.split(" orig=")[-1] == _orig(host, port)


class TestBuiltinDefaultRedirect:
    """The built-in default policy, given through EGRESSGUARD_POLICY_JSON as a Kubernetes user would."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, module_lab: Lab) -> Iterator[Lab]:
        done = module_lab.egressguard("apply", env={"EGRESSGUARD_POLICY_JSON": json.dumps(DEFAULT_POLICY)})
        assert done.returncode == 0, done.stderr
        yield module_lab

    @FAMILIES
    @pytest.mark.parametrize("port", [80, 443])
    def test_confined_web_traffic_goes_to_the_local_proxy_with_its_original_destination(
        self, lab: Lab, family: int, port: int
    ) -> None:
        for host in HOSTS[family]:
            res = lab.tcp(host, port, timeout=FAST)
            assert _proxied_from(res, host, port), res.answer

    @FAMILIES
    def test_the_proxy_sees_the_confined_client_as_local(self, lab: Lab, family: int) -> None:
        banner = str(lab.tcp(HOSTS[family][0], 80, timeout=FAST).answer)
        assert banner.startswith("pod ::1 8444 " if family == 6 else "pod 127.0.0.1 8444 "), banner

    @FAMILIES
    @pytest.mark.parametrize("uid", [EXEMPT, ROOT], ids=["exempt-1001", "root-not-listed"])
    def test_unconfined_web_traffic_is_not_redirected(self, lab: Lab, family: int, uid: int) -> None:
        host = HOSTS[family][0]
        for port in (80, 443):
            assert reached(lab.tcp(host, port, uid=uid, timeout=FAST), host)

    @FAMILIES
    def test_other_ports_are_neither_redirected_nor_allowed(self, lab: Lab, family: int) -> None:
        for port in (22, 8444, 5000):
            stopped(lab, "tcp", HOSTS[family][0], port)


class TestRedirectWithLoopbackDenied:
    lab = lab_with(policy(loopback="deny", redirect=[{"ports": [80], "to_port": 8444}]))

    @FAMILIES
    def test_redirected_traffic_still_reaches_the_proxy(self, lab: Lab, family: int) -> None:
        host = HOSTS[family][1]
        res = lab.tcp(host, 80, timeout=FAST)
        assert _proxied_from(res, host, 80), res.answer

    @FAMILIES
    def test_loopback_stays_closed_and_unlisted_ports_are_not_redirected(self, lab: Lab, family: int) -> None:
        # Loopback is denied: other local ports stay closed, and 443 is not redirected in this policy.
        stopped(lab, "tcp", "::1" if family == 6 else "127.0.0.1", 7000)
        stopped(lab, "tcp", HOSTS[family][1], 443)
