"""`egressguard demo` (what `scripts/demo` runs): the built-in default policy in a throwaway pod,
real probes, every result as the default policy says, and nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns


def _namespaces(prefix: str) -> set[str]:
    """Namespaces whose name starts with `prefix` (other suites build and remove their own meanwhile)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(prefix)}


def test_demo_shows_every_probe_as_the_default_policy_says_and_cleans_up() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EGRESSGUARD_BACKEND"}  # the default back end: auto
    proc = subprocess.Popen([sys.executable, "-m", "egressguard", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its pid
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr[-2000:]
    rows = [line for line in stdout.splitlines() if line.startswith(("confined", "exempt", "root"))]
    assert len(rows) == 17 and not any("MISMATCH" in r for r in rows), stdout
    verdicts = {r[72:81].strip() for r in rows}  # the result column (who: 18, probe: 52)
    assert verdicts == {"allowed", "refused", "proxied"}, rows
    # The demo's lab names its namespaces egdemo<its pid>x<n>-pod/-world and prints them: exactly
    # those, and nothing else of this run, are gone.
    tag = f"egdemo{proc.pid % 100000}x"
    m = re.search(r"pod namespace (\S+) <-> world namespace (\S+)", stdout)
    assert m and all(name.startswith(tag) for name in m.groups()), stdout[:500]
    assert _namespaces(tag) == set()
    assert not any((Path("/etc/netns") / name).exists() for name in m.groups())
