"""The suite's own guards can fail: the host-safety check sees every kind of state egressguard writes,
and under CI=true a skipped container test fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
