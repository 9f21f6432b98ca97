"""Named interval sets on the nftables back end with real traffic: 10,000 entries per family, and
re-apply under continuous attempts (a kept destination never refused, a removed one never reached
once the apply that removed it has returned; counts printed)."""

from __future__ import annotations

import json

import pytest
from egtraffic import FAST, applied, reached, stopped
from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_sets_traffic import PORT, N, add_world_hosts, list_policy, neighbour4, neighbour6, reapply_under_traffic, v4, v6

from egressguard.lab import Lab

pytestmark = pytest.mark.netns


def nft_sets(lab: Lab) -> dict[str, int]:
    out = lab.in_pod("nft", "-j", "list", "table", "inet", "egressguard", check=True).stdout
    return {o["set"]["name"]: len(o["set"].get("elem", [])) for o in json.loads(out)["nftables"] if "set" in o}


def test_ten_thousand_entries_per_family_in_two_interval_sets(lab: Lab) -> None:
    picks = [0, N // 2, N - 1]
    hosts4 = [v4(i) for i in picks]
    hosts6 = [v6(i) for i in picks]
    add_world_hosts(lab, *hosts4, *map(neighbour4, hosts4), *hosts6, *map(neighbour6, hosts6))
    applied(lab, list_policy(lab, [v4(i) for i in range(N)] + [v6(i) for i in range(N)]))

    assert sorted(nft_sets(lab).values()) == [N, N]
    for host in hosts4 + hosts6:
        assert reached(lab.tcp(host, PORT, timeout=FAST), host), host
        stopped(lab, "tcp", host, 22)  # 22 is not in the list's ports
    for host in [neighbour4(h) for h in hosts4] + [neighbour6(h) for h in hosts6]:
        stopped(lab, "tcp", host, PORT)  # the host is not listed
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0


ROUNDS = 8


def test_reapply_keeps_kept_destinations_and_closes_removed_ones_under_traffic(lab: Lab, figures: list[str]) -> None:
    """Each apply swaps the list between two versions (different set names, so each apply creates
    a new set and deletes the old one) while two threads keep connecting."""
    attempts, failures, leaks = reapply_under_traffic(lab, rounds=ROUNDS)
    line = (f"nftables re-apply under traffic: {2 * ROUNDS} applies, kept {attempts['kept']} attempts "
            f"{len(failures)} refused; removed {attempts['removed_after_apply']} attempts after its apply "
            f"{len(leaks)} reached")
    figures.append(line)
    print(line)
    assert attempts["kept"] > 20 and attempts["removed_after_apply"] > 5, attempts
    assert failures == []
    assert leaks == []
    assert len(nft_sets(lab)) == 2  # the previous list's sets are gone
