"""The guard in pod shapes other than one `eth0`: traffic that leaves by a second interface, a pod with
IPv6 disabled, and a pod with the kernel's default ping_group_range (as Kubernetes leaves it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from egtraffic import FAST, applied, policy, reached, refused_fast, stopped
from wire import WireCapture, in_pod, new_marker, send_udp

from egressguard.lab import (
    CONFINED,
    EXEMPT,
    POD_V6,
    SECOND_WORLD_IFACE,
    WORLD_IFACE,
    WORLD_V6,
    Lab,
)
from egressguard.policy import DEFAULT_POLICY

pytestmark = pytest.mark.netns

CAP_NET_RAW_BIT = 1 << 13
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
VIA_SECOND = {4: "203.0.113.12", 6: "2001:db8:2::12"}  # routed through the pod's second interface
ALLOWED_VIA_SECOND = "192.0.2.10"
VIA_FIRST = {4: "203.0.113.11", 6: "2001:db8:2::11"}

# The built-in default policy (issue 9 was found with it) plus one allow for a host on the second link.
SECOND_LINK_POLICY = {**DEFAULT_POLICY, "allow": [{"cidr": f"{ALLOWED_VIA_SECOND}/32", "ports": [22]}]}


# -- a second interface -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[{"iface": "eth0", "second_iface": "net1"},
                                        {"iface": "tun0", "second_iface": "tap-0123456789a"}],
                ids=["eth0+net1", "tun0+tap-0123456789a"])
def two_links(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with Lab(**request.param) as lab:
        for host in (*VIA_SECOND.values(), ALLOWED_VIA_SECOND):
            route = lab.in_pod("ip", "route", "get", host).stdout
            assert f"dev {lab.second_iface} " in route, route  # the lab really routes it out of the second link
        applied(lab, SECOND_LINK_POLICY)
        yield lab


def _second_link_packets(lab: Lab, proto: str, port: int) -> int:
    return lab.world_received(proto, port, devices=(SECOND_WORLD_IFACE,))


@FAMILIES
def test_confined_tcp_leaving_by_the_second_interface_is_refused(two_links: Lab, family: int) -> None:
    port = 5000
    before = _second_link_packets(two_links, "tcp", port)
    assert refused_fast(two_links.tcp(VIA_SECOND[family], port, timeout=FAST))
    assert _second_link_packets(two_links, "tcp", port) == before, "a confined packet left by the second link"
    # Control: the exempt uid's connection to the same host and port is answered, over the second link.
    assert reached(two_links.tcp(VIA_SECOND[family], port, uid=EXEMPT, timeout=FAST), VIA_SECOND[family])
    assert _second_link_packets(two_links, "tcp", port) > before


@FAMILIES
def test_confined_udp_leaving_by_the_second_interface_is_refused(two_links: Lab, family: int) -> None:
    port = 9999
    before = _second_link_packets(two_links, "udp", port)
    assert refused_fast(two_links.udp(VIA_SECOND[family], port, timeout=FAST))
    assert _second_link_packets(two_links, "udp", port) == before
    control = two_links.udp(VIA_SECOND[family], port, uid=EXEMPT, timeout=FAST)
    assert control.ok and str(control.answer).startswith(f"world udp {port} "), control
    assert _second_link_packets(two_links, "udp", port) > before


def test_confined_uid_reaches_an_allowed_host_on_the_second_link(two_links: Lab) -> None:
    before = _second_link_packets(two_links, "tcp", 22)
    assert reached(two_links.tcp(ALLOWED_VIA_SECOND, 22, timeout=FAST), ALLOWED_VIA_SECOND)
    assert _second_link_packets(two_links, "tcp", 22) > before
    stopped(two_links, "tcp", ALLOWED_VIA_SECOND, 5000)  # only the port listed


@FAMILIES
def test_the_first_interface_is_still_guarded_beside_a_second(two_links: Lab, family: int) -> None:
    before = two_links.world_received("tcp", 5000, devices=(WORLD_IFACE,))
    assert refused_fast(two_links.tcp(VIA_FIRST[family], 5000, timeout=FAST))
    assert two_links.world_received("tcp", 5000, devices=(WORLD_IFACE,)) == before
    assert reached(two_links.tcp(VIA_FIRST[family], 5000, uid=EXEMPT, timeout=FAST), VIA_FIRST[family])


@FAMILIES
def test_nothing_a_confined_uid_sends_by_the_second_link_arrives_there(two_links: Lab, family: int) -> None:
    """Judged by every frame the world receives on both links, not by the sender's error: the
    confined uid's datagram leaves no frame anywhere; the exempt uid's control arrives on eth1w."""
    secret, control = new_marker(), new_marker()
    with WireCapture(two_links) as cap:
        in_pod(two_links, CONFINED, send_udp, VIA_SECOND[family], 9999, secret.decode())
        in_pod(two_links, EXEMPT, send_udp, VIA_SECOND[family], 9999, control.decode())
        cap.barrier(two_links)
        leaked, seen = cap.frames_with(secret), cap.frames_with(control)
    assert not leaked, [str(f) for f in leaked]
    assert seen and {f.iface for f in seen} == {SECOND_WORLD_IFACE}, [str(f) for f in seen]


def test_confined_ipv6_to_the_second_links_own_neighbours_is_refused(two_links: Lab) -> None:
    ll = two_links.world_link_local(second=True)
    before = _second_link_packets(two_links, "tcp", 22)
    assert refused_fast(two_links.tcp(ll, 22, timeout=FAST))
    mid = _second_link_packets(two_links, "tcp", 22)
    assert mid == before, "a confined packet to the second link's neighbour arrived there"
    assert two_links.tcp(ll, 22, uid=EXEMPT, timeout=FAST).ok
    assert _second_link_packets(two_links, "tcp", 22) > mid  # the counter sees the control


# -- IPv6 disabled in the pod ---------------------------------------------------------------------


def test_an_ipv6_disabled_pod_is_guarded_and_stays_guarded_when_ipv6_comes_back() -> None:
    """apply works in a pod with IPv6 disabled (many clusters are IPv4-only), IPv4 is guarded, and the
    IPv6 rules are in place all the same: a pod that later enables IPv6 is guarded from the first packet."""
    with Lab(iface="net1", ipv6=False) as lab:
        applied(lab, policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]},
                                   {"cidr": "2001:db8:2::10/128", "ports": [22]}]))
        assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")
        stopped(lab, "tcp", "203.0.113.11", 22)
        assert lab.tcp("2001:db8:2::11", 22, uid=EXEMPT, timeout=FAST).outcome == "unreachable"  # no IPv6 at all

        lab.in_pod("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0", f"net.ipv6.conf.{lab.iface}.disable_ipv6=0",
                   "net.ipv6.conf.lo.disable_ipv6=0", check=True)
        lab.in_pod("ip", "addr", "add", f"{POD_V6}/64", "dev", lab.iface, "nodad", check=True)
        lab.in_pod("ip", "-6", "route", "add", "default", "via", WORLD_V6, check=True)
        control = lab.tcp("2001:db8:2::11", 22, uid=EXEMPT, timeout=2.0)  # the link is up again
        assert reached(control, "2001:db8:2::11"), control
        stopped(lab, "tcp", "2001:db8:2::11", 22)
        assert reached(lab.tcp("2001:db8:2::10", 22, timeout=FAST), "2001:db8:2::10")
        assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0


# -- a link that comes after the guard ------------------------------------------------------------

LATE_POD, LATE_WORLD = "wg0", "eth7w"  # a VPN sidecar's link, or a CNI's that came late
LATE_ADDRS = {4: ("198.18.7.2", "198.18.7.1", 24), 6: ("2001:db8:7::2", "2001:db8:7::1", 64)}
LATE_ALLOWED = {4: "203.0.113.10", 6: "2001:db8:2::10"}
LATE_REFUSED = {4: "203.0.113.11", 6: "2001:db8:2::11"}


def _add_late_link(lab: Lab) -> None:
    """A link from the pod to the world made after apply, carrying the routes to LATE_ALLOWED and
    LATE_REFUSED (both families)."""
    def ip(netns: str, *argv: str) -> None:
        subprocess.run(["ip", "-n", netns, *argv], check=True, capture_output=True, text=True)

    ip(lab.pod, "link", "add", LATE_POD, "type", "veth", "peer", "name", LATE_WORLD, "netns", lab.world)
    for family, (pod_addr, world_addr, bits) in LATE_ADDRS.items():
        nodad = ("nodad",) if family == 6 else ()
        ip(lab.pod, "addr", "add", f"{pod_addr}/{bits}", "dev", LATE_POD, *nodad)
        ip(lab.world, "addr", "add", f"{world_addr}/{bits}", "dev", LATE_WORLD, *nodad)
    ip(lab.pod, "link", "set", LATE_POD, "up")
    ip(lab.world, "link", "set", LATE_WORLD, "up")
    for family in (4, 6):
        for host in (LATE_ALLOWED[family], LATE_REFUSED[family]):
            ip(lab.pod, f"-{family}", "route", "replace", host, "via", LATE_ADDRS[family][1], "dev", LATE_POD)
            route = lab.in_pod("ip", "route", "get", host).stdout
            assert f"dev {LATE_POD} " in route, route  # the lab really routes it out of the new link


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_link_added_after_apply_is_guarded_from_its_first_packet(backend: str) -> None:
    """The rules name no interface but lo, so what leaves by a link that did not exist when the policy
    was applied is judged as on any other: not one of the confined uid's packets to a refused host
    arrives at the new link's far end, while the exempt uid's do and an allowed host answers."""
    with Lab(iface="tun0") as lab:
        applied(lab, policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]},
                                   {"cidr": "2001:db8:2::10/128", "ports": [22]}]), "--backend", backend)
        _add_late_link(lab)
        for family in (4, 6):
            refused, allowed = LATE_REFUSED[family], LATE_ALLOWED[family]
            for _ in range(50):  # neighbour discovery on the new link
                if reached(lab.tcp(refused, 22, uid=EXEMPT, timeout=0.5), refused):
                    break
            before = lab.world_received("tcp", 22, devices=(LATE_WORLD,))
            got = lab.tcp(refused, 22, timeout=FAST)
            assert refused_fast(got), got
            mid = lab.world_received("tcp", 22, devices=(LATE_WORLD,))
            assert mid == before, f"{mid - before} of the confined uid's packets to {refused} reached the new link's end"
            assert reached(lab.tcp(refused, 22, uid=EXEMPT, timeout=FAST), refused)
            assert lab.world_received("tcp", 22, devices=(LATE_WORLD,)) > mid  # the counter sees this link
            assert reached(lab.tcp(allowed, 22, timeout=FAST), allowed)
        assert lab.egressguard("verify", "--backend", backend, "--policy", str(lab.workdir / "policy.yaml")).returncode == 0


# -- the kernel's default ping_group_range --------------------------------------------------------


@FAMILIES
def test_with_the_default_ping_range_raw_icmp_echo_is_what_the_guard_must_stop(family: int) -> None:
    """Without Docker's wide ping_group_range no uid may open a ping socket, so a refused ping
    proves nothing there; ping then works through a raw socket (CAP_NET_RAW, as the ping binary
    has it). The confined uid's raw echo is refused, the exempt uid's is answered."""
    dest = {4: "203.0.113.12", 6: "2001:db8:2::12"}[family]
    with Lab(iface="veth1a2b3c4d", wide_ping=False) as lab:
        applied(lab, policy())
        for uid in (CONFINED, EXEMPT):
            assert lab.ping(dest, uid=uid, timeout=FAST).outcome == "eperm"
        control = lab.ping(dest, uid=EXEMPT, raw=True, caps=CAP_NET_RAW_BIT, timeout=FAST)
        assert control.ok and control.detail == "raw socket", control
        assert lab.ping(dest, uid=CONFINED, raw=True, caps=CAP_NET_RAW_BIT, timeout=FAST).blocked

