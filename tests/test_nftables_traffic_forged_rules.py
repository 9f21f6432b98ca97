"""tests/test_traffic_forged_rules.py (issue 10's rules, judged by a world-side capture) on the
nftables back end: same probes, same expectations; its control (the live rule deleted) deletes
the nft rule instead of the iptables one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import test_traffic_forged_rules as suite
from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_traffic_forged_rules import *  # noqa: F403 - the suite's tests, collected again here

from egressguard.lab import Lab

LAB_TOPOLOGIES = [{"iface": "tun0"}]  # another shape than the iptables run


def _without_nft(lab: Lab, comment: str) -> None:
    """Delete the live rules with `comment` from our table, in the lab's pod only."""
    listing = json.loads(lab.in_pod("nft", "-j", "-a", "list", "table", "inet", "egressguard", check=True).stdout)
    found = [o["rule"] for o in listing["nftables"] if "rule" in o and o["rule"].get("comment") == comment]
    assert found, f"no rule with comment {comment}"
    for r in found:
        done = lab.in_pod("nft", "delete", "rule", "inet", "egressguard", r["chain"], "handle", str(r["handle"]))
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module", autouse=True)
def nft_control() -> Iterator[None]:
    saved = suite._without
    suite._without = _without_nft
    try:
        yield
    finally:
        suite._without = saved
