"""Learned ipsets (iptables back end, dns.mode proxy) are created with room for the addresses a busy
forwarder learns: the kernel grows a full hash table inside the add, waiting for an RCU grace period
while every answer queued behind that add waits too (bench/RESULTS.md, run Q)."""

from __future__ import annotations

import re
import subprocess

from test_nftables_plan import _in_fresh_netns


def _created_and_filled() -> dict[str, str]:
    from egressguard.backends.iptables.backend import ensure_learned  # noqa: PLC0415
    from egressguard.backends.iptables.sets import Ipsets  # noqa: PLC0415
    from egressguard.ruleset import LearnedSet  # noqa: PLC0415

    want = LearnedSet(name="egressguard-d4-0123456789ab", family=4, host="*.example.com")
    with Ipsets() as ipsets:
        ensure_learned(ipsets, want)
        before = subprocess.run(["ipset", "list", "-t", want.name], check=True, capture_output=True, text=True).stdout
        for at in range(0, 3000, 500):  # as many addresses as the bench learns in 3 s at 1,000 new names/s
            ipsets.add_timed(want.name, [(f"198.18.{i // 250}.{i % 250}", 300) for i in range(at, at + 500)])
        after = subprocess.run(["ipset", "list", "-t", want.name], check=True, capture_output=True, text=True).stdout
    return {"before": before, "after": after}


def _hashsize(listing: str) -> int:
    return int(re.search(r"hashsize (\d+) ", listing).group(1))  # type: ignore[union-attr]


def test_learned_ipset_holds_thousands_of_addresses_without_growing_its_table() -> None:
    got = _in_fresh_netns(_created_and_filled)
    assert "Number of entries: 3000" in got["after"], got["after"]
    assert _hashsize(got["before"]) >= 2048
    assert _hashsize(got["after"]) == _hashsize(got["before"])  # never grown: no stall inside an add
