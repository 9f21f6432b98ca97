"""The suite's own guards can fail: the host-safety check sees every kind of state egressguard writes,
and under CI=true a skipped container test fails the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# Each change is one kind of state egressguard can write; all of them are made in a throwaway
# namespace (unshare -n), never in the machine's own.
CHANGES = {
    "iptables-legacy-save": "iptables-legacy -A OUTPUT -d 192.0.2.1 -j DROP",
    "ip6tables-legacy-save": "ip6tables-legacy -t nat -N EGTEST",
    "nft list ruleset": "nft add table inet egtest",
    "ipset save": "ipset create egtest hash:net",
    "ip rule": "ip rule add uidrange 1000-1000 prohibit pref 1 proto 235",
    "ip -6 rule": "ip -6 rule add uidrange 1000-1000 prohibit pref 1 proto 235",
}

DETECT = """
import subprocess, sys
from conftest import host_state
before = host_state()
subprocess.run(sys.argv[1], shell=True, check=True, capture_output=True)
after = host_state()
print(",".join(k for k in before if after[k] != before[k]))
"""


@pytest.mark.netns
@pytest.mark.parametrize("kind", list(CHANGES))
def test_host_safety_check_sees_each_kind_of_change(kind: str) -> None:
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", DETECT, CHANGES[kind]], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == kind


FAKE = """
import pytest

@pytest.mark.docker
def test_container_thing():
    pytest.skip("no Docker daemon")

@pytest.mark.docker
@pytest.mark.skip(reason="DOCKER_HOST not set")  # as tests/docker/conftest.py marks them at collection
def test_container_marked_skip():
    pass

def test_plain_skip():
    pytest.skip("not relevant here")

@pytest.mark.docker
@pytest.mark.xfail(reason="known")
def test_container_xfail():
    assert False
"""


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(FAKE))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  docker: fake\n  netns: fake\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(HERE)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-rA",
                           "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


def test_under_ci_a_skipped_docker_test_fails_the_run(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "true")
    assert done.returncode == 1, done.stdout[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    # a skip in the test body fails the test; a skip mark fails its setup (an error)
    assert "1 failed" in summary and "1 error" in summary and "1 skipped" in summary and "1 xfailed" in summary, summary
    assert "CI=true: container test skipped (no Docker daemon): under CI every docker test must run" in done.stdout
    assert "CI=true: container test skipped (DOCKER_HOST not set): under CI" in done.stdout


def test_without_ci_a_skipped_docker_test_stays_a_skip(tmp_path: Path) -> None:
    done = _pytest(tmp_path, None)
    assert done.returncode == 0, done.stdout[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "3 skipped" in summary and "1 xfailed" in summary, summary


# -- pod topologies ---------------------------------------------------------------------------------
# A suite that probes traffic runs on at least one pod shape other than the default one-`eth0` pod
# (LAB_TOPOLOGIES, which tests/conftest.py samples, or labs it builds with another `iface`), so a rule
# that only works on eth0 shows somewhere. Suites written before this rule are listed with why they
# stay on eth0; a new suite is not listed, so it cannot run only on eth0 without someone saying so.

PROBES = re.compile(r"\b(reached|refused_fast|stopped|dns_answered)\(|\.(tcp|udp|ping|dns)\(")
STAR_IMPORT = re.compile(r"^from (test_\w+) import \*", re.MULTILINE)
OWN_IFACE = re.compile(r"""\biface=(?!["']eth0["'])[\w"']|["']iface["']:\s*(?!["']eth0["'])[\w"']""")
_SEQUENCE = "what it proves is the apply sequence (faults, exit codes, status, idempotence); probes are spot checks"
ETH0_ONLY: dict[str, str] = {
    **dict.fromkeys(("test_apply_foreign_rules", "test_apply_idempotent", "test_exit_codes", "test_exit_paths",
                     "test_faults", "test_nftables_faults", "test_fence", "test_foreign_tools", "test_hostile_input",
                     "test_log_run", "test_nftables_apply", "test_nftables_commit_race",
                     "test_raw_readback", "test_resolution_limits", "test_run_in_netns", "test_verify_status"), _SEQUENCE),
}


def probes_traffic(name: str) -> bool:
    """The module sends probes (itself, or the suite it collects again with `import *`)."""
    text = (HERE / f"{name}.py").read_text()
    return bool(PROBES.search(text)) or any(probes_traffic(src) for src in STAR_IMPORT.findall(text))


def samples_another_topology(name: str) -> bool:
    """Some test of the module runs on a pod whose interface is not eth0 (or that has a second one)."""
    import importlib  # noqa: PLC0415

    from egressguard.lab import topology_name  # noqa: PLC0415

    topologies = getattr(importlib.import_module(name), "LAB_TOPOLOGIES", None) or []
    if any(topology_name(**t) != "eth0" for t in topologies):
        return True
    text = (HERE / f"{name}.py").read_text()
    return bool(OWN_IFACE.search(text)) or any(samples_another_topology(s) for s in STAR_IMPORT.findall(text))


def test_every_traffic_suite_runs_on_a_pod_topology_other_than_eth0() -> None:
    suites = [p.stem for p in sorted(HERE.glob("test_*.py")) if probes_traffic(p.stem)]
    assert len(suites) >= 40, suites  # the scan finds the traffic suites (and their twins)
    eth0_only = [s for s in suites if not samples_another_topology(s)]
    unexplained = sorted(set(eth0_only) - set(ETH0_ONLY))
    assert not unexplained, f"run only on the eth0 pod: {unexplained} (set LAB_TOPOLOGIES, see tests/conftest.py)"
    stale = sorted(set(ETH0_ONLY) - set(eth0_only))
    assert not stale, f"listed as eth0-only but sample another topology (or probe nothing): {stale}"


def test_the_topology_scan_sees_a_suite_that_runs_only_on_eth0(tmp_path: Path) -> None:
    (tmp_path / "suite.py").write_text("def test_x(module_lab):\n    assert reached(module_lab.tcp('203.0.113.10', 22))\n")
    text = (tmp_path / "suite.py").read_text()
    assert PROBES.search(text) and not OWN_IFACE.search(text)
    assert OWN_IFACE.search('Lab(iface="net1")') and OWN_IFACE.search('{"iface": "tun0"}')
    assert OWN_IFACE.search("Lab(prefix='egf', iface=name)")
    assert not OWN_IFACE.search('Lab(iface="eth0")') and not OWN_IFACE.search('{"iface": "eth0"}')


# -- the world's packet counter --------------------------------------------------------------------
# `stopped` judges a blocked probe by the world's count of packets to its port between the control's
# answer and the blocked probe's end. An answered connection's last packet (the client's FIN, or its
# ACK of the world's FIN) can still be on its way when the client returns: a CI run counted one such
# packet as the confined uid's. The count is read only once every answered connection has ended.


@pytest.mark.netns
def test_a_world_count_is_read_after_an_answered_connections_last_packet_has_arrived() -> None:
    """An exempt connection to a world banner port is held open after the world has closed its side
    and is ended 0.3 s later (its last packet then goes out): a count read meanwhile waits for that
    packet, and a later count finds nothing more."""
    from egressguard.lab import EXEMPT, WORLD_HOSTS_V4, Lab  # noqa: PLC0415

    with Lab(prefix="egs", iface="net1") as lab:
        host = WORLD_HOSTS_V4[0]
        before = lab.world_received("tcp", 5000)  # the counting rule exists before the connection
        held = lab.hold_tcp(host, 5000, uid=EXEMPT)
        assert held.opened.ok, held.opened
        closer = threading.Timer(0.3, held.close)
        started = time.monotonic()
        closer.start()
        try:
            counted = lab.world_received("tcp", 5000)
            waited = time.monotonic() - started
        finally:
            closer.join()
        assert counted > before, "the held connection's packets were not counted"
        time.sleep(0.3)
        assert lab.world_received("tcp", 5000) == counted, "the held connection's last packet came after the count"
        assert waited >= 0.25, f"the count did not wait for the held connection ({waited:.2f} s)"
