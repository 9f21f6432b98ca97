"""`confine: all`: every uid but the exempt ones is confined, root included, while what the kernel
itself needs keeps working: IPv6 neighbour discovery and replies to inbound connections (health probes).
Run in a pod whose resolvers and metadata are on its link and whose addresses went through DAD (as on
clouds), and in a pod with two interfaces."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from egtraffic import FAST, UPLOAD, applied, cut_midway, dns_answered, reached, stopped, uploaded

from egressguard.lab import EXEMPT, POD_V4, POD_V6, RESOLVER_V4, RESOLVER_V6, ROOT, Lab

pytestmark = pytest.mark.netns

# 2001:db8:2::12 (UNLISTED[6]) leaves by the second interface in the two-interface pod.
LAB_TOPOLOGIES = [{"iface": "net1", "dad": True, "onlink_services": True},
                  {"iface": "tap-0123456789a", "second_iface": "veth1a2b3c4d"}]

POLICY = {
    "version": 1,
    "exempt": {"uids": [EXEMPT]},
    "allow": [{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}],
}
ALLOWED = {4: "203.0.113.10", 6: "2001:db8:2::10"}
UNLISTED = {4: "203.0.113.12", 6: "2001:db8:2::12"}
POD = {4: POD_V4, 6: POD_V6}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
UNLISTED_UIDS = pytest.mark.parametrize("uid", [ROOT, 1002, 65534], ids=["root", "uid-1002", "nobody"])
SINK_PORT = 7777  # the world's sink (Lab.world_sink): no world server listens there


@pytest.fixture(scope="module")
def lab(module_lab: Lab) -> Iterator[Lab]:
    applied(module_lab, POLICY)
    yield module_lab


@pytest.fixture(scope="module")
def sink(lab: Lab) -> Path:
    return lab.world_sink(SINK_PORT)


def _flush_neighbours(lab: Lab) -> None:
    """Forget every neighbour in both namespaces (the lab's own, never the machine's)."""
    for ns in (lab.pod, lab.world):
        for fam in ("-4", "-6"):
            subprocess.run(["ip", "-n", ns, fam, "neigh", "flush", "all"], check=True, capture_output=True, timeout=10)


def _pod_knows_next_hop(lab: Lab, dest: str) -> bool:
    """The pod has learnt the link-layer address of its next hop toward `dest` (the gateway of the
    interface it leaves by, or `dest` itself when on-link): neighbour discovery got through."""
    route = lab.in_pod("ip", "-j", "route", "get", dest).stdout
    hop = json.loads(route)[0]
    out = lab.in_pod("ip", "neigh", "show", hop.get("gateway", dest), "dev", hop["dev"]).stdout
    return "lladdr" in out and "FAILED" not in out


@FAMILIES
@UNLISTED_UIDS
def test_every_unlisted_uid_is_confined(lab: Lab, family: int, uid: int) -> None:
    stopped(lab, "tcp", UNLISTED[family], 22, uid=uid)
    assert reached(lab.tcp(ALLOWED[family], 22, uid=uid, timeout=FAST), ALLOWED[family])


@FAMILIES
def test_exempt_uid_is_not_confined(lab: Lab, family: int) -> None:
    assert reached(lab.tcp(UNLISTED[family], 22, uid=EXEMPT, timeout=FAST), UNLISTED[family])


@FAMILIES
def test_what_the_exempt_uid_sent_before_closing_arrives_whole(lab: Lab, sink: Path, family: int) -> None:
    """Most of the upload leaves after close(), sent by a socket no process owns (as are the FIN and
    the last ACK from TIME_WAIT): the exempt uid's connection keeps its exemption to the end."""
    assert uploaded(lab, sink, UNLISTED[family], SINK_PORT, EXEMPT) == f"{UPLOAD} eof"


@FAMILIES
def test_a_closed_confined_connection_is_still_judged_when_its_destination_loses_its_allow(
        lab: Lab, sink: Path, family: int) -> None:
    """The control: a socket no process owns is not exempt for that alone. Root (confined) uploads to
    a host allowed when it connected and closes; a re-apply takes the allow away while most of the
    data waits in the pod: that part never arrives. The exempt uid's same upload, the same way, does."""
    host = f"{UNLISTED[family]}/{32 if family == 4 else 128}"
    allowing = {**POLICY, "allow": [*POLICY["allow"], {"cidr": host, "ports": [SINK_PORT]}]}
    cut: dict[int, str] = {}
    for uid in (ROOT, EXEMPT):
        applied(lab, allowing)
        try:
            cut[uid] = uploaded(lab, sink, UNLISTED[family], SINK_PORT, uid, meanwhile=lambda: applied(lab, POLICY))
        finally:
            applied(lab, POLICY)
    assert cut_midway(cut[ROOT]), cut
    assert cut[EXEMPT] == f"{UPLOAD} eof", cut


@FAMILIES
def test_under_a_uid_list_a_closed_confined_connection_is_still_judged_when_its_destination_loses_its_allow(
        lab: Lab, sink: Path, family: int) -> None:
    """`confine: uids`: packets no process owns are confined when the connection is a listed uid's
    (its mark), so what uid 1000 wrote before close() stops at the re-apply that takes its
    destination's allow away. The control: an unlisted uid's same upload, the same way, arrives whole."""
    listed = {**POLICY, "confine": {"uids": [1000]}}
    host = f"{UNLISTED[family]}/{32 if family == 4 else 128}"
    allowing = {**listed, "allow": [*POLICY["allow"], {"cidr": host, "ports": [SINK_PORT]}]}
    got: dict[int, str] = {}
    try:
        for uid in (1000, 1002):
            applied(lab, allowing)
            got[uid] = uploaded(lab, sink, UNLISTED[family], SINK_PORT, uid, meanwhile=lambda: applied(lab, listed))
    finally:
        applied(lab, POLICY)
    assert cut_midway(got[1000]), got
    assert got[1002] == f"{UPLOAD} eof", got


@FAMILIES
def test_confined_root_still_resolves_names_and_uses_loopback(lab: Lab, family: int) -> None:
    resolver = RESOLVER_V6 if family == 6 else RESOLVER_V4
    assert dns_answered(lab.dns("allowed.test", resolver, uid=ROOT, timeout=FAST))
    local = "::1" if family == 6 else "127.0.0.1"
    assert lab.tcp(local, 8443, uid=ROOT, timeout=FAST).ok


def test_ipv6_neighbour_discovery_works_for_exempt_traffic_after_the_cache_is_flushed(lab: Lab) -> None:
    _flush_neighbours(lab)
    assert reached(lab.tcp(UNLISTED[6], 22, uid=EXEMPT, timeout=2.0), UNLISTED[6])
    assert _pod_knows_next_hop(lab, UNLISTED[6])


def test_ipv6_neighbour_discovery_works_for_confined_traffic_after_the_cache_is_flushed(lab: Lab) -> None:
    _flush_neighbours(lab)
    assert reached(lab.tcp(ALLOWED[6], 22, uid=ROOT, timeout=2.0), ALLOWED[6])
    assert _pod_knows_next_hop(lab, ALLOWED[6])


@FAMILIES
def test_confined_root_reaches_its_resolver_after_the_neighbour_cache_is_flushed(lab: Lab, family: int) -> None:
    # With on-link resolvers (as on clouds) the pod must resolve the resolver itself, not a gateway:
    # neighbour discovery for it happens under the guard, for a confined uid's query.
    resolver = RESOLVER_V6 if family == 6 else RESOLVER_V4
    _flush_neighbours(lab)
    assert dns_answered(lab.dns("allowed.test", resolver, uid=ROOT, timeout=2.0))
    assert _pod_knows_next_hop(lab, resolver)


@FAMILIES
def test_inbound_health_probe_gets_its_replies(lab: Lab, family: int) -> None:
    # The pod's listener runs as root, which is confined: its replies must still go out.
    _flush_neighbours(lab)  # the pod must also answer neighbour solicitations and solicit the world
    res = lab.world_probe("tcp", POD[family], 7000, timeout=2.0)
    assert res.ok and str(res.answer).startswith(f"pod {POD[family]} 7000 "), res


@FAMILIES
def test_confined_listener_cannot_open_connections_of_its_own(lab: Lab, family: int) -> None:
    # Replies are allowed only in the reply direction: the same uid opening a connection is refused.
    stopped(lab, "tcp", UNLISTED[family], 5000, uid=ROOT)
