"""The log of refused connections (issue 14), with real traffic: `egressguard watch` runs in the pod
as an unprivileged reader of the NFLOG group; refused TCP, UDP and ICMP attempts over IPv4 and IPv6
each appear once per flow with the policy line that refused them, the line `explain` names; a flood
gives a bounded number of events and the reader's memory stays flat; and the reader dying changes
nothing about what is refused. Every "refused" has its control: the exempt uid's same probe reaches
the world in the same run. (tests/test_nftables_log_traffic.py runs these on the nftables back end.)"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from egtraffic import FAST, applied, cut_midway, policy, reached, uploaded

from egressguard.lab import CONFINED, EXEMPT, METADATA_V4, ROOT, Lab

pytestmark = pytest.mark.netns

# Not eth0 (tests/test_suite_guards.py), and a second link: 203.0.113.12 and 2001:db8:2::12 are routed
# out of it, so refusals are logged on both interfaces. The nftables twin names both differently.
LAB_TOPOLOGIES = [{"iface": "veth1a2b3c4d", "second_iface": "net1"}]

POLICY = policy(
    allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}],
    deny=[{"cidr": "203.0.113.11/32"}, {"cidr": "2001:db8:2::11/128"}, {"cidr": "192.0.2.10/32", "protocol": "udp"}],
)
# (probe, address, port, protocol as `watch` and `explain` name it, the line that refuses it)
REFUSED = [
    ("tcp", "203.0.113.11", 22, "tcp", "deny[0]"),
    ("udp", "203.0.113.11", 9999, "udp", "deny[0]"),
    ("ping", "203.0.113.12", None, "icmp", "default"),
    ("tcp", "203.0.113.10", 5000, "tcp", "default"),  # an allowed address on a port its entry does not list
    ("tcp", METADATA_V4, 80, "tcp", "deny_metadata"),
    ("tcp", "2001:db8:2::11", 22, "tcp", "deny[1]"),
    ("udp", "2001:db8:2::12", 9999, "udp", "default"),
    ("ping", "2001:db8:2::12", None, "icmp", "default"),
]
WINDOW_S = "600"  # longer than any test: every flow is reported once, when the reader stops
MiB = 1024 * 1024


class Watcher:
    """`egressguard watch` in the pod (started as root: it drops to nobody with CAP_NET_ADMIN only),
    its JSON events read from its stderr once it has stopped."""

    def __init__(self, lab: Lab, *args: str) -> None:
        argv = ["ip", "netns", "exec", lab.pod, sys.executable, "-m", "egressguard", "--log-format", "json",
                "watch", "--window", WINDOW_S, *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], 30)  # readiness: its first line, once bound
        line = self.proc.stderr.readline() if ready else ""
        self.lines.append(line)
        if '"watch_started"' not in line:
            self.kill()  # not left running after the test
            pytest.fail(f"watch did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the interpreter: the same process

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err[-2000:]
        self.lines += err.splitlines()
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


@pytest.fixture
def watcher(lab: Lab) -> Iterator[Watcher]:
    w = Watcher(lab)
    try:
        yield w
    finally:
        w.kill()


@pytest.fixture
def lab(module_lab: Lab) -> Iterator[Lab]:
    applied(module_lab, POLICY)
    yield module_lab


def _probe(lab: Lab, kind: str, dest: str, port: int | None, uid: int) -> Any:
    if kind == "ping":
        return lab.ping(dest, uid=uid, timeout=FAST)
    return lab.udp(dest, port, uid=uid, timeout=FAST) if kind == "udp" else lab.tcp(dest, port, uid=uid, timeout=FAST)  # type: ignore[arg-type]


def _refused(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["uid"], e["destination"], e["port"], e["protocol"], e["line"]) for e in events
            if e["event"] == "connection_refused"]


def test_each_refused_flow_is_logged_once_with_its_policy_line(lab: Lab, watcher: Watcher) -> None:
    for kind, dest, port, _proto, _line in REFUSED:
        got = _probe(lab, kind, dest, port, CONFINED)
        assert got.blocked, f"{kind} {dest}:{port} was not refused: {got}"
        control = _probe(lab, kind, dest, port, EXEMPT)
        assert control.ok, f"control: the exempt uid's {kind} to {dest}:{port} got {control}"
    for _ in range(2):  # repeats of a flow are folded into its one event
        assert lab.tcp("203.0.113.11", 22, timeout=FAST).blocked
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")  # allowed: never logged
    events = watcher.stop()
    expected = [(CONFINED, dest, port, proto, line) for _kind, dest, port, proto, line in REFUSED]
    assert sorted(_refused(events), key=str) == sorted(expected, key=str)
    counts = {(e["destination"], e["port"], e["protocol"]): e["packets"] for e in events if e["event"] == "connection_refused"}
    assert counts[("203.0.113.11", 22, "tcp")] == 3
    assert not [e for e in events if e["event"] == "refusals_not_itemised"]


def test_explain_names_the_line_the_log_names_for_every_logged_refusal(lab: Lab, watcher: Watcher) -> None:
    for kind, dest, port, _proto, _line in REFUSED:
        assert _probe(lab, kind, dest, port, CONFINED).blocked
    events = [e for e in watcher.stop() if e["event"] == "connection_refused"]
    assert len(events) == len(REFUSED)
    path = lab.write_policy(POLICY)
    for e in events:
        host = f"[{e['destination']}]" if ":" in e["destination"] else e["destination"]
        dest = f"{host}:{e['port']}/{e['protocol']}" if e["port"] else f"{e['destination']}/{e['protocol']}"
        out = lab.egressguard("explain", "--policy", str(path), "--uid", str(e["uid"]), dest)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0].endswith(f": {e['line']}"), (dest, out.stdout, e)
        assert out.stdout.startswith("refuse")


def test_a_flood_of_refusals_gives_a_bounded_number_of_events(lab: Lab, watcher: Watcher, figures: list[str]) -> None:
    """10,000 UDP datagrams to 10,000 ports of a denied host, as fast as one process sends them: the
    kernel's limit (10/second, burst 50 per rule) lets through a bounded share to the reader."""
    before = _counts(lab)
    took = _flood(lab, "192.0.2.10", 10_000)
    events = watcher.stop()
    after = _counts(lab)
    refused = after["refused"].get("deny[2]", 0) - before["refused"].get("deny[2]", 0)
    logged = after["logged"].get("deny[2]", 0) - before["logged"].get("deny[2]", 0)
    assert refused >= 10_000  # every datagram was refused (and counted by the refusing rule)
    assert logged <= 50 + 10 * 100  # burst + 100 s at the rate: the flood took far less (figure below)
    reported = sum(e["packets"] for e in events if e["event"] == "connection_refused" and e["line"] == "deny[2]")
    assert reported == logged  # every packet the kernel logged is reported, none is invented
    figures.append(f"log flood: 10000 refused datagrams in {took:.2f} s, {logged} logged by the kernel, "
                   f"{len(_refused(events))} events")


def test_the_readers_memory_stays_flat_whatever_the_agent_sends(lab: Lab, figures: list[str]) -> None:
    """A policy whose kernel limit lets nearly everything through: the reader's resident memory (which
    it reports when it stops, after reading everything queued, with the flows still held) is the same
    after 10,000 distinct refused flows as after 300; it keeps at most --max-flows of them and counts
    the rest."""
    applied(lab, {**POLICY, "log": {"rate": "10000/second", "burst": 10000}})
    try:
        small, _ = _peak_rss_after_flood(lab, 300)
        big, events = _peak_rss_after_flood(lab, 10_000)
    finally:
        applied(lab, POLICY)
    assert big - small < 1 * MiB, f"RSS {small / MiB:.1f} MiB after 300 flows, {big / MiB:.1f} MiB after 10000"
    itemised = _refused(events)
    assert len(itemised) <= 256  # at most --max-flows per window (one window here)
    skipped = sum(e["packets"] + e["lost_in_kernel_queue"] for e in events if e["event"] == "refusals_not_itemised")
    assert skipped > 0  # more flows than the reader keeps arrived, and they were counted
    figures.append(f"log reader: RSS {small / MiB:.1f} MiB after 300 refused flows, {big / MiB:.1f} MiB after "
                   f"10000 ({len(itemised)} itemised, {skipped} counted only)")


def _peak_rss_after_flood(lab: Lab, flows: int) -> tuple[int, list[dict[str, Any]]]:
    w = Watcher(lab, "--max-flows", "256")
    try:
        _flood(lab, "192.0.2.10", flows)
        events = w.stop()
    finally:
        w.kill()
    stopped = next(e for e in events if e["event"] == "watch_stopped")
    return stopped["rss_kib"] * 1024, events


def test_killing_the_reader_changes_nothing_about_what_is_refused(lab: Lab) -> None:
    probes = [*REFUSED, ("tcp", "203.0.113.10", 22, "tcp", "allow[0]")]

    def outcomes(uid: int) -> list[str]:
        return [_probe(lab, kind, dest, port, uid).outcome for kind, dest, port, _p, _l in probes]

    w = Watcher(lab)
    with_reader = outcomes(CONFINED)
    w.proc.kill()
    w.proc.communicate(timeout=30)
    assert w.proc.returncode == -signal.SIGKILL
    without_reader = outcomes(CONFINED)
    assert without_reader == with_reader
    assert all(o in ("refused", "timeout", "eperm", "unreachable") for o in with_reader[:-1]), with_reader
    assert with_reader[-1] == "ok"
    # judged on the far side too: the confined uid's refused SYNs to port 5000 never reach the world,
    # the exempt uid's do (the control)
    received = lab.world_received("tcp", 5000)
    assert lab.tcp("203.0.113.10", 5000, timeout=FAST).blocked
    assert lab.world_received("tcp", 5000) == received
    assert lab.tcp("203.0.113.10", 5000, uid=EXEMPT, timeout=FAST).ok
    assert lab.world_received("tcp", 5000) > received
    assert outcomes(EXEMPT) == ["ok"] * len(probes)  # the control: every destination answers the exempt uid


def _flood(lab: Lab, dest: str, count: int, first_port: int = 1) -> float:
    """`count` UDP datagrams to `count` consecutive ports of `dest`, from one socket of the confined uid."""
    code = ("import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);t=time.monotonic()\n"
            f"for p in range({first_port},{first_port + count}):\n"
            f"    try: s.sendto(b'x',('{dest}',p))\n"
            "    except OSError: pass\n"
            "print(time.monotonic()-t)")
    res = lab.exec_as(["/usr/bin/python3", "-c", code], uid=CONFINED, timeout=60)
    assert res.ok, res.answer
    return float(str(res.answer).split()[-1])


def _counts(lab: Lab) -> dict[str, dict[str, int]]:
    """Per policy line: packets refused (`status --json`) and packets the log rules let through."""
    out = lab.egressguard("status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    logged: dict[str, int] = {}
    for t in report["tables"]:
        for rules in t["chains"].values():
            for r in rules:
                if "NFLOG" in r["rule"] or " log prefix " in r["rule"]:
                    line = r["rule"].split("prefix ", 1)[1].split()[0].strip('"')
                    logged[line] = logged.get(line, 0) + r["packets"]
    return {"refused": report["refused"], "logged": logged}


def test_status_counts_refusals_per_policy_line(lab: Lab) -> None:
    before = _counts(lab)["refused"]
    for _ in range(3):
        assert lab.tcp("203.0.113.11", 22, timeout=FAST).blocked
    assert lab.tcp("2001:db8:2::11", 22, timeout=FAST).blocked
    assert lab.tcp("203.0.113.11", 22, uid=EXEMPT, timeout=FAST).ok  # control: not counted
    after = _counts(lab)["refused"]
    assert after["deny[0]"] - before.get("deny[0]", 0) == 3
    assert after["deny[1]"] - before.get("deny[1]", 0) == 1
    text = lab.egressguard("status")
    assert "refused packets, by policy line: " in text.stdout and f"deny[0] {after['deny[0]']}" in text.stdout


def test_log_refused_false_installs_no_log_rule_and_refuses_the_same(lab: Lab) -> None:
    applied(lab, {**POLICY, "log": {"refused": False}})
    try:
        dump = lab.ruleset_dump()
        assert "NFLOG" not in dump and " log " not in dump
        for kind, dest, port, _p, _l in REFUSED:
            assert _probe(lab, kind, dest, port, CONFINED).blocked
            assert _probe(lab, kind, dest, port, EXEMPT).ok
    finally:
        applied(lab, POLICY)


# A refusal's verdict as status prints it on either back end: refuse there, or jump to its line's chain.
_VERDICT = re.compile(r"-j (EGRESSGUARD-REFUSE-\d+|REJECT --reject-with \S+|DROP)|jump refuse[46]-\d+|"
                      r"reject with (tcp reset|icmpv6 type port-unreachable|icmp type port-unreachable)|\bdrop\b")


_TCP = re.compile(r"(?:^|(?<= ))(?:-p tcp|meta l4proto tcp)(?: |$)")


def _folded(rules: list[str]) -> list[str]:
    """Log-off rules (verdicts as REFUSE) as log on keeps them: of a refusal pair (TCP, then the
    same match for any protocol) only the second, both halves jumping to the same chain."""
    out: list[str] = []
    for r in rules:
        if "REFUSE" in r and out and out[-1] != r and _TCP.sub("", out[-1]) == r:
            out.pop()
        out.append(r)
    return out


def _filter_chains(lab: Lab) -> dict[str, dict[str, list[str]]]:
    """Per family, our filter chains as the kernel holds them (read back by `status --json`)."""
    out = lab.egressguard("status", "--json")
    assert out.returncode == 0, out.stderr
    return {t["family"]: {name: [r["rule"] for r in rules] for name, rules in t["chains"].items()}
            for t in json.loads(out.stdout)["tables"] if t["table"] == "filter"}


def test_allowed_traffic_meets_no_log_rule_in_the_kernel(lab: Lab) -> None:
    """Read back from the kernel: with log on, the chains an allowed packet passes (dispatch, then
    confined up to its RETURN) hold the rules they hold with log off, matches and order alike (a
    refusal pair folded into one jump); the log rules sit in the refusal chains only, and allowed
    traffic moves none of their counters."""
    on = _filter_chains(lab)
    applied(lab, {**POLICY, "log": {"refused": False}})
    try:
        off = _filter_chains(lab)
    finally:
        applied(lab, POLICY)
    for family in ("ipv4", "ipv6"):
        assert list(off[family]) == ["EGRESSGUARD", "EGRESSGUARD-CONFINED"]
        assert list(on[family])[:2] == ["EGRESSGUARD", "EGRESSGUARD-CONFINED"] and len(on[family]) > 2
        assert on[family]["EGRESSGUARD"] == off[family]["EGRESSGUARD"]
        got, was = on[family]["EGRESSGUARD-CONFINED"], off[family]["EGRESSGUARD-CONFINED"]
        assert not [r for r in got if "NFLOG" in r or " log " in r]
        folded = _folded([_VERDICT.sub("REFUSE", r) for r in was])
        assert len(folded) < len(was)  # the default refusal is a pair with log off
        assert [_VERDICT.sub("REFUSE", r) for r in got] == folded
        assert sum(bool(_VERDICT.search(r)) for r in got) == sum("REFUSE" in r for r in folded) > 0
        for name, rules in on[family].items():
            if name.startswith("EGRESSGUARD-REFUSE-"):
                assert "NFLOG" in rules[0] or " log prefix " in rules[0]
    before = _counts(lab)["logged"]
    for host in ("203.0.113.10", "2001:db8:2::10"):
        assert reached(lab.tcp(host, 22, timeout=FAST), host)  # allowed
    assert _counts(lab)["logged"] == before
    assert lab.tcp("203.0.113.11", 22, timeout=FAST).blocked  # the control: a refusal does move them
    after = _counts(lab)["logged"]
    assert after["deny[0]"] == before.get("deny[0]", 0) + 1


SINK_PORT = 7781


@pytest.fixture(scope="module")
def sink(module_lab: Lab) -> Path:
    return module_lab.world_sink(SINK_PORT)


def test_what_a_closed_socket_sent_after_its_allow_went_is_logged_without_a_uid(
        lab: Lab, watcher: Watcher, sink: Path) -> None:
    """README ("uid": null): the confined uid uploads to a host allowed on the sink's port and closes;
    a re-apply takes the allow away while most of the data waits in the pod. The rest, sent by no
    process, is refused by the default line and logged with no uid; nothing of it arrives."""
    allowing = {**POLICY, "allow": [*POLICY["allow"], {"cidr": "203.0.113.12/32", "ports": [SINK_PORT]}]}
    applied(lab, allowing)
    try:
        got = uploaded(lab, sink, "203.0.113.12", SINK_PORT, CONFINED, meanwhile=lambda: applied(lab, POLICY))
    finally:
        applied(lab, POLICY)
    assert cut_midway(got), got
    assert [e for e in _refused(watcher.stop()) if e[1] == "203.0.113.12"] == [
        (None, "203.0.113.12", SINK_PORT, "tcp", "default")]


def test_watch_runs_as_nobody_with_only_cap_net_admin(lab: Lab, watcher: Watcher) -> None:
    with open(f"/proc/{watcher.pid}/status") as fh:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    assert fields["Uid"].split() == ["65534"] * 4
    assert int(fields["CapEff"], 16) == 1 << 12 and int(fields["CapBnd"], 16) == 1 << 12
    assert fields["NoNewPrivs"].strip() == "1"


def test_a_second_reader_in_the_same_pod_exits_3_and_the_first_goes_on(lab: Lab, watcher: Watcher) -> None:
    second = lab.egressguard("watch", timeout=30)
    assert second.returncode == 3, second.stderr[-1000:]
    assert "another reader holds NFLOG group 14 in this namespace" in second.stderr
    assert lab.tcp("203.0.113.11", 22, timeout=FAST).blocked
    assert [e for e in _refused(watcher.stop()) if e[1] == "203.0.113.11"] == [(CONFINED, "203.0.113.11", 22, "tcp", "deny[0]")]


def test_under_confine_all_refusals_of_root_and_of_unlisted_uids_are_logged_with_their_line(lab: Lab) -> None:
    """`confine: all` (every uid but the exempt ones, root included): the same refusals are logged,
    each with the uid that sent it and the policy line that refused it."""
    probes = [r for r in REFUSED if r[0] == "tcp" and r[4].startswith("deny")]  # one per family
    applied(lab, {**POLICY, "confine": {"uids": "all"}})
    try:
        watcher = Watcher(lab)
        try:
            for uid in (ROOT, 1002):
                for kind, dest, port, _proto, _line in probes:
                    got = _probe(lab, kind, dest, port, uid)
                    assert got.blocked, f"uid {uid}: {kind} {dest}:{port} was not refused: {got}"
            for kind, dest, port, _proto, _line in probes:
                control = _probe(lab, kind, dest, port, EXEMPT)
                assert control.ok, f"control: the exempt uid's {kind} to {dest}:{port} got {control}"
            events = watcher.stop()
        finally:
            watcher.kill()
    finally:
        applied(lab, POLICY)
    expected = [(uid, dest, port, proto, line) for uid in (ROOT, 1002) for _kind, dest, port, proto, line in probes]
    assert sorted(_refused(events), key=str) == sorted(expected, key=str)
