"""`egressguard run` and `egressguard probe` for real in a lab pod, without Docker: the non-Docker
equivalents of tests/docker's privilege tables. `run` starts as root in the pod, applies, drops every
privilege and execs a command that reports its own /proc/self/status and sends real traffic.

The image's users (sandbox 1000, router 1001) exist only in a passwd file bind-mounted over
/etc/passwd in a private mount namespace of the egressguard process: the machine's files are untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from egtraffic import FAST, applied, policy, reached, stopped

from egressguard.lab import CONFINED, EXEMPT, Lab

pytestmark = pytest.mark.netns

ROOT_DIR = Path(__file__).parent.parent
EGRESSGUARD_BIN = shutil.which("egressguard", path=str(Path(sys.executable).parent)) or ""
PYTHON = "/usr/bin/python3"  # a uid-1000 command must not need the pyenv shim's files
POLICY = policy(confine={"uids": [1000, 1002]},
                allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}])
PASSWD = ("root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n"
          "router:x:1001:1001::/home/router:/bin/sh\nagent:x:1002:1002::/home/agent:/bin/sh\n")
GROUP = "root:x:0:\nsandbox:x:1000:\nrouter:x:1001:\nagent:x:1002:\n"

# The command: who am I, what may I still do, and what does the network let me reach.
REPORT = r"""
import json, socket, sys
status = dict(line.rstrip("\n").split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line)
def tcp(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        return "ok: " + s.recv(100).decode(errors="replace").strip()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
try:
    import os; os.setuid(0); regained = "yes"
except OSError as exc:
    regained = exc.strerror
hosts = ["203.0.113.10", "2001:db8:2::10", "203.0.113.11", "2001:db8:2::11"]
print(json.dumps({"status": status, "setuid0": regained, "traffic": {f"{h}:22": tcp(h, 22) for h in hosts}}))
"""


@pytest.fixture
def image_users(lab: Lab) -> tuple[str, ...]:
    """Prefix for lab.egressguard: a private mount namespace where the image's users exist."""
    (lab.workdir / "passwd").write_text(PASSWD)
    (lab.workdir / "group").write_text(GROUP)
    (lab.workdir / "report.py").write_text(REPORT)
    for name in ("passwd", "group", "report.py"):
        (lab.workdir / name).chmod(0o644)
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/passwd && mount --bind "$1" /etc/group && shift && exec "$@"',
            str(lab.workdir / "passwd"), str(lab.workdir / "group"))


def _report(stdout: str) -> dict[str, object]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout
    return json.loads(lines[-1])


def _assert_dropped_and_guarded(report: dict[str, object], uid: int) -> None:
    st = report["status"]
    assert isinstance(st, dict)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, (key, st[key])
    assert st["NoNewPrivs"] == "1"
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert st["Groups"].strip() == ""
    assert report["setuid0"] == "Operation not permitted"
    traffic = report["traffic"]
    assert isinstance(traffic, dict)
    assert traffic["203.0.113.10:22"].startswith("ok: world 203.0.113.10 "), traffic
    assert traffic["2001:db8:2::10:22"].startswith("ok: world 2001:db8:2::10 "), traffic
    assert traffic["203.0.113.11:22"].startswith("ConnectionRefusedError"), traffic  # reject: tcp-reset
    assert traffic["2001:db8:2::11:22"].startswith("ConnectionRefusedError"), traffic


def _exempt_control(lab: Lab) -> None:
    """The refused destinations answer the exempt uid in the same pod: the servers are alive."""
    for host in ("203.0.113.11", "2001:db8:2::11"):
        assert reached(lab.tcp(host, 22, uid=EXEMPT, timeout=FAST), host)


# -- run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["sandbox", "1000"])
def test_run_applies_drops_every_privilege_and_execs_the_command_under_the_policy(
    lab: Lab, image_users: tuple[str, ...], user: str
) -> None:
    done = lab.egressguard("run", "--user", user, "--policy", str(lab.write_policy(POLICY)), "--",
                           PYTHON, str(lab.workdir / "report.py"), prefix=image_users, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    _assert_dropped_and_guarded(_report(done.stdout), 1000)
    assert json.loads(lab.status_file.read_text())["state"] == "policy"
    _exempt_control(lab)


@pytest.mark.parametrize(("user", "uid"), [("agent", 1002), (None, 1000)], ids=["EGRESSGUARD_USER=agent", "unset"])
def test_entrypoint_as_root_runs_the_command_as_egressguard_user(
    lab: Lab, image_users: tuple[str, ...], user: str | None, uid: int
) -> None:
    assert EGRESSGUARD_BIN, "the venv's egressguard script"
    env = {"EGRESSGUARD_POLICY": str(lab.write_policy(POLICY)),
           "PATH": f"{Path(EGRESSGUARD_BIN).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    if user:
        env["EGRESSGUARD_USER"] = user
    argv = ("ip", "netns", "exec", lab.pod, *image_users, "sh", str(ROOT_DIR / "entrypoint.sh"),
            PYTHON, str(lab.workdir / "report.py"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSGUARD_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**base, "EGRESSGUARD_STATUS": str(lab.status_file), **env})
    assert done.returncode == 0, done.stderr[-1500:]
    _assert_dropped_and_guarded(_report(done.stdout), uid)


@pytest.mark.parametrize("user", ["router", "root", "nobody-listed"], ids=["exempt", "root", "not-confined"])
def test_run_refuses_a_user_the_policy_does_not_confine_with_exit_2_before_any_change(
    lab: Lab, image_users: tuple[str, ...], user: str
) -> None:
    """README: run refuses (exit 2) a uid the policy exempts or does not confine, or root; the
    command never starts and the kernel is unchanged."""
    marker = lab.workdir / "started"
    pol = {**POLICY, "exempt": {"uids": [1001]}, "confine": {"uids": [1000]}}
    argv_user = "agent" if user == "nobody-listed" else user  # agent (1002) is not in this policy's confine
    before = lab.ruleset_dump()
    done = lab.egressguard("run", "--user", argv_user, "--policy", str(lab.write_policy(pol)), "--",
                           "touch", str(marker), prefix=image_users, timeout=60)
    assert done.returncode == 2, done.stderr[-1500:]
    human = [line for line in done.stderr.splitlines() if line.startswith("egressguard:")]
    assert len(human) == 1 and ("root" in human[0] if user == "root" else "unguarded" in human[0]), human
    assert not marker.exists()
    assert lab.ruleset_dump() == before


@pytest.mark.parametrize("cap", ["cap_setuid", "cap_setgid"])
def test_run_without_setuid_or_setgid_exits_3_with_the_guard_in_place(
    lab: Lab, image_users: tuple[str, ...], cap: str
) -> None:
    marker = lab.workdir / "started"
    drop = ("capsh", f"--drop={cap}", "--", "-c", 'exec "$0" "$@"')
    path = lab.write_policy(POLICY)
    done = lab.egressguard("run", "--user", "sandbox", "--policy", str(path), "--", "touch", str(marker),
                           prefix=(*image_users, *drop), timeout=60)
    assert done.returncode == 3, done.stderr[-1500:]
    assert f"(needs CAP_SET{cap[-3:].upper()})" in done.stderr
    assert not marker.exists()  # the command never ran
    assert lab.egressguard("verify", "--policy", str(path)).returncode == 0
    stopped(lab, "tcp", "203.0.113.11", 22)
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")
    _exempt_control(lab)


@pytest.mark.parametrize(("command", "code"), [("not-executable", 126), ("missing", 127)])
def test_run_of_a_command_that_cannot_be_executed_exits_126_or_127_with_the_guard_in_place(
    lab: Lab, image_users: tuple[str, ...], command: str, code: int
) -> None:
    target = lab.workdir / command
    if command == "not-executable":
        target.write_text("#!/bin/sh\necho started\n")
        target.chmod(0o644)
    path = lab.write_policy(POLICY)
    done = lab.egressguard("run", "--user", "sandbox", "--policy", str(path), "--", str(target),
                           prefix=image_users, timeout=60)
    assert done.returncode == code, done.stderr[-1500:]
    assert "started" not in done.stdout
    assert lab.egressguard("verify", "--policy", str(path)).returncode == 0
    stopped(lab, "tcp", "203.0.113.11", 22)
    _exempt_control(lab)


# -- probe -------------------------------------------------------------------------------------

TARGETS = ["--target", "203.0.113.11:22", "--target", "[2001:db8:2::11]:22"]


SITE = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "structlog").is_dir())


def _probe(lab: Lab, uid: int, *extra: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """`egressguard probe` in the pod as an agent container runs it: its own process as `uid`, no
    capabilities in any set (bounding set empty), no_new_privs."""
    argv = ["ip", "netns", "exec", lab.pod, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
            PYTHON, "-m", "egressguard", "probe", "--status-file", str(lab.status_file), *extra]
    full_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT_DIR}:{SITE}", **(env or {})}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=40, env=full_env, cwd="/")
    return {"exit": done.returncode, "stderr": done.stderr, "stdout": done.stdout}


def test_probe_passes_as_the_confined_uid_and_fails_as_the_exempt_one(lab: Lab) -> None:
    applied(lab, POLICY)
    confined = _probe(lab, CONFINED, *TARGETS)
    assert confined["exit"] == 0, confined
    exempt = _probe(lab, EXEMPT, *TARGETS)  # the same probe, an identity the guard lets through
    assert exempt["exit"] == 6 and "203.0.113.11:22 is reachable" in str(exempt["stderr"]), exempt
    assert "[2001:db8:2::11]:22 is reachable" in str(exempt["stderr"])


def test_probe_fails_with_6_in_an_unguarded_pod_with_a_valid_status_file(lab: Lab) -> None:
    applied(lab, POLICY)
    saved = lab.status_file.read_text()
    assert _probe(lab, CONFINED, *TARGETS)["exit"] == 0
    assert lab.egressguard("reset").returncode == 0
    lab.status_file.write_text(saved)  # only the traffic can tell now
    answer = _probe(lab, CONFINED, *TARGETS)
    assert answer["exit"] == 6, answer
    stderr = str(answer["stderr"])
    assert "203.0.113.11:22 is reachable" in stderr and "[2001:db8:2::11]:22 is reachable" in stderr
    assert "state=" not in stderr and "no readable status" not in stderr


def test_probe_default_targets_are_refused_by_the_guard_and_reached_without_it(lab: Lab) -> None:
    for addr in ("192.0.2.1/32", "2001:db8::1/128"):  # the probe's default targets, made real in the world
        lab_world = ("ip", "-n", lab.world, "addr", "add", addr, "dev", "lo")
        subprocess.run(lab_world if ":" not in addr else (*lab_world, "nodad"), check=True, timeout=10)
    lab.world_answer_every_port()  # port 9 answers
    assert lab.tcp("192.0.2.1", 9, timeout=FAST).ok and lab.tcp("2001:db8::1", 9, timeout=FAST).ok
    unguarded = _probe(lab, CONFINED)
    assert unguarded["exit"] == 6 and "192.0.2.1:9 is reachable" in str(unguarded["stderr"]), unguarded
    assert "[2001:db8::1]:9 is reachable" in str(unguarded["stderr"])
    applied(lab, POLICY)
    assert _probe(lab, CONFINED)["exit"] == 0
    assert _probe(lab, EXEMPT)["exit"] == 6


@pytest.mark.parametrize("seconds", [0.2, 2.5])
def test_probe_waits_for_silence_no_longer_than_its_timeout(lab: Lab, seconds: float) -> None:
    applied(lab, {**POLICY, "action": "drop"})  # silence: every attempt runs into the timeout
    env = {"EGRESSGUARD_PROBE_TIMEOUT": str(seconds)}
    t = time.monotonic()
    baseline = _probe(lab, CONFINED, "--target", "127.0.0.1:1", env=env)  # refused at once: start-up cost only
    t_baseline = time.monotonic() - t
    t = time.monotonic()
    answer = _probe(lab, CONFINED, *TARGETS, env=env)
    waited = time.monotonic() - t - t_baseline
    assert baseline["exit"] == 0 and answer["exit"] == 0, (baseline, answer)
    assert "203.0.113.11:22 (timeout), [2001:db8:2::11]:22 (timeout)" in str(answer["stdout"]), answer
    assert seconds - 0.1 <= waited < seconds + 0.6, waited  # the default would be 1 s
    _exempt_control(lab)


@pytest.mark.parametrize("value", ["0", "31", "soon"])
def test_probe_timeout_out_of_range_is_a_usage_error(lab: Lab, value: str) -> None:
    answer = _probe(lab, CONFINED, *TARGETS, env={"EGRESSGUARD_PROBE_TIMEOUT": value})
    assert answer["exit"] == 2 and "EGRESSGUARD_PROBE_TIMEOUT" in str(answer["stderr"]), answer


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_entrypoint_as_the_agent_starts_the_command_only_when_probe_passes(lab: Lab, guarded: bool) -> None:
    """Kubernetes mode without Kubernetes: the init step applied (or not), the agent container's
    entrypoint runs as uid 1000 with nothing and execs its command only after `probe` passed."""
    applied(lab, POLICY)
    saved = lab.status_file.read_text()
    if not guarded:
        assert lab.egressguard("reset").returncode == 0
        lab.status_file.write_text(saved)  # a status file that lies: only the traffic can tell
    bindir = lab.workdir / "bin"
    bindir.mkdir()
    (bindir / "egressguard").write_text(f'#!/bin/sh\nexec {PYTHON} -m egressguard "$@"\n')
    (bindir / "egressguard").chmod(0o755)
    marker = lab.workdir / "agent-started"
    lab.workdir.chmod(0o777)  # the agent (uid 1000) writes its marker here
    argv = ["ip", "netns", "exec", lab.pod, "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
            "sh", str(ROOT_DIR / "entrypoint.sh"), "touch", str(marker)]
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "PYTHONPATH": f"{ROOT_DIR}:{SITE}",
           "EGRESSGUARD_STATUS": str(lab.status_file),
           "EGRESSGUARD_PROBE_TARGETS": "203.0.113.11:22,[2001:db8:2::11]:22"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=40, env=env, cwd="/")
    if guarded:
        assert done.returncode == 0 and marker.exists(), done.stderr[-1500:]
    else:
        assert done.returncode == 6 and not marker.exists(), done.stderr[-1500:]
        assert "203.0.113.11:22 is reachable" in done.stderr and "the command is not started" in done.stderr
    _exempt_control(lab)
