"""The forwarder's hand-written nf_tables netlink (transport.TimedElements) against the reference
tool: what it adds is what `nft` itself adds for the same script, element for element and timeout
for timeout, as `nft list set` shows them; a batch the kernel refuses changes nothing."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from test_nftables_plan import _in_fresh_netns

SETS = """add table inet egressguard
add set inet egressguard ours4 { type ipv4_addr; flags timeout; }
add set inet egressguard ref4 { type ipv4_addr; flags timeout; }
add set inet egressguard ours6 { type ipv6_addr; flags timeout; }
add set inet egressguard ref6 { type ipv6_addr; flags timeout; }
"""


def _listed(name: str) -> dict[str, int]:
    """address -> timeout in seconds, as `nft -j list set` shows set `name`."""
    out = subprocess.run(["nft", "-j", "list", "set", "inet", "egressguard", name], check=True,
                         capture_output=True, text=True).stdout
    found = {}
    for obj in json.loads(out)["nftables"]:
        for elem in obj.get("set", {}).get("elem", []):
            found[elem["elem"]["val"]] = elem["elem"]["timeout"]
    return found


def _both_ways(batches: list[list[tuple[str, str, int]]]) -> dict[str, Any]:
    """Each batch added to the ours* sets by TimedElements and to the ref* sets by libnftables
    (the script KernelSets ran before: add, delete, add with the timeout); what nft lists."""
    from egressguard.backends.nftables.transport import Nft, TimedElements  # noqa: PLC0415

    with Nft() as nft:
        nft.run(SETS)
        elements = TimedElements("egressguard")
        try:
            for batch in batches:
                elements.add([(f"ours{name}", addr, ttl) for name, addr, ttl in batch])
                lines = []
                for name, addr, ttl in batch:
                    lines += [f"add element inet egressguard ref{name} {{ {addr} }}",
                              f"delete element inet egressguard ref{name} {{ {addr} }}",
                              f"add element inet egressguard ref{name} {{ {addr} timeout {ttl}s }}"]
                nft.run("\n".join(lines) + "\n")
        finally:
            elements.close()
    return {name: _listed(name) for name in ("ours4", "ref4", "ours6", "ref6")}


def test_netlink_elements_are_what_nft_adds_with_their_timeouts() -> None:
    got = _in_fresh_netns(lambda: _both_ways([
        [("4", "198.51.100.7", 300), ("4", "203.0.113.9", 45), ("6", "2001:db8::7", 3600)],
        [("4", "198.51.100.8", 30)],
    ]))
    assert got["ours4"] == got["ref4"] == {"198.51.100.7": 300, "203.0.113.9": 45, "198.51.100.8": 30}
    assert got["ours6"] == got["ref6"] == {"2001:db8::7": 3600}


def test_a_batch_larger_than_one_transaction_is_added_whole() -> None:
    many = [("4", f"198.18.{i // 250}.{i % 250}", 60 + i % 7) for i in range(1300)]  # three transactions
    got = _in_fresh_netns(lambda: _both_ways([many]))
    assert got["ours4"] == got["ref4"] and len(got["ours4"]) == 1300


def test_an_address_already_held_takes_the_new_timeout_as_with_nft() -> None:
    got = _in_fresh_netns(lambda: _both_ways([
        [("4", "198.51.100.7", 300), ("4", "198.51.100.9", 60)],
        [("4", "198.51.100.7", 30), ("4", "198.51.100.9", 600)],
    ]))
    assert got["ours4"] == got["ref4"] == {"198.51.100.7": 30, "198.51.100.9": 600}


def _refused_batch() -> dict[str, Any]:
    from egressguard.backends.nftables.transport import Nft, NftablesError, TimedElements  # noqa: PLC0415

    with Nft() as nft:
        nft.run(SETS)
    elements = TimedElements("egressguard")
    try:
        try:
            elements.add([("ours4", "198.51.100.7", 60), ("missing4", "198.51.100.8", 60)])
            refused = ""
        except NftablesError as exc:
            refused = str(exc)
        after_refusal = _listed("ours4")
        elements.add([("ours4", "198.51.100.9", 60)])  # the socket still works for the next batch
        return {"refused": refused, "after_refusal": after_refusal, "after_next": _listed("ours4")}
    finally:
        elements.close()


def test_a_batch_naming_a_missing_set_is_refused_whole_and_the_next_one_commits() -> None:
    got = _in_fresh_netns(_refused_batch)
    assert "No such file or directory" in got["refused"]
    assert got["after_refusal"] == {}
    assert got["after_next"] == {"198.51.100.9": 60}


def _read_back() -> tuple[list[tuple[str, int]], dict[str, int], bool]:
    """What transport.timed_elements reads (a restarted forwarder's seed), with nft's own listing."""
    from egressguard.backends.nftables.transport import Nft, timed_elements  # noqa: PLC0415

    with Nft() as nft:
        nft.run(SETS + "add element inet egressguard ours4 { 198.51.100.7 timeout 300s, 203.0.113.9 timeout 45s }\n"
                "add element inet egressguard ours6 { 2001:db8::7 timeout 3600s }\n")
    out = subprocess.run(["nft", "-j", "list", "table", "inet", "egressguard"], check=True, capture_output=True,
                         text=True).stdout
    expires = {e["elem"]["val"]: e["elem"]["expires"] for o in json.loads(out)["nftables"]
               for e in o.get("set", {}).get("elem", [])}
    return (timed_elements("egressguard", "ours4") or []) + (timed_elements("egressguard", "ours6") or []), \
        expires, timed_elements("egressguard", "nosuch") is None


def test_timed_elements_reads_each_address_with_its_time_left_rounded_up() -> None:
    got, expires, gone = _in_fresh_netns(_read_back)
    assert {addr for addr, _ in got} == set(expires) == {"198.51.100.7", "203.0.113.9", "2001:db8::7"}
    timeouts = {"198.51.100.7": 300, "203.0.113.9": 45, "2001:db8::7": 3600}
    for addr, left in got:
        assert expires[addr] <= left <= timeouts[addr], (addr, left, expires[addr])
    assert gone, "a missing set reads as None"
