"""Named sets on the nftables back end (a hash of addresses, or intervals where a list holds
networks) with real traffic: 10,000 entries per family, and re-apply under continuous attempts
(a kept destination never refused, a removed one never reached once the apply that removed it
has returned; counts printed)."""

from __future__ import annotations

import json

import pytest
from egtraffic import FAST, applied, reached, stopped
from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_sets_traffic import PORT, N, add_world_hosts, list_policy, neighbour4, neighbour6, reapply_under_traffic, v4, v6

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

# The module's pod shape (tests/conftest.py): not eth0, so the guard is shown not to depend on it.
LAB_TOPOLOGIES = [{"iface": "veth1a2b3c4d", "second_iface": "tun0"}]


def nft_sets(lab: Lab) -> dict[str, int]:
    return {name: n for name, (n, _flags) in nft_set_kinds(lab).items()}


def nft_set_kinds(lab: Lab) -> dict[str, tuple[int, list[str]]]:
    """Our sets as the kernel lists them: name -> (element count, flags)."""
    out = lab.in_pod("nft", "-j", "list", "table", "inet", "egressguard", check=True).stdout
    return {o["set"]["name"]: (len(o["set"].get("elem", [])), o["set"].get("flags", []))
            for o in json.loads(out)["nftables"] if "set" in o}


# Networks beside the 10,000 addresses: the list then needs an interval set (a hash holds addresses only).
NETWORKS = {"198.19.0.0/24": "198.19.0.7", "2001:db8:4::/64": "2001:db8:4::7"}


@pytest.mark.parametrize("networks", [False, True], ids=["addresses: hash sets", "with networks: interval sets"])
def test_ten_thousand_entries_per_family_in_two_sets(lab: Lab, networks: bool) -> None:
    picks = [0, N // 2, N - 1]
    hosts4 = [v4(i) for i in picks]
    hosts6 = [v6(i) for i in picks]
    inside = list(NETWORKS.values()) if networks else []
    add_world_hosts(lab, *hosts4, *map(neighbour4, hosts4), *hosts6, *map(neighbour6, hosts6), *inside)
    listed = [v4(i) for i in range(N)] + [v6(i) for i in range(N)] + (list(NETWORKS) if networks else [])
    applied(lab, list_policy(lab, listed))

    kinds = sorted(nft_set_kinds(lab).values())
    assert kinds == ([(N + 1, ["interval"])] * 2 if networks else [(N, [])] * 2), kinds
    for host in hosts4 + hosts6 + inside:
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
