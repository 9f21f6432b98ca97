"""Concurrency with other tools: Docker-style and kube-proxy-style rules, legacy x_tables and nftables,
present before, during and after apply/reset. They survive untouched and in order, ours still hold
(checked with traffic), and `status` names the nftables tables it did not write.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from egtraffic import stopped

from egressguard.lab import CONFINED, EXEMPT, RESOLVER_V4, Lab

pytestmark = pytest.mark.netns

ALLOWED_V4, OTHER_V4, OTHER_V6 = "203.0.113.10", "203.0.113.11", "2001:db8:2::11"
DNS_VIP = "198.18.0.10"  # a kube-dns style service address, DNAT'ed to the lab resolver

POLICY = {
    "version": 1,
    "confine": {"uids": [CONFINED]},
    "exempt": {"uids": [EXEMPT]},
    "dns": {"resolvers": [RESOLVER_V4, DNS_VIP]},
    "allow": [{"cidr": f"{ALLOWED_V4}/32", "ports": [443]}],
    "redirect": [{"ports": [80], "to_port": 8444}],
}
POLICY_B = {**POLICY, "allow": [{"cidr": f"{ALLOWED_V4}/32", "ports": [443, 22]}]}

# What Docker installs in a container's namespace (embedded DNS at 127.0.0.11) and on a host,
# and what kube-proxy (iptables mode) installs: nat and filter, with chains, jumps and DNAT.
DOCKER_V4 = """*nat
:DOCKER_OUTPUT - [0:0]
:DOCKER_POSTROUTING - [0:0]
-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT
-A POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING
-A DOCKER_OUTPUT -d 127.0.0.11/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.11:39999
-A DOCKER_OUTPUT -d 127.0.0.11/32 -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.11:48888
-A DOCKER_POSTROUTING -s 127.0.0.11/32 -p tcp -m tcp --sport 39999 -j SNAT --to-source :53
-A DOCKER_POSTROUTING -s 127.0.0.11/32 -p udp -m udp --sport 48888 -j SNAT --to-source :53
COMMIT
*filter
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
COMMIT
"""
KUBE_V4 = f"""*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-DNS - [0:0]
:KUBE-SEP-DNS - [0:0]
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d {DNS_VIP}/32 -p udp -m udp --dport 53 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-SVC-DNS
-A KUBE-SERVICES -d {DNS_VIP}/32 -p tcp -m tcp --dport 53 -m comment --comment "kube-system/kube-dns:dns-tcp" -j KUBE-SVC-DNS
-A KUBE-SVC-DNS -j KUBE-SEP-DNS
-A KUBE-SEP-DNS -p udp -m udp -j DNAT --to-destination {RESOLVER_V4}:53
-A KUBE-SEP-DNS -p tcp -m tcp -j DNAT --to-destination {RESOLVER_V4}:53
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A OUTPUT -j KUBE-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-SERVICES -d 198.18.0.20/32 -p tcp -m tcp --dport 80 -m comment --comment "default/no-endpoints has no endpoints" -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""
KUBE_V6 = """*filter
:KUBE-FIREWALL - [0:0]
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -d 2001:db8:ffff::/48 -p tcp -m tcp --dport 9 -j REJECT --reject-with icmp6-port-unreachable
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A OUTPUT -j KUBE-SERVICES
COMMIT
"""
# nftables: a kube-proxy (nftables mode) style table with a reject, a Docker-style nat table, and what
# iptables-nft (the nft-backed iptables most distributions ship) writes.
NFT_RULESET = """table ip kube-proxy {
  chain filter-output { type filter hook output priority -110; policy accept; ip daddr 203.0.113.12 tcp dport 5000 reject; }
  chain nat-output { type nat hook output priority -100; policy accept; ip daddr 198.18.0.30 tcp dport 80 dnat to 198.18.0.31:8080; }
}
table inet docker-bridges {
  chain forward { type filter hook forward priority 0; policy accept; }
}
"""


def _save(lab: Lab, tool: str) -> list[str]:
    """Every foreign rule and chain in filter and nat, in order, as iptables-save prints them (an empty
    table and an absent one are the same: the kernel creates tables when first read)."""
    lines = []
    for table in ("filter", "nat"):
        for line in lab.in_pod(tool, "-t", table).stdout.splitlines():
            if "EGRESSGUARD" in line or "egressguard" in line:
                continue
            if line.startswith("-A") or (line.startswith(":") and line.split()[1] == "-"):
                lines.append(f"{table} {line.split(' [')[0]}")
    return lines


def _foreign(lab: Lab) -> dict[str, list[str]]:
    state = {tool: _save(lab, tool) for tool in ("iptables-legacy-save", "ip6tables-legacy-save")}
    if shutil.which("nft"):
        state["nft"] = lab.in_pod("nft", "list", "ruleset").stdout.splitlines()
    return state


def _restore(lab: Lab, tool: str, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.pod, tool, "-w", "-n"], input=text, text=True, check=True,
                   capture_output=True)


def _ours_hold(lab: Lab) -> None:
    """Traffic: the policy's allow works, everything else is refused, the exempt uid is free."""
    assert lab.tcp(ALLOWED_V4, 443).ok
    stopped(lab, "tcp", OTHER_V4, 443)  # each with the exempt uid reaching the same host as control
    stopped(lab, "tcp", OTHER_V6, 443)
    assert lab.tcp(OTHER_V4, 80).proxied


@pytest.fixture
def docker_kube_legacy(lab: Lab) -> Iterator[Lab]:
    _restore(lab, "iptables-legacy-restore", DOCKER_V4)
    _restore(lab, "iptables-legacy-restore", KUBE_V4)
    _restore(lab, "ip6tables-legacy-restore", KUBE_V6)
    yield lab


@pytest.fixture
def with_nft(lab: Lab) -> Iterator[Lab]:
    if not shutil.which("nft"):
        pytest.skip("needs nft (apt-get install nftables)")
    subprocess.run(["ip", "netns", "exec", lab.pod, "nft", "-f", "-"], input=NFT_RULESET, text=True, check=True)
    lab.in_pod("iptables-nft", "-w", "-t", "nat", "-A", "OUTPUT", "-d", "198.18.0.40/32", "-p", "tcp",
               "-j", "DNAT", "--to-destination", "198.18.0.41", check=True)
    lab.in_pod("iptables-nft", "-w", "-A", "OUTPUT", "-d", "198.18.0.42/32", "-j", "DROP", check=True)
    yield lab


def test_docker_and_kube_legacy_rules_survive_apply_reapply_and_reset_in_order(docker_kube_legacy: Lab) -> None:
    lab = docker_kube_legacy
    before = _foreign(lab)
    for policy in (POLICY, POLICY_B, POLICY):
        done = lab.apply(policy)
        assert done.returncode == 0, done.stderr
        assert _foreign(lab) == before
        _ours_hold(lab)
    assert lab.egressguard("reset").returncode == 0
    assert _foreign(lab) == before
    assert "EGRESSGUARD" not in lab.ruleset_dump()


def test_dns_through_a_kube_service_address_works_and_other_resolvers_stay_refused(docker_kube_legacy: Lab) -> None:
    """kube-dns style: resolv.conf names a service address that nat DNATs to the real resolver; the
    DNS rule matches the original destination, so listing the service address is enough."""
    lab = docker_kube_legacy
    assert lab.apply(POLICY).returncode == 0
    assert lab.dns("allowed.test", DNS_VIP).answer == [ALLOWED_V4]
    assert lab.dns("allowed.test", DNS_VIP, tcp=True).answer == [ALLOWED_V4]
    stopped(lab, "dns", "allowed.test", "198.51.100.54")


def test_nft_rules_survive_and_status_names_them(lab: Lab, with_nft: Lab) -> None:
    before = _foreign(lab)
    st = lab.egressguard("status")
    assert "nftables tables:" in st.stdout and "ip kube-proxy" in st.stdout and "inet docker-bridges" in st.stdout
    for policy in (POLICY, POLICY_B):
        assert lab.apply(policy).returncode == 0
        assert _foreign(lab) == before
        _ours_hold(lab)
    # Both firewalls apply: what the nft table rejects stays rejected, even for the exempt uid.
    assert lab.tcp("203.0.113.12", 5000, uid=EXEMPT).outcome == "refused"  # their reject
    assert lab.tcp("203.0.113.12", 22, uid=EXEMPT).ok
    st = lab.egressguard("status", "--json")
    assert any("ip kube-proxy" in note for note in __import__("json").loads(st.stdout)["other_firewalls"])
    assert lab.egressguard("reset").returncode == 0
    assert _foreign(lab) == before


def test_status_reports_no_nft_tables_when_there_are_none(lab: Lab) -> None:
    st = lab.egressguard("status")
    assert st.returncode == 0 and "nftables tables:" not in st.stdout


def test_foreign_rules_written_during_apply_survive_and_ours_hold(docker_kube_legacy: Lab, figures: list[str]) -> None:
    """A Docker/kube-like writer adds rules (iptables-legacy -w, nat and filter, and nft in a table of
    its own) while apply runs again and again: every rule it was told was added is there at the end,
    in its order, writes landed while applies ran (counted), and the last apply's rules verify."""
    lab = docker_kube_legacy
    assert lab.apply(POLICY).returncode == 0
    lab.in_pod("nft", "add table inet foreign; add chain inet foreign out "
                      "{ type filter hook output priority 10; policy accept; }", check=True)
    added: list[tuple[str, str, float]] = []  # table, tag, when the write returned
    failed: list[str] = []
    applying: list[tuple[float, float]] = []  # each apply's start and end
    stop = threading.Event()

    def writer() -> None:
        for i in range(400):
            if stop.is_set():
                return
            table = ("filter", "nat", "nft")[i % 3]
            tag = f"foreign-{i}"
            if table == "nft":
                argv = ["nft", f"add rule inet foreign out ip daddr 198.18.2.{i % 250} tcp dport 9 counter "
                               f'comment "{tag}"']
            else:
                argv = ["iptables-legacy", "-w", "-t", table, "-A", "KUBE-SERVICES", "-d", f"198.18.1.{i % 250}/32",
                        "-p", "tcp", "-m", "comment", "--comment", tag, "-j", "RETURN"]
            r = lab.in_pod(*argv)
            if r.returncode == 0:
                added.append((table, tag, time.monotonic()))
            else:
                failed.append(f"{tag}: {r.stderr.strip()}")

    t = threading.Thread(target=writer)
    t.start()
    try:
        for policy in (POLICY_B, POLICY, POLICY_B, POLICY, POLICY_B):
            started = time.monotonic()
            done = lab.apply(policy)
            applying.append((started, time.monotonic()))
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        t.join()
    saved = {table: lab.in_pod("iptables-legacy-save", "-t", table).stdout for table in ("filter", "nat")}
    saved["nft"] = lab.in_pod("nft", "list", "table", "inet", "foreign").stdout
    marker = {"filter": "--comment {} ", "nat": "--comment {} ", "nft": 'comment "{}"'}
    missing = [tag for table, tag, _ in added if marker[table].format(tag) not in saved[table]]
    assert not missing, f"foreign rules lost: {missing[:5]}"
    assert not failed, f"the foreign writer failed while egressguard applied: {failed[:3]}"
    for table in ("filter", "nat", "nft"):
        positions = [saved[table].index(marker[table].format(tag)) for tab, tag, _ in added if tab == table]
        assert positions == sorted(positions), f"foreign rules out of order in {table}"
    during = {table: sum(1 for tab, _, at in added if tab == table and any(a <= at <= b for a, b in applying))
              for table in ("filter", "nat", "nft")}
    assert all(n > 0 for n in during.values()), f"no foreign write landed while an apply ran: {during}"
    assert lab.egressguard("verify", "--policy", str(lab.write_policy(POLICY_B))).returncode == 0
    _ours_hold(lab)
    figures.append(f"foreign tools: {len(added)} rules written during 5 applies ({sum(during.values())} while one "
                   f"ran: {during}), {len(missing)} lost, {len(failed)} writes failed")


def test_a_foreign_rule_inserted_above_our_jump_is_detected_and_reapply_fixes_it(lab: Lab) -> None:
    """A tool that inserts an ACCEPT at the top of OUTPUT would bypass the guard: `verify` exits 5 and
    `status` says not guarded; `apply` puts our jump back first, leaving the foreign rule in place."""
    path = lab.write_policy(POLICY)
    assert lab.apply(path).returncode == 0
    lab.in_pod("iptables-legacy", "-w", "-I", "OUTPUT", "1", "-d", f"{OTHER_V4}/32", "-j", "ACCEPT", check=True)
    assert lab.tcp(OTHER_V4, 443).ok  # the foreign ACCEPT wins: this is what must be detected
    assert lab.egressguard("verify", "--policy", str(path)).returncode == 5
    assert "guarded: NO" in lab.egressguard("status").stdout
    assert lab.apply(path).returncode == 0
    stopped(lab, "tcp", OTHER_V4, 443)
    out = lab.in_pod("iptables-legacy", "-S", "OUTPUT").stdout.splitlines()
    assert out[1].startswith("-A OUTPUT -m comment --comment egressguard") and f"-d {OTHER_V4}/32 -j ACCEPT" in out[2]
