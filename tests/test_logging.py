"""The logging contract of the README: one JSON object per line on stderr when it is not a terminal
(or with --log-format json), named events with facts as keys, one `run_finished` per run; readable
console lines with --log-format console."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from egtraffic import policy

from egressguard.lab import Lab

pytestmark = pytest.mark.netns

POLICY = policy(allow=[{"host": "allowed.test", "ports": [22]}])


@pytest.fixture(scope="module")
def log_lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def _events(stderr: str) -> list[dict[str, object]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(events) == len([line for line in lines if not line.startswith("egressguard: ")]), stderr
    return events


def test_apply_logs_named_json_events_ending_with_run_finished(log_lab: Lab) -> None:
    done = log_lab.egressguard("apply", "--policy", str(log_lab.write_policy(POLICY)))  # stderr is a pipe
    assert done.returncode == 0, done.stderr
    events = _events(done.stderr)
    names = [e["event"] for e in events]
    for name in ("host_resolved", "rules_committed", "rules_verified", "policy_applied"):
        assert name in names, names
    assert names[-1] == "run_finished" and names.count("run_finished") == 1
    last = events[-1]
    assert last["command"] == "apply" and last["exit_code"] == 0 and last["rules"] > 0  # type: ignore[operator]
    assert str(last["policy_digest"]).startswith("sha256:") and last["backend"] and last["duration_ms"]
    resolved = next(e for e in events if e["event"] == "host_resolved")
    assert resolved["host"] == "allowed.test" and "203.0.113.10" in resolved["addresses"]  # type: ignore[operator]
    assert all({"level", "timestamp"} <= set(e) for e in events)


@pytest.mark.parametrize("command", ["verify", "reset"])
def test_verify_and_reset_end_with_one_run_finished(log_lab: Lab, command: str) -> None:
    args = ("verify", "--policy", str(log_lab.write_policy(POLICY))) if command == "verify" else ("reset",)
    if command == "verify":
        assert log_lab.egressguard("apply", "--policy", str(log_lab.write_policy(POLICY))).returncode == 0
    done = log_lab.egressguard(*args)
    assert done.returncode == 0, done.stderr
    last = _events(done.stderr)[-1]
    assert last["event"] == "run_finished" and last["command"] == command and last["exit_code"] == 0
    assert last["backend"]
    if command == "verify":
        assert str(last["policy_digest"]).startswith("sha256:")


def test_a_failed_run_logs_its_exit_code_and_one_human_line(log_lab: Lab) -> None:
    done = log_lab.egressguard("apply", "--policy", str(log_lab.write_policy("version: 2\n", "bad.yaml")))
    assert done.returncode == 2
    human = [line for line in done.stderr.splitlines() if line.startswith("egressguard: ")]
    assert len(human) == 1 and "version" in human[0]
    assert _events(done.stderr)[-1] == {**_events(done.stderr)[-1], "event": "run_finished", "exit_code": 2}


def test_console_format_prints_readable_lines_not_json(log_lab: Lab) -> None:
    done = log_lab.egressguard("--log-format", "console", "apply", "--policy", str(log_lab.write_policy(POLICY)))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and not any(line.lstrip().startswith("{") for line in lines)
    assert any("run_finished" in line and "exit_code=0" in line for line in lines)
