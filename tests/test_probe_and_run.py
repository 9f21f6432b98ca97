"""The pure parts of `probe` and `run`: target parsing, status and capability checks, who may run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from egressguard import policy as policy_mod
from egressguard.errors import PolicyError
from egressguard.privileges import Identity
from egressguard.probe import capability_problems, parse_target, status_problems
from egressguard.run import check_confined

HERE_NETNS = os.readlink("/proc/self/ns/net")
ZERO = "0000000000000000"
NET_ADMIN = f"{1 << 12:016x}"


def _status(tmp_path: Path, **fields: object) -> Path:
    data = {"state": "policy", "exit_code": 0, "policy_digest": "sha256:aa", "netns": HERE_NETNS, **fields}
    path = tmp_path / "status.json"
    path.write_text(json.dumps(data))
    return path


def test_probe_target_accepts_ipv4_and_bracketed_ipv6() -> None:
    assert parse_target("192.0.2.1:9").family == socket.AF_INET
    t = parse_target("[2001:db8::1]:443")
    assert (t.family, t.address, t.port) == (socket.AF_INET6, "2001:db8::1", 443)


@pytest.mark.parametrize("text", ["example.com:443", "192.0.2.1", "192.0.2.1:0", "192.0.2.1:70000", "[2001:db8::1]"])
def test_probe_target_rejects_names_and_bad_ports(text: str) -> None:
    with pytest.raises(PolicyError, match="probe target"):
        parse_target(text)


def test_status_of_a_policy_applied_here_passes(tmp_path: Path) -> None:
    assert status_problems(_status(tmp_path), "sha256:aa") == []


def test_missing_status_file_fails(tmp_path: Path) -> None:
    assert "no readable status file" in status_problems(tmp_path / "nope.json", None)[0]


def test_status_left_in_lockdown_fails(tmp_path: Path) -> None:
    (problem,) = status_problems(_status(tmp_path, state="lockdown", exit_code=4, error="host x did not resolve"), None)
    assert "state='lockdown'" in problem and "did not resolve" in problem


def test_status_written_in_another_network_namespace_fails(tmp_path: Path) -> None:
    (problem,) = status_problems(_status(tmp_path, netns="net:[1]"), None)
    assert "written in network namespace net:[1]" in problem


def test_unexpected_policy_digest_fails(tmp_path: Path) -> None:
    (problem,) = status_problems(_status(tmp_path), "sha256:bb")
    assert "not the expected sha256:bb" in problem


def test_no_capabilities_pass() -> None:
    assert capability_problems({k: ZERO for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")} | {"NoNewPrivs": "1"}) == []


def test_holding_net_admin_fails() -> None:
    assert capability_problems({"CapEff": NET_ADMIN, "CapPrm": NET_ADMIN, "CapAmb": ZERO, "CapBnd": NET_ADMIN})


def test_net_admin_regainable_through_the_bounding_set_fails_without_no_new_privs() -> None:
    caps = {"CapEff": ZERO, "CapPrm": ZERO, "CapAmb": ZERO, "CapBnd": NET_ADMIN}
    assert capability_problems(caps | {"NoNewPrivs": "0"})
    assert capability_problems(caps | {"NoNewPrivs": "1"}) == []


def _policy(**over: object) -> policy_mod.Policy:
    return policy_mod.validate({"version": 1, **over})


SANDBOX = Identity(name="sandbox", uid=1000, gid=1000, home="/home/sandbox", shell="/bin/sh")


def test_run_accepts_a_confined_user() -> None:
    check_confined(_policy(confine={"uids": [1000]}), SANDBOX)
    check_confined(_policy(), SANDBOX)  # confine: all


@pytest.mark.parametrize("policy", [{"confine": {"uids": [1002]}}, {"exempt": {"uids": [1000]}}])
def test_run_refuses_a_user_the_policy_leaves_unguarded(policy: dict[str, object]) -> None:
    with pytest.raises(PolicyError, match="unguarded"):
        check_confined(_policy(**policy), SANDBOX)


def test_run_refuses_root() -> None:
    with pytest.raises(PolicyError, match="root"):
        check_confined(_policy(), Identity(name="root", uid=0, gid=0, home="/root", shell="/bin/sh"))
