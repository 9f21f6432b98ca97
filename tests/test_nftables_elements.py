"""The forwarder's hand-written nf_tables netlink (transport.TimedElements) against the reference
tool: what it adds is what `nft` itself adds for the same script, element for element and timeout
for timeout, as `nft list set` shows them; a batch the kernel refuses changes nothing."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------
# transport.SetRefill: a tampered set's flush and refill, one netlink transaction, without
# libnftables (which fetches an interval set's 10,000 elements first). Its bytes against nft's.

_DELSETELEM, _NEWSETELEM, _SET_ID, _ELEMENTS = 0xA0E, 0xA0C, 4, 3
REFILLED = {  # set name -> (family, members as the Ruleset holds them)
    "h4": (4, ("198.18.0.1/32", "198.51.100.7/32")),
    "i4": (4, ("198.18.0.0/31", "198.51.100.7/32", "203.0.113.0/29", "203.0.113.8/31", "240.0.0.0/4")),
    "z4": (4, ("0.0.0.0/8", "192.0.2.0/24")),  # an interval from address 0: no leading end element
    "h6": (6, ("2001:db8::1/128", "2001:db8::ff/128")),
    "i6": (6, ("2001:db8::/32", "8000::/1")),  # open to the top
}


def _address_set(name: str) -> Any:
    from egressguard.ruleset import AddressSet  # noqa: PLC0415

    family, members = REFILLED[name]
    return AddressSet(name, family, members)  # type: ignore[arg-type]


def _declarations() -> str:
    from egressguard.backends.nftables import render  # noqa: PLC0415

    lines = ["add table inet egressguard"]
    for name in REFILLED:
        st = _address_set(name)
        typ = "ipv6_addr" if st.family == 6 else "ipv4_addr"
        lines.append(f"add set inet egressguard {name} {{ type {typ};{''.join(f' flags {f};' for f in render.set_flags(st))} }}")
    return "\n".join(lines) + "\n"


def _messages(blob: bytes) -> list[tuple[int, int, bytes]]:
    """(netlink type, netlink flags, payload after nfgenmsg) of each message in `blob`."""
    out, at = [], 0
    while at + 20 <= len(blob):
        length, kind, flags = struct.unpack_from("=IHH", blob, at)
        out.append((kind, flags, blob[at + 16:at + length]))
        at += (length + 3) & ~3
    return out


def _strace_sent(path: str) -> list[bytes]:
    """The data of each buffer a process sent, from `strace -e write=all`'s hex dumps."""
    blobs: list[bytes] = []
    for line in open(path, encoding="utf-8"):
        m = re.search(r"\| ([0-9a-f]{5})  ((?:[0-9a-f]{2} {1,2}){1,16})", line)
        if m:
            if m.group(1) == "00000":
                blobs.append(b"")
            blobs[-1] += bytes.fromhex(m.group(2).replace(" ", ""))
    return blobs


def _element_messages(blobs: list[bytes]) -> list[tuple[int, int, bytes, dict[int, bytes], list[bytes]]]:
    """The DELSETELEM / NEWSETELEM messages in `blobs`: type, flags without NLM_F_ACK, nfgenmsg,
    attributes other than the element list and nft's set id (the kernel finds a set by its name
    first), and the elements one by one."""
    from egressguard.backends.nftables.transport import attributes  # noqa: PLC0415

    out = []
    for blob in blobs:
        for kind, flags, payload in _messages(blob):
            if kind not in (_DELSETELEM, _NEWSETELEM):
                continue
            attrs = dict(attributes(payload[4:]))
            elements = [bytes(e) for _, e in attributes(attrs.pop(_ELEMENTS, b""))]
            attrs.pop(_SET_ID, None)
            out.append((kind, flags & ~0x4, payload[:4], attrs, elements))
    return out


class _Recording:
    """A socket that keeps a copy of what is sent through it."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.sent = sock, []

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.sock, attr)

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return int(self.sock.send(data))


def _refilled_both_ways(tmp: str) -> dict[str, Any]:
    """Each set refilled by `nft` (under strace) and then, flushed, by SetRefill (its socket's sends
    recorded): the element messages each sent and the kernel's dump after each."""
    from egressguard.backends.nftables import render  # noqa: PLC0415
    from egressguard.backends.nftables.transport import Nft, SetRefill, set_elements  # noqa: PLC0415

    with Nft() as nft:
        nft.run(_declarations())
    got: dict[str, Any] = {}
    for name in REFILLED:
        st = _address_set(name)
        trace = f"{tmp}/{name}.strace"
        script = (f"flush set inet egressguard {name}\n"
                  f"add element inet egressguard {name} {{ {', '.join(render.elements(st))} }}\n")
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=sendmsg", "-e", "write=all", "-o", trace,
                        "nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)
        by_nft = set_elements("egressguard", name)
        subprocess.run(["nft", "flush", "set", "inet", "egressguard", name], check=True)
        with SetRefill("egressguard") as writer:
            recording = _Recording(writer.sock)
            writer.sock = recording  # type: ignore[assignment]
            writer.refill([(name, render.encoded_elements(st))])
        sent = recording.sent
        got[name] = {"nft": _element_messages(_strace_sent(trace)), "ours": _element_messages(sent),
                     "nft_dump": by_nft, "our_dump": set_elements("egressguard", name)}
    return got


def test_a_refill_sends_the_bytes_nft_sends_and_leaves_what_nft_leaves(tmp_path: Path) -> None:
    got = _in_fresh_netns(lambda: _refilled_both_ways(str(tmp_path)))
    for name, seen in got.items():
        assert seen["nft"] and seen["nft"] == seen["ours"], name
        assert [m[0] for m in seen["ours"]] == [_DELSETELEM, _NEWSETELEM], name  # a flush, then the elements
        assert seen["nft_dump"] == seen["our_dump"] and seen["our_dump"], name
    assert len(got["i4"]["ours"][1][4]) == 1 + 2 * 3 + 1  # end at 0, three closed intervals, one open start


def _big_refill() -> dict[str, Any]:
    """10,000 IPv4 intervals and 3,000 IPv6 ones (a batch of ~640 KB, over three times the default
    send buffer; many messages per set), refilled by nft into ref* and by SetRefill into ours*, and a
    refill naming a missing set beside ours4, which must change nothing."""
    from egressguard.backends.nftables import decode, render  # noqa: PLC0415
    from egressguard.backends.nftables.transport import Nft, NftablesError, SetRefill, set_elements  # noqa: PLC0415
    from egressguard.ruleset import AddressSet  # noqa: PLC0415

    v4 = tuple(f"198.18.{i // 64}.{i % 64 * 4}/31" for i in range(10_000))
    v6 = tuple(f"2001:db8:{i:x}::/48" for i in range(0, 6000, 2))
    sets = {f"{who}{f}": AddressSet(f"{who}{f}", f, m) for who in ("ours", "ref") for f, m in ((4, v4), (6, v6))}
    with Nft() as nft:
        nft.run("add table inet egressguard\n" + "".join(
            f"add set inet egressguard {n} {{ type {'ipv6_addr' if st.family == 6 else 'ipv4_addr'}; flags interval; }}\n"
            for n, st in sets.items()))
        nft.run("".join(f"add element inet egressguard {n} {{ {', '.join(render.elements(st))} }}\n"
                        for n, st in sets.items() if n.startswith("ref")))
        nft.run("add element inet egressguard ours4 { 192.0.2.0/24 }\n")  # what the refill must remove
    with SetRefill("egressguard") as writer:
        writer.refill([(n, render.encoded_elements(st)) for n, st in sets.items() if n.startswith("ours")])
        held = {n: set_elements("egressguard", n) for n in sets}
        try:
            writer.refill([("ours4", render.encoded_elements(sets["ours4"])[:4]), ("missing", [])])
            refused = ""
        except NftablesError as exc:
            refused = str(exc)
    return {"same": {f: held[f"ours{f}"] == held[f"ref{f}"] for f in (4, 6)},
            "exact": {f: decode.holds_exactly(sets[f"ours{f}"], held[f"ours{f}"]) for f in (4, 6)},
            "refused": refused, "after_refusal": set_elements("egressguard", "ours4") == held["ours4"]}


def test_a_refill_of_ten_thousand_intervals_is_one_transaction_holding_what_nft_holds() -> None:
    got = _in_fresh_netns(_big_refill)
    assert got["same"] == {4: True, 6: True} and got["exact"] == {4: True, 6: True}, got
    assert "No such file or directory" in got["refused"] and got["after_refusal"], got
