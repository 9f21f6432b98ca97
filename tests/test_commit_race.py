"""A commit that races another writer is rebuilt and retried: a writer that takes no lock keeps
changing both families' filter tables while egressguard re-applies; apply sees EAGAIN, retries,
and every apply ends with exactly its policy (and the writer's chain untouched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from egtraffic import policy

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

WRITER = str(Path(__file__).parent / "race_writer.py")
A = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}])
B = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22, 443]},
                  {"cidr": "203.0.113.11/32", "ports": [80]}])
MAX_APPLIES = 30


def _retries(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines() if line.startswith("{") and json.loads(line).get("event") == "commit_retried")


def test_apply_racing_a_lock_free_writer_retries_and_ends_exact(lab: Lab, figures: list[str]) -> None:
    paths = {"A": lab.write_policy(A, "a.yaml"), "B": lab.write_policy(B, "b.yaml")}
    writer = subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, WRITER, "60"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    retries = applies = 0
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        while applies < MAX_APPLIES and (retries == 0 or applies < 6):
            name = "AB"[applies % 2]
            done = lab.egressguard("apply", "--policy", str(paths[name]))
            assert done.returncode == 0, done.stderr[-1500:]
            retries += _retries(done.stderr)
            applies += 1
    finally:
        assert writer.stdin is not None
        writer.stdin.close()  # the writer's cue to stop
        assert writer.stdout is not None
        out = writer.stdout.read()
        writer.wait(timeout=30)
    landed = int(out.split()[-1]) if out.strip() else 0
    figures.append(f"commit race: {applies} applies against a lock-free writer ({landed} foreign commits), "
                   f"{retries} commit retries, 0 failures")
    assert landed > 0, "the writer never committed: nothing raced"
    assert retries > 0, f"{applies} applies raced {landed} foreign commits without one retry: the race was not produced"
    last = "AB"[(applies - 1) % 2]
    verify = lab.egressguard("verify", "--policy", str(paths[last]))
    assert verify.returncode == 0, verify.stderr[-1500:]
    assert "-N FOREIGN" in lab.in_pod("iptables-legacy-save").stdout.replace(":FOREIGN", "-N FOREIGN")
