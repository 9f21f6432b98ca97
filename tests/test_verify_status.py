"""`verify` (read back and compare: 0, or 5 after tampering), `status --json` (counters, digest)
and the status file written by `apply`."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from egtraffic import FAST, apply_quick, policy, reached

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

POLICY = policy(allow=[{"host": "allowed.test", "ports": [22]}, {"cidr": "203.0.113.12/32", "ports": [22]}],
                redirect=[{"ports": [80], "to_port": 8444}])


@pytest.fixture
def guarded(module_lab: Lab) -> Iterator[tuple[Lab, Path]]:
    """The policy freshly applied (replacing whatever the previous test left or tampered with)."""
    apply_quick(module_lab, POLICY)
    yield module_lab, module_lab.workdir / "policy.yaml"


def _verify(lab: Lab, path: Path) -> tuple[int, str]:
    done = lab.egressguard("verify", "--policy", str(path))
    return done.returncode, done.stdout + done.stderr


def test_verify_exits_0_right_after_apply(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded
    code, out = _verify(lab, path)
    assert code == 0, out
    assert "verified" in out


@pytest.mark.parametrize("tool", ["iptables-legacy", "ip6tables-legacy"])
def test_verify_exits_5_after_one_of_our_rules_is_deleted(guarded: tuple[Lab, Path], tool: str) -> None:
    lab, path = guarded
    assert lab.in_pod(tool, "-D", "EGRESSGUARD-CONFINED", "1").returncode == 0
    before = lab.ruleset_dump()
    code, out = _verify(lab, path)
    assert code == 5, out
    assert "EGRESSGUARD-CONFINED" in out
    assert lab.ruleset_dump() == before  # verify changes nothing, not even to repair


def test_verify_exits_5_when_our_jump_was_moved(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded
    assert lab.in_pod("iptables-legacy", "-I", "OUTPUT", "1", "-d", "192.0.2.1/32", "-j", "ACCEPT").returncode == 0
    code, out = _verify(lab, path)
    assert code == 5 and "jump" in out, out


def test_verify_exits_5_when_the_dispatch_jumps_where_the_plan_goes(guarded: tuple[Lab, Path]) -> None:
    """The read-back compares the goto flag: the confined uid's dispatch rule as `-j` instead of
    `-g` (what iptables-save shows) is a difference, though its target chain is the same."""
    lab, path = guarded
    rules = lab.in_pod("iptables-legacy", "-S", "EGRESSGUARD").stdout.splitlines()[1:]  # less "-N EGRESSGUARD"
    (at,) = [i for i, r in enumerate(rules, 1) if r.endswith("-g EGRESSGUARD-CONFINED") and "--uid-owner" in r]
    spec = rules[at - 1].split()[2:-2] + ["-j", "EGRESSGUARD-CONFINED"]  # less "-A EGRESSGUARD", "-g CHAIN"
    done = lab.in_pod("iptables-legacy", "-R", "EGRESSGUARD", str(at), *spec)
    assert done.returncode == 0, done.stderr
    code, out = _verify(lab, path)
    rule = "-m owner --uid-owner 1000 -m comment --comment confine"
    assert code == 5 and f"expected {rule} -g EGRESSGUARD-CONFINED, found {rule} -j EGRESSGUARD-CONFINED" in out, out


def test_verify_exits_5_for_a_rule_added_to_our_chain(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded
    assert lab.in_pod("ip6tables-legacy", "-I", "EGRESSGUARD-CONFINED", "1", "-j", "RETURN").returncode == 0
    assert _verify(lab, path)[0] == 5


def test_verify_exits_5_against_another_policy(guarded: tuple[Lab, Path]) -> None:
    lab, _ = guarded
    other = lab.write_policy(policy(action="drop"), "other.yaml")
    assert _verify(lab, other)[0] == 5


def test_verify_exits_5_after_reset(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded
    assert lab.egressguard("reset").returncode == 0
    lab.status_file.write_text(json.dumps({"hosts": {"allowed.test": ["203.0.113.10", "2001:db8:2::10"]}}))
    assert _verify(lab, path)[0] == 5


def test_status_file_describes_the_apply(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded
    st = json.loads(lab.status_file.read_text())
    plan = json.loads(lab.egressguard("plan", "--policy", str(path), "--json", "--resolve").stdout)
    assert st["state"] == "policy" and st["exit_code"] == 0 and st["error"] is None
    assert st["policy_digest"] == plan["policy_digest"]
    assert st["policy_source"] == str(path)
    assert st["backend"].startswith("iptables")
    assert st["hosts"] == {"allowed.test": ["203.0.113.10", "2001:db8:2::10"]}
    assert st["resolvers"] == ["198.51.100.53", "2001:db8:53::53"]
    planned = {f"{t['family']}/{t['table']}": sum(len(c) for c in t["chains"].values()) for t in plan["tables"]}
    assert st["rule_counts"] == planned
    assert st["ruleset_digest"] == plan["digest"]
    assert isinstance(st["lockdown_first"], bool)
    assert {"preflight", "commit", "verify"} <= set(st["timings_ms"])
    assert st["applied_at"]


def test_without_status_file_option_the_environment_then_run_egressguard_says_where(module_lab: Lab) -> None:
    """README: the status file is /run/egressguard/status.json unless --status-file or
    $EGRESSGUARD_STATUS says otherwise. The default is checked in a private mount namespace with a
    fresh /run, so the machine's /run is not touched."""
    lab = module_lab
    path = lab.write_policy(POLICY)
    lab.status_file.unlink(missing_ok=True)
    assert lab.apply(path).returncode == 0  # no --status-file: Lab.egressguard sets $EGRESSGUARD_STATUS
    assert json.loads(lab.status_file.read_text())["state"] == "policy"
    script = (f"mount -t tmpfs tmpfs /run && env -u EGRESSGUARD_STATUS {sys.executable} -m egressguard apply "
              f"--policy {path} 2>/dev/null; echo exit=$?; cat /run/egressguard/status.json")
    done = lab.in_pod("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
    said, _, status = done.stdout.partition("\n")
    assert said == "exit=0", done.stdout + done.stderr
    assert json.loads(status)["state"] == "policy"


def test_status_file_is_world_readable_and_replaced_atomically(guarded: tuple[Lab, Path]) -> None:
    lab, _ = guarded
    assert stat.S_IMODE(os.stat(lab.status_file).st_mode) == 0o644
    assert not [p for p in lab.status_file.parent.iterdir() if p.name.startswith(".status.")]  # no temp left over


def test_status_json_shows_the_digest_and_counters_that_move_with_traffic(guarded: tuple[Lab, Path]) -> None:
    lab, path = guarded

    def allow_counter() -> int:
        report = json.loads(lab.egressguard("status", "--json").stdout)
        t = next(t for t in report["tables"] if t["family"] == "ipv4" and t["table"] == "filter")
        return sum(r["packets"] for r in t["chains"]["EGRESSGUARD-CONFINED"] if "allow[1]" in r["rule"])

    report = json.loads(lab.egressguard("status", "--json").stdout)
    digest = json.loads(lab.egressguard("plan", "--policy", str(path), "--json").stdout)["policy_digest"]
    assert report["guarded"] is True
    assert report["last_apply"]["policy_digest"] == digest
    assert {(t["family"], t["table"]) for t in report["tables"] if t["chains"]} == {
        ("ipv4", "filter"), ("ipv4", "nat"), ("ipv6", "filter"), ("ipv6", "nat")
    }
    before = allow_counter()
    assert reached(lab.tcp("203.0.113.12", 22, timeout=FAST), "203.0.113.12")
    assert allow_counter() > before


def test_status_text_says_guarded(guarded: tuple[Lab, Path]) -> None:
    lab, _ = guarded
    done = lab.egressguard("status")
    assert done.returncode == 0 and done.stdout.startswith("guarded: yes"), done.stdout


def test_status_says_not_guarded_after_reset(guarded: tuple[Lab, Path]) -> None:
    lab, _ = guarded
    assert lab.egressguard("reset").returncode == 0
    assert json.loads(lab.egressguard("status", "--json").stdout)["guarded"] is False
