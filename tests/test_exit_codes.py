"""The exit-code contract, each code produced by a real cause, with the kernel state it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from egtraffic import FAST, applied, dns_answered, normalized, policy, reached, stopped

from egressguard import __version__
from egressguard.lab import EXEMPT, RESOLVER_V4, Lab

ALLOW_HOST = policy(allow=[{"host": "nowhere.test", "ports": [22]}, {"cidr": "203.0.113.10/32", "ports": [22]}])
SETPRIV_NO_NET_CAPS = ("setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw", "--")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egressguard", *args], capture_output=True, text=True, timeout=60)


# -- without namespaces ------------------------------------------------------------------------


def test_version_prints_the_version_and_exits_0() -> None:
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"egressguard {__version__}"


def test_help_lists_commands_and_the_exit_codes() -> None:
    done = _run("--help")
    assert done.returncode == 0
    for word in ("plan", "apply", "verify", "status", "reset", "schema", "exit codes:"):
        assert word in done.stdout
    for code in range(0, 6):
        assert f"  {code}  " in done.stdout


def test_python_dash_m_and_the_console_script_behave_the_same() -> None:
    script = subprocess.run([sys.executable, "-c", "import sys; from egressguard.cli import main; sys.exit(main())",
                             "--version"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout == _run("--version").stdout


def test_unknown_command_or_option_is_a_usage_error_2() -> None:
    for args in (("frobnicate",), ("apply", "--no-such-option"), ()):
        done = _run(*args)
        assert done.returncode == 2, args


def test_plan_of_a_missing_policy_file_exits_2_with_one_line() -> None:
    done = _run("plan", "--policy", "/nonexistent/policy.yaml")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("egressguard: policy error: cannot read")


# -- in the lab --------------------------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.parametrize("installed", [False, True], ids=["nothing-installed", "policy-installed"])
def test_bad_policy_exits_2_and_the_kernel_is_unchanged(lab: Lab, installed: bool) -> None:
    if installed:
        applied(lab, policy())
    before = lab.ruleset_dump()
    status_before = lab.status_file.read_text() if lab.status_file.exists() else None
    bad = {"version": 1, "allow": [{"cidr": "10.0.0.1/8"}], "exempt": {"uids": [1001]}}
    done = lab.apply(bad)
    assert done.returncode == 2
    assert "allow[0].cidr" in done.stderr
    assert lab.ruleset_dump() == before
    assert (lab.status_file.read_text() if lab.status_file.exists() else None) == status_before


@pytest.mark.netns
def test_bad_inline_json_policy_exits_2_and_changes_nothing(lab: Lab) -> None:
    before = lab.ruleset_dump()
    done = lab.egressguard("apply", env={"EGRESSGUARD_POLICY_JSON": '{"version": 1, "confine": {"uids": [1000]}, '
                                                                    '"exempt": {"uids": [1000]}}'})
    assert done.returncode == 2 and "exempt.uids[0]" in done.stderr
    assert lab.ruleset_dump() == before


@pytest.mark.netns
@pytest.mark.parametrize("command", ["apply", "reset"])
def test_without_net_admin_and_net_raw_exits_3_and_changes_nothing(lab: Lab, command: str) -> None:
    applied(lab, policy())
    before = lab.ruleset_dump()
    args = ("apply", "--policy", str(lab.write_policy(policy(action="drop"), "other.yaml"))) if command == "apply" else ("reset",)
    done = lab.egressguard(*args, prefix=SETPRIV_NO_NET_CAPS)
    assert done.returncode == 3, done.stderr
    assert "CAP_NET_ADMIN" in done.stderr or "CAP_NET_RAW" in done.stderr
    assert lab.ruleset_dump() == before


@pytest.mark.netns
def test_without_net_raw_alone_exits_3(lab: Lab) -> None:
    before = lab.ruleset_dump()
    prefix = ("capsh", "--drop=cap_net_raw", "--", "-c", 'exec "$0" "$@"')
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(policy())), prefix=prefix)
    assert done.returncode == 3 and "CAP_NET_RAW" in done.stderr, done.stderr
    assert lab.ruleset_dump() == before


@pytest.mark.netns
def test_non_root_user_gets_3_from_apply_but_may_plan(lab: Lab) -> None:
    path = str(lab.write_policy(policy()))
    res = lab.probe("egressguard", ["apply", "--policy", path, "--status-file", str(lab.workdir / "s.json")], uid=1000,
                    timeout=30)
    assert res.answer["exit"] == 3, res.answer
    res = lab.probe("egressguard", ["plan", "--policy", path, "--resolv-conf", "/dev/null"], uid=1000, timeout=30)
    assert res.answer["exit"] == 0, res.answer
    assert "EGRESSGUARD" not in normalized(lab.ruleset_dump())


@pytest.mark.netns
class TestHostThatDoesNotResolve:
    """Exit 4: the name is NXDOMAIN at the lab's DNS, so the apply fails and leaves the lockdown."""

    @pytest.fixture(scope="class")
    @classmethod
    def failed(cls, module_lab: Lab) -> subprocess.CompletedProcess[str]:
        return module_lab.apply(ALLOW_HOST)

    def test_apply_exits_4_naming_the_host(self, failed: subprocess.CompletedProcess[str]) -> None:
        assert failed.returncode == 4, failed.stderr
        assert "nowhere.test" in failed.stderr

    def test_lockdown_is_in_place(self, module_lab: Lab, failed: subprocess.CompletedProcess[str]) -> None:
        dump = module_lab.ruleset_dump()
        assert "--comment lockdown" in dump and "allow[" not in dump

    def test_confined_uid_keeps_dns_and_loopback(self, module_lab: Lab, failed: subprocess.CompletedProcess[str]) -> None:
        assert dns_answered(module_lab.dns("allowed.test", RESOLVER_V4, timeout=FAST))
        assert dns_answered(module_lab.dns("allowed.test", RESOLVER_V4, tcp=True, timeout=FAST))
        assert module_lab.tcp("127.0.0.1", 8443, timeout=FAST).ok and module_lab.tcp("::1", 8443, timeout=FAST).ok

    def test_confined_uid_gets_nothing_else_not_even_the_policys_allows(
        self, module_lab: Lab, failed: subprocess.CompletedProcess[str]
    ) -> None:
        for host in ("203.0.113.10", "203.0.113.12", "2001:db8:2::10"):
            stopped(module_lab, "tcp", host, 22)

    def test_exempt_uid_is_not_locked_down(self, module_lab: Lab, failed: subprocess.CompletedProcess[str]) -> None:
        assert reached(module_lab.tcp("203.0.113.12", 22, uid=EXEMPT, timeout=FAST), "203.0.113.12")

    def test_status_file_records_the_lockdown(self, module_lab: Lab, failed: subprocess.CompletedProcess[str]) -> None:
        st = json.loads(module_lab.status_file.read_text())
        assert st["state"] == "lockdown" and st["exit_code"] == 4 and "nowhere.test" in st["error"]

    def test_verify_of_the_policy_exits_4_naming_the_unresolved_host(
        self, module_lab: Lab, failed: subprocess.CompletedProcess[str]
    ) -> None:
        # Not 0 or 5: verify cannot rebuild the policy's rules without the host's addresses, which no
        # apply recorded. Exactly 4 with the host named (a crash would be 1, also "not passing").
        before = module_lab.ruleset_dump()
        done = module_lab.egressguard("verify", "--policy", str(module_lab.workdir / "policy.yaml"))
        assert done.returncode == 4, done.stderr[-800:]
        assert "egressguard: host nowhere.test: no record of its resolved addresses" in done.stderr
        assert module_lab.ruleset_dump() == before


@pytest.mark.netns
def test_host_that_resolves_later_applies_cleanly_over_the_lockdown(lab: Lab) -> None:
    assert lab.apply(ALLOW_HOST).returncode == 4
    lab.set_records({**lab.records, "nowhere.test": {"A": ["203.0.113.12"]}})
    applied(lab, ALLOW_HOST)
    assert reached(lab.tcp("203.0.113.12", 22, timeout=FAST), "203.0.113.12")
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "policy.yaml")).returncode == 0
