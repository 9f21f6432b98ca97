"""`egressguard demo` (what `scripts/demo` runs): the built-in default policy in a throwaway pod,
real probes, every result as the default policy says, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_shows_every_probe_as_the_default_policy_says_and_cleans_up() -> None:
    before = _namespaces()
    env = {k: v for k, v in os.environ.items() if k != "EGRESSGUARD_BACKEND"}  # the default back end: auto
    done = subprocess.run([sys.executable, "-m", "egressguard", "demo"], capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("confined", "exempt", "root"))]
    assert len(rows) == 17 and not any("MISMATCH" in r for r in rows), done.stdout
    verdicts = {r[72:81].strip() for r in rows}  # the result column (who: 18, probe: 52)
    assert verdicts == {"allowed", "refused", "proxied"}, rows
    assert _namespaces() == before
