"""tests/test_apply_idempotent.py on the nftables back end. The same policy 20 times: the same
table, byte for byte. Going back to the first policy restores its table as a structure: nft lists
chains in the order they were made, so the nat chains a policy without a redirect removed come back
listed last; every chain, rule and set is the same."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from egtraffic import applied, apply_quick, stopped
from nftbed import legacy_tables, nftables_env  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_apply_idempotent import *  # noqa: F403 - the suite's tests, collected again here
from test_apply_idempotent import (
    FIRST,
    SECOND,
    test_each_owned_chain_and_jump_exists_once,
    test_going_back_to_the_first_policy_restores_its_exact_rules,
)

from egressguard.lab import Lab

LAB_TOPOLOGIES = [{"iface": "net1"}, {"iface": "tun0"}]  # the iptables suite runs on eth0

# iptables' chain names, and a text comparison that nft's listing order defeats: replaced below.
del test_each_owned_chain_and_jump_exists_once, test_going_back_to_the_first_policy_restores_its_exact_rules


@pytest.fixture(autouse=True)
def no_legacy_tables(lab: Lab) -> Iterator[None]:
    yield
    assert legacy_tables(lab) == [], "the nftables back end touched legacy x_tables"


def table(lab: Lab) -> dict[str, Any]:
    """`inet egressguard` as the kernel lists it: each chain with its rules, each set; no handles."""
    listed = json.loads(lab.in_pod("nft", "-j", "-s", "list", "table", "inet", "egressguard", check=True).stdout)
    out: dict[str, Any] = {}
    for obj in listed["nftables"]:
        kind, body = next(iter(obj.items()))
        if kind in ("chain", "set"):
            out[f"{kind} {body['name']}"] = {k: v for k, v in body.items() if k != "handle"}
        elif kind == "rule":
            out.setdefault(f"rules {body['chain']}", []).append({k: v for k, v in body.items() if k != "handle"})
    return out


def test_each_chain_and_base_jump_exists_once(lab: Lab) -> None:
    applied(lab, FIRST)
    apply_quick(lab, FIRST)
    listing = lab.in_pod("nft", "list", "table", "inet", "egressguard", check=True).stdout
    chains = [line.split()[1] for line in listing.splitlines() if line.strip().startswith("chain ")]
    assert len(chains) == len(set(chains)), chains
    for base, jumps in (("filter", ("dispatch4", "dispatch6")), ("nat", ("natdispatch4", "natdispatch6"))):
        rules = table(lab)[f"rules {base}"]
        assert [r["expr"][-1] for r in rules] == [{"jump": {"target": j}} for j in jumps], rules
    assert lab.in_pod("nft", "list", "tables").stdout.count("inet egressguard") == 1


def test_going_back_to_the_first_policy_restores_its_table(lab: Lab) -> None:
    applied(lab, FIRST)
    first = table(lab)
    apply_quick(lab, SECOND)
    assert table(lab) != first
    apply_quick(lab, FIRST)
    assert table(lab) == first
    stopped(lab, "tcp", "203.0.113.12", 22)
