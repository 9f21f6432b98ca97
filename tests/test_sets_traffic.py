"""Kernel sets with real traffic: a 10,000-entry list per family, re-apply under load, reset."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from egtraffic import FAST, applied, policy, reached, stopped

from egressguard.lab import CONFINED, Lab

pytestmark = pytest.mark.netns

# Pod shapes, one per test in turn (tests/conftest.py): the guard must not depend on eth0.
LAB_TOPOLOGIES = [{"iface": "net1"}, {"iface": "eth0"}]

N = 10_000
PORT = 5000  # a world TCP listener


def v4(i: int) -> str:
    """Entry i of the IPv4 list: every even address from 198.18.0.2 on; odd ones are neighbours."""
    n = 2 * i + 2
    return f"198.18.{n // 256}.{n % 256}"


def v6(i: int) -> str:
    return f"2001:db8:3::{2 * i + 2:x}"


def neighbour4(addr: str) -> str:
    head, last = addr.rsplit(".", 1)
    return f"{head}.{int(last) + 1}"


def neighbour6(addr: str) -> str:
    head, last = addr.rsplit(":", 1)
    return f"{head}:{int(last, 16) + 1:x}"


def add_world_hosts(lab: Lab, *addrs: str) -> None:
    """More world hosts on the world's lo (the lab's own namespace; its listeners bind every address)."""
    for a in addrs:
        plen = 128 if ":" in a else 32
        extra = ["nodad"] if ":" in a else []
        subprocess.run(["ip", "-n", lab.world, "addr", "add", f"{a}/{plen}", "dev", "lo", *extra],
                       check=True, capture_output=True)


def list_policy(lab: Lab, addrs: list[str], name: str = "list.txt") -> dict[str, object]:
    path: Path = lab.workdir / name
    path.write_text("".join(f"{a}\n" for a in addrs))
    path.chmod(0o644)
    return policy(allow=[{"allow_file": str(path), "ports": [PORT]}])


def ipsets(lab: Lab) -> list[str]:
    return lab.in_pod("ipset", "list", "-n", check=True).stdout.split()


def test_ten_thousand_entries_per_family_first_middle_last_reachable_neighbours_refused(lab: Lab) -> None:
    picks = [0, N // 2, N - 1]
    hosts4 = [v4(i) for i in picks]
    hosts6 = [v6(i) for i in picks]
    add_world_hosts(lab, *hosts4, *map(neighbour4, hosts4), *hosts6, *map(neighbour6, hosts6))
    applied(lab, list_policy(lab, [v4(i) for i in range(N)] + [v6(i) for i in range(N)]))

    assert len([s for s in ipsets(lab) if s.startswith("egressguard-")]) == 2
    for host in hosts4 + hosts6:
        assert reached(lab.tcp(host, PORT, timeout=FAST), host), host
        stopped(lab, "tcp", host, 22)  # 22 is not in the list's ports
    for host in [neighbour4(h) for h in hosts4] + [neighbour6(h) for h in hosts6]:
        stopped(lab, "tcp", host, PORT)  # the host is not listed
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0


def test_reset_leaves_no_set_behind(lab: Lab) -> None:
    applied(lab, list_policy(lab, [v4(i) for i in range(100)] + [v6(i) for i in range(100)]))
    assert any(s.startswith("egressguard-") for s in ipsets(lab))
    assert lab.egressguard("reset").returncode == 0
    assert ipsets(lab) == []


def test_reapplying_the_same_list_keeps_the_same_sets(lab: Lab) -> None:
    pol = list_policy(lab, [v4(i) for i in range(500)])
    applied(lab, pol)
    before = ipsets(lab)
    applied(lab, pol)
    assert ipsets(lab) == before


def test_verify_notices_a_member_removed_behind_its_back(lab: Lab) -> None:
    applied(lab, list_policy(lab, [v4(i) for i in range(100)]))
    (name,) = [s for s in ipsets(lab) if s.startswith("egressguard-")]
    lab.in_pod("ipset", "del", name, f"{v4(7)}/32", check=True)
    done = lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml"))
    assert done.returncode == 5, done.stderr[-500:]
    assert "1 missing" in done.stderr


HOLDS = """
import json, sys
from egressguard.ruleset import AddressSet
from egressguard.backends.iptables.sets import Ipsets
name, family, members = json.loads(sys.argv[1])
with Ipsets() as ipsets:
    print(ipsets.holds(AddressSet(name, family, tuple(members))))
"""


def test_apply_read_back_compares_every_member_of_a_set(lab: Lab) -> None:
    """apply's read-back (`Ipsets.holds`) compares member by member: one member swapped for
    another, the count unchanged, is a difference; so is a missing set."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    members = [f"{v4(i)}/32" for i in range(100)]
    applied(lab, list_policy(lab, [v4(i) for i in range(100)]))
    (name,) = [s for s in ipsets(lab) if s.startswith("egressguard-")]

    def holds(name: str, members: list[str]) -> str:
        out = lab.in_pod(sys.executable, "-c", HOLDS, json.dumps([name, 4, sorted(members, key=_key)]), check=True)
        return out.stdout.strip()

    assert holds(name, members) == "True"
    lab.in_pod("ipset", "del", name, f"{v4(7)}/32", check=True)
    lab.in_pod("ipset", "add", name, f"{neighbour4(v4(7))}/32", check=True)
    assert holds(name, members) == "False"
    assert holds("egressguard-4-absent", members) == "None"


def _key(member: str) -> tuple[int, ...]:
    addr, _, plen = member.partition("/")
    return (*map(int, addr.split(".")), int(plen))


def reapply_under_traffic(lab: Lab, rounds: int) -> tuple[dict[str, int], list[str], list[str]]:
    """Switch between a list with and a list without one destination, `rounds` times each way,
    while two threads keep connecting as the confined uid: (attempts, kept destinations refused,
    the removed destination reached after the apply that removed it had returned). Attempts:
    `kept`, `removed`, and `removed_after_apply` (the removed one tried only after that apply).
    Each window is closed by events, not by time: at least five attempts on the removed destination
    after the apply that removed it, and one that reaches it after the apply that put it back."""
    kept4, kept6, removed = v4(1), v6(1), v4(2)
    add_world_hosts(lab, kept4, kept6, removed)
    base = [v4(i) for i in range(3, 2000)] + [v6(i) for i in range(3, 2000)]
    with_removed = list_policy(lab, [kept4, kept6, removed, *base], "a.txt")
    without = list_policy(lab, [kept4, kept6, *base, v4(5000)], "b.txt")
    applied(lab, with_removed)

    failures: list[str] = []
    leaks: list[str] = []
    stop = threading.Event()
    removed_since: list[float] = []  # when the current "without" apply returned (empty: removed is allowed)
    back_since: list[float] = [0.0]  # when the last "with" apply returned
    attempts = {"kept": 0, "removed": 0, "removed_after_apply": 0, "reached_after_readd": 0}
    progress = threading.Condition()

    def keep_trying() -> None:
        while not stop.is_set() and attempts["kept"] < 100_000:
            for host in (kept4, kept6):
                res = lab.tcp(host, PORT, uid=CONFINED, timeout=FAST)
                attempts["kept"] += 1
                if not reached(res, host):
                    failures.append(f"{host}: {res}")

    def try_removed() -> None:
        while not stop.is_set() and attempts["removed"] < 100_000:
            started = time.monotonic()
            window = list(removed_since)
            back = back_since[0]
            res = lab.tcp(removed, PORT, uid=CONFINED, timeout=FAST)
            with progress:
                attempts["removed"] += 1
                if window and started > window[0] and removed_since == window:
                    attempts["removed_after_apply"] += 1
                    if reached(res, removed):
                        leaks.append(str(res))
                elif not window and not removed_since and started > back and reached(res, removed):
                    attempts["reached_after_readd"] += 1
                progress.notify_all()

    def wait_for(key: str, at_least: int) -> None:
        with progress:
            assert progress.wait_for(lambda: attempts[key] >= at_least or stop.is_set(), timeout=30), (key, attempts)

    threads = [threading.Thread(target=keep_trying), threading.Thread(target=try_removed)]
    for t in threads:
        t.start()
    try:
        for _ in range(rounds):
            applied(lab, without)
            removed_since[:] = [time.monotonic()]
            wait_for("removed_after_apply", attempts["removed_after_apply"] + 5)
            removed_since.clear()
            applied(lab, with_removed)
            back_since[0] = time.monotonic()
            wait_for("reached_after_readd", attempts["reached_after_readd"] + 1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    return attempts, failures, leaks


def test_reapply_with_a_changed_list_under_continuous_attempts(lab: Lab) -> None:
    """Kept destinations are never refused while the list changes; a removed one is never reached
    once the apply that removed it has returned."""
    attempts, failures, leaks = reapply_under_traffic(lab, rounds=3)
    assert attempts["kept"] > 20 and attempts["removed"] > 5, attempts
    assert failures == []
    assert leaks == []


def test_a_set_no_rule_uses_any_more_is_destroyed_on_reapply(lab: Lab) -> None:
    applied(lab, list_policy(lab, [v4(i) for i in range(100)]))
    (old,) = [s for s in ipsets(lab) if s.startswith("egressguard-")]
    applied(lab, list_policy(lab, [v4(i) for i in range(100, 200)]))
    (new,) = [s for s in ipsets(lab) if s.startswith("egressguard-")]
    assert new != old and old not in ipsets(lab)


def test_a_tampered_set_is_repaired_in_place_by_apply(lab: Lab) -> None:
    """A member removed behind egressguard's back: the next apply swaps a full set in under the
    same name (the rules keep pointing at it) and the destination answers again."""
    addrs = [v4(i) for i in range(100)]
    add_world_hosts(lab, addrs[7])
    pol = list_policy(lab, addrs)
    applied(lab, pol)
    assert reached(lab.tcp(addrs[7], PORT, timeout=FAST), addrs[7])
    (name,) = [s for s in ipsets(lab) if s.startswith("egressguard-")]
    lab.in_pod("ipset", "del", name, f"{addrs[7]}/32", check=True)
    stopped(lab, "tcp", addrs[7], PORT)
    applied(lab, pol)
    assert [s for s in ipsets(lab) if s.startswith("egressguard-")] == [name]
    assert reached(lab.tcp(addrs[7], PORT, timeout=FAST), addrs[7])
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0


def test_reset_destroys_every_egressguard_set_and_no_other(lab: Lab) -> None:
    applied(lab, list_policy(lab, [v4(i) for i in range(100)]))
    for name in ("egressguard-4-stale-new", "someone-elses"):
        lab.in_pod("ipset", "create", name, "hash:net", check=True)
    assert lab.egressguard("reset").returncode == 0
    assert ipsets(lab) == ["someone-elses"]
