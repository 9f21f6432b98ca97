"""Run a real-traffic suite written for the iptables back end on the nftables back end: the same
test functions, imported into a test_nftables_* module, with EGRESSGUARD_BACKEND=nftables for every
egressguard the lab runs, and a check that the pod never used legacy x_tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from egressguard.lab import Lab


def legacy_tables(lab: Lab) -> list[str]:
    """x_tables tables the pod namespace has (an nftables-only run must create none)."""
    found = []
    for path in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        found += [f"{path}:{n}" for n in lab.in_pod("cat", path).stdout.split()]
    return found


def nft_tables(lab: Lab) -> list[str]:
    out = lab.in_pod("nft", "-j", "list", "tables", check=True).stdout
    return [f"{o['table']['family']} {o['table']['name']}" for o in json.loads(out)["nftables"] if "table" in o]


@pytest.fixture(scope="module", autouse=True)
def nftables_backend(module_lab: Lab) -> Iterator[None]:
    saved = os.environ.get("EGRESSGUARD_BACKEND")
    os.environ["EGRESSGUARD_BACKEND"] = "nftables"
    try:
        yield
        assert legacy_tables(module_lab) == [], "the nftables back end touched legacy x_tables"
    finally:
        if saved is None:
            os.environ.pop("EGRESSGUARD_BACKEND", None)
        else:
            os.environ["EGRESSGUARD_BACKEND"] = saved
