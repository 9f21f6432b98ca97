"""Docker mode's log (issue 14), without Docker: `egressguard run` starts `egressguard watch` as a
process of its own beside the command, as another user; its events go to the same log as the
command's; the command can neither signal nor trace it; and it ends with the command."""

from __future__ import annotations

import json

import pytest
from egtraffic import FAST, reached
from test_run_in_netns import POLICY, PYTHON, image_users  # noqa: F401 - the fixture

from egressguard.lab import EXEMPT, Lab

pytestmark = pytest.mark.netns

# The command: a refused connection, then an attempt to kill the reader.
COMMAND = r"""
import ctypes, json, os, signal, socket
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect(("203.0.113.11", 22)); refused = "no"
except OSError as exc:
    refused = type(exc).__name__
mine = f"\0watch\0--ready-fd\0".encode(), f"\0--parent\0{os.getpid()}\0".encode()  # beside this command
readers = []
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open(f"/proc/{p}/cmdline", "rb").read()
    except OSError:
        continue
    if all(m in cmdline for m in mine):
        readers.append(int(p))
killed = {}
for pid in readers:
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
        try:
            os.kill(pid, sig); killed[f"{pid}/{sig.name}"] = "sent"
        except OSError as exc:
            killed[f"{pid}/{sig.name}"] = exc.strerror
libc = ctypes.CDLL(None, use_errno=True)
traced = {}
for pid in readers:  # PTRACE_ATTACH (16): no way into the reader's memory either
    traced[str(pid)] = "attached" if libc.ptrace(16, pid, None, None) == 0 else os.strerror(ctypes.get_errno())
print(json.dumps({"refused": refused, "readers": readers, "kill": killed, "ptrace": traced}))
"""


def test_run_starts_the_reader_beside_the_command_which_cannot_signal_it(
        lab: Lab, image_users: tuple[str, ...]) -> None:  # noqa: F811
    (lab.workdir / "command.py").write_text(COMMAND)
    (lab.workdir / "command.py").chmod(0o644)
    done = lab.egressguard("run", "--user", "sandbox", "--policy", str(lab.write_policy(POLICY)), "--",
                           PYTHON, str(lab.workdir / "command.py"), prefix=image_users, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert report["refused"] == "ConnectionRefusedError"
    assert len(report["readers"]) == 1, report
    assert set(report["kill"].values()) == {"Operation not permitted"}, report
    assert set(report["ptrace"].values()) == {"Operation not permitted"}, report
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "watch_started_beside_command")
    assert started["pid"] == report["readers"][0]
    refused = [e for e in events if e["event"] == "connection_refused"]
    # the reader ended with the command (which is why `run` returned) and reported on its way out
    assert [(e["uid"], e["destination"], e["port"], e["line"]) for e in refused] == [(1000, "203.0.113.11", 22, "default")]
    assert events[-1]["event"] == "watch_stopped" or any(e["event"] == "watch_stopped" for e in events)
    assert reached(lab.tcp("203.0.113.11", 22, uid=EXEMPT, timeout=FAST), "203.0.113.11")  # control


def test_run_starts_no_reader_when_the_policy_logs_nothing(lab: Lab, image_users: tuple[str, ...]) -> None:  # noqa: F811
    (lab.workdir / "command.py").write_text(COMMAND)
    (lab.workdir / "command.py").chmod(0o644)
    quiet = {**POLICY, "log": {"refused": False}}
    done = lab.egressguard("run", "--user", "sandbox", "--policy", str(lab.write_policy(quiet)), "--",
                           PYTHON, str(lab.workdir / "command.py"), prefix=image_users, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert report["refused"] == "ConnectionRefusedError" and report["readers"] == []
    assert "watch_started" not in done.stderr
