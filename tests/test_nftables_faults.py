"""SIGKILL `apply --backend nftables` at timed instants: one transaction per ruleset, so the table
holds one whole ruleset (the old or the new, both families), or on a first apply nothing at all;
never a mix. Confined traffic to a destination neither policy allows never gets out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from egtraffic import FAST, policy, reached, refused_fast
from nftbed import nft_tables

from egressguard.lab import EXEMPT, Lab

pytestmark = pytest.mark.netns

KILLS = 20
A = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}])
B = policy(allow=[{"cidr": "203.0.113.12/32", "ports": [22]}, {"cidr": "2001:db8:2::12/128", "ports": [22]},
                  *({"cidr": f"198.18.2.{i}/32", "ports": [22]} for i in range(20))])  # B also has a set
OUTSIDE = ("203.0.113.11", "2001:db8:2::11")  # allowed by neither


def _start(lab: Lab, path: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EGRESSGUARD_BACKEND": "nftables", "EGRESSGUARD_STATUS": str(lab.status_file)}
    # `ip netns exec` execs the command: the pid is egressguard's own
    return subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, "-m", "egressguard", "apply",
                             "--policy", path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _holds(lab: Lab, path: str) -> bool:
    done = lab.egressguard("verify", "--policy", path, env={"EGRESSGUARD_BACKEND": "nftables"})
    return done.returncode == 0


def _kill_after(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """True if the kill landed while apply was still running."""
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return alive


def _outside_refused(lab: Lab) -> None:
    for host in OUTSIDE:
        assert refused_fast(lab.tcp(host, 22, timeout=FAST)), host
        assert reached(lab.tcp(host, 22, uid=EXEMPT, timeout=FAST), host)  # control


def test_sigkill_during_a_first_apply_leaves_the_whole_ruleset_or_nothing(lab: Lab, figures: list[str]) -> None:
    path = str(lab.write_policy(A, "a.yaml"))
    tally = {"nothing": 0, "whole": 0, "finished": 0}
    for i in range(KILLS):
        assert lab.egressguard("reset", "--backend", "nftables").returncode == 0
        landed = _kill_after(_start(lab, path), 0.06 + 0.22 * i / KILLS)
        if "inet egressguard" not in nft_tables(lab):
            assert landed
            tally["nothing"] += 1
            assert reached(lab.tcp(OUTSIDE[0], 22, timeout=FAST), OUTSIDE[0])  # unguarded: nothing was changed
        else:
            assert _holds(lab, path), f"kill {i}: the table holds something other than the whole policy"
            tally["whole" if landed else "finished"] += 1
            _outside_refused(lab)
    figures.append(f"nftables first apply, SIGKILL at {KILLS} instants: {tally}")
    print(tally)
    assert tally["nothing"] and tally["whole"] + tally["finished"], tally  # the kills spanned the commit


def test_sigkill_during_a_reapply_leaves_the_old_or_the_new_ruleset(lab: Lab, figures: list[str]) -> None:
    a, b = str(lab.write_policy(A, "a.yaml")), str(lab.write_policy(B, "b.yaml"))
    done = lab.egressguard("apply", "--policy", a, env={"EGRESSGUARD_BACKEND": "nftables"})
    assert done.returncode == 0, done.stderr
    tally = {"old": 0, "new": 0}
    current, other = a, b
    for i in range(KILLS):
        _kill_after(_start(lab, other), 0.06 + 0.22 * i / KILLS)
        if _holds(lab, other):
            tally["new"] += 1
            current, other = other, current
        else:
            assert _holds(lab, current), f"kill {i}: neither the old nor the new policy, whole"
            tally["old"] += 1
        _outside_refused(lab)
    figures.append(f"nftables re-apply, SIGKILL at {KILLS} instants: {tally}")
    print(tally)
    assert tally["old"] and tally["new"], tally
