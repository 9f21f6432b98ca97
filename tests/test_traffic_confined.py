"""Real traffic under one policy: what the confined uid may reach, and that exempt uids and root
(not listed) are not restricted. IPv4 and IPv6, TCP, UDP, ICMP and DNS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from egtraffic import FAST, applied, dns_answered, policy, reached, stopped

from egressguard.lab import (
    CONFINED,
    EXEMPT,
    METADATA_V4,
    METADATA_V6,
    OTHER_RESOLVER_V4,
    OTHER_RESOLVER_V6,
    RESOLVER_V4,
    RESOLVER_V6,
    ROOT,
    Lab,
)

pytestmark = pytest.mark.netns

# A 15-character interface name, and a Multus-style pod whose second interface carries the "other"
# and "udp" hosts below (203.0.113.12, 192.0.2.10, 2001:db8:2::12).
LAB_TOPOLOGIES = [{"iface": "tap-0123456789a"}, {"iface": "eth0", "second_iface": "net1"}]

POLICY = policy(
    allow=[
        {"cidr": "203.0.113.10/32", "ports": [22]},
        {"cidr": "2001:db8:2::10/128", "ports": [22]},
        {"cidr": "192.0.2.10/32", "protocol": "udp", "ports": [9999]},
        {"cidr": "2001:db8:2::12/128", "protocol": "udp", "ports": [9999]},
        {"cidr": "203.0.113.12/32", "protocol": "icmp"},
        {"cidr": "2001:db8:2::12/128", "protocol": "icmp"},
        {"cidr": "0.0.0.0/0", "ports": [8444]},  # broad allows: metadata and deny must still win
        {"cidr": "::/0", "ports": [8444]},
        {"cidr": "169.254.0.0/16", "protocol": "any"},
        {"cidr": "fd00::/8", "protocol": "any"},
        {"cidr": "203.0.113.0/24", "ports": [5000]},
        {"cidr": "2001:db8:2::/64", "ports": [5000]},
        # 20 ports in one entry: one nftables rule; iptables' multiport holds 15, so two rules there.
        {"cidr": f"{OTHER_RESOLVER_V4}/32", "ports": [*range(1001, 1019), 443, 5000]},
        {"cidr": f"{OTHER_RESOLVER_V6}/128", "ports": [*range(1001, 1019), 443, 5000]},
    ],
    deny=[{"cidr": "203.0.113.11/32"}, {"cidr": "2001:db8:2::11/128"}],
)

HOSTS = {
    4: {"allowed": "203.0.113.10", "denied": "203.0.113.11", "other": "203.0.113.12", "unlisted": OTHER_RESOLVER_V4,
        "udp": "192.0.2.10", "metadata": (METADATA_V4, "169.254.170.2", "100.100.100.200"),
        "resolver": RESOLVER_V4, "other_resolver": OTHER_RESOLVER_V4},
    6: {"allowed": "2001:db8:2::10", "denied": "2001:db8:2::11", "other": "2001:db8:2::12", "unlisted": OTHER_RESOLVER_V6,
        "udp": "2001:db8:2::12", "metadata": (METADATA_V6,),
        "resolver": RESOLVER_V6, "other_resolver": OTHER_RESOLVER_V6},
}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


@pytest.fixture(scope="module")
def lab(module_lab: Lab) -> Iterator[Lab]:
    applied(module_lab, POLICY)
    yield module_lab


# -- confined: address, port, protocol ----------------------------------------------------------


@FAMILIES
def test_confined_uid_reaches_an_allowed_address_and_port(lab: Lab, family: int) -> None:
    h = HOSTS[family]
    assert reached(lab.tcp(h["allowed"], 22, timeout=FAST), h["allowed"])


@FAMILIES
def test_confined_uid_is_refused_on_a_port_the_entry_does_not_list(lab: Lab, family: int) -> None:
    stopped(lab, "tcp", HOSTS[family]["allowed"], 443)


@FAMILIES
def test_confined_uid_is_refused_by_an_unlisted_address(lab: Lab, family: int) -> None:
    stopped(lab, "tcp", HOSTS[family]["unlisted"], 22)


@FAMILIES
def test_confined_uid_is_refused_udp_where_only_tcp_is_allowed(lab: Lab, family: int) -> None:
    stopped(lab, "udp", HOSTS[family]["allowed"], 9999)


@FAMILIES
def test_confined_uid_reaches_an_allowed_udp_port(lab: Lab, family: int) -> None:
    h = HOSTS[family]
    res = lab.udp(h["udp"], 9999, timeout=FAST)
    assert res.ok and str(res.answer).startswith("world udp 9999"), res


@FAMILIES
def test_confined_uid_is_refused_on_an_unlisted_udp_port(lab: Lab, family: int) -> None:
    stopped(lab, "udp", HOSTS[family]["udp"], 123)


@FAMILIES
def test_confined_ping_is_refused(lab: Lab, family: int) -> None:
    # An IPv6 ping socket is not told of the local refusal: its echo goes unanswered.
    stopped(lab, "ping", HOSTS[family]["allowed"], verdict="refused" if family == 4 else "silence")


@FAMILIES
def test_confined_ping_passes_where_icmp_is_allowed(lab: Lab, family: int) -> None:
    assert lab.ping(HOSTS[family]["other"], timeout=FAST).ok


@FAMILIES
def test_a_broad_allow_reaches_every_host_on_its_port(lab: Lab, family: int) -> None:
    h = HOSTS[family]
    for host in (h["other"], h["unlisted"]):
        assert reached(lab.tcp(host, 8444, timeout=FAST), host)


@FAMILIES
def test_a_port_list_longer_than_one_multiport_match_allows_each_listed_port(lab: Lab, family: int) -> None:
    """The entry of 20 ports: its first (443) and its twentieth (5000, past iptables' 15 to a rule)
    are reached; a port between them that it does not list is refused, as everywhere else."""
    host = HOSTS[family]["unlisted"]
    assert reached(lab.tcp(host, 443, timeout=FAST), host)
    assert reached(lab.tcp(host, 5000, timeout=FAST), host)
    stopped(lab, "tcp", host, 853)


@FAMILIES
def test_a_network_allow_covers_every_address_in_it(lab: Lab, family: int) -> None:
    h = HOSTS[family]
    for host in (h["allowed"], h["other"]):
        assert reached(lab.tcp(host, 5000, timeout=FAST), host)


# -- deny and metadata win ----------------------------------------------------------------------


@FAMILIES
def test_deny_beats_allow(lab: Lab, family: int) -> None:
    h = HOSTS[family]
    for port in (5000, 8444):  # both allowed by networks that contain the denied host
        stopped(lab, "tcp", h["denied"], port)


@FAMILIES
def test_metadata_is_refused_despite_a_broad_allow(lab: Lab, family: int) -> None:
    for host in HOSTS[family]["metadata"]:
        stopped(lab, "tcp", host, 8444)
        stopped(lab, "tcp", host, 22)
        stopped(lab, "udp", host, 9999)


@FAMILIES
def test_metadata_endpoint_exists_for_an_exempt_uid(lab: Lab, family: int) -> None:
    # The positive control: the endpoint answers, so the refusal above is the guard's doing.
    for host in HOSTS[family]["metadata"]:
        assert reached(lab.tcp(host, 8444, uid=EXEMPT, timeout=FAST), host)


# -- DNS -----------------------------------------------------------------------------------------


@FAMILIES
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_confined_dns_to_a_configured_resolver_is_answered(lab: Lab, family: int, tcp: bool) -> None:
    res = lab.dns("allowed.test", HOSTS[family]["resolver"], rdtype="AAAA" if family == 6 else "A", tcp=tcp, timeout=FAST)
    assert dns_answered(res), res


@FAMILIES
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_confined_dns_to_a_second_reachable_resolver_is_refused(lab: Lab, family: int, tcp: bool) -> None:
    stopped(lab, "dns", "allowed.test", HOSTS[family]["other_resolver"], tcp=tcp)


@FAMILIES
def test_confined_uid_cannot_use_port_53_of_a_host_that_is_not_a_resolver(lab: Lab, family: int) -> None:
    stopped(lab, "dns", "allowed.test", HOSTS[family]["allowed"], tcp=True)


@FAMILIES
def test_a_resolver_is_open_to_confined_uids_for_dns_only(lab: Lab, family: int) -> None:
    stopped(lab, "tcp", HOSTS[family]["resolver"], 22)


def test_real_dig_as_confined_uid_uses_the_configured_resolver_only(lab: Lab) -> None:
    good = lab.exec_as(["dig", f"@{RESOLVER_V4}", "allowed.test", "+short", "+time=1", "+tries=1"], timeout=3)
    bad = ["dig", f"@{OTHER_RESOLVER_V4}", "allowed.test", "+short", "+time=1", "+tries=1"]
    control = lab.exec_as(bad, uid=EXEMPT, timeout=3)  # the other resolver answers the same dig
    refused = lab.exec_as(bad, timeout=3)
    assert good.ok and "203.0.113.10" in str(good.answer), good.answer
    assert control.ok and "203.0.113.10" in str(control.answer), control.answer
    assert not refused.ok and "203.0.113.10" not in str(refused.answer), refused.answer


def test_real_nc_as_confined_uid_reaches_only_the_allowed_host(lab: Lab) -> None:
    good = lab.exec_as(["nc", "-w", "1", "2001:db8:2::10", "22"], timeout=3)
    bad = ["nc", "-w", "1", "2001:db8:2::11", "22"]
    control = lab.exec_as(bad, uid=EXEMPT, timeout=3)  # the same nc reaches that host
    refused = lab.exec_as(bad, timeout=3)
    assert good.ok and str(good.answer).startswith("world 2001:db8:2::10 22"), good.answer
    assert control.ok and str(control.answer).startswith("world 2001:db8:2::11 22"), control.answer
    assert not refused.ok and "world" not in str(refused.answer), refused.answer


# -- who is not confined --------------------------------------------------------------------------


def _everything(family: int) -> list[tuple[str, tuple[object, ...], dict[str, object]]]:
    h = HOSTS[family]
    return [
        ("tcp", (h["unlisted"], 22), {}),
        ("tcp", (h["denied"], 5000), {}),
        ("tcp", (h["metadata"][0], 22), {}),
        ("tcp", (h["allowed"], 443), {}),
        ("udp", (h["allowed"], 9999), {}),
        ("ping", (h["allowed"],), {}),
        ("dns", ("allowed.test", h["other_resolver"]), {}),
        ("dns", ("allowed.test", h["other_resolver"]), {"tcp": True}),
    ]


@FAMILIES
@pytest.mark.parametrize("uid", [EXEMPT, ROOT], ids=["exempt-1001", "root-not-listed"])
def test_unconfined_uid_reaches_everything_the_confined_uid_may_not(lab: Lab, family: int, uid: int) -> None:
    """Each probe is blocked for the confined uid, judged where the world receives too (TCP, UDP and
    DNS by port: not one of its packets arrives), and answered for `uid`, whose packets the same
    counters see."""
    probes = _everything(family)
    counted = [("tcp", 22), ("tcp", 5000), ("tcp", 443), ("udp", 9999), ("udp", 53), ("tcp", 53)]
    before = lab.world_counts(counted)
    confined = lab.batch(probes, uid=CONFINED, each=FAST)
    assert all(r.blocked for r in confined), [(p, str(r)) for p, r in zip(probes, confined, strict=True) if not r.blocked]
    mid = lab.world_counts(counted)
    assert mid == before, {k: mid[k] - before[k] for k in counted if mid[k] != before[k]}
    results = lab.batch(probes, uid=uid, each=FAST)
    failed = [(p, str(r)) for p, r in zip(probes, results, strict=True) if not r.ok]
    assert not failed
    after = lab.world_counts(counted)
    assert all(after[k] > mid[k] for k in counted), {k: after[k] - mid[k] for k in counted}
