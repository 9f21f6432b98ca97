"""Bypass suite: from the confined uid inside a guarded pod, every way out we could think of.

Each test states its expected result. Every attempt that must be stopped is paired with a control:
the same probe from the exempt uid gets through, so the block is the guard's doing and not the test
bed's. A few tests pin down paths the guard lets through by design (loopback to a local relay, answers
on flows others opened, packet sockets for a process given CAP_NET_RAW); the README section "What the
guard does and does not stop" lists the same cases.

The suite runs on several pod topologies (LAB_TOPOLOGIES): interface names that a rule matching `lo`
must not confuse with it, and a pod with a second interface that some world hosts are routed through.
"""

from __future__ import annotations

import os
import random
import select
import socket
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from egtraffic import from_world, world_port
from wire import in_pod

from egressguard.lab import (
    CONFINED,
    EXEMPT,
    METADATA_V4,
    METADATA_V6,
    OTHER_RESOLVER_V4,
    OTHER_RESOLVER_V6,
    POD_V4,
    POD_V6,
    RESOLVER_V4,
    RESOLVER_V6,
    ROOT,
    SECOND_LINK_ROUTED,
    WORLD_V4,
    Lab,
    Result,
)

pytestmark = pytest.mark.netns

ALLOWED_V4, ALLOWED_V6 = "203.0.113.10", "2001:db8:2::10"
OTHER_V4, OTHER_V6 = "203.0.113.11", "2001:db8:2::11"
LINK_LOCAL_V4 = "169.254.1.1"  # added to the world for the link-local test
METADATA = (METADATA_V4, "169.254.170.2", "100.100.100.200", METADATA_V6)
CAP_NET_RAW_BIT = 1 << 13

# A Multus-style net1 pod, a pod with two interfaces (its second link carries 203.0.113.12, 192.0.2.10
# and 2001:db8:2::12, which the sweeps below try), and the eth0 pod. Each test that builds its own lab
# takes the next one in turn (tests/conftest.py); the other real-traffic suites take other names.
LAB_TOPOLOGIES = [{"iface": "net1"}, {"iface": "veth1a2b3c4d", "second_iface": "tun0"}, {}]

# The guarded pod's policy: one allowed TCP port on one host per family, broad allows that cover every
# metadata endpoint (deny_metadata must still win), DNS to the pod's resolvers, port 80 redirected to
# the local proxy on 8444, loopback allowed (the default).
POLICY: dict[str, Any] = {
    "version": 1,
    "confine": {"uids": [CONFINED]},
    "exempt": {"uids": [EXEMPT]},
    "action": "reject",
    "dns": {"resolvers": "auto"},
    "deny_metadata": True,
    "allow": [
        {"cidr": f"{ALLOWED_V4}/32", "ports": [443]},
        {"cidr": f"{ALLOWED_V6}/128", "ports": [443]},
        {"cidr": "169.254.169.0/24", "protocol": "any"},
        {"cidr": "169.254.170.0/24", "protocol": "any"},
        {"cidr": "100.100.100.0/24", "protocol": "any"},
        {"cidr": "fd00:ec2::/64", "protocol": "any"},
    ],
    "redirect": [{"ports": [80], "to_port": 8444}],
}


class Tally:
    """Counts confined attempts that had to be stopped, and which got through, over every topology."""

    def __init__(self) -> None:
        self.attempts = 0
        self.outcomes: Counter[str] = Counter()  # how each stopped attempt was stopped
        self.through: list[str] = []
        self.by_design: set[str] = set()
        self.topologies: set[str] = set()

    def line(self) -> str:
        design = f"; {len(self.by_design)} paths open by design, documented" if self.by_design else ""
        shapes = f" on {len(self.topologies)} pod topologies ({', '.join(sorted(self.topologies))})"
        how = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items()))
        return f"bypass: {len(self.through)} of {self.attempts} attempts got through ({how}){shapes}{design}"

    def count(self, what: str, got: Result) -> None:
        self.attempts += 1
        if got.blocked:
            self.outcomes[got.outcome] += 1
        else:
            self.through.append(f"{what}: {got}")


TALLY = Tally()


def stopped(what: str, confined: Result, control: Result | None = None) -> None:
    """One bypass attempt: the confined probe must be blocked; its control (same probe, exempt uid)
    must get through, or the attempt proves nothing."""
    if control is not None:
        assert control.ok, f"{what}: control (exempt uid) did not get through: {control}"
    TALLY.count(what, confined)
    assert confined.blocked, f"{what}: confined uid got through: {confined} {confined.answer or ''}"


def sweep(lab: Lab, what: str, probes: list[tuple[str, tuple[Any, ...], dict[str, Any]]], each: float = 1.0) -> None:
    """Many attempts in two batches (confined, then exempt as control); every one must be stopped.
    TCP and UDP attempts are also judged where the world receives: not one packet of the confined
    batch may arrive on any of its ports, and each port the control reached the world on counts it."""
    ports = [world_port(op, args) for op, args, _ in probes]
    counted = [p for p in ports if p]
    before = lab.world_counts(counted)
    confined = lab.batch(probes, uid=CONFINED, each=each)
    mid = lab.world_counts(counted)
    control = lab.batch(probes, uid=EXEMPT, each=each)
    after = lab.world_counts(counted)
    failures = []
    for probe, port, got, ctl in zip(probes, ports, confined, control, strict=True):
        label = f"{what} {probe[0]} {probe[1]}"
        if not ctl.ok:
            failures.append(f"{label}: control failed: {ctl}")
            continue
        TALLY.count(label, got)
        if not got.blocked:
            failures.append(f"{label}: got through: {got} {got.answer or ''}")
        if port and from_world(ctl) and after[port] == mid[port]:
            failures.append(f"{label}: the world's counter of {port} saw none of the control's packets")
    failures += [f"{what}: {mid[p] - before[p]} packet(s) of the confined batch reached the world on {p}"
                 for p in before if mid[p] != before[p]]
    assert not failures, "\n".join(failures)


def refused_by_kernel(res: Result) -> Result:
    """A command's result as a verdict: stopped (eperm) only if it failed saying the kernel refused;
    a missing binary or a usage error is not a refusal and would count as getting through."""
    said = str(res.answer or "")
    if not res.ok and any(m in said for m in ("Permission denied", "Operation not permitted", "you must be root")):
        return Result("eperm", res.detail, res.elapsed, res.answer)
    return res


def _open_lock() -> Path:
    """An xtables lock file every uid may take, so the kernel (not the lock) is what refuses."""
    lock = Path(tempfile.mkdtemp()) / "xtables.lock"
    lock.touch(mode=0o666)
    lock.parent.chmod(0o755)
    return lock


@pytest.fixture(scope="module", autouse=True)
def _report(figures: list[str]) -> Iterator[None]:
    yield
    if TALLY.attempts:
        figures.append(TALLY.line())
    # The printed figure is a claim too: each attempt already failed its own test, this keeps the sum honest.
    assert not TALLY.through, TALLY.line() + ": " + "; ".join(TALLY.through[:10])


@pytest.fixture(scope="module")
def guarded(module_lab: Lab) -> Iterator[Lab]:
    """The module's pod under POLICY, with a world that answers on every port (positive controls)."""
    lab = module_lab
    lab.world_answer_every_port()
    subprocess.run(["ip", "-n", lab.world, "addr", "add", f"{LINK_LOCAL_V4}/32", "dev", "lo"], check=True)
    done = lab.apply(POLICY)
    assert done.returncode == 0, done.stderr
    assert lab.tcp(ALLOWED_V4, 443).ok and lab.tcp(ALLOWED_V6, 443).ok, "the policy's allow does not work"
    TALLY.topologies.add(lab.topology)
    yield lab


# -- other ports, other hosts, other protocols -------------------------------------------------


def test_other_tcp_ports_on_the_allowed_host_are_refused(guarded: Lab) -> None:
    """Only 443 is allowed on the allowed host: every other TCP port is refused (IPv4 and IPv6)."""
    ports = (1, 22, 25, 444, 853, 5000, 8080, 8443, 8444, 9999, 65535)  # 53: see the DNS tests
    sweep(guarded, "allowed host, other port",
          [("tcp", (host, p), {}) for host in (ALLOWED_V4, ALLOWED_V6) for p in ports])


def test_the_allowed_port_on_other_hosts_is_refused(guarded: Lab) -> None:
    """443 is allowed on one host only: 443 on any other host, either family, is refused."""
    hosts = (OTHER_V4, "203.0.113.12", "203.0.113.5", "192.0.2.10", WORLD_V4,
             OTHER_V6, "2001:db8:2::12", "2001:db8:100::1")
    sweep(guarded, "allowed port, other host", [("tcp", (h, 443), {}) for h in hosts])


def test_udp_to_allowed_and_other_hosts_is_refused(guarded: Lab) -> None:
    """The allow is TCP only: UDP to any port of the allowed host, or of any other host, is refused."""
    targets = [(h, p) for h in (ALLOWED_V4, ALLOWED_V6, OTHER_V4, OTHER_V6) for p in (123, 5353, 9999, 40000)]
    sweep(guarded, "udp", [("udp", t, {}) for t in targets])


def test_quic_style_udp_443_is_refused(guarded: Lab) -> None:
    """HTTP/3 (QUIC) is UDP 443: refused even to the host whose TCP 443 is allowed."""
    sweep(guarded, "quic", [("udp", (h, 443), {}) for h in (ALLOWED_V4, ALLOWED_V6, OTHER_V4, OTHER_V6)])


def test_other_ip_protocols_to_the_allowed_host_are_refused(guarded: Lab) -> None:
    """UDP-Lite (IP protocol 136) needs no privilege and is neither TCP nor UDP: refused."""
    sweep(guarded, "udplite",
          [("send", (h, 443), {"proto": "udplite"}) for h in (ALLOWED_V4, ALLOWED_V6, OTHER_V4)], each=0.2)


def test_icmp_echo_is_refused(guarded: Lab) -> None:
    """Unprivileged ICMP echo sockets are open to every uid in the pod: ping is refused anyway."""
    sweep(guarded, "ping", [("ping", (h,), {}) for h in (ALLOWED_V4, OTHER_V4, "198.51.100.1", METADATA_V4)])


def test_icmpv6_echo_is_refused(guarded: Lab) -> None:
    """Refused too; an IPv6 ping socket is not told of the local refusal, the echo just goes unanswered."""
    sweep(guarded, "ping6", [("ping", (h,), {}) for h in (ALLOWED_V6, OTHER_V6, "2001:db8:100::1", METADATA_V6)],
          each=0.3)


# -- address tricks --------------------------------------------------------------------------------


def test_ipv4_mapped_ipv6_destinations_are_judged_as_ipv4(guarded: Lab) -> None:
    """An IPv6 socket sending to ::ffff:a.b.c.d sends IPv4 packets, which the IPv4 rules judge:
    ::ffff:203.0.113.5 is refused, like 203.0.113.5; the allowed IPv4 host:443 stays allowed."""
    sweep(guarded, "v4-mapped", [
        ("tcp", ("::ffff:203.0.113.5", 443), {}),
        ("tcp", (f"::ffff:{OTHER_V4}", 443), {}),
        ("tcp", (f"::ffff:{ALLOWED_V4}", 22), {}),
        ("udp", (f"::ffff:{ALLOWED_V4}", 443), {}),
        ("tcp", (f"::ffff:{METADATA_V4}", 80), {}),
        ("tcp", (f"::ffff:{METADATA_V4}", 8080), {}),
    ])
    assert guarded.tcp(f"::ffff:{ALLOWED_V4}", 443).ok


def test_link_local_destinations_are_refused(guarded: Lab) -> None:
    """Link-local neighbours are not exempt: the world's fe80:: address on each link and an IPv4
    link-local host (169.254.1.1) are refused, TCP and UDP."""
    lls = [guarded.world_link_local(second=second) for second in (False, True)[:len(guarded.ifaces)]]
    sweep(guarded, "link-local", [
        *[probe for ll in lls for probe in (("tcp", (ll, 22), {}), ("tcp", (ll, 443), {}), ("send", (ll, 40000), {}))],
        ("tcp", (LINK_LOCAL_V4, 22), {}), ("udp", (LINK_LOCAL_V4, 40000), {}),
    ])


def multicast_and_broadcast(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    """Groups and broadcast addresses, scoped to each of the pod's links."""
    dests: list[tuple[str, dict[str, Any]]] = [
        ("224.0.0.1", {}), ("224.0.0.251", {}), ("239.255.255.250", {}),  # all hosts, mDNS, SSDP
        ("255.255.255.255", {"broadcast": True}), ("198.51.100.255", {"broadcast": True}),
        ("ff05::1:3", {}),  # DHCPv6 servers
    ]
    for dev in lab.ifaces:
        dests += [(f"ff02::1%{dev}", {}), (f"ff02::fb%{dev}", {})]  # all nodes, mDNS
    if lab.second_iface:
        dests.append(("192.0.2.255", {"broadcast": True}))
    return dests


def test_multicast_and_broadcast_are_refused(guarded: Lab) -> None:
    """Datagrams to multicast groups and broadcast addresses: the send fails (EPERM) and no packet
    reaches a link, counted at the world's end; the exempt uid's identical datagrams arrive."""
    port = 9998
    before = guarded.world_received("udp", port)
    probes = [("send", (dest, port), kw) for dest, kw in multicast_and_broadcast(guarded)]
    confined = guarded.batch(probes, uid=CONFINED, each=0.2)
    assert guarded.world_received("udp", port) == before, "a confined datagram reached the world"
    control = guarded.batch(probes, uid=EXEMPT, each=0.2)
    assert guarded.world_received("udp", port) - before == len(probes), "controls did not all arrive"
    for (_, (dest, _p), _kw), got, ctl in zip(probes, confined, control, strict=True):
        stopped(f"multicast/broadcast {dest}", got, ctl)
        assert got.outcome == "eperm"


def test_binding_to_lo_does_not_carry_traffic_out(guarded: Lab) -> None:
    """SO_BINDTODEVICE=lo needs no privilege and makes a packet match `loopback: allow` (-o lo), but
    lo cannot carry it out of the pod: no packet reaches the world."""
    port = 2222
    before = guarded.world_received("tcp", port)
    for dest in (OTHER_V4, OTHER_V6):
        got = guarded.probe("tcp_device", dest, port, device="lo", timeout=0.5)
        stopped(f"bound to lo -> {dest}", got)
    assert guarded.world_received("tcp", port) == before
    assert guarded.tcp(OTHER_V4, port, uid=EXEMPT).ok
    assert guarded.world_received("tcp", port) > before


# -- metadata ----------------------------------------------------------------------------------


def _sample_ports(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    fixed = [1, 21, 22, 25, 80, 123, 443, 853, 1024, 3128, 5000, 8000, 8080, 8443, 8444, 9999, 65535]
    return sorted(set(fixed + rng.sample(range(1, 65536), n)) - {53})  # 53 answers DNS only: probed as DNS


def test_metadata_is_refused_on_every_port_despite_a_broad_allow(guarded: Lab) -> None:
    """Every metadata endpoint (AWS/GCP/Azure 169.254.169.254, ECS 169.254.170.2, Alibaba
    100.100.100.200, AWS IPv6 fd00:ec2::254) is covered by an `allow` of any protocol, yet every
    sampled TCP and UDP port is refused (the world answers on every port: the exempt uid gets in)."""
    tcp_ports = _sample_ports(30, seed=5)
    udp_ports = _sample_ports(10, seed=6)
    probes = [("tcp", (m, p), {}) for m in METADATA for p in tcp_ports]
    probes += [("udp", (m, p), {}) for m in METADATA for p in udp_ports]
    probes += [("dns", ("allowed.test", m), {"tcp": tcp}) for m in METADATA for tcp in (False, True)]
    sweep(guarded, "metadata", probes, each=0.5)


def test_metadata_on_a_redirect_port_is_refused_not_handed_to_the_proxy(guarded: Lab) -> None:
    """Port 80 is redirected to the local proxy (an exempt process that would connect onwards with
    its own identity): for a metadata address the connection is refused instead of proxied."""
    assert guarded.tcp(OTHER_V4, 80).proxied, "the redirect itself does not work"
    for m in METADATA:
        got = guarded.tcp(m, 80)
        stopped(f"metadata {m}:80 via redirect", got, guarded.tcp(m, 80, uid=EXEMPT))
        assert not got.proxied


# -- DNS ---------------------------------------------------------------------------------------------


def test_dns_to_a_resolver_not_configured_is_refused_over_udp_and_tcp(guarded: Lab) -> None:
    """Only the pod's resolv.conf servers may be queried; another reachable resolver is refused."""
    assert guarded.dns("allowed.test", RESOLVER_V4).ok and guarded.dns("allowed.test", RESOLVER_V6, tcp=True).ok
    for server in (OTHER_RESOLVER_V4, OTHER_RESOLVER_V6):
        for tcp in (False, True):
            stopped(f"dns {server} tcp={tcp}", guarded.dns("allowed.test", server, tcp=tcp, timeout=1),
                    guarded.dns("allowed.test", server, uid=EXEMPT, tcp=tcp))


def test_dns_over_tls_and_other_ports_of_the_resolver_are_refused(guarded: Lab) -> None:
    """DNS-over-TLS (TCP 853) is refused, to the configured resolvers too: only port 53 is open
    to them. Other ports of a configured resolver are refused as well."""
    sweep(guarded, "resolver port", [
        ("tcp", (s, 853), {}) for s in (RESOLVER_V4, RESOLVER_V6, OTHER_RESOLVER_V4, OTHER_RESOLVER_V6)
    ] + [("tcp", (RESOLVER_V4, 443), {}), ("udp", (RESOLVER_V4, 443), {}), ("udp", (RESOLVER_V6, 9999), {})])


# -- privileges --------------------------------------------------------------------------------


def test_raw_and_packet_sockets_are_refused_to_the_confined_uid(guarded: Lab) -> None:
    """Raw IP and packet sockets need CAP_NET_RAW, which the confined uid does not have: EPERM."""
    kinds = [("inet", "raw", 17), ("inet", "raw", 255), ("inet6", "raw", 58), ("packet", "raw", 0), ("packet", "dgram", 0)]
    for family, kind, proto in kinds:
        got = guarded.probe("socket", family, kind, proto=proto)
        stopped(f"{family}/{kind} socket", got, guarded.probe("socket", family, kind, proto=proto, uid=ROOT))
        assert got.outcome == "eperm"


def test_with_cap_net_raw_raw_ip_sockets_are_still_filtered(guarded: Lab) -> None:
    """If the confined uid were given CAP_NET_RAW, a hand-made packet on a raw IP socket still passes
    OUTPUT with the sender's uid: refused."""
    got = guarded.probe("crafted_udp", "raw", POD_V4, OTHER_V4, 9999, caps=CAP_NET_RAW_BIT)
    control = guarded.probe("crafted_udp", "raw", POD_V4, OTHER_V4, 9999, uid=EXEMPT, caps=CAP_NET_RAW_BIT)
    stopped("raw IP socket with CAP_NET_RAW", got, control)
    assert got.outcome == "eperm" and str(control.answer).startswith("world udp 9999 "), control


def test_with_cap_net_raw_packet_sockets_bypass_the_guard(guarded: Lab) -> None:
    """NOT STOPPED, by the nature of netfilter: packet sockets hand frames to the device below the IP
    layer, where no iptables (or nftables inet) rule runs. A confined process must never hold
    CAP_NET_RAW (Docker grants it by default: drop it with --cap-drop NET_RAW)."""
    got = guarded.probe("crafted_udp", "packet", POD_V4, OTHER_V4, 9999, dst_mac=guarded.world_mac(),
                        iface=guarded.iface, caps=CAP_NET_RAW_BIT)
    assert got.ok and got.answer.startswith("world udp 9999"), got
    TALLY.by_design.add("packet socket with CAP_NET_RAW")


def test_the_confined_uid_cannot_change_its_uid(guarded: Lab) -> None:
    """setuid to root or to the exempt uid fails (EPERM); so does setpriv."""
    for target in (ROOT, EXEMPT):
        got = guarded.probe("setuid", target)
        stopped(f"setuid({target})", got, guarded.probe("setuid", target, uid=ROOT))  # control: root may
        assert got.outcome == "eperm"
    argv = ["setpriv", f"--reuid={EXEMPT}", "--regid", str(EXEMPT), "--clear-groups", "true"]
    got = guarded.exec_as(argv)
    stopped("setpriv", refused_by_kernel(got), guarded.exec_as(argv, uid=ROOT))  # root's same setpriv works


def test_root_in_a_new_user_namespace_is_still_confined(guarded: Lab) -> None:
    """unshare(CLONE_NEWUSER) makes the process uid 0 with every capability *in its own user
    namespace*, but the pod's network namespace belongs to the initial one: its sockets still carry
    uid 1000 (refused), and raw sockets and firewall changes are still EPERM."""
    got = guarded.probe("userns", "tcp", [OTHER_V4, 443], {})
    if got.outcome == "eperm" and "user namespace" not in got.detail:
        pytest.skip("user namespaces are not available to unprivileged users here")
    stopped("tcp from a user namespace", got, guarded.probe("userns", "tcp", [OTHER_V4, 443], {}, uid=EXEMPT))
    stopped("packet socket from a user namespace", guarded.probe("userns", "socket", ["packet", "raw"], {}),
            guarded.probe("socket", "packet", "raw", uid=ROOT))
    flush = guarded.probe("userns", "exec", [["env", f"XTABLES_LOCKFILE={_open_lock()}", "iptables-legacy", "-F"]], {})
    stopped("iptables -F from a user namespace", refused_by_kernel(flush))


def test_the_confined_uid_cannot_flush_or_add_rules(guarded: Lab) -> None:
    """iptables (legacy and nft), ip6tables and nft, run by the confined uid to flush, delete or add
    rules, all fail (no CAP_NET_ADMIN in the pod's namespace); the ruleset is unchanged and the
    guard still refuses. The xtables lock file is made writable, so the kernel is what says no."""
    before = guarded.ruleset_dump()
    env = ["env", f"XTABLES_LOCKFILE={_open_lock()}"]
    commands = [
        ["iptables-legacy", "-F"], ["iptables-legacy", "-t", "nat", "-F"], ["ip6tables-legacy", "-F"],
        ["iptables-legacy", "-I", "OUTPUT", "1", "-j", "ACCEPT"], ["iptables-legacy", "-D", "OUTPUT", "1"],
        ["iptables-legacy", "-X", "EGRESSGUARD-CONFINED"], ["ip6tables-legacy", "-P", "OUTPUT", "ACCEPT"],
        ["iptables-nft", "-F"], ["nft", "flush", "ruleset"], ["nft", "add", "table", "inet", "bypass"],
    ]
    for argv in commands:
        stopped(" ".join(argv), refused_by_kernel(guarded.exec_as(env + argv)))
    assert guarded.ruleset_dump() == before
    stopped("after the flush attempts", guarded.tcp(OTHER_V4, 443), guarded.tcp(OTHER_V4, 443, uid=EXEMPT))


def test_the_confined_uid_cannot_load_another_policy(guarded: Lab) -> None:
    """`egressguard apply` of an allow-everything policy, and `egressguard reset`, run as the
    confined uid: exit 3 (environment unsupported: no CAP_NET_ADMIN/CAP_NET_RAW), nothing changed."""
    before = guarded.ruleset_dump()
    open_policy = guarded.write_policy({"version": 1, "confine": {"uids": [CONFINED]},
                                        "allow": [{"cidr": "0.0.0.0/0", "protocol": "any"},
                                                  {"cidr": "::/0", "protocol": "any"}]}, name="open.yaml")
    status = str(guarded.workdir / "confined-status.json")
    for argv in (["apply", "--policy", str(open_policy), "--status-file", status], ["reset", "--status-file", status]):
        got = guarded.probe("egressguard", argv, timeout=30)
        TALLY.count(f"egressguard {argv[0]}", got if got.answer["exit"] != 3 else Result("eperm", "exit 3"))
        assert got.answer["exit"] == 3, got.answer["stderr"]
        assert "missing capability" in got.answer["stderr"]
    assert guarded.ruleset_dump() == before
    stopped("after the apply attempt", guarded.tcp(OTHER_V4, 443), guarded.tcp(OTHER_V4, 443, uid=EXEMPT))


# -- local relays ------------------------------------------------------------------------------


def test_with_loopback_allowed_a_local_relay_is_reachable(guarded: Lab) -> None:
    """OPEN BY DESIGN: `loopback: allow` (the default) lets the confined uid reach every local
    service, e.g. one an exempt process runs (pod port 7000 stands for it). If that service relays
    out, the guard cannot see it: that is what `redirect` + an exempt proxy is for. Use
    `loopback: deny` or a port list to close it."""
    for dest in ("127.0.0.1", "::1", POD_V4, POD_V6):
        assert guarded.tcp(dest, 7000).ok, dest
    assert guarded.tcp(OTHER_V4, 80).proxied  # the designed path: the redirect to the local proxy
    TALLY.by_design.add("loopback to a local relay (loopback: allow)")


def test_with_loopback_denied_local_relays_are_refused(lab: Lab) -> None:
    """`loopback: deny`: local services (127.0.0.1, ::1, the pod's own addresses, v4-mapped
    loopback) are refused, while the redirect to the local proxy still works."""
    done = lab.apply({**POLICY, "loopback": "deny"})
    assert done.returncode == 0, done.stderr
    for dest in ("127.0.0.1", "127.0.0.2", "::1", POD_V4, POD_V6, "::ffff:127.0.0.1"):
        for port in (7000, 8443):
            stopped(f"loopback {dest}:{port}", lab.tcp(dest, port), lab.tcp(dest, port, uid=EXEMPT))
    assert lab.tcp(OTHER_V4, 80).proxied and lab.tcp(OTHER_V6, 80).proxied


def test_flows_opened_from_outside_can_be_answered(guarded: Lab) -> None:
    """OPEN BY DESIGN: replies on flows someone else opened pass (inbound services, health probes).
    That includes UDP: after a world host sends to pod:40000, the confined uid can send back from
    40000 to that host and port (a "hole punch" needs an outside party that sends first). A new flow
    from the same socket to another port of that host is refused."""
    # A host on the primary link: the world knocks on POD_V4 through it, and only a reply that leaves
    # the same way (from POD_V4) is on that flow; one routed out of a second interface is a new flow.
    peer = "203.0.113.5"
    assert peer not in SECOND_LINK_ROUTED
    # Ordered by events: the confined socket is bound before the world knocks (it says so on a pipe),
    # and it answers only once the knock has arrived.
    ready_r, ready_w = os.pipe()
    pod: dict[str, Any] = {}
    t = threading.Thread(target=lambda: pod.update(
        answer=in_pod(guarded, CONFINED, _answer_the_first_knock, ready_w, 40000, timeout=5.0)))
    t.start()
    try:
        assert select.select([ready_r], [], [], 5.0)[0] and os.read(ready_r, 1) == b"r", "the pod never bound"
        knock = guarded.world_probe("send", POD_V4, 40000, src=peer, sport=7001, timeout=3)
    finally:
        t.join()
        os.close(ready_r)
        os.close(ready_w)
    assert pod["answer"] == {"knock_from": peer, "answer": "sent"} and knock.answer == "egressguard", (pod, knock)
    other = guarded.probe("send", peer, 7002, sport=40000, timeout=0.5)
    stopped("new flow from the answering socket", other, guarded.probe("send", peer, 7002, sport=40000, uid=EXEMPT))
    TALLY.by_design.add("answers on flows opened from outside")


def _answer_the_first_knock(ready_fd: int, port: int) -> dict[str, str]:
    """In the pod: bind UDP `port`, say so on `ready_fd`, wait for one datagram, answer its sender."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))
        s.settimeout(3.0)
        os.write(ready_fd, b"r")
        _data, (src, sport) = s.recvfrom(64)
        s.sendto(b"egressguard", (src, sport))
        return {"knock_from": src, "answer": "sent"}


# -- volume and timing -------------------------------------------------------------------------


def test_two_hundred_parallel_connections_are_all_refused(guarded: Lab) -> None:
    """200 connects in flight at once to a refused destination, per family: every one refused."""
    for dest in (OTHER_V4, OTHER_V6):
        got = guarded.probe("parallel_tcp", dest, 443, count=200, timeout=5)
        TALLY.attempts += 200
        for outcome, n in got.answer.items():
            if outcome == "ok":
                TALLY.through.append(f"{n} of 200 parallel to {dest}")
            else:
                TALLY.outcomes[outcome] += n
        assert got.answer == {"refused": 200}, got.answer
    control = guarded.probe("parallel_tcp", OTHER_V4, 443, count=50, uid=EXEMPT, timeout=5)
    assert control.answer == {"ok": 50}, control.answer


def test_a_connection_opened_before_apply_stops_passing_data(lab: Lab) -> None:
    """Outbound packets are judged one by one, not only when a connection starts: a connection the
    confined uid opened before the guard existed stops carrying data once `apply` runs (the next
    segment is answered with a reset), and the world never sees it. A connection to an allowed
    destination, and the exempt uid's connection, carry on."""
    port = 7777
    log = lab.world_echo(port)
    policy = {**POLICY, "allow": [{"cidr": f"{ALLOWED_V4}/32", "ports": [port]}, {"cidr": f"{ALLOWED_V6}/128", "ports": [port]}]}
    held = {
        "refused-v4": lab.hold_tcp(OTHER_V4, port), "refused-v6": lab.hold_tcp(OTHER_V6, port),
        "allowed-v4": lab.hold_tcp(ALLOWED_V4, port), "allowed-v6": lab.hold_tcp(ALLOWED_V6, port),
        "exempt": lab.hold_tcp(OTHER_V4, port, uid=EXEMPT),
    }
    try:
        for name, h in held.items():
            assert h.exchange(f"before {name}").answer == f"echo before {name}"
        done = lab.apply(policy)
        assert done.returncode == 0, done.stderr
        after = {name: h.exchange(f"after {name}", timeout=1) for name, h in held.items()}
    finally:
        for h in held.values():
            h.close()
    for name in ("refused-v4", "refused-v6"):
        stopped(f"connection opened before apply ({name})", after[name])
        assert f"after {name}" not in log.read_text()
    for name in ("allowed-v4", "allowed-v6", "exempt"):
        assert after[name].answer == f"echo after {name}", (name, after[name])
