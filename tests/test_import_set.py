"""A run imports only what it uses: the set of top-level modules outside the standard library that
a real `egressguard` process has imported when it exits (not timed; the time is in bench/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from egressguard.lab import Lab

# Runs `python -m egressguard ARGS` and, at exit, prints the non-stdlib top-level modules it imported
# ("_"-prefixed ones are C parts of others, or site's .pth hooks) and whether asyncio (structlog's,
# with ssl) was imported.
WRAPPER = """
import atexit, runpy, sys
def report():
    tops = {m.partition(".")[0] for m in sys.modules}
    print("IMPORTED", *sorted(t for t in tops if t not in sys.stdlib_module_names and not t.startswith("_")
                              and t != "cython_runtime"), "| asyncio" if "asyncio" in tops else "", file=sys.__stderr__)
atexit.register(report)
sys.argv = ["egressguard", *sys.argv[1:]]
runpy.run_module("egressguard", run_name="__main__", alter_sys=True)
"""

JSON_POLICY = '{"version": 1, "confine": {"uids": [1000]}, "allow": [{"cidr": "203.0.113.0/24", "ports": [443]}]}'
YAML_POLICY = "version: 1\nconfine: {uids: [1000]}\nallow:\n  - host: allowed.test\n    ports: [22]\n"


def imported(argv: list[str], prefix: tuple[str, ...] = ()) -> tuple[set[str], bool]:
    """(non-stdlib top-level modules, asyncio imported?) of one run; its exit code must be 0."""
    done = subprocess.run([*prefix, sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/")
    assert done.returncode == 0, done.stderr[-1000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED"))
    names, _, tail = line.removeprefix("IMPORTED").partition("|")
    return set(names.split()), "asyncio" in tail


@pytest.fixture
def policies(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "p.json").write_text(JSON_POLICY)
    (tmp_path / "p.yaml").write_text(YAML_POLICY)
    return tmp_path / "p.json", tmp_path / "p.yaml"


def test_apply_help_imports_nothing_but_egressguard() -> None:
    assert imported(["apply", "--help"]) == ({"egressguard"}, False)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_plan_of_a_json_policy_imports_no_library(policies: tuple[Path, Path], backend: str) -> None:
    """No structlog (plan logs nothing), no PyYAML (JSON), no python-iptables, no dnspython."""
    assert imported(["plan", "--policy", str(policies[0]), "--backend", backend]) == ({"egressguard"}, False)


def test_plan_of_a_yaml_policy_with_hosts_imports_pyyaml_only(policies: tuple[Path, Path]) -> None:
    """Hosts are shown unresolved: no dnspython."""
    assert imported(["plan", "--policy", str(policies[1])]) == ({"egressguard", "yaml"}, False)


@pytest.mark.netns
def test_nftables_apply_imports_structlog_and_nothing_of_iptables(lab: Lab, policies: tuple[Path, Path]) -> None:
    argv = ["apply", "--backend", "nftables", "--policy", str(policies[0]), "--status-file", str(lab.workdir / "s.json")]
    assert imported(argv, prefix=("ip", "netns", "exec", lab.pod)) == ({"egressguard", "structlog"}, True)


@pytest.mark.netns
def test_iptables_apply_imports_python_iptables(lab: Lab, policies: tuple[Path, Path]) -> None:
    argv = ["apply", "--backend", "iptables", "--policy", str(policies[0]), "--status-file", str(lab.workdir / "s.json")]
    assert imported(argv, prefix=("ip", "netns", "exec", lab.pod)) == ({"egressguard", "structlog", "iptc"}, True)


@pytest.mark.netns
def test_apply_with_hosts_imports_dnspython_and_pyyaml(lab: Lab, policies: tuple[Path, Path]) -> None:
    argv = ["apply", "--backend", "nftables", "--policy", str(policies[1]), "--status-file", str(lab.workdir / "s.json")]
    modules, _ = imported(argv, prefix=("ip", "netns", "exec", lab.pod))
    assert modules == {"egressguard", "structlog", "yaml", "dns"}


# The agent as bench/ runs it: uid 0 without any capability (nothing to regain, no_new_privs), so
# that this venv's Python under /root stays readable; `confine: all` guards it.
AGENT = ("setpriv", "--securebits=+noroot,+noroot_locked", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs")


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_a_passing_probe_imports_no_library_and_no_asyncio(lab: Lab, tmp_path: Path, backend: str) -> None:
    """The agent's self-check on its success path logs nothing, so structlog (and asyncio) stay out;
    a failing probe (the control) logs its event and imports structlog."""
    policy, status = tmp_path / "all.json", lab.workdir / "s.json"
    policy.write_text('{"version": 1, "exempt": {"uids": [1001]}}')
    applied = lab.egressguard("apply", "--backend", backend, "--policy", str(policy), "--status-file", str(status))
    assert applied.returncode == 0, applied.stderr
    probe = ["probe", "--status-file", str(status), "--target", "203.0.113.10:22"]
    assert imported(probe, prefix=("ip", "netns", "exec", lab.pod, *AGENT)) == ({"egressguard"}, False)
    failing = subprocess.run(["ip", "netns", "exec", lab.pod, *AGENT, sys.executable, "-c", WRAPPER, *probe,
                              "--expect-digest", "sha256:0"], capture_output=True, text=True, timeout=60, cwd="/")
    assert failing.returncode == 6 and "structlog" in failing.stderr and "| asyncio" in failing.stderr, failing.stderr
