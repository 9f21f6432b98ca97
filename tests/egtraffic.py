"""Helpers shared by the real-traffic suites (test_traffic_*, test_apply_*, test_exit_codes)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egressguard.lab import CONFINED, EXEMPT, Lab, Result

# Short timeouts: a refusal under `reject` comes at once; silence is only waited for where it is the point.
FAST = 1.0
SILENT = 0.6

BASE: dict[str, Any] = {"version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001]}}


def policy(**overrides: Any) -> dict[str, Any]:
    """A policy confining 1000 and exempting 1001, with `overrides` on top."""
    return {**BASE, **overrides}


def applied(lab: Lab, pol: dict[str, Any] | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Apply `pol` in the lab's pod and insist it worked (exit 0)."""
    done = lab.apply(pol, *extra)
    assert done.returncode == 0, f"apply exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def reached(res: Result, host: str) -> bool:
    """The world host `host` itself answered (not the pod's proxy, not another address)."""
    return res.ok and str(res.answer or "").startswith(f"world {host} ")


def refused_fast(res: Result, within: float = 0.5) -> bool:
    """Refused by an immediate error (reject), not by a timeout. On its own this cannot tell the guard
    from a closed port or a dead server: use `stopped`, which adds the control, unless the test has
    its own control in the same run."""
    return res.outcome in ("refused", "eperm", "unreachable") and res.elapsed < within


def dns_answered(res: Result) -> bool:
    return res.ok and res.detail == "NOERROR" and bool(res.answer)


def served(op: str, args: tuple[Any, ...], res: Result) -> bool:
    """`res` is the far side's own answer to probe `op(*args)`: the world host's banner for TCP, the
    world's UDP echo from that port, a DNS answer, an echo reply (a pod's own listener for a local
    destination). A closed port, a dead server or the pod's proxy is not an answer."""
    if op == "tcp":
        banner = str(res.answer or "")
        return res.ok and banner.startswith((f"world {args[0]} {args[1]} ", f"pod {args[0]} {args[1]} "))
    if op == "udp":
        return res.ok and str(res.answer or "").startswith(f"world udp {args[1]} ")
    if op == "dns":
        return dns_answered(res)
    return res.ok


# What each expected verdict accepts from the confined probe. Timeouts and refusals are kept apart:
# `refused` is reject's immediate error, `silence` is drop's timeout; a test that accepts both says so.
VERDICTS = {"refused": ("refused", "eperm", "unreachable"), "silence": ("timeout",),
            "blocked": ("refused", "eperm", "unreachable", "timeout")}


def stopped(lab: Lab, op: str, *args: Any, verdict: str = "refused", uid: int = CONFINED, control_uid: int = EXEMPT,
            timeout: float = FAST, **kwargs: Any) -> Result:
    """Probe `op(*args)` as `control_uid`, then as `uid`, in this run: the control must reach the
    far side's server (else a closed port or a dead server would pass for the guard), and `uid` must
    get `verdict` (refused: an immediate error within 0.5 s; silence: a timeout). For TCP and UDP to a
    world host the client's error is not the proof: not one of `uid`'s packets may arrive on the
    world's side of the pod's links (counted there, where the control's arrival shows the counter
    sees this port; each count waits until the control's connection has ended, so its last packet is
    not taken for `uid`'s). Returns `uid`'s result."""
    port = world_port(op, args)
    before = lab.world_received(*port) if port else 0
    control = lab.probe(op, *args, uid=control_uid, timeout=timeout, **kwargs)
    assert served(op, args, control), \
        f"control {op}{args} as uid {control_uid} did not reach the server: {control} {control.answer or ''}"
    wire = port if port and from_world(control) else None  # not a listener in the pod
    mid = lab.world_received(*wire) if wire else 0
    assert not wire or mid > before, f"control {op}{args}: the world's counter saw none of its packets"
    got = lab.probe(op, *args, uid=uid, timeout=timeout, **kwargs)
    assert got.outcome in VERDICTS[verdict], f"{op}{args} as uid {uid}: {got} {got.answer or ''}, expected {verdict}"
    if verdict == "refused":
        assert got.elapsed < 0.5, f"{op}{args} as uid {uid}: refused only after {got.elapsed:.2f} s"
    if wire:
        left = lab.world_received(*wire) - mid
        assert left == 0, f"{op}{args} as uid {uid}: the client saw {got.outcome}, but {left} packet(s) reached the world"
    return got


def world_port(op: str, args: tuple[Any, ...]) -> tuple[str, int] | None:
    """Where probe `op(host, port)` arrives at the world, counted by `Lab.world_counts`: TCP and UDP."""
    return (op, int(args[1])) if op in ("tcp", "udp") else None


def from_world(res: Result) -> bool:
    """Answered by a world host's own server (not by a listener in the pod)."""
    return str(res.answer or "").startswith("world ")


def apply_quick(lab: Lab, pol: dict[str, Any], name: str = "policy.yaml") -> None:
    """`egressguard apply` run in a forked child inside the pod (no interpreter start-up: ~0.3 s),
    for tests that apply many times. The pod's resolv.conf and the lab's status file are passed
    explicitly, as `ip netns exec` is not involved."""
    path = lab.write_policy(pol, name)
    argv = ["apply", "--policy", str(path), "--resolv-conf", f"/etc/netns/{lab.pod}/resolv.conf",
            "--status-file", str(lab.status_file)]
    res = lab.probe("egressguard", argv, uid=0, timeout=60)
    answer = res.answer if isinstance(res.answer, dict) else {}
    assert answer.get("exit") == 0, f"apply: {res} {answer.get('stderr', '')[-2000:]}"


def owned_lines(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if "EGRESSGUARD" in line or "egressguard" in line]


def foreign_lines(dump: str) -> list[str]:
    """Everything that is not egressguard's, in order (empty tables left out)."""
    ours = set(owned_lines(dump))
    return normalized("\n".join(line for line in dump.splitlines() if line not in ours)).splitlines()


def normalized(dump: str) -> str:
    """`dump` without empty tables: python-iptables makes the kernel instantiate tables it merely
    looks at (security, raw, mangle...), which then show with their empty built-in chains."""
    out: list[str] = []
    block: list[str] = []
    for line in dump.splitlines():
        if line.startswith("*"):
            block = [line]
            continue
        if block:
            block.append(line)
            if line == "COMMIT":
                body = block[1:-1]
                builtin_only = all(b.startswith(":") and b.split()[1] == "ACCEPT" and b[1:].split()[0].isupper()
                                   and b.split()[0][1:] in _BUILTIN for b in body)
                if not builtin_only:
                    out += block
                block = []
            continue
        if line.strip():
            out.append(line)
    return "\n".join(out)


_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def lab_with(pol: dict[str, Any]) -> Any:
    """A class-scoped `lab` fixture: the module's lab with `pol` applied (for read-only probe classes)."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls: type, module_lab: Lab) -> Iterator[Lab]:
        applied(module_lab, pol)
        yield module_lab

    return lab


UPLOAD = 200_000  # bytes: more than a sink's window takes before it reads, less than the pod's send buffer


def uploaded(lab: Lab, sink: Path, dest: str, port: int, uid: int,
             meanwhile: Callable[[], object] = lambda: None) -> str:
    """`uid` writes UPLOAD bytes to the world sink (Lab.world_sink) at dest:port and closes at once;
    `meanwhile` runs after close(), while most of the data still waits in the pod, sent later by a
    socket no process owns; then the sink reads. Returns its log line: what arrived, and how it ended."""
    before = len(sink.read_text().splitlines())
    res = lab.probe("upload", dest, port, uid=uid, size=UPLOAD, timeout=5.0)
    assert res.ok, f"uid {uid}: upload to {dest}:{port} got {res}"
    meanwhile()
    sink.with_suffix(".go").touch()
    for _ in range(100):
        lines = sink.read_text().splitlines()
        if len(lines) > before:
            return lines[before]
        time.sleep(0.05)
    raise AssertionError("the sink logged no connection")


def cut_midway(line: str) -> bool:
    """A sink's log line (`uploaded`) for an upload the guard cut: some of it arrived (the window the
    sink took before the cut), not all, and the connection never ended cleanly."""
    arrived, how = line.split()
    return 0 < int(arrived) < UPLOAD and how != "eof"
