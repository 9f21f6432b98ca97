"""Docker mode, in real containers: the entrypoint applies the policy, drops every privilege, execs."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dockerbed import ALLOWED4, ALLOWED6, DENIED4, DENIED6, HERE, IMAGE, Bed, docker, inspect, report_of

pytestmark = pytest.mark.docker

CHECKS = ["python3", "/checks/inside.py", "--marker", "/markers/ran", ALLOWED4, DENIED4, ALLOWED6, DENIED6]
DOCKER_MODE = ["--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW"]  # on top of Docker's default set
ZERO = "0000000000000000"


def run(bed: Bed, markers: Path, *opts: str, policy: str = "policy.yaml", cmd: list[str] = CHECKS):
    return docker("run", "--rm", "--network", bed.network,
                  "-v", f"{HERE / policy}:/etc/egressguard/policy.yaml:ro",
                  "-v", f"{HERE}:/checks:ro", "-v", f"{markers}:/markers", *opts, IMAGE, *cmd, check=False)


BACKENDS = ("nftables", "iptables")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> list[str]:
    """`docker run` options that pin the image's back end (each test using this runs on both)."""
    return ["-e", f"EGRESSGUARD_BACKEND={request.param}"]


@pytest.fixture(scope="module", params=BACKENDS)
def guarded(bed: Bed, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """One guarded command's view of itself (default seccomp profile, only NET_ADMIN/NET_RAW added),
    on each back end: the same expectations hold for both."""
    markers = tmp_path_factory.mktemp(f"docker-mode-{request.param}")
    markers.chmod(0o777)
    p = run(bed, markers, *DOCKER_MODE, "-e", f"EGRESSGUARD_BACKEND={request.param}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _backend_used(p.stderr).startswith(request.param)
    assert (markers / "ran").exists()
    return report_of(p)


def _backend_used(stderr: str) -> str:
    for line in stderr.splitlines():
        if '"backend_selected"' in line:
            return str(json.loads(line)["backend"])
    raise AssertionError(f"no backend_selected line: {stderr[-1500:]}")


def test_the_image_uses_nftables_by_default_where_the_kernel_has_it(bed: Bed, markers: Path) -> None:
    p = run(bed, markers, *DOCKER_MODE)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _backend_used(p.stderr).startswith("nftables")


def test_command_reaches_the_allowed_server(guarded: dict[str, Any]) -> None:
    assert guarded["tcp"][ALLOWED4] == "connected"
    assert guarded["tcp"][ALLOWED6] == "connected"


def test_command_is_refused_by_a_server_the_policy_does_not_list(guarded: dict[str, Any]) -> None:
    assert guarded["tcp"][DENIED4] == "ECONNREFUSED"
    assert guarded["tcp"][DENIED6] == "ECONNREFUSED"


def test_command_runs_as_sandbox_without_groups(guarded: dict[str, Any]) -> None:
    assert guarded["uid"].split() == ["1000"] * 4
    assert guarded["gid"].split() == ["1000"] * 4
    assert guarded["groups"] == ""


def test_pid_1_is_an_unprivileged_init_that_reaps_orphans(guarded: dict[str, Any]) -> None:
    assert guarded["pid1"] == {"name": "tini", "uid": "1000"}
    assert guarded["orphan_reaped"] is True


def test_docker_stop_ends_the_command_at_once(bed: Bed) -> None:
    """SIGTERM reaches the command through the init (a bare PID 1 ignores it: docker stop would
    wait its 10 s and SIGKILL)."""
    name = f"eg-stop-{os.getpid()}"
    docker("run", "-d", "--name", name, "--network", bed.network, *DOCKER_MODE,
           "-v", f"{HERE / 'policy.yaml'}:/etc/egressguard/policy.yaml:ro", IMAGE, "sleep", "300")
    try:
        for _ in range(100):  # until the command itself runs (PID 1's own command line names it earlier)
            if any(line.rstrip().endswith(" sleep 300") and "egressguard" not in line and "tini" not in line
                   for line in docker("top", name, check=False).stdout.splitlines()):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the command never started")
        started = time.monotonic()
        docker("stop", "-t", "10", name)
        took = time.monotonic() - started
        state = inspect(name)["State"]
        assert took < 5, took
        assert state["ExitCode"] == 143, state  # 128 + SIGTERM: the command died of the signal
    finally:
        docker("rm", "-f", name, check=False)


def test_command_holds_no_capability_in_any_set_and_no_new_privs(guarded: dict[str, Any]) -> None:
    assert guarded["caps"] == {k: ZERO for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert guarded["no_new_privs"] == "1"
    assert guarded["seccomp"] == "2"  # Docker's default profile is still in force


def test_command_cannot_flush_the_rules(guarded: dict[str, Any]) -> None:
    for tool in ("iptables_F", "iptables_legacy_F", "ip6tables_legacy_F"):
        assert guarded[tool]["rc"] != 0, guarded[tool]
    assert guarded["egressguard_reset"]["rc"] == 3, guarded["egressguard_reset"]  # missing capability


def test_command_cannot_open_raw_sockets(guarded: dict[str, Any]) -> None:
    assert guarded["raw_socket"] == "EPERM"


def test_command_cannot_get_back_to_root(guarded: dict[str, Any]) -> None:
    assert guarded["setuid_0"] == "EPERM"
    assert guarded["setpriv_root"]["rc"] != 0 and "not permitted" in guarded["setpriv_root"]["err"]
    assert guarded["su_root"]["rc"] != 0 and guarded["su_root"]["out"] != "0"


def test_minimal_capability_set_is_enough(bed: Bed, markers: Path, backend: list[str]) -> None:
    p = run(bed, markers, *backend, "--cap-drop", "ALL", *[f"--cap-add={c}" for c in
                                                  ("NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "SETPCAP")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert report_of(p)["tcp"][DENIED4] == "ECONNREFUSED"


def test_broken_policy_exits_2_and_the_command_never_runs(bed: Bed, markers: Path) -> None:
    p = run(bed, markers, *DOCKER_MODE, policy="broken-policy.yaml")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "allow[0].ports[0]" in p.stderr
    assert not (markers / "ran").exists()


def test_without_net_raw_the_nftables_back_end_guards_and_the_command_runs(bed: Bed, markers: Path) -> None:
    """Only python-iptables needs CAP_NET_RAW: the default back end does without it."""
    p = run(bed, markers, "--cap-add", "NET_ADMIN", "--cap-drop", "NET_RAW")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _backend_used(p.stderr).startswith("nftables")
    report = report_of(p)
    assert report["tcp"][ALLOWED4] == "connected" and report["tcp"][DENIED4] == "ECONNREFUSED"
    assert report["tcp"][DENIED6] == "ECONNREFUSED"


def test_without_net_raw_the_iptables_back_end_exits_3_and_the_command_never_runs(bed: Bed, markers: Path) -> None:
    p = run(bed, markers, "--cap-add", "NET_ADMIN", "--cap-drop", "NET_RAW", "-e", "EGRESSGUARD_BACKEND=iptables")
    assert p.returncode == 3, p.stderr[-2000:]
    assert "NET_RAW" in p.stderr
    assert not (markers / "ran").exists()


def test_without_net_admin_exits_3_and_the_command_never_runs(bed: Bed, markers: Path) -> None:
    p = run(bed, markers)
    assert p.returncode == 3, p.stderr[-2000:]
    assert not (markers / "ran").exists()


def test_privileges_that_cannot_be_dropped_stop_the_command(bed: Bed, markers: Path, backend: list[str]) -> None:
    p = run(bed, markers, *DOCKER_MODE, *backend, "--cap-drop", "SETPCAP")  # cannot empty the bounding set
    assert p.returncode == 3, p.stderr[-2000:]
    assert "bounding set" in p.stderr
    assert not (markers / "ran").exists()


def test_a_missing_command_exits_127_after_the_guard_is_up(bed: Bed, markers: Path, backend: list[str]) -> None:
    p = run(bed, markers, *DOCKER_MODE, *backend, cmd=["no-such-command"])
    assert p.returncode == 127 and "command not found" in p.stderr, p.stderr[-2000:]


def test_read_only_root_filesystem_with_tmpfs_run(bed: Bed, markers: Path, backend: list[str]) -> None:
    p = run(bed, markers, *DOCKER_MODE, *backend, "--read-only", "--tmpfs", "/run", "--tmpfs", "/tmp")
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(p)
    assert report["tcp"][ALLOWED4] == "connected" and report["tcp"][DENIED4] == "ECONNREFUSED"
    assert (markers / "ran").exists()


def test_no_command_runs_a_shell_as_sandbox(bed: Bed, markers: Path) -> None:
    p = docker("run", "--rm", "-i", "--network", bed.network, *DOCKER_MODE, IMAGE, check=False)
    assert p.returncode == 0, p.stderr[-2000:]  # stdin is empty: the shell exits at once
    p = docker("run", "--rm", "--network", bed.network, *DOCKER_MODE, "--entrypoint", "sh", IMAGE,
               "-c", "echo 'id -un' | /usr/local/bin/entrypoint.sh", check=False)
    assert p.stdout.strip() == "sandbox", p.stderr[-2000:]


def test_start_to_command_time_and_image_size(bed: Bed, figures: list[str]) -> None:
    """Measured, for the README: container start -> command start, and what egressguard adds."""
    samples = []
    for i in range(3):
        name = f"{bed.project}-timing{i}"
        p = docker("run", "--name", name, "--network", bed.network, *DOCKER_MODE, IMAGE, "date", "+%s.%N", check=False)
        try:
            assert p.returncode == 0, p.stderr[-2000:]
            started = inspect(name)["State"]["StartedAt"]  # RFC 3339 with nanoseconds, UTC
            samples.append(float(p.stdout.strip()) - _epoch(started))
        finally:
            docker("rm", "-f", name, check=False)
    best, worst = min(samples) * 1000, max(samples) * 1000
    assert worst < 10_000
    layers = [int(x) for x in docker("history", "--human=false", "--format", "{{.Size}}", IMAGE).stdout.split()]
    figures.append(f"docker mode: container start -> command start {best:.0f}-{worst:.0f} ms (3 runs); image "
                   f"{sum(layers) / 1e6:.1f} MB, of which egressguard's layers {sum(layers[:-1]) / 1e6:.1f} MB")


def _epoch(rfc3339: str) -> float:
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp() + float(f"0.{frac or 0}")


def test_python_iptables_finds_its_extensions_without_ldconfig(bed: Bed) -> None:
    p = docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "echo $XTABLES_LIBDIR; ls $XTABLES_LIBDIR/libxt_comment.so")
    assert p.returncode == 0 and p.stdout.split()[0].endswith("/xtables")


def test_the_docker_compose_example_runs_guarded(bed: Bed) -> None:
    example = HERE.parent.parent / "examples" / "compose.yaml"
    compose = ["docker-compose", "-p", f"{bed.project}example", "-f", str(example)]
    env = dict(os.environ, EGRESSGUARD_IMAGE=IMAGE)
    try:
        p = subprocess.run([*compose, "run", "--rm", "-T", "agent"], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "guarded: uid 1000" in p.stdout
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "2"], capture_output=True, env=env, timeout=120)


DNS_PROXY_POLICY = json.dumps({
    "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1002]},
    "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": "auto"},
    "allow": [{"host": "allowed", "ports": [8080]}],
})


def test_dns_proxy_forwarder_serves_the_command_which_cannot_touch_it(bed: Bed, markers: Path,
                                                                     backend: list[str]) -> None:
    """Docker mode with dns.mode proxy, on both back ends (learned nftables sets, or ipsets with
    timeouts): `run` starts the forwarder before the command; the command (uid 1000) resolves the
    allowed name and connects, gets REFUSED for the other, and can neither signal, stop, trace nor
    replace the forwarder (uid 1002, CAP_NET_ADMIN only)."""
    p = run(bed, markers, "--cap-add", "NET_ADMIN", *backend,
            "-e", f"EGRESSGUARD_POLICY_JSON={DNS_PROXY_POLICY}", "-e", "EGRESSGUARD_POLICY=",
            cmd=["python3", "/checks/dns_inside.py"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _backend_used(p.stderr).startswith(backend[1].partition("=")[2])
    got = report_of(p)
    assert got["uid"] == 1000 and len(got["pids"]) == 1, got
    st = got["forwarder_status"]
    assert st["Uid"].split() == ["1002"] * 4 and st["CapEff"] == "0000000000001000" and st["NoNewPrivs"] == "1", st
    assert (got["kill"], got["stop"], got["ptrace"], got["mem"], got["bind"]) == \
        ("EPERM", "EPERM", "EPERM", "EACCES", "EADDRINUSE"), got
    assert got["dns_allowed"] == ["NOERROR", ["198.19.7.10"]], got
    assert got["connect_allowed"] == "connected", got
    assert got["dns_denied"][0] == "REFUSED", got
    assert got["connect_denied"] != "connected", got
    assert '"dns_learned"' in p.stderr and '"dns_refused"' in p.stderr

# -- the log of refusals (issue 14) --------------------------------------------------------------

LOG_COMMAND = r"""
import json, os, signal, socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect((sys.argv[1], 8080)); refused = "no"
except OSError as exc:
    refused = type(exc).__name__
readers, kill = [], {}
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        if b"\0watch\0" in open(f"/proc/{p}/cmdline", "rb").read():
            readers.append(int(p))
    except OSError:
        pass
for pid in readers:
    for sig in (signal.SIGKILL, signal.SIGTERM):
        try:
            os.kill(pid, sig); kill[sig.name] = "sent"
        except OSError as exc:
            kill[sig.name] = exc.strerror
print(json.dumps({"refused": refused, "readers": readers, "kill": kill}), flush=True)
os.execvp("sleep", ["sleep", "300"])
"""


def test_the_reader_runs_beside_the_command_and_logs_to_the_container_log(bed: Bed) -> None:
    """`run` starts `egressguard watch` beside the command (the policy logs refusals by default): the
    refused connection appears in `docker logs` with its policy line; the command cannot kill it."""
    name = f"eg-watch-{os.getpid()}"
    docker("run", "-d", "--name", name, "--network", bed.network, *DOCKER_MODE,
           "-v", f"{HERE / 'policy.yaml'}:/etc/egressguard/policy.yaml:ro", IMAGE,
           "python3", "-c", LOG_COMMAND, DENIED4)
    try:
        events: list[dict[str, Any]] = []
        report: dict[str, Any] = {}
        for _ in range(150):  # until the reader's window (10 s) has ended and its event is in the log
            logs = docker("logs", name, check=False)
            events = [json.loads(x) for x in logs.stderr.splitlines() if x.startswith("{")]
            report = next((json.loads(x) for x in logs.stdout.splitlines() if x.startswith("{")), {})
            if any(e["event"] == "connection_refused" for e in events):
                break
            time.sleep(0.2)
        assert report["refused"] == "ConnectionRefusedError" and len(report["readers"]) == 1, report
        assert set(report["kill"].values()) == {"Operation not permitted"}, report
        refused = [(e["uid"], e["destination"], e["port"], e["protocol"], e["line"])
                   for e in events if e["event"] == "connection_refused"]
        assert refused == [(1000, DENIED4, 8080, "tcp", "default")], events
    finally:
        docker("rm", "-f", name, check=False)
