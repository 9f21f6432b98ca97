"""The Kubernetes pod model with real containers: pause holds the network namespace, init applies,
the agent (no capabilities) starts only afterwards and checks the guard itself before its command."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dockerbed import ALLOWED4, ALLOWED6, DENIED4, DENIED6, HERE, IMAGE, Bed, docker, inspect, report_of

pytestmark = pytest.mark.docker

ZERO = "0000000000000000"
AGENT = ["--user", "1000:1000", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--read-only"]


# The compose file runs the pod twice: services NAME (the back end `auto` picks: nftables on this
# kernel) and NAME-iptables (init told EGRESSGUARD_BACKEND=iptables). Same policy, same expectations.
POD_BACKENDS = {"": "nftables", "-iptables": "iptables"}


@pytest.fixture(scope="module", params=list(POD_BACKENDS), ids=list(POD_BACKENDS.values()))
def pod(request: pytest.FixtureRequest) -> str:
    """The service-name suffix of one pod."""
    return str(request.param)


@pytest.fixture(scope="module")
def agent(bed: Bed, pod: str) -> dict[str, Any]:
    """The agent container's exit code, its command's report, its stdout (a passing probe's line) and
    stderr (a failing probe's verdict)."""
    cid = bed.container(f"agent{pod}")
    code = int(docker("wait", cid, timeout=60).stdout.strip())
    logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True, timeout=30)
    return {"exit": code, "report": report_of(logs) if code == 0 else None, "stderr": logs.stderr,
            "stdout": logs.stdout, "state": inspect(cid)["State"]}


def test_init_container_applies_the_policy_on_its_back_end_and_exits_0(bed: Bed, pod: str) -> None:
    init = bed.container(f"init{pod}")
    state = inspect(init)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    logs = subprocess.run(["docker", "logs", init], capture_output=True, text=True, timeout=30).stderr
    chosen = [json.loads(ln)["backend"] for ln in logs.splitlines() if '"backend_selected"' in ln]
    assert len(chosen) == 1 and chosen[0].startswith(POD_BACKENDS[pod]), logs[-2000:]


def test_agent_starts_only_after_init_exited(bed: Bed, pod: str, agent: dict[str, Any]) -> None:
    init_done = _time(inspect(bed.container(f"init{pod}"))["State"]["FinishedAt"])
    assert _time(agent["state"]["StartedAt"]) >= init_done


def test_probe_passes_in_the_agent_and_the_command_runs(bed: Bed, pod: str, agent: dict[str, Any]) -> None:
    assert agent["exit"] == 0, agent["stderr"][-2000:]
    assert "guarded: uid 1000 cannot reach" in agent["stdout"], agent["stdout"][-2000:]
    assert (bed.markers / f"agent{pod}").exists()


def test_agent_egress_is_enforced(agent: dict[str, Any]) -> None:
    tcp = agent["report"]["tcp"]
    assert (tcp[ALLOWED4], tcp[ALLOWED6]) == ("connected", "connected")
    assert (tcp[DENIED4], tcp[DENIED6]) == ("ECONNREFUSED", "ECONNREFUSED")


def test_agent_holds_no_capability_and_cannot_undo_the_guard(agent: dict[str, Any]) -> None:
    r = agent["report"]
    assert r["caps"] == {k: ZERO for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert r["no_new_privs"] == "1"
    assert r["iptables_F"]["rc"] != 0 and r["iptables_legacy_F"]["rc"] != 0
    assert r["egressguard_reset"]["rc"] == 3, r["egressguard_reset"]
    assert r["raw_socket"] == "EPERM" and r["setuid_0"] == "EPERM"


def test_agents_pid_1_is_an_init_that_reaps_orphans(agent: dict[str, Any]) -> None:
    assert agent["report"]["pid1"] == {"name": "tini", "uid": "1000"}
    assert agent["report"]["orphan_reaped"] is True


def test_pod_start_up_times(bed: Bed, pod: str, agent: dict[str, Any], figures: list[str]) -> None:
    init = inspect(bed.container(f"init{pod}"))["State"]
    init_ms = (_time(init["FinishedAt"]) - _time(init["StartedAt"])) * 1000
    agent_ms = (agent["report"]["started"] - _time(agent["state"]["StartedAt"])) * 1000
    assert agent_ms < 10_000 and init_ms < 30_000
    figures.append(f"kubernetes mode ({POD_BACKENDS[pod]}): init container (egressguard apply) {init_ms:.0f} ms; agent container "
                   f"start -> command start {agent_ms:.0f} ms (probe, then exec)")


def test_agent_in_a_namespace_no_init_container_guarded_refuses_to_start(bed: Bed, markers: Path) -> None:
    with _pause(bed, "noinit") as pause:
        p = docker("run", "--rm", "--network", f"container:{pause}", *AGENT,
                   "-e", f"EGRESSGUARD_PROBE_TARGETS={DENIED4}:8080", "-v", f"{markers}:/markers",
                   IMAGE, "touch", "/markers/agent", check=False)
    assert p.returncode == 6, p.stderr[-2000:]
    assert "no readable status file" in p.stderr and f"{DENIED4}:8080 is reachable" in p.stderr
    assert "the command is not started" in p.stderr
    assert not (markers / "agent").exists()


def test_a_status_file_from_another_pod_does_not_fool_the_probe(bed: Bed, markers: Path) -> None:
    with _pause(bed, "foreign") as pause:
        p = docker("run", "--rm", "--network", f"container:{pause}", *AGENT,
                   "-e", f"EGRESSGUARD_PROBE_TARGETS={DENIED4}:8080", "-e", f"EGRESSGUARD_EXPECT_DIGEST={bed.expect_digest}",
                   "-v", f"{bed.project}_podrun:/run/egressguard:ro", "-v", f"{markers}:/markers",
                   IMAGE, "touch", "/markers/agent", check=False)
    assert p.returncode == 6, p.stderr[-2000:]
    assert "written in network namespace" in p.stderr
    assert not (markers / "agent").exists()


def test_probe_rejects_an_unexpected_policy_digest(bed: Bed) -> None:
    p = docker("run", "--rm", "--network", f"container:{bed.container('pause')}", *AGENT,
               "-v", f"{bed.project}_podrun:/run/egressguard:ro", "-e", f"EGRESSGUARD_PROBE_TARGETS={DENIED4}:8080",
               "-e", "EGRESSGUARD_EXPECT_DIGEST=sha256:0000", IMAGE, "true", check=False)
    assert p.returncode == 6 and "is not the expected sha256:0000" in p.stderr


def test_broken_policy_fails_the_init_container_and_the_agent_never_starts(bed: Bed, markers: Path) -> None:
    project = f"{bed.project}broken"
    env = dict(os.environ, EG_IMAGE=IMAGE, EG_MARKERS=str(markers))
    compose = ["docker-compose", "-p", project, "-f", str(HERE / "pod-broken.yaml")]
    try:
        up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, env=env, timeout=120)
        assert up.returncode != 0, "compose started the agent although init failed"
        ids = {svc: docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                           "--filter", f"label=com.docker.compose.service={svc}").stdout.split() for svc in ("init", "agent")}
        assert inspect(ids["init"][0])["State"]["ExitCode"] == 2
        for cid in ids["agent"]:  # compose may have created it, but must never have started it
            assert inspect(cid)["State"]["StartedAt"].startswith("0001-01-01")
        assert not (markers / "agent").exists()
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "2"], capture_output=True, env=env, timeout=120)


class _pause:
    """A pause container on the lab network: a fresh network namespace no init container touched."""

    def __init__(self, bed: Bed, tag: str) -> None:
        self.name = f"{bed.project}-{tag}-pause"
        self.bed = bed

    def __enter__(self) -> str:
        docker("run", "-d", "--name", self.name, "--network", self.bed.network, "--user", "65534",
               "--cap-drop", "ALL", "--entrypoint", "sleep", IMAGE, "infinity")
        return self.name

    def __exit__(self, *exc: object) -> None:
        docker("rm", "-f", self.name, check=False)


def _time(rfc3339: str) -> float:
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp() + float(f"0.{frac or 0}")
