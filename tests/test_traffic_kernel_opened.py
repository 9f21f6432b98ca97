"""Connections the kernel opens on a process's behalf. An MPTCP socket's extra subflows start with a
SYN from a kernel socket that has no owner yet, so no owner match sees whose it is; SMC, RDS over TCP
and RxRPC send from such sockets too (this kernel has only MPTCP, so only it is tested). Under a uid
list those SYNs left unjudged: a confined process's MPTCP connection to an allowed host that announces
another address (ADD_ADDR) made the pod's kernel send a SYN to that address, though the policy
refuses it. Judged at the world's end of the pod's link. A VXLAN device stands in for the kernel UDP
sockets (RxRPC's): its outer packets have no owner either."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from egtraffic import FAST, applied, policy

from egressguard.lab import CONFINED, EXEMPT, WORLD_IFACE, Lab

pytestmark = pytest.mark.netns

_MPTCP_SWITCH = Path("/proc/sys/net/mptcp/enabled")
needs_mptcp = pytest.mark.skipif(not _MPTCP_SWITCH.exists() or _MPTCP_SWITCH.read_text().strip() != "1",
                                 reason="this kernel has no MPTCP (or has it off)")

PYTHON = "/usr/bin/python3"
IPPROTO_MPTCP = 262
PORT, REFUSED_PORT, ALLOWED_PORT = 7777, 7778, 7779  # the first subflow's; the two announced addresses'
HOSTS = {  # (the allowed host the process connects to, an address it announces that the policy refuses, one it allows)
    4: ("203.0.113.10", "203.0.113.11", "203.0.113.12"),
    6: ("2001:db8:2::10", "2001:db8:2::11", "2001:db8:2::12"),
}

# A world host that speaks MPTCP: accepts and reads until the client closes.
SERVER = f"""
import socket, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, {IPPROTO_MPTCP})
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", {PORT}))
s.listen(16)
def drain(c):
    with c:
        while c.recv(4096):
            pass
while True:
    threading.Thread(target=drain, args=(s.accept()[0],), daemon=True).start()
"""

# The process in the pod: an MPTCP connection that carries data for a while, time for the kernel to
# act on the peer's announcements (it opens one subflow per announced address).
CLIENT = f"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, {IPPROTO_MPTCP})
s.settimeout(3)
s.connect((host, port))
print("connected", flush=True)
for _ in range(30):
    s.send(b"x" * 512)
    time.sleep(0.05)
s.close()
"""


def _mptcp(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "-n", netns, "mptcp", *argv], check=True, capture_output=True, text=True)


def _joins_sent(lab: Lab) -> int:
    """MP_JOIN SYNs the pod's kernel has sent (its MPTcpExtMPJoinSynTx counter)."""
    lines = [ln.split() for ln in lab.in_pod("cat", "/proc/net/netstat").stdout.splitlines() if ln.startswith("MPTcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("MPJoinSynTx")])


def _mptcp_world(lab: Lab, family: int) -> subprocess.Popen[bytes]:
    """The world speaks MPTCP on PORT and announces two more addresses to every client."""
    _, refused, allowed = HOSTS[family]
    # An IPv6 announcement with a port takes 30 bytes of TCP options: no room beside timestamps.
    subprocess.run(["ip", "netns", "exec", lab.world, "sysctl", "-qw", "net.ipv4.tcp_timestamps=0"], check=True)
    _mptcp(lab.world, "limits", "set", "subflows", "4", "add_addr_accepted", "4")
    _mptcp(lab.world, "endpoint", "add", refused, "dev", WORLD_IFACE, "port", str(REFUSED_PORT), "signal")
    _mptcp(lab.world, "endpoint", "add", allowed, "dev", WORLD_IFACE, "port", str(ALLOWED_PORT), "signal")
    server = subprocess.Popen(["ip", "netns", "exec", lab.world, PYTHON, "-c", SERVER])
    for _ in range(200):
        if subprocess.run(["ss", "-N", lab.world, "-Hltn", f"sport = :{PORT}"], capture_output=True,
                          text=True).stdout.strip():
            return server
        time.sleep(0.01)
    server.kill()
    raise AssertionError("the world's MPTCP server did not start")


@needs_mptcp
@pytest.mark.parametrize(("backend", "confine", "family", "iface"), [
    ("iptables", "uids", 4, "net1"),
    ("iptables", "uids", 6, "veth1a2b3c4d"),
    ("nftables", "uids", 4, "tun0"),
    ("nftables", "uids", 6, "eth0"),
    ("iptables", "all", 6, "tap-0123456789a"),
    ("nftables", "all", 4, "net1"),
], ids=lambda v: str(v))
def test_an_mptcp_subflow_to_an_address_the_peer_announces_is_judged_as_the_confined_uids(
        backend: str, confine: str, family: int, iface: str) -> None:
    """The pod accepts announced addresses (`ip mptcp limits`, the platform's setting). A confined
    process's MPTCP connection to an allowed host that announces a refused and an allowed address:
    the kernel sends a join to each; not one packet of the refused one reaches the world, the allowed
    one does (the joins are judged, not all dropped). The connection itself carries on."""
    first, refused, allowed = HOSTS[family]
    net = "/32" if family == 4 else "/128"
    pol = policy(allow=[{"cidr": first + net, "ports": [PORT]}, {"cidr": allowed + net, "ports": [ALLOWED_PORT]}])
    if confine == "all":
        pol = {**pol, "confine": {"uids": "all"}, "exempt": {"uids": [EXEMPT]}}
    with Lab(iface=iface, prefix="ko") as lab:
        server = _mptcp_world(lab, family)
        try:
            _mptcp(lab.pod, "limits", "set", "subflows", "4", "add_addr_accepted", "4")
            applied(lab, pol, "--backend", backend)
            ports = [("tcp", REFUSED_PORT), ("tcp", ALLOWED_PORT)]
            before, joins = lab.world_counts(ports), _joins_sent(lab)
            got = lab.exec_as([PYTHON, "-c", CLIENT, first, str(PORT)], uid=CONFINED)
            assert got.ok and "connected" in str(got.answer), got.answer
            for _ in range(100):  # the joins are sent from a workqueue, after the handshake
                if _joins_sent(lab) - joins >= 2:
                    break
                time.sleep(0.02)
            assert _joins_sent(lab) - joins >= 2, "the pod's kernel opened no subflow to the announced addresses"
            after = lab.world_counts(ports)
            leaked = after[("tcp", REFUSED_PORT)] - before[("tcp", REFUSED_PORT)]
            assert leaked == 0, f"{leaked} packet(s) of a subflow to refused {refused} reached the world"
            assert after[("tcp", ALLOWED_PORT)] > before[("tcp", ALLOWED_PORT)], \
                f"no subflow to allowed {allowed}:{ALLOWED_PORT} reached the world"
            # The control: the refused address speaks MPTCP, and the exempt uid's own connection gets there.
            control = lab.exec_as([PYTHON, "-c", CLIENT, refused, str(PORT)], uid=EXEMPT, timeout=FAST + 5)
            assert control.ok and "connected" in str(control.answer), control.answer
        finally:
            server.kill()
            server.wait()


# -- a kernel tunnel in the pod: the price of the rule, and the same rule for a kernel UDP socket --

TUNNEL_PEER = {4: "203.0.113.11", 6: "2001:db8:2::11"}
VXLAN_PORT = 4789
INTO_TUNNEL = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(10):
    s.sendto(b"x", ("198.18.42.1", 9))
    time.sleep(0.1)
"""


@pytest.mark.parametrize(("backend", "family", "iface"), [("iptables", 4, "net1"), ("nftables", 6, "veth1a2b3c4d")],
                         ids=lambda v: str(v))
def test_a_kernel_tunnel_in_the_pod_reaches_its_peer_only_once_the_policy_allows_it(
        backend: str, family: int, iface: str) -> None:
    """A VXLAN device in the pod (what a platform's own tunnel would be) sends its outer UDP from a
    kernel socket, as RxRPC does for a process: no owner. Under a uid list (root is not confined) not
    one outer packet reaches the peer until the policy allows the peer's port; then they arrive."""
    peer = TUNNEL_PEER[family]
    with Lab(iface=iface, prefix="kt") as lab:
        applied(lab, policy(), "--backend", backend)
        made = lab.in_pod("ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", peer,
                          "dstport", str(VXLAN_PORT), "dev", iface)
        assert made.returncode == 0, made.stderr
        for argv in (("ip", "addr", "add", "198.18.42.2/24", "dev", "vx0"), ("ip", "link", "set", "vx0", "up")):
            assert lab.in_pod(*argv).returncode == 0

        def outer_packets_arriving() -> int:
            before = lab.world_received("udp", VXLAN_PORT)
            # Datagrams into the tunnel (as root: unconfined); its neighbour lookups go out as outer UDP.
            sent = lab.in_pod(PYTHON, "-c", INTO_TUNNEL)
            assert sent.returncode == 0, sent.stderr
            return lab.world_received("udp", VXLAN_PORT) - before

        assert outer_packets_arriving() == 0
        net = "/32" if family == 4 else "/128"
        applied(lab, policy(allow=[{"cidr": peer + net, "ports": [VXLAN_PORT], "protocol": "udp"}]),
                "--backend", backend)
        assert outer_packets_arriving() > 0
