"""`dns.resolvers`: auto reads the pod's resolv.conf at apply time, a list names the resolvers,
[] means no DNS at all for confined uids. Exempt uids keep every resolver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from egtraffic import FAST, applied, dns_answered, lab_with, policy, stopped

from egressguard.lab import EXEMPT, OTHER_RESOLVER_V4, OTHER_RESOLVER_V6, RESOLVER_V4, RESOLVER_V6, Lab

pytestmark = pytest.mark.netns

# The module's pod (tests/conftest.py): not eth0, so the guard is shown not to depend on it.
LAB_TOPOLOGIES = [{"iface": "net1"}]

RESOLVERS = (RESOLVER_V4, RESOLVER_V6)
OTHERS = (OTHER_RESOLVER_V4, OTHER_RESOLVER_V6)
TRANSPORT = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


def _answered(lab: Lab, server: str, tcp: bool, uid: int = 1000) -> bool:
    return dns_answered(lab.dns("allowed.test", server, uid=uid, tcp=tcp, timeout=FAST))


class TestNoResolvers:
    lab = lab_with(policy(dns={"resolvers": []}))

    @TRANSPORT
    def test_confined_uid_has_no_dns_at_all(self, lab: Lab, tcp: bool) -> None:
        for server in RESOLVERS + OTHERS:  # each answers the exempt uid's same query (the control)
            stopped(lab, "dns", "allowed.test", server, tcp=tcp)

    @TRANSPORT
    def test_exempt_uid_keeps_dns(self, lab: Lab, tcp: bool) -> None:
        assert _answered(lab, RESOLVER_V4, tcp, uid=EXEMPT)

    def test_status_file_records_no_resolvers(self, lab: Lab) -> None:
        assert json.loads(lab.status_file.read_text())["resolvers"] == []


class TestExplicitResolvers:
    lab = lab_with(policy(dns={"resolvers": [OTHER_RESOLVER_V6]}))

    @TRANSPORT
    def test_only_the_listed_resolver_answers_confined_queries(self, lab: Lab, tcp: bool) -> None:
        assert _answered(lab, OTHER_RESOLVER_V6, tcp)
        for server in (RESOLVER_V4, RESOLVER_V6, OTHER_RESOLVER_V4):  # resolv.conf's are not used
            stopped(lab, "dns", "allowed.test", server, tcp=tcp)


class TestAutoReadsResolvConf:
    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, module_lab: Lab) -> Iterator[Lab]:
        resolv = Path("/etc/netns") / module_lab.pod / "resolv.conf"  # what the pod sees as /etc/resolv.conf
        before = resolv.read_text()
        resolv.write_text(f"# written by the test\nnameserver {OTHER_RESOLVER_V4}\nnameserver {OTHER_RESOLVER_V6}\n")
        try:
            applied(module_lab, policy(dns={"resolvers": "auto"}))
            yield module_lab
        finally:
            resolv.write_text(before)

    @TRANSPORT
    def test_the_pods_nameservers_answer_confined_queries(self, lab: Lab, tcp: bool) -> None:
        for server in OTHERS:
            assert _answered(lab, server, tcp), server

    @TRANSPORT
    def test_resolvers_not_in_the_pods_resolv_conf_are_refused(self, lab: Lab, tcp: bool) -> None:
        for server in RESOLVERS:
            stopped(lab, "dns", "allowed.test", server, tcp=tcp)

    def test_status_file_records_the_resolvers_found(self, lab: Lab) -> None:
        assert json.loads(lab.status_file.read_text())["resolvers"] == list(OTHERS)
