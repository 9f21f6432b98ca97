"""Model versus kernel: random valid policies, applied for real, must give the evaluator's verdict
(egressguard.explain) for random probes sent as real packets from the pod. Each policy is drawn with
the pod topology it runs in: every name in IFACE_NAMES, and a pod with a second interface."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from egtraffic import stopped
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressguard.explain import Facts, Probe, Verdict, evaluate
from egressguard.lab import (
    IFACE_NAMES,
    METADATA_V4,
    METADATA_V6,
    OTHER_RESOLVER_V4,
    POD_TCP_PORTS,
    POD_V4,
    POD_V6,
    RESOLVER_V4,
    RESOLVER_V6,
    ROOT,
    SECOND_POD_V4,
    SECOND_POD_V6,
    Lab,
    Result,
    topology_name,
)
from egressguard.policy import validate

pytestmark = pytest.mark.netns

V4_HOSTS = ("203.0.113.10", "203.0.113.11", "192.0.2.10", METADATA_V4, RESOLVER_V4, "100.100.100.200")
V6_HOSTS = ("2001:db8:2::10", "2001:db8:2::11", METADATA_V6, RESOLVER_V6)
LOCAL_DESTS = ("127.0.0.1", "::1", POD_V4)
TCP_PORTS = (22, 80, 443, 5000, 8444)  # world listeners (53 is DNS-only: probed with real queries)
UDP_PORTS = (123, 443, 9999)
CIDRS = (
    "203.0.113.10/32", "203.0.113.11/32", "203.0.113.0/24", "192.0.2.0/24", "198.51.100.0/24", "0.0.0.0/0",
    "169.254.0.0/16", "100.100.100.200/32", "127.0.0.0/8",
    "2001:db8:2::10/128", "2001:db8:2::/64", "2001:db8::/32", "::/0", "fd00:ec2::254/128", "::1/128",
)
HOSTS = ("allowed.test", "other.test", "alias.test")
PROBE_TIMEOUT = 0.6
MAX_EXAMPLES = 25
PROBES_PER_POLICY = 12

# The facts a verdict depends on, from sources independent of the code under test (which also writes
# them to its status file): the README's loopback and metadata networks as literals, the addresses the
# lab's DNS serves as literals (checked against live answers below), and the pod's resolv.conf as
# the lab wrote it.
LOOPBACK = ("127.0.0.0/8", "::1/128")
README_METADATA = ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
HOST_ADDRESSES = {"allowed.test": ("203.0.113.10", "2001:db8:2::10"), "other.test": ("203.0.113.11", "2001:db8:2::11"),
                  "alias.test": ("203.0.113.10", "2001:db8:2::10")}  # alias.test: a CNAME of allowed.test

_pairs = {"policies": 0, "pairs": 0, "disagreements": 0}
_shapes: set[str] = set()

# One lab per topology, built when first drawn and kept for the module. The function-lab test below
# takes the first. 203.0.113.12, 192.0.2.10 and 2001:db8:2::12 leave by the second interface.
LAB_TOPOLOGIES = [{"iface": "eth0", "second_iface": "net1"}, *({"iface": name} for name in IFACE_NAMES)]


@st.composite
def entries(draw: st.DrawFn, default_protocol: str, hosts_optional: bool) -> dict[str, Any]:
    e: dict[str, Any] = {}
    if draw(st.integers(0, 4)) == 0:
        e["host"] = draw(st.sampled_from(HOSTS))
        if hosts_optional:
            e["optional"] = True
    else:
        e["cidr"] = draw(st.sampled_from(CIDRS))
    proto = draw(st.sampled_from((None, "tcp", "udp", "icmp", "any")))
    if proto is not None:
        e["protocol"] = proto
    if (proto or default_protocol) in ("tcp", "udp") and draw(st.booleans()):
        pool = TCP_PORTS if (proto or default_protocol) == "tcp" else UDP_PORTS
        e["ports"] = draw(st.lists(st.sampled_from(pool + (53,)), min_size=1, max_size=3, unique=True))
    return e


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    resolvers = draw(st.sampled_from(("auto", [], [RESOLVER_V4], [OTHER_RESOLVER_V4, RESOLVER_V6])))
    p: dict[str, Any] = {"version": 1, "dns": {"resolvers": resolvers}}
    confine = draw(st.sampled_from(([1000], [1000, 0], "all", None)))
    if confine is not None:
        p["confine"] = {"uids": confine}
    if draw(st.booleans()):
        p["exempt"] = {"uids": [1001]}
    p["action"] = draw(st.sampled_from(("reject", "reject", "drop")))
    p["loopback"] = draw(st.one_of(st.sampled_from(("allow", "deny")),
                                   st.lists(st.sampled_from(POD_TCP_PORTS), min_size=1, max_size=2, unique=True)))
    p["deny_metadata"] = draw(st.booleans())
    no_dns = resolvers == []
    p["allow"] = draw(st.lists(entries("tcp", no_dns), max_size=4))
    p["deny"] = draw(st.lists(entries("any", no_dns), max_size=2))
    if draw(st.booleans()):
        p["redirect"] = [{"ports": draw(st.lists(st.sampled_from((80, 443)), min_size=1, max_size=2, unique=True)),
                          "to_port": draw(st.sampled_from(POD_TCP_PORTS))}]
    return p


@st.composite
def probes(draw: st.DrawFn) -> Probe:
    uid = draw(st.sampled_from((1000, 1000, 1001, 0)))
    kind = draw(st.sampled_from(("tcp", "tcp", "tcp", "udp", "icmp", "dns", "local")))
    if kind == "local":
        return Probe(uid, draw(st.sampled_from(LOCAL_DESTS)), draw(st.sampled_from(POD_TCP_PORTS)), "tcp")
    if kind == "dns":
        server = draw(st.sampled_from((RESOLVER_V4, OTHER_RESOLVER_V4, RESOLVER_V6)))
        return Probe(uid, server, 53, draw(st.sampled_from(("udp", "tcp"))))
    dest = draw(st.sampled_from(V4_HOSTS + V6_HOSTS))
    if kind == "icmp":
        return Probe(uid, dest, None, "icmp")
    return Probe(uid, dest, draw(st.sampled_from(TCP_PORTS if kind == "tcp" else UDP_PORTS)), kind)  # type: ignore[arg-type]


def send(lab: Lab, p: Probe) -> Result:
    if p.port == 53:
        return lab.dns("allowed.test", p.destination, uid=p.uid, tcp=p.protocol == "tcp", timeout=PROBE_TIMEOUT)
    if p.protocol == "icmp":
        return lab.ping(p.destination, uid=p.uid, timeout=PROBE_TIMEOUT)
    if p.protocol == "udp":
        return lab.udp(p.destination, p.port or 0, uid=p.uid, timeout=PROBE_TIMEOUT)
    return lab.tcp(p.destination, p.port or 0, uid=p.uid, timeout=PROBE_TIMEOUT)


def observed(p: Probe, r: Result) -> str:
    """The kernel's verdict, read from what the probe got back."""
    if not r.ok:
        return "refuse" if r.blocked else f"error: {r}"
    banner = str(r.answer or "")
    if p.protocol == "tcp" and p.port != 53 and banner.startswith("pod ") and p.destination not in LOCAL_DESTS:
        return "redirect"
    return "allow"


def agrees(p: Probe, want: Verdict, r: Result) -> bool:
    got = observed(p, r)
    if got != want.verdict:
        return False
    if want.verdict == "redirect":
        return str(r.answer).split()[2] == str(want.to_port)  # "pod <local addr> <port> from ..."
    if want.verdict == "refuse" and p.protocol == "tcp" and p.port != 53:
        # reject fails fast with an error; drop stays silent until the timeout
        return r.outcome == ("refused" if want.action == "reject" else "timeout")
    if want.verdict == "allow" and p.protocol == "tcp" and p.port != 53 and p.destination not in LOCAL_DESTS:
        return str(r.answer).split()[:3] == ["world", p.destination, str(p.port)]  # reached the host itself
    if want.verdict == "allow" and p.protocol == "udp" and p.port != 53:
        return str(r.answer).startswith(f"world udp {p.port} ")
    return True


def pod_nameservers(lab: Lab) -> tuple[str, ...]:
    """`resolvers: auto` means the pod's resolv.conf nameservers (README): read from the file the lab wrote."""
    lines = Path(f"/etc/netns/{lab.pod}/resolv.conf").read_text().splitlines()
    return tuple(line.split()[1] for line in lines if line.startswith("nameserver "))


def independent_facts(lab: Lab, policy: dict[str, Any]) -> Facts:
    resolvers = policy["dns"]["resolvers"]
    hosts = {e["host"] for e in (*policy["allow"], *policy["deny"]) if "host" in e}
    own = [f"{POD_V4}/32", f"{POD_V6}/128"] + ([f"{SECOND_POD_V4}/32", f"{SECOND_POD_V6}/128"] if lab.second_iface else [])
    servers = pod_nameservers(lab) if resolvers == "auto" else tuple(resolvers)
    return Facts(
        resolvers=servers,
        # README: a host that does not resolve is skipped when optional (with no resolver, none does;
        # the strategy makes every host optional then)
        hosts={h: HOST_ADDRESSES[h] for h in hosts} if servers else {},
        local=(*LOOPBACK, *own),
    )


def metadata_refused(policy: dict[str, Any], p: Probe) -> bool:
    """README: with `deny_metadata`, a confined uid's connection to a metadata endpoint is refused on
    every port, whatever the allows say (checked beside the model, from the README's own list)."""
    confine = policy.get("confine", {}).get("uids", "all")  # README: `confine` omitted = all
    confined = (confine == "all" or p.uid in confine) and p.uid not in policy.get("exempt", {}).get("uids", [])
    metadata = ipaddress.ip_address(p.destination) in {ipaddress.ip_address(m) for m in README_METADATA}
    return policy["deny_metadata"] and confined and metadata


def test_the_labs_dns_serves_the_host_addresses_the_model_is_given(lab: Lab) -> None:
    """HOST_ADDRESSES are literals: check them against the lab's DNS answers, through every resolver drawn."""
    for server in (RESOLVER_V4, OTHER_RESOLVER_V4, RESOLVER_V6):
        for name, addresses in HOST_ADDRESSES.items():
            got = [a for rdtype in ("A", "AAAA") for a in lab.dns(name, server, uid=ROOT, rdtype=rdtype).answer or ()]
            assert set(addresses) <= set(got) and set(got) <= set(addresses) | {"allowed.test."}, (server, name, got)


def test_the_model_refuses_the_readmes_metadata_endpoints_and_their_nat64_forms() -> None:
    """The model's metadata list is the README's (not only egressguard's own constant): each endpoint,
    and the NAT64 form of each IPv4 one, is refused under an allow of everything; a neighbour is not."""
    policy = validate({"version": 1, "confine": {"uids": [1000]}, "deny_metadata": True,
                       "allow": [{"cidr": "0.0.0.0/0", "protocol": "any"}, {"cidr": "::/0", "protocol": "any"}]})
    nat64 = ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:aa02", "64:ff9b::6464:64c8")
    for dest in (*README_METADATA, *nat64):
        assert evaluate(policy, Facts(), Probe(1000, dest, 80)).line == "deny_metadata", dest
    for dest in ("169.254.169.253", "100.100.100.201", "fd00:ec2::253"):
        assert evaluate(policy, Facts(), Probe(1000, dest, 80)).verdict == "allow", dest


@pytest.fixture(scope="module", autouse=True)
def _report(figures: list[str]) -> Any:
    yield
    if _pairs["policies"]:
        figures.append(f"model vs kernel: {_pairs['policies']} policies on {len(_shapes)} pod topologies "
                       f"({', '.join(sorted(_shapes))}), {_pairs['pairs']} policy x probe pairs, "
                       f"{_pairs['disagreements']} disagreements between kernel and explain")


@pytest.fixture(scope="module")
def labs() -> Iterator[dict[str, Lab]]:
    built: dict[str, Lab] = {}
    try:
        yield built
    finally:
        for lab in built.values():
            lab.close()


def lab_for(labs: dict[str, Lab], topology: dict[str, str]) -> Lab:
    name = topology_name(**topology)
    if name not in labs:
        labs[name] = Lab(**topology).__enter__()
    return labs[name]


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(topology=st.sampled_from(LAB_TOPOLOGIES), policy=policies(),
       batch=st.lists(probes(), min_size=PROBES_PER_POLICY, max_size=PROBES_PER_POLICY))
def test_kernel_verdict_equals_the_model(labs: dict[str, Lab], topology: dict[str, str], policy: dict[str, Any],
                                         batch: list[Probe]) -> None:
    lab = lab_for(labs, topology)
    validated = validate(policy)
    done = lab.apply(policy)
    assert done.returncode == 0, done.stderr[-1500:]
    facts = independent_facts(lab, policy)
    reported = json.loads(lab.status_file.read_text())
    assert tuple(reported["resolvers"]) == facts.resolvers, reported["resolvers"]
    assert {k: set(v) for k, v in reported["hosts"].items()} == {k: set(v) for k, v in facts.hosts.items()}, reported["hosts"]
    disagreements = []
    wanted = [(p, evaluate(validated, facts, p)) for p in batch]
    refused = [(p, want) for p, want in wanted if want.verdict == "refuse"]
    others = [(p, want) for p, want in wanted if want.verdict != "refuse"]
    # The probes the model refuses go first, judged where the world receives too: not one packet of
    # theirs may arrive (TCP, UDP and DNS, counted by port on every link of the pod).
    counted = sorted({(p.protocol, p.port) for p, _ in refused
                      if p.port and p.protocol in ("tcp", "udp") and p.destination not in LOCAL_DESTS})
    before = lab.world_counts(counted)
    for group in (refused, others):
        for p, want in group:
            r = send(lab, p)
            if not agrees(p, want, r) or metadata_refused(policy, p) and observed(p, r) != "refuse":
                disagreements.append(f"uid {p.uid} {p.destination}:{p.port}/{p.protocol}: model {want}, "
                                     f"kernel {r} {r.answer!r}")
        if group is refused:
            after = lab.world_counts(counted)
            disagreements += [f"{after[k] - before[k]} packet(s) of refused probes to {k[0]} port {k[1]} "
                              "reached the world" for k in counted if after[k] != before[k]]
    _shapes.add(lab.topology)
    _pairs["policies"] += 1
    _pairs["pairs"] += len(batch)
    _pairs["disagreements"] += len(disagreements)
    assert not disagreements, "\n".join([f"pod topology {lab.topology}", json.dumps(policy), *disagreements])


def test_reapply_with_new_resolvers_when_root_is_confined(lab: Lab) -> None:
    """Found by the property above: the policy in force refused apply's own DNS queries to the new
    resolvers (confine: all), so a legitimate change failed with exit 4."""
    exempt = {"uids": [1001]}  # the control below: everyone else, root included, is confined
    first = {"version": 1, "exempt": exempt, "dns": {"resolvers": [RESOLVER_V4]}, "allow": [{"host": "allowed.test"}]}
    second = {"version": 1, "exempt": exempt, "dns": {"resolvers": [OTHER_RESOLVER_V4]}, "allow": [{"host": "other.test"}]}
    assert lab.apply(first).returncode == 0
    done = lab.apply(second)
    assert done.returncode == 0, done.stderr[-800:]
    assert lab.tcp("203.0.113.11", 22, uid=0).ok
    stopped(lab, "tcp", "203.0.113.10", 22, uid=ROOT)
