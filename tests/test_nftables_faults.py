"""SIGKILL `apply --backend nftables` at timed instants (measured from the moment apply starts its
policy commit, announced on a pipe, and aimed at the commit by a timing run) and at
every named point (tests/fault_apply.py): one transaction per ruleset, so the table holds one whole
ruleset (the old or the new, both families, or the lockdown), or on a first apply nothing at all;
never a mix. Confined traffic to a destination neither policy allows never gets out (the exempt uid
reaches it in the same run), and a re-apply restores exactly the policy."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from egtraffic import FAST, policy, reached, stopped
from nftbed import nft_tables
from test_faults import OUTSIDE as OUTSIDE_PROBES
from test_faults import POLICY_A, POLICY_B

from egressguard.lab import EXEMPT, Lab

pytestmark = pytest.mark.netns

HARNESS = Path(__file__).with_name("fault_apply.py")
KILLS = 20
A = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}])
B = policy(allow=[{"cidr": "203.0.113.12/32", "ports": [22]}, {"cidr": "2001:db8:2::12/128", "ports": [22]},
                  *({"cidr": f"198.18.2.{i}/32", "ports": [22]} for i in range(20))])  # B also has a set
OUTSIDE = ("203.0.113.11", "2001:db8:2::11")  # allowed by neither


ANCHOR = "policy:start"  # the timed kills' clock starts here: Python's start-up varies far more than the commit


def _start(lab: Lab, path: str, trace: Path | None = None, anchor_fd: int | None = None) -> subprocess.Popen[bytes]:
    """apply through tests/fault_apply.py with nothing armed (with `trace`: a timing run; with
    `anchor_fd`: one byte written there as apply passes ANCHOR)."""
    env = {**os.environ, "EGRESSGUARD_BACKEND": "nftables", "EGRESSGUARD_STATUS": str(lab.status_file)}
    if trace is not None:
        env["EG_FAULT_TRACE"] = str(trace)
    if anchor_fd is not None:
        env |= {"EG_FAULT_ANCHOR": ANCHOR, "EG_FAULT_ANCHOR_FD": str(anchor_fd)}
    # `ip netns exec` execs the command: the pid is the harness's own
    return subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, str(HARNESS), "none", "apply",
                             "--policy", path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=() if anchor_fd is None else (anchor_fd,))


def _kill_delays(lab: Lab, path: str) -> list[float]:
    """KILLS instants spread from the policy's commit starting (ANCHOR) to just after it is done,
    in seconds after ANCHOR (one timing run)."""
    trace = lab.workdir / "timing"
    trace.unlink(missing_ok=True)
    start = time.monotonic()
    assert _start(lab, path, trace).wait(timeout=60) == 0
    at = {}
    for line in trace.read_text().splitlines():
        point, when = line.rsplit(" ", 1)
        at.setdefault(point, float(when) - start)  # the child's CLOCK_MONOTONIC is this one
    hi = at["policy:done"] - at[ANCHOR] + 0.02
    return [hi * i / (KILLS - 1) for i in range(KILLS)]


def _holds(lab: Lab, path: str) -> bool:
    done = lab.egressguard("verify", "--policy", path, env={"EGRESSGUARD_BACKEND": "nftables"})
    return done.returncode == 0


def _kill_after(lab: Lab, path: str, delay: float) -> bool:
    """Start an apply of `path` and SIGKILL it `delay` s after it passes ANCHOR; True if the kill
    landed while apply was still running."""
    r, w = os.pipe()
    proc = _start(lab, path, anchor_fd=w)
    os.close(w)
    try:
        announced = bool(select.select([r], [], [], 30)[0]) and os.read(r, 1) == b"a"
        if announced and delay > 0:
            time.sleep(delay)  # where in the commit the kill lands (not an ordering)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # our own child, by its pid
        proc.wait(timeout=10)
    finally:
        os.close(r)
    assert announced, f"the apply never passed {ANCHOR}"
    return alive


def _outside_refused(lab: Lab) -> None:
    for host in OUTSIDE:
        stopped(lab, "tcp", host, 22)  # with its control, judged where the world receives


def test_sigkill_during_a_first_apply_leaves_the_whole_ruleset_or_nothing(lab: Lab, figures: list[str]) -> None:
    path = str(lab.write_policy(A, "a.yaml"))
    tally = {"nothing": 0, "whole": 0, "finished": 0}
    delays = _kill_delays(lab, path)
    for i in range(KILLS):
        assert lab.egressguard("reset", "--backend", "nftables").returncode == 0
        landed = _kill_after(lab, path, delays[i])
        if "inet egressguard" not in nft_tables(lab):
            assert landed
            tally["nothing"] += 1
            assert reached(lab.tcp(OUTSIDE[0], 22, timeout=FAST), OUTSIDE[0])  # unguarded: nothing was changed
        else:
            assert _holds(lab, path), f"kill {i}: the table holds something other than the whole policy"
            tally["whole" if landed else "finished"] += 1
            _outside_refused(lab)
    figures.append(f"nftables first apply, SIGKILL at {KILLS} instants: {tally}")
    print(tally)
    assert tally["nothing"] and tally["whole"] + tally["finished"], tally  # the kills spanned the commit


def test_sigkill_during_a_reapply_leaves_the_old_or_the_new_ruleset(lab: Lab, figures: list[str]) -> None:
    a, b = str(lab.write_policy(A, "a.yaml")), str(lab.write_policy(B, "b.yaml"))
    done = lab.egressguard("apply", "--policy", a, env={"EGRESSGUARD_BACKEND": "nftables"})
    assert done.returncode == 0, done.stderr
    tally = {"old": 0, "new": 0}
    delays = _kill_delays(lab, b)  # a re-apply A -> B
    assert lab.egressguard("apply", "--policy", a, env={"EGRESSGUARD_BACKEND": "nftables"}).returncode == 0
    current, other = a, b
    for i in range(KILLS):
        _kill_after(lab, other, delays[i])
        if _holds(lab, other):
            tally["new"] += 1
            current, other = other, current
        else:
            assert _holds(lab, current), f"kill {i}: neither the old nor the new policy, whole"
            tally["old"] += 1
        _outside_refused(lab)
    figures.append(f"nftables re-apply, SIGKILL at {KILLS} instants: {tally}")
    print(tally)
    assert tally["old"] and tally["new"], tally


# -- SIGKILL at every named point of apply (tests/fault_apply.py, armed for the nftables back end) -----
NAMED = {"A": POLICY_A, "B": {**POLICY_B, "allow": [*POLICY_B["allow"], *({"cidr": f"198.18.3.{i}/32", "ports": [22]}
                                                                            for i in range(20))]}}
# Every point a whole apply passes, in order, per scenario (checked against a trace of an unarmed run,
# so a point that moves or disappears fails here instead of silently going unkilled). A (nothing to
# resolve) goes in as one transaction; B (a host entry and a set) commits the lockdown first, then
# creates its set, then commits the policy.
_TAIL = ("policy:done", "readback:before", "readback:after", "verify", "status")
PATHS = {
    ("first", "A"): ("fence:lower:before", "fence:lower:after", "resolve", "policy:start", "policy:read",
                     "policy:rules:before", "policy:rules:after", *_TAIL),
    ("first", "B"): ("lockdown:start", "lockdown:read", "lockdown:rules:before", "lockdown:rules:after", "lockdown:done",
                     "fence:lower:before", "fence:lower:after", "resolve", "policy:start", "policy:read",
                     "policy:sets:before", "policy:sets:after", "policy:rules:before", "policy:rules:after", *_TAIL),
    ("reapply", "B"): ("fence:lower:before", "fence:lower:after", "resolve", "policy:start", "policy:read",
                       "policy:sets:before", "policy:sets:after", "policy:rules:before", "policy:rules:after", *_TAIL),
    ("reapply", "A"): ("fence:lower:before", "fence:lower:after", "resolve", "policy:start", "policy:read",
                       "policy:rules:before", "policy:rules:after", *_TAIL),
}
# What the table must hold after a kill, named by the state it leaves: nothing of ours enforced (a
# first apply before its first rules transaction; a set alone enforces nothing), the lockdown, the
# policy in force before (a re-apply), or the new policy.
WINDOWS = ("nothing enforced", "lockdown", "old policy", "new policy")
MIN_NAMED_PER_WINDOW = 3
_windows: dict[str, int] = dict.fromkeys(WINDOWS, 0)
_named_escapes = [0]
_scenarios_done: list[tuple[str, str]] = []


def _blocks(dump: str) -> tuple[dict[str, str], dict[str, str]]:
    """`nft -s list table` text -> (sets, chains), each name -> its whole block (compared as
    dicts: the listing's order is creation order, and a re-apply may re-create a base chain)."""
    sets: dict[str, str] = {}
    chains: dict[str, str] = {}
    current: list[str] = []
    for line in dump.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t") and line.strip().endswith("{"):
            current = [line]
        elif line == "\t}" and current:
            kind, name = current[0].split()[:2]
            (sets if kind == "set" else chains)[name] = "\n".join([*current, line])
            current = []
        elif current:
            current.append(line)
    return sets, chains


class NamedBed:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.paths = {n: lab.write_policy(p, f"named-{n}.json") for n, p in NAMED.items()}
        self.blank()
        missing = [o for o in OUTSIDE_PROBES if not self.reaches(*o, uid=1000)]
        assert not missing, f"the world does not answer {missing} unguarded: an escape could not be seen"
        self.ref: dict[str, str] = {}
        for name in NAMED:
            self.blank()
            done = self.run(name)
            assert done.returncode == 0, done.stderr[-800:]
            self.ref[name] = self.table()
        self.lockdown: dict[str, str] = {}

    def argv(self, name: str, point: str | None) -> list[str]:
        head = [sys.executable, str(HARNESS), point] if point else [sys.executable, "-m", "egressguard"]
        return ["ip", "netns", "exec", self.lab.pod, *head, "apply", "--policy", str(self.paths[name]),
                "--status-file", str(self.lab.status_file)]

    def run(self, name: str, point: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, "EGRESSGUARD_BACKEND": "nftables", **(env or {})}
        return subprocess.run(self.argv(name, point), capture_output=True, text=True, timeout=120, env=full)

    def blank(self) -> None:
        self.lab.in_pod("nft", "delete", "table", "inet", "egressguard")
        assert "inet egressguard" not in nft_tables(self.lab)

    def table(self) -> str:
        return self.lab.in_pod("nft", "-s", "list", "table", "inet", "egressguard").stdout

    def reaches(self, proto: str, dest: str, port: int, uid: int) -> bool:
        r = (self.lab.tcp if proto == "tcp" else self.lab.udp)(dest, port, uid=uid, timeout=0.5)
        return r.ok and str(r.answer).startswith("world")

    def trace(self, name: str) -> tuple[str, ...]:
        trace = self.lab.workdir / "trace"
        trace.unlink(missing_ok=True)
        done = self.run(name, "none", env={"EG_FAULT_TRACE": str(trace)})
        assert done.returncode == 0, done.stderr[-800:]
        return tuple(line.split()[0] for line in trace.read_text().splitlines())

    def state(self, victim: str, old: str | None, what: str) -> str:
        """Which window the kill left the table in; fails unless it is exactly one whole state."""
        sets, chains = _blocks(self.table())
        if not chains:
            assert old is None, f"{what}: a re-apply left no chains"
            return "nothing enforced"
        for window, name in (("new policy", victim), ("old policy", old)):
            if name is None:
                continue
            want_sets, want_chains = _blocks(self.ref[name])
            if chains == want_chains:
                # Sets a later transaction would have used may be there already; the rules' own are whole.
                assert all(sets.get(n) == b for n, b in want_sets.items()), f"{what}: {name}'s sets are not whole"
                return window
        dump = self.table()
        assert 'comment "lockdown"' in dump and "allow[" not in dump, f"{what}: neither lockdown nor a whole policy:\n{dump}"
        # The lockdown's chains (a set the policy's next transaction will use may already be there).
        assert self.lockdown.setdefault(victim, repr(chains)) == repr(chains), f"{what}: a lockdown other than the first seen"
        return "lockdown"

    def escapes(self) -> list[str]:
        got = []
        for probe in OUTSIDE_PROBES:
            if self.reaches(*probe, uid=1000):
                got.append(f"{probe} reached the world as the confined uid")
            assert self.reaches(*probe, uid=EXEMPT), f"control: {probe} does not reach the world as the exempt uid"
        return got



@pytest.fixture(scope="module")
def named(module_lab: Lab) -> NamedBed:
    return NamedBed(module_lab)


def _expected(path: tuple[str, ...], at: int, victim: str, old: str | None) -> str:
    committed = [p for p in path[: at + 1] if p.endswith(":rules:after")]
    if not committed:
        return "old policy" if old else "nothing enforced"
    return "lockdown" if committed[-1].startswith("lockdown") else "new policy"


@pytest.mark.parametrize(("scenario", "victim"), list(PATHS))
def test_sigkill_at_every_named_point(named: NamedBed, scenario: str, victim: str, figures: list[str]) -> None:
    old = None if scenario == "first" else ("A" if victim == "B" else "B")
    prepare = named.blank if old is None else lambda: _applied(named, old)
    prepare()
    path = named.trace(victim)
    assert path == PATHS[(scenario, victim)], path
    fired = named.lab.workdir / "fired"
    tally: dict[str, int] = {}
    for at, point in enumerate(path):
        prepare()
        fired.unlink(missing_ok=True)
        done = named.run(victim, point, env={"EG_FAULT_FIRED": str(fired)})
        assert fired.read_text() == point and done.returncode == -signal.SIGKILL, (point, done.stderr[-500:])
        what = f"{scenario} apply of {victim} killed at {point}"
        window = named.state(victim, old, what)
        assert window == _expected(path, at, victim, old), f"{what}: left {window}"
        if window == "nothing enforced":
            # Killed before its first rules transaction: nothing is enforced, and nothing else changed
            # either (the same probe gets out, as without the guard; the apply never exited 0).
            assert named.reaches(*OUTSIDE_PROBES[0], uid=1000), what
        else:
            leaks = named.escapes()
            _named_escapes[0] += len(leaks)
            assert not leaks, f"{what}: {leaks}"
        repaired = named.run(victim)
        assert repaired.returncode == 0, f"{what}: re-apply failed: {repaired.stderr[-800:]}"
        assert _blocks(named.table()) == _blocks(named.ref[victim]), f"{what}: the re-apply did not restore exactly {victim}"
        tally[window] = tally.get(window, 0) + 1
        _windows[window] += 1
    _scenarios_done.append((scenario, victim))
    figures.append(f"nftables {'first apply' if old is None else 're-apply'} of {victim}: "
                   f"SIGKILL at {len(path)} named points, left {tally}, "
                   f"each repaired by a re-apply")


def _applied(named: NamedBed, name: str) -> None:
    done = named.run(name)
    assert done.returncode == 0, done.stderr[-800:]
    assert _blocks(named.table()) == _blocks(named.ref[name])


def test_named_kills_covered_every_window(figures: list[str]) -> None:
    """Runs after the parametrized kills above (file order): each window got its minimum."""
    if len(_scenarios_done) < len(PATHS):
        pytest.skip(f"only {len(_scenarios_done)} of {len(PATHS)} kill scenarios ran (selected, or failed above)")
    figures.append(f"nftables named-point kills per window: {_windows}, {_named_escapes[0]} escapes")
    assert all(n >= MIN_NAMED_PER_WINDOW for n in _windows.values()), _windows
    assert _named_escapes[0] == 0


REPAIR_PATH = ("fence:lower:before", "fence:lower:after", "resolve", "policy:start", "policy:read",
               "policy:refill:before", "policy:refill:after", "policy:rules:before", "policy:rules:after", *_TAIL)
TAMPERED = "198.18.3.5"  # one of B's set members, deleted by hand before each re-apply


def _tampered(named: NamedBed) -> str:
    """B applied, then one element of its set deleted by hand; the set's name."""
    _applied(named, "B")
    sets, _ = _blocks(named.table())
    (name,) = [n for n, block in sets.items() if re.search(rf"\b{re.escape(TAMPERED)}\b", block)]
    done = named.lab.in_pod("nft", "delete", "element", "inet", "egressguard", name, f"{{ {TAMPERED} }}")
    assert done.returncode == 0, done.stderr
    return name


def test_sigkill_at_every_named_point_of_a_tampered_sets_repair(named: NamedBed, figures: list[str]) -> None:
    """A re-apply of B after one element of its set was deleted by hand: the set is flushed and
    refilled in a netlink transaction of its own (transport.SetRefill), before the rules'. Killed at
    any point, the table holds B's rules with the set as it was tampered (before the refill landed) or
    whole (after), each other set whole, and nothing reaches the world; a re-apply restores B."""
    name = _tampered(named)
    path = named.trace("B")
    assert path == REPAIR_PATH, path
    assert _blocks(named.table()) == _blocks(named.ref["B"])  # the unarmed re-apply repaired it
    want_sets, want_chains = _blocks(named.ref["B"])
    tally = {"tampered": 0, "repaired": 0}
    for at, point in enumerate(path):
        _tampered(named)
        tampered_sets, _ = _blocks(named.table())
        fired = named.lab.workdir / "fired"
        fired.unlink(missing_ok=True)
        done = named.run("B", point, env={"EG_FAULT_FIRED": str(fired)})
        assert fired.read_text() == point and done.returncode == -signal.SIGKILL, (point, done.stderr[-500:])
        sets, chains = _blocks(named.table())
        what = f"re-apply of B over its tampered set, killed at {point}"
        assert chains == want_chains, f"{what}: B's rules are not whole"
        landed = at >= path.index("policy:refill:after")
        assert sets == (want_sets if landed else tampered_sets), f"{what}: set {name} is neither as tampered nor whole"
        tally["repaired" if landed else "tampered"] += 1
        leaks = named.escapes()
        assert not leaks, f"{what}: {leaks}"
        repaired = named.run("B")
        assert repaired.returncode == 0, f"{what}: re-apply failed: {repaired.stderr[-800:]}"
        assert _blocks(named.table()) == (want_sets, want_chains), f"{what}: the re-apply did not restore B"
    assert tally["tampered"] >= 5 and tally["repaired"] >= 5, tally
    figures.append(f"nftables repair of a tampered set: SIGKILL at {len(path)} named points, left {tally}, "
                   "no escape, each repaired by a re-apply")


def _legacy_guarded_families(lab: Lab) -> set[int]:
    return {f for f, tool in ((4, "iptables-legacy-save"), (6, "ip6tables-legacy-save"))
            if "-j EGRESSGUARD" in lab.in_pod(tool).stdout}


@pytest.mark.skipif(not os.path.exists("/proc/net/ip_tables_names"), reason="legacy x_tables not in this kernel")
def test_sigkill_at_every_named_point_of_an_upgrade_from_the_iptables_back_end(named: NamedBed, figures: list[str]) -> None:
    """apply --backend nftables over an iptables guard: the iptables back end's chains, jumps and
    ipsets go only once a whole nftables ruleset is in force. Killed anywhere, a whole guard holds
    (the old one on iptables, the new one on nftables, or both), and a re-apply leaves nft objects only."""
    lab = named.lab

    def prepare() -> None:
        named.blank()
        done = lab.egressguard("apply", "--backend", "iptables", "--policy", str(named.paths["A"]))
        assert done.returncode == 0, done.stderr[-800:]
        assert _legacy_guarded_families(lab) == {4, 6}

    prepare()
    path = named.trace("B")
    assert path == PATHS[("first", "B")], path  # nothing of ours in nftables yet: a first apply there
    fired = lab.workdir / "fired"
    tally: dict[str, int] = {}
    for at, point in enumerate(path):
        prepare()
        fired.unlink(missing_ok=True)
        done = named.run("B", point, env={"EG_FAULT_FIRED": str(fired)})
        assert fired.read_text() == point and done.returncode == -signal.SIGKILL, (point, done.stderr[-500:])
        what = f"upgrade to nftables killed at {point}"
        legacy = _legacy_guarded_families(lab)
        assert legacy in (set(), {4, 6}), f"{what}: the iptables guard holds one family only: {legacy}"
        nft_window = named.state("B", None, what)
        assert nft_window == _expected(path, at, "B", None), f"{what}: left {nft_window}"
        # The iptables guard goes in the same commit call that put the nft lockdown in force, after it.
        removed = at >= path.index("lockdown:done")
        assert (legacy == set()) == removed, f"{what}: iptables guard {'still there' if legacy else 'gone'}"
        window = ("iptables guard" + (" + nftables " + nft_window if nft_window != "nothing enforced" else "")
                  if legacy else "nftables " + nft_window)
        leaks = named.escapes()
        _named_escapes[0] += len(leaks)
        assert not leaks, f"{what}: {leaks}"
        repaired = named.run("B")
        assert repaired.returncode == 0, f"{what}: re-apply failed: {repaired.stderr[-800:]}"
        assert _blocks(named.table()) == _blocks(named.ref["B"]), what
        assert _legacy_guarded_families(lab) == set() and lab.in_pod("ipset", "list", "-n").stdout.split() == [], what
        tally[window] = tally.get(window, 0) + 1
    figures.append(f"nftables upgrade from an iptables guard: SIGKILL at {len(path)} named points, left {tally}, "
                   "never without a whole guard, each repaired by a re-apply")
    assert {"iptables guard", "iptables guard + nftables lockdown", "nftables lockdown", "nftables new policy"} <= set(tally)


@pytest.mark.skipif(not os.path.exists("/proc/net/ip_tables_names"), reason="legacy x_tables not in this kernel")
def test_sigkill_at_every_named_point_of_a_move_to_the_iptables_back_end(named: NamedBed, figures: list[str]) -> None:
    """apply --backend iptables over an nftables guard (a downgrade, or auto falling back): the nft
    table goes only once both families' iptables guard is in force. Killed at any named point of the
    iptables apply, a whole guard holds (nft, or iptables, or both; the routing fence covers a family
    not yet committed), and a re-apply leaves the iptables objects only."""
    from egressguard.backends.iptables import fence  # noqa: PLC0415

    lab = named.lab
    ipt = {"EGRESSGUARD_BACKEND": "iptables"}

    def fenced() -> bool:
        return f"proto {fence.PROTOCOL}" in lab.in_pod("ip", "rule").stdout + lab.in_pod("ip", "-6", "rule").stdout

    def prepare() -> None:
        assert lab.egressguard("reset", "--backend", "iptables").returncode == 0
        assert not fenced() and _legacy_guarded_families(lab) == set()
        _applied(named, "A")  # the nftables guard

    prepare()
    trace = lab.workdir / "trace"
    trace.unlink(missing_ok=True)
    assert named.run("B", "none", env={**ipt, "EG_FAULT_TRACE": str(trace)}).returncode == 0
    path = tuple(line.split()[0] for line in trace.read_text().splitlines())
    assert "lockdown:ipv6:filter:after" in path and "policy:ipv4:filter:after" in path, path
    fired = lab.workdir / "fired"
    tally: dict[str, int] = {}
    for point in path:
        prepare()
        fired.unlink(missing_ok=True)
        done = named.run("B", point, env={**ipt, "EG_FAULT_FIRED": str(fired)})
        assert fired.read_text() == point and done.returncode == -signal.SIGKILL, (point, done.stderr[-500:])
        what = f"move to iptables killed at {point}"
        legacy, up = _legacy_guarded_families(lab), fenced()
        nft_whole = bool(_blocks(named.table())[1])
        if nft_whole:
            assert _blocks(named.table()) == _blocks(named.ref["A"]), f"{what}: the nft table is not whole A"
        else:
            # The nft table went only after the iptables guard was in force in both families.
            assert legacy == {4, 6}, f"{what}: no nft table, iptables guard in {legacy}"
        assert legacy in (set(), {4, 6}) or up, f"{what}: one family guarded by iptables ({legacy}) and no fence"
        leaks = named.escapes()
        _named_escapes[0] += len(leaks)
        assert not leaks, f"{what}: {leaks}"
        window = " + ".join(w for w, on in (("nftables guard", nft_whole), (f"iptables {sorted(legacy)}", legacy),
                                            ("fence", up)) if on)
        tally[window] = tally.get(window, 0) + 1
        repaired = named.run("B", env=ipt)
        assert repaired.returncode == 0, f"{what}: re-apply failed: {repaired.stderr[-800:]}"
        assert "inet egressguard" not in nft_tables(lab) and _legacy_guarded_families(lab) == {4, 6} and not fenced()
    assert lab.egressguard("reset", "--backend", "iptables").returncode == 0
    figures.append(f"move from nftables to iptables: SIGKILL at {len(path)} named points, left {tally}, "
                   "never without a whole guard, each repaired by a re-apply")
    assert {"nftables guard", "iptables [4, 6]"} <= set(tally) and any("+" in w for w in tally), tally
