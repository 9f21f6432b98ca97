"""The read-back of set elements: egressguard dumps an interval set's elements over netlink and
decodes them by hand (transport.set_elements, decode.held_intervals) instead of asking
libnftables for a JSON listing. Proved against `nft -j list set` on real sets in a pod namespace:
both families, the edges of the address space, ranges and prefixes, intervals added in separate
transactions, a set large enough to span many dump messages; and what the decoder refuses. And a
re-apply sends a kept set's elements again only when the kernel's differ from the plan's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from egtraffic import policy

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

SETS = {
    "v4": ("ipv4_addr", ["0.0.0.0/8", "10.0.0.1", "10.0.0.3-10.0.0.9", "192.0.2.0/24", "198.51.100.128/25",
                         "203.0.113.7", "255.255.255.0/24"]),
    "v4low": ("ipv4_addr", ["0.0.0.0", "192.0.2.1"]),  # a one-address interval at 0
    "v6": ("ipv6_addr", ["::/16", "2001:db8::1", "2001:db8:1::/48", "2001:db8:2::5-2001:db8:2::9",
                         "64:ff9b::a9fe:a9fe", "ffff::/16"]),
    "v6top": ("ipv6_addr", ["2001:db8::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]),
    # 3,000 separate /32s: ~120 KB of elements, several dump messages
    "big": ("ipv4_addr", [f"198.18.{i // 128}.{i % 128 * 2}" for i in range(3000)]),
    "empty": ("ipv4_addr", []),
}
# Elements added in separate transactions: adjacent and nested intervals nft 1.0.6 does not merge.
LATER = {"v4": ["10.0.0.2", "10.0.0.10-10.0.0.12"], "v6": ["2001:db8::2", "2001:db8:2::a"]}

# Run in the pod: both readings of every set, as merged (first, last) pairs.
READ = textwrap.dedent("""
    import ipaddress, json, subprocess, sys
    from egressguard.backends.nftables import decode, render, transport

    def merged(pairs):
        return [list(p) for p in render.merge([tuple(p) for p in pairs])]

    def nft_pairs(name):
        out = json.loads(subprocess.run(["nft", "-j", "list", "set", "inet", "egtest", name],
                                        capture_output=True, text=True, check=True).stdout)
        found = []
        for o in out["nftables"]:
            for e in o.get("set", {}).get("elem", []):
                if isinstance(e, str):
                    net = ipaddress.ip_network(e)
                elif "prefix" in e:
                    net = ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")
                else:
                    lo, hi = (int(ipaddress.ip_address(a)) for a in e["range"])
                    found.append((lo, hi))
                    continue
                found.append((int(net.network_address), int(net.broadcast_address)))
        return merged(found)

    result = {}
    for name, family in json.loads(sys.argv[1]).items():
        blocks = transport.set_elements("egtest", name)
        first, last = decode.held_intervals(blocks, family)
        result[name] = {"dump": merged(zip(first, last)), "nft": nft_pairs(name), "pairs": len(first)}
    print(json.dumps(result))
""")


def _script() -> str:
    lines = ["add table inet egtest"]
    for name, (typ, elems) in SETS.items():
        inline = f" elements = {{ {', '.join(elems)} }};" if elems else ""
        lines.append(f"add set inet egtest {name} {{ type {typ}; flags interval;{inline} }}")
    return "\n".join(lines) + "\n"


def _read(lab: Lab, families: dict[str, int]) -> dict[str, dict[str, object]]:
    done = lab.in_pod(sys.executable, "-c", READ, json.dumps(families))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_netlink_dump_decodes_to_what_nft_lists(module_lab: Lab, tmp_path: Path) -> None:
    lab = module_lab
    lab.in_pod("nft", "delete", "table", "inet", "egtest")
    script = tmp_path / "sets.nft"
    script.write_text(_script())
    try:
        done = lab.in_pod("nft", "-f", str(script))
        assert done.returncode == 0, done.stderr
        for name, elems in LATER.items():
            for e in elems:  # one transaction each
                done = lab.in_pod("nft", "add", "element", "inet", "egtest", name, f"{{ {e} }}")
                assert done.returncode == 0, done.stderr
        families = {name: 6 if typ == "ipv6_addr" else 4 for name, (typ, _) in SETS.items()}
        got = _read(lab, families)
        for name in SETS:
            assert got[name]["dump"] == got[name]["nft"], name
        assert got["big"]["pairs"] == 3000
        assert got["empty"]["dump"] == [] and got["v4"]["dump"][0] == [0, (1 << 24) - 1]
        assert got["v4"]["dump"][-1][1] == (1 << 32) - 1 and got["v6top"]["dump"][-1][1] == (1 << 128) - 1
        assert got["v4low"]["dump"][0] == [0, 0]
    finally:
        lab.in_pod("nft", "delete", "table", "inet", "egtest")


def test_an_element_with_more_than_a_key_is_refused(module_lab: Lab) -> None:
    """An element carrying a counter (or a comment, a timeout...) is not what egressguard adds: the
    decoder raises, and read-back reports the set as unexpected (verify exit 5, apply refills)."""
    lab = module_lab
    lab.in_pod("nft", "delete", "table", "inet", "egtest")
    try:
        for cmd in ("add table inet egtest", "add set inet egtest s { type ipv4_addr; flags interval; counter; }",
                    "add element inet egtest s { 192.0.2.1, 192.0.2.9 }"):
            done = lab.in_pod("nft", cmd)
            assert done.returncode == 0, done.stderr
        done = lab.in_pod(sys.executable, "-c", "from egressguard.backends.nftables import decode, transport\n"
                          "decode.held_intervals(transport.set_elements('egtest', 's'), 4)")
        assert done.returncode != 0 and "ValueError: an element with netlink attribute" in done.stderr, done.stderr
    finally:
        lab.in_pod("nft", "delete", "table", "inet", "egtest")


# Run in the pod: subscribe to nf_tables' notifications, say "ready", and after a line on stdin
# print how many NEWSETELEM / NEWRULE messages (per set name for elements) the commits in between sent.
MONITOR = textwrap.dedent("""
    import json, socket, struct, sys
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, 1 << (7 - 1)))  # NFNLGRP_NFTABLES
    print("ready", flush=True)
    sys.stdin.readline()
    sock.setblocking(False)
    seen = {"rules": 0, "elements": {}}
    while True:
        try:
            data = sock.recv(1 << 17)
        except BlockingIOError:
            break
        at = 0
        while at + 20 <= len(data):
            length, kind = struct.unpack_from("=IH", data, at)
            if kind == (10 << 8 | 6):  # NFT_MSG_NEWRULE
                seen["rules"] += 1
            elif kind == (10 << 8 | 12):  # NFT_MSG_NEWSETELEM: which set
                p = at + 20
                while p + 4 <= at + length:
                    size, attr = struct.unpack_from("=HH", data, p)
                    if attr & 0x3FFF == 2:  # NFTA_SET_ELEM_LIST_SET
                        name = data[p + 4:p + size].rstrip(b"\\0").decode()
                        seen["elements"][name] = seen["elements"].get(name, 0) + 1
                    p += (size + 3) & ~3
            at += (length + 3) & ~3
    print(json.dumps(seen))
""")


def _commits_during(lab: Lab, *argv: str) -> dict[str, Any]:
    """What nf_tables announced while `egressguard apply` ran (the monitor subscribed first)."""
    monitor = subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, "-c", MONITOR],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert monitor.stdout is not None and monitor.stdout.readline().strip() == "ready"
        done = lab.egressguard(*argv, env={"EGRESSGUARD_BACKEND": "nftables"})
        assert done.returncode == 0, done.stderr[-1500:]
        out, _ = monitor.communicate("go\n", timeout=30)
    finally:
        monitor.kill()
    return json.loads(out)


def _named(seen: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in seen["elements"].items() if not k.startswith("__set")}


def test_a_reapply_leaves_a_set_holding_its_members_and_refills_a_tampered_one(module_lab: Lab) -> None:
    lab = module_lab
    path = lab.write_policy(policy(allow=[{"cidr": f"198.18.1.{2 * i}/32", "ports": [5000]} for i in range(20)]))
    first = _commits_during(lab, "apply", "--policy", str(path))
    (name,) = _named(first)  # the new set, filled (rules' anonymous port sets are re-created with them)
    again = _commits_during(lab, "apply", "--policy", str(path))
    assert again["rules"] > 0 and _named(again) == {}, again  # rules replaced, the set left alone
    assert lab.in_pod("nft", "delete", "element", "inet", "egressguard", name, "{ 198.18.1.6 }").returncode == 0
    repaired = _commits_during(lab, "apply", "--policy", str(path))
    assert repaired["rules"] > 0 and name in _named(repaired), repaired
    assert lab.egressguard("verify", "--policy", str(path), env={"EGRESSGUARD_BACKEND": "nftables"}).returncode == 0
