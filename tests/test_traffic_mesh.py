"""Service meshes in the pod (issue 16): an Istio- or Linkerd-style sidecar redirects the pod's TCP
in the nat table to a relay on loopback, so the filter table sees 127.0.0.1:15001 where the agent
asked for 203.0.113.10:443. egressguard judges the original destination (conntrack's original
tuple): allowed destinations pass through the mesh, denied ones and metadata stay refused and never
reach the relay or the world (judged on the wire, with the exempt uid as the control through the
same mesh), and egressguard's own `redirect` wins on its ports. A NAT that sends an allowed
connection on to another host is refused, and a relay whose uid is confined cannot be used to go
elsewhere."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from egtraffic import FAST, applied, policy, reached, refused_fast, stopped
from mesh import ISTIO, MESHES, Mesh, in_pod, iptables_tool
from test_log_traffic import Watcher
from wire import Frame, WireCapture

from egressguard.lab import EXEMPT, Lab, Result

pytestmark = pytest.mark.netns

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
ALLOWED = {4: "203.0.113.10", 6: "2001:db8:2::10"}  # allowed on 443 and 853 (and 80, with its network)
DENIED = {4: "203.0.113.11", 6: "2001:db8:2::11"}  # in the network allowed on 80, and denied
UNLISTED = {4: "203.0.113.12", 6: "2001:db8:2::12"}  # allowed on 80 only
METADATA = {4: "169.254.169.254", 6: "fd00:ec2::254"}
REDIRECTED_PORT = 5000  # egressguard's own `redirect`, to the pod's stand-in proxy on 8444

POLICY = policy(
    allow=[
        {"cidr": "203.0.113.10/32", "ports": [443, 853]},
        {"cidr": "2001:db8:2::10/128", "ports": [443, 853]},
        {"cidr": "203.0.113.0/24", "ports": [80]},
        {"cidr": "2001:db8:2::/64", "ports": [80]},
    ],
    deny=[{"cidr": "203.0.113.11/32"}, {"cidr": "2001:db8:2::11/128"}],
    redirect=[{"ports": [REDIRECTED_PORT], "to_port": 8444}],
)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def through_relay(res: Result, uid: int, host: str, port: int) -> bool:
    """The relay running as `uid` took the connection and reached `host:port` in the world."""
    return res.ok and str(res.answer).startswith(f"relay {uid} {hostport(host, port)} world {host} {port} ")


def to(host: str, port: int) -> Callable[[Frame], bool]:
    """TCP frames the world receives for host:port."""
    return lambda f: f.proto == 6 and f.dst == host and f.dport == port


# Not eth0 (tests/test_suite_guards.py): each back end's run of this suite names the pod's interface
# differently (the nftables twin sets its own), so a rule that matched the interface would show.
LAB_TOPOLOGIES = [{"iface": "net1"}]


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with Lab(prefix="mesh", **request.param) as built:
        yield built


_relays: dict[tuple[str, int, int], Any] = {}


def relay_log(lab: Lab, uid: int, port: int, divert: tuple[str, int] | None = None) -> Any:
    """The relay for (uid, port) in this lab, started on first use; its log of original destinations."""
    key = (lab.pod, uid, port)
    if key not in _relays:
        _relays[key] = lab.start_relay(uid, port, divert)
    return _relays[key]


@pytest.fixture(scope="module", params=MESHES, ids=[m.name for m in MESHES])
def meshed(request: pytest.FixtureRequest, module_lab: Lab) -> Iterator[tuple[Lab, Mesh]]:
    """The module's pod with the mesh's redirect and relay, then egressguard applied (as an init
    container after the mesh's own init, or its CNI plugin, would)."""
    mesh: Mesh = request.param
    relay_log(module_lab, mesh.uid, mesh.port)
    mesh.install(module_lab)
    try:
        applied(module_lab, POLICY)
        yield module_lab, mesh
    finally:
        mesh.remove(module_lab)


@FAMILIES
def test_allowed_destinations_pass_through_the_mesh_relay(meshed: tuple[Lab, Mesh], family: int) -> None:
    lab, mesh = meshed
    log = relay_log(lab, mesh.uid, mesh.port)
    for host, port in ((ALLOWED[family], 443), (UNLISTED[family], 80)):
        res = lab.tcp(host, port, timeout=FAST)
        assert through_relay(res, mesh.uid, host, port), (mesh.name, host, port, res, res.answer)
        assert log.read_text().splitlines()[-1] == hostport(host, port)


@FAMILIES
@pytest.mark.parametrize("what", ["denied", "unlisted-port", "unlisted-host", "metadata"])
def test_refused_destinations_reach_neither_the_relay_nor_the_world(
    meshed: tuple[Lab, Mesh], family: int, what: str
) -> None:
    lab, mesh = meshed
    host, port = {"denied": (DENIED[family], 80), "unlisted-port": (ALLOWED[family], 22),
                  "unlisted-host": (UNLISTED[family], 443), "metadata": (METADATA[family], 80)}[what]
    log = relay_log(lab, mesh.uid, mesh.port)
    with WireCapture(lab) as cap:
        before = log.read_text()
        res = lab.tcp(host, port, timeout=FAST)
        cap.barrier(lab)
        assert refused_fast(res), (mesh.name, res)
        assert log.read_text() == before, "the relay was handed a refused connection"
        assert not cap.frames_with(to(host, port))
        # The control: the exempt uid's same connection goes through the same mesh and arrives.
        control = lab.tcp(host, port, uid=EXEMPT, timeout=FAST)
        assert through_relay(control, mesh.uid, host, port), (control, control.answer)
        assert cap.wait_for(to(host, port))


@FAMILIES
def test_egressguard_redirect_wins_over_the_mesh_on_its_ports(meshed: tuple[Lab, Mesh], family: int) -> None:
    lab, mesh = meshed
    log = relay_log(lab, mesh.uid, mesh.port)
    before = log.read_text()
    host = UNLISTED[family]
    res = lab.tcp(host, REDIRECTED_PORT, timeout=FAST)
    assert res.proxied and str(res.answer).endswith(f" orig={hostport(host, REDIRECTED_PORT)}"), res.answer
    assert log.read_text() == before, "the mesh's relay got a connection egressguard redirects"
    # The exempt uid is not redirected by egressguard; the mesh takes it.
    assert through_relay(lab.tcp(host, REDIRECTED_PORT, uid=EXEMPT, timeout=FAST), mesh.uid, host, REDIRECTED_PORT)


def test_which_redirect_wins_when_the_mesh_is_set_up_after_egressguard(meshed: tuple[Lab, Mesh]) -> None:
    """nftables: egressguard's nat chain (priority -101) runs before any dstnat (-100) chain, so it
    wins whoever came first. iptables: its jump heads the legacy nat table's OUTPUT, so it wins over
    a legacy-iptables mesh; a mesh in nftables hooks at -100 like that table, and of two chains at
    one priority the one registered last runs first: set up later, the mesh takes the port, and the
    connection is judged by its original destination (here: not allowed, refused)."""
    lab, mesh = meshed
    mesh.remove(lab)
    mesh.install(lab)  # registered after egressguard's nat chain or table
    log = relay_log(lab, mesh.uid, mesh.port)
    before = log.read_text()
    ours = os.environ.get("EGRESSGUARD_BACKEND") == "nftables" or not mesh.nft
    for family in (4, 6):
        host = UNLISTED[family]
        res = lab.tcp(host, REDIRECTED_PORT, timeout=FAST)
        if ours:
            assert res.proxied and str(res.answer).endswith(f" orig={hostport(host, REDIRECTED_PORT)}"), res
        else:
            assert refused_fast(res), res
        assert log.read_text() == before
    for family in (4, 6):  # the control: the mesh does take this port, for the exempt uid
        host = UNLISTED[family]
        res = lab.tcp(host, REDIRECTED_PORT, uid=EXEMPT, timeout=FAST)
        assert through_relay(res, mesh.uid, host, REDIRECTED_PORT), res.answer


@FAMILIES
def test_ports_the_mesh_ignores_are_judged_as_they_go(meshed: tuple[Lab, Mesh], family: int) -> None:
    lab, mesh = meshed
    res = lab.tcp(ALLOWED[family], 853, timeout=FAST)
    if 853 in mesh.ignore_ports:
        assert reached(res, ALLOWED[family]), res.answer  # straight to the world, not through the relay
    else:
        assert through_relay(res, mesh.uid, ALLOWED[family], 853), res.answer
    with WireCapture(lab) as cap:  # judged where the world receives, not by the client's error
        refused = lab.tcp(DENIED[family], 853, timeout=FAST)
        cap.barrier(lab)
        assert refused_fast(refused) and not cap.frames_with(to(DENIED[family], 853)), refused
    control = lab.tcp(DENIED[family], 853, uid=EXEMPT, timeout=FAST)
    assert reached(control, DENIED[family]) if 853 in mesh.ignore_ports else \
        through_relay(control, mesh.uid, DENIED[family], 853), control.answer


def test_watch_reports_the_original_destination_of_a_refusal_through_the_mesh(meshed: tuple[Lab, Mesh]) -> None:
    """The mesh's redirect readdresses the refused packet to its relay on loopback: `watch` asks the
    kernel for the connection's conntrack entry and reports where the agent was going (issue 14)."""
    lab, mesh = meshed
    watcher = Watcher(lab)
    try:
        for family in (4, 6):
            assert refused_fast(lab.tcp(DENIED[family], 80, timeout=FAST))
            assert refused_fast(lab.tcp(UNLISTED[family], 443, timeout=FAST))
            # The control: the same connection of the exempt uid is redirected, and reaches its host.
            assert through_relay(lab.tcp(DENIED[family], 80, uid=EXEMPT, timeout=FAST), mesh.uid, DENIED[family], 80)
        events = watcher.stop()
    finally:
        watcher.kill()
    got = sorted((e["destination"], e["port"], e["line"]) for e in events if e["event"] == "connection_refused")
    started = next(e for e in events if e["event"] == "watch_started")
    if started["destination"] == "packet":
        # A kernel without CONFIG_NETFILTER_NETLINK_GLUE_CT attaches no conntrack to logged packets
        # (EOPNOTSUPP): watch says so when it starts, and reports the packet's destination, the relay's.
        relay = {4: "127.0.0.1", 6: "::1"}
        want = [(relay[4], mesh.port, "deny[0]"), (relay[6], mesh.port, "deny[1]"),
                (relay[4], mesh.port, "default"), (relay[6], mesh.port, "default")]
    else:
        want = [(DENIED[4], 80, "deny[0]"), (DENIED[6], 80, "deny[1]"),
                (UNLISTED[4], 443, "default"), (UNLISTED[6], 443, "default")]
    assert got == sorted(want), events


# -- a NAT that sends a connection elsewhere ------------------------------------------------------


@pytest.fixture(scope="class")
def own_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with Lab(prefix="mesh", **request.module.LAB_TOPOLOGIES[-1]) as built:  # the requesting module's (twin's) shape
        yield built


def _dnat(lab: Lab, family: int, frm: str, dest: str, port: int) -> None:
    to_dest = f"[{dest}]:{port}" if family == 6 else f"{dest}:{port}"
    in_pod(lab, iptables_tool(family), "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", frm, "--dport", str(port),
         "-j", "DNAT", "--to-destination", to_dest)


class TestNatToAnotherHost:
    """A DNAT (installed by someone with CAP_NET_ADMIN) turns an allowed connection into one to
    another host: judged by where it was addressed, it must not go somewhere else."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, own_lab: Lab) -> Iterator[Lab]:
        for family in (4, 6):
            _dnat(own_lab, family, ALLOWED[family], DENIED[family], 443)
        applied(own_lab, POLICY)
        yield own_lab

    @FAMILIES
    def test_an_allowed_connection_natted_to_another_host_is_refused(self, lab: Lab, family: int) -> None:
        with WireCapture(lab) as cap:
            res = lab.tcp(ALLOWED[family], 443, timeout=FAST)
            cap.barrier(lab)
            assert refused_fast(res), res
            assert not cap.frames_with(to(DENIED[family], 443))
            control = lab.tcp(ALLOWED[family], 443, uid=EXEMPT, timeout=FAST)  # the NAT is real
            assert reached(control, DENIED[family]), control.answer
            assert cap.wait_for(to(DENIED[family], 443))


class TestRelayThatRoutesElsewhere:
    """A relay picks its upstream itself (Envoy routes HTTP by its Host header): here it always
    connects to a denied host. Confine the relay's uid too, and its own connections are judged."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, own_lab: Lab) -> Iterator[Lab]:
        own_lab.start_relay(ISTIO.uid, ISTIO.port)
        own_lab.start_relay(ISTIO.uid, 15009, divert=(DENIED[4], 80))
        yield own_lab

    def test_with_the_relay_confined_allowed_traffic_still_passes(self, lab: Lab) -> None:
        ISTIO.install(lab)
        try:
            applied(lab, {**POLICY, "confine": {"uids": [1000, ISTIO.uid]}})
            for family in (4, 6):
                res = lab.tcp(ALLOWED[family], 443, timeout=FAST)
                assert through_relay(res, ISTIO.uid, ALLOWED[family], 443), res.answer
        finally:
            ISTIO.remove(lab)

    def test_a_confined_relay_cannot_take_an_allowed_connection_elsewhere(self, lab: Lab) -> None:
        ISTIO.install(lab, port=15009)
        try:
            with WireCapture(lab) as cap:
                applied(lab, {**POLICY, "confine": {"uids": [1000, ISTIO.uid]}})
                res = lab.tcp(ALLOWED[4], 443, timeout=FAST)
                cap.barrier(lab)
                assert res.ok and str(res.answer).startswith(f"relay {ISTIO.uid} {DENIED[4]}:80 failed"), res.answer
                assert not cap.frames_with(to(DENIED[4], 80))
                # The control: the same relay, its uid not confined, does reach the denied host.
                applied(lab, POLICY)
                res = lab.tcp(ALLOWED[4], 443, timeout=FAST)
                assert str(res.answer).startswith(f"relay {ISTIO.uid} {DENIED[4]}:80 world {DENIED[4]} 80 "), res.answer
                assert cap.wait_for(to(DENIED[4], 80))
        finally:
            ISTIO.remove(lab)


class TestSetsThroughTheMesh:
    """Long lists go into kernel sets. nftables looks them up by the original destination
    (`ct original ip daddr @set`); ipset cannot, so on iptables a DNATed connection that a set would
    judge is refused (`dnat-set`): fail-closed, and a denied member never passes as the relay."""

    POLICY = policy(
        allow=[
            *({"cidr": f"198.19.0.{i}/32", "ports": [443]} for i in range(1, 20)),
            *({"cidr": f"2001:db8:3::{i:x}/128", "ports": [443]} for i in range(1, 20)),
            {"cidr": "203.0.113.10/32", "ports": [443]},
            {"cidr": "2001:db8:2::10/128", "ports": [443]},
            {"cidr": "203.0.113.0/24", "ports": [80]},
            {"cidr": "2001:db8:2::/64", "ports": [80]},
        ],
        deny=[
            *({"cidr": f"198.18.0.{i}/32"} for i in range(1, 20)),
            *({"cidr": f"2001:db8:4::{i:x}/128"} for i in range(1, 20)),
            {"cidr": "203.0.113.11/32"},
            {"cidr": "2001:db8:2::11/128"},
        ],
    )

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, own_lab: Lab) -> Iterator[Lab]:
        own_lab.start_relay(ISTIO.uid, ISTIO.port)
        applied(own_lab, cls.POLICY)
        yield own_lab

    @FAMILIES
    def test_set_members_without_the_mesh_are_judged_by_their_sets(self, lab: Lab, family: int) -> None:
        assert reached(lab.tcp(ALLOWED[family], 443, timeout=FAST), ALLOWED[family])
        stopped(lab, "tcp", DENIED[family], 80)  # with its control, judged where the world receives

    @FAMILIES
    def test_through_the_mesh_sets_judge_the_original_destination_or_refuse(self, lab: Lab, family: int) -> None:
        ISTIO.install(lab)
        try:
            with WireCapture(lab) as cap:
                allowed = lab.tcp(ALLOWED[family], 443, timeout=FAST)
                by_rule = lab.tcp(UNLISTED[family], 80, timeout=FAST)
                denied = lab.tcp(DENIED[family], 80, timeout=FAST)
                cap.barrier(lab)
                assert refused_fast(denied), denied
                assert not cap.frames_with(to(DENIED[family], 80))
                if os.environ.get("EGRESSGUARD_BACKEND") == "nftables":
                    assert through_relay(allowed, ISTIO.uid, ALLOWED[family], 443), allowed.answer
                    assert through_relay(by_rule, ISTIO.uid, UNLISTED[family], 80), by_rule.answer
                else:  # ipset cannot judge a DNATed connection: refused, whatever a set holds
                    assert refused_fast(allowed) and refused_fast(by_rule), (allowed, by_rule)
                    assert not cap.frames_with(to(ALLOWED[family], 443))
                    control = lab.tcp(ALLOWED[family], 443, uid=EXEMPT, timeout=FAST)
                    assert through_relay(control, ISTIO.uid, ALLOWED[family], 443), control.answer
                control = lab.tcp(DENIED[family], 80, uid=EXEMPT, timeout=FAST)
                assert through_relay(control, ISTIO.uid, DENIED[family], 80), control.answer
        finally:
            ISTIO.remove(lab)


class TestMeshWithLoopbackDenied:
    """Redirected connections are judged by where they were addressed, not as loopback traffic: with
    `loopback: deny` they still pass, while the relay's port itself stays closed to the agent."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, own_lab: Lab) -> Iterator[Lab]:
        own_lab.start_relay(ISTIO.uid, ISTIO.port)
        ISTIO.install(own_lab)
        applied(own_lab, {**POLICY, "loopback": "deny"})
        yield own_lab

    @FAMILIES
    def test_allowed_traffic_passes_the_mesh_and_the_relay_port_stays_closed(self, lab: Lab, family: int) -> None:
        assert through_relay(lab.tcp(ALLOWED[family], 443, timeout=FAST), ISTIO.uid, ALLOWED[family], 443)
        local = "::1" if family == 6 else "127.0.0.1"
        assert refused_fast(lab.tcp(local, ISTIO.port, timeout=FAST))
        assert lab.tcp(local, ISTIO.port, uid=EXEMPT, timeout=FAST).ok  # the control: the relay listens
