"""Service-mesh sidecars as they program a pod's namespace, for the mesh suites (test_traffic_mesh):
a nat OUTPUT redirect of the pod's TCP to a local relay port, which the relay's own uid is excluded
from, and a relay process (Lab.start_relay) that reads SO_ORIGINAL_DST and connects onward.

- `ISTIO`: istio-iptables' shape (ISTIO_OUTPUT / ISTIO_REDIRECT, port 15001, uid and gid 1337,
  loopback destinations left alone), appended to the nat table's OUTPUT.
- `LINKERD`: linkerd2-proxy-init's shape (PROXY_INIT_OUTPUT / PROXY_INIT_REDIRECT, port 4140,
  uid 2102, traffic out of `lo` left alone, and outbound ports to ignore: here 853).
- `ISTIO_NFT`: Istio's nftables mode (tools/istio-nftables): `table inet istio-proxy-nat` with an
  `output` chain of type nat at priority -100 jumping to istio-output, which redirects to :15001.

The iptables-shaped meshes are written with the iptables a node of that kind has: legacy x_tables
where egressguard runs on its iptables back end (no nf_tables there), iptables-nft where it runs on
nftables (an nftables-only run must not create legacy tables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from egressguard.lab import Lab


@dataclass(frozen=True)
class Mesh:
    name: str
    uid: int  # the relay's uid, which the redirect leaves alone
    port: int  # the relay's port on loopback
    ignore_ports: tuple[int, ...] = ()  # outbound ports the mesh does not redirect
    nft: bool = False  # Istio's nftables mode

    def install(self, lab: Lab, port: int | None = None) -> None:
        """Program the redirect in the lab's pod (to `port` instead of the mesh's own, if given)."""
        to = str(port or self.port)
        if self.nft:
            script = "\n".join([
                "table inet istio-proxy-nat {",
                "  chain output { type nat hook output priority -100; policy accept; jump istio-output; }",
                "  chain istio-redirect { meta l4proto tcp redirect to :" + to + "; }",
                "  chain istio-output {",
                f"    meta skuid {self.uid} return",
                f"    meta skgid {self.uid} return",
                "    ip daddr 127.0.0.1 return",
                "    ip6 daddr ::1 return",
                "    meta l4proto tcp jump istio-redirect",
                "  }",
                "}",
            ]) + "\n"
            path = lab.workdir / "istio-proxy-nat.nft"
            path.write_text(script)
            in_pod(lab, "nft", "-f", str(path))
            return
        out, redirect = ("ISTIO_OUTPUT", "ISTIO_REDIRECT") if self.name == "istio" else (
            "PROXY_INIT_OUTPUT", "PROXY_INIT_REDIRECT")
        for tool, local in ((iptables_tool(4), "127.0.0.1/32"), (iptables_tool(6), "::1/128")):
            nat = (tool, "-w", "-t", "nat")
            in_pod(lab, *nat, "-N", redirect)
            in_pod(lab, *nat, "-A", redirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", to)
            in_pod(lab, *nat, "-N", out)
            in_pod(lab, *nat, "-A", out, "-m", "owner", "--uid-owner", str(self.uid), "-j", "RETURN")
            if self.name == "istio":
                in_pod(lab, *nat, "-A", out, "-m", "owner", "--gid-owner", str(self.uid), "-j", "RETURN")
                in_pod(lab, *nat, "-A", out, "-d", local, "-j", "RETURN")
            else:
                in_pod(lab, *nat, "-A", out, "-o", "lo", "-j", "RETURN")
            if self.ignore_ports:
                in_pod(lab, *nat, "-A", out, "-p", "tcp", "-m", "multiport", "--dports",
                     ",".join(map(str, self.ignore_ports)), "-j", "RETURN")
            in_pod(lab, *nat, "-A", out, "-p", "tcp", "-j", redirect)
            in_pod(lab, *nat, "-A", "OUTPUT", "-p", "tcp", "-j", out)

    def remove(self, lab: Lab) -> None:
        if self.nft:
            in_pod(lab, "nft", "delete", "table", "inet", "istio-proxy-nat")
            return
        out, redirect = ("ISTIO_OUTPUT", "ISTIO_REDIRECT") if self.name == "istio" else (
            "PROXY_INIT_OUTPUT", "PROXY_INIT_REDIRECT")
        for tool in (iptables_tool(4), iptables_tool(6)):
            nat = (tool, "-w", "-t", "nat")
            in_pod(lab, *nat, "-D", "OUTPUT", "-p", "tcp", "-j", out)
            for chain in (out, redirect):
                in_pod(lab, *nat, "-F", chain)
                in_pod(lab, *nat, "-X", chain)


ISTIO = Mesh("istio", uid=1337, port=15001)
LINKERD = Mesh("linkerd", uid=2102, port=4140, ignore_ports=(853,))
ISTIO_NFT = Mesh("istio-nft", uid=1337, port=15001, nft=True)
# Istio's nftables mode first: its chain and iptables' legacy nat table both hook at priority -100,
# where the chain registered last runs first. On the iptables back end the legacy nat table comes
# into being with egressguard's first apply, after the mesh's init, as in a pod; a mesh suite that
# had already used legacy nat would register it before the mesh instead.
MESHES = (ISTIO_NFT, ISTIO, LINKERD)


def iptables_tool(family: int) -> str:
    """The iptables a node running egressguard's current back end has (see the module doc)."""
    legacy = os.environ.get("EGRESSGUARD_BACKEND", "iptables") == "iptables"
    base = "ip6tables" if family == 6 else "iptables"
    return f"{base}-legacy" if legacy else f"{base}-nft"


def in_pod(lab: Lab, *argv: str) -> None:
    done = lab.in_pod(*argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
