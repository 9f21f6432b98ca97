"""Fault injection: SIGKILL `apply` at named points and at timed instants over its whole run, race it
with a second apply and a foreign iptables writer, break its status directory, take away kernel
support. Confined traffic must never get out beyond lockdown + the policies involved, and a fresh
apply must always restore exactly the policy."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from egtraffic import stopped

from egressguard.backends.iptables import fence
from egressguard.lab import RESOLVER_V4, RESOLVER_V6, Lab, Result

pytestmark = pytest.mark.netns

HARNESS = Path(__file__).with_name("fault_apply.py")
TIMED_KILLS_PER_SCENARIO = 36
EXACT_CHECK_EVERY = 4  # timed kills: a fresh apply + exact comparison after every 4th (each costs a full apply)

POLICY_A = {
    "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001]},
    "dns": {"resolvers": [RESOLVER_V4, RESOLVER_V6]},
    "allow": [{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}],
    "redirect": [{"ports": [80], "to_port": 8444}],
}
POLICY_B = {
    "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001]},
    "dns": {"resolvers": [RESOLVER_V4, RESOLVER_V6]}, "action": "reject",
    "allow": [{"host": "other.test", "ports": [22, 443]}],
    "redirect": [{"ports": [443], "to_port": 8443}],
}
# Allowed by neither policy: a confined probe must never reach the world there.
OUTSIDE = (("tcp", "203.0.113.12", 22), ("tcp", "203.0.113.12", 80), ("udp", "192.0.2.10", 9999),
           ("tcp", "2001:db8:2::12", 22), ("tcp", "2001:db8:2::12", 443), ("udp", "2001:db8:2::12", 9999))
_POLICY_POINTS = (
    "policy:start", "policy:ipv4:filter:before", "policy:ipv4:filter:after", "policy:ipv4:nat:before",
    "policy:ipv4:nat:after", "policy:ipv4:committed", "policy:ipv6:filter:before", "policy:ipv6:filter:after",
    "policy:ipv6:nat:before", "policy:ipv6:nat:after", "policy:done",
)
# A first apply of A (nothing to resolve) holds the routing fence while the policy goes in; one of B
# (a host entry, so apply must query DNS) commits the lockdown first and lowers the fence before resolving.
FIRST_APPLY_POINTS = {
    "A": ("fence:raise:before", "fence:raise:after", "resolve", *_POLICY_POINTS, "fence:lower:before",
          "fence:lower:after", "verify", "status"),
    "B": ("fence:raise:before", "fence:raise:after", "lockdown:start", "lockdown:ipv4:filter:before",
          "lockdown:ipv4:filter:after", "lockdown:ipv4:committed", "lockdown:ipv6:filter:before",
          "lockdown:ipv6:filter:after", "lockdown:done", "fence:lower:before", "fence:lower:after", "resolve",
          *_POLICY_POINTS, "verify", "status"),
}
# Killed here, one family may hold the first ruleset while the other does not (family in, family
# not in; None: either way, as the families commit side by side): the fence must be up.
BETWEEN_THE_FAMILIES: dict[str, dict[str, tuple[int | None, int | None]]] = {
    "A": {"policy:ipv4:committed": (4, None), "policy:ipv6:filter:before": (None, 6)},
    "B": {"lockdown:ipv4:committed": (4, None), "lockdown:ipv6:filter:before": (None, 6)},
}
REAPPLY_POINTS = ("fence:lower:before", "fence:lower:after", "resolve", *_POLICY_POINTS, "verify", "status")
EMPTY_TABLES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
                "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n")

_tally: dict[str, int] = {"named": 0, "timed": 0, "escapes": 0, "fenced": 0, "before_first_change": 0, "restored": 0}
# Where the timed kills of a first apply landed, judged by the state each left: nothing changed yet,
# the fence up with no family / one family / both families in, or the guard complete (fence lowered).
_windows: dict[str, int] = {"before any change": 0, "fence only": 0, "fence + one family": 0,
                            "fence + both families": 0, "guarded": 0}
MIN_INSIDE_THE_FENCE = 18  # of 36 timed kills of a first apply, measured from the fence's raising (27-35 seen)
MIN_PER_FENCE_WINDOW = 3  # and in each window the fence holds: no family in, one, both (6-18 seen)
# Where a kill aimed at a fence window starts (the point that opens it), and at most how many per window.
AIMED_AT = {"fence only": "fence:raise:after", "fence + one family": "policy:ipv4:committed",
            "fence + both families": "policy:done"}
AIMED_KILLS_MAX = 15
MIN_REAPPLY_CHANGED = 6  # re-apply kills that must come after a kernel change


class Bed:
    """One lab, two policies and their reference dumps."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.paths = {"A": lab.write_policy(POLICY_A, "a.json"), "B": lab.write_policy(POLICY_B, "b.json")}
        self.ref: dict[str, str] = {}
        self.blank()
        for name in ("A", "B"):
            self.blank()
            done = lab.apply(self.paths[name])
            assert done.returncode == 0, done.stderr[-800:]
            self.ref[name] = lab.ruleset_dump()
        self.blank()
        start = time.monotonic()
        assert lab.apply(self.paths["A"]).returncode == 0
        self.full_run_s = time.monotonic() - start
        self.blank()
        self.blank_dump = lab.ruleset_dump()
        # Positive control: every OUTSIDE probe reaches the world without the guard, so `escapes`
        # would see an escape (a dead server would look like a block).
        missing = set(OUTSIDE) - {o for o in OUTSIDE if self._reaches(*o)}
        assert not missing, f"the world does not answer {missing}: escapes could not be seen"

    def _reaches(self, proto: str, dest: str, port: int, uid: int = 1000) -> bool:
        r: Result = (self.lab.tcp if proto == "tcp" else self.lab.udp)(dest, port, uid=uid, timeout=0.5)
        return r.ok and str(r.answer).startswith("world")

    def timing(self, name: str) -> dict[str, float]:
        """When each point of a whole apply comes, in seconds after the process is spawned (one run
        of the harness with nothing armed; the timed kills run the same harness)."""
        trace = self.lab.workdir / "trace"
        trace.unlink(missing_ok=True)
        start = time.monotonic()
        done = subprocess.run(self.argv(name, "none"), capture_output=True, text=True, timeout=60,
                              env={**os.environ, "EG_FAULT_TRACE": str(trace)})
        assert done.returncode == 0, done.stderr[-800:]
        points: dict[str, float] = {}
        for line in trace.read_text().splitlines():
            point, at = line.rsplit(" ", 1)
            points.setdefault(point, float(at) - start)
        points["end"] = time.monotonic() - start
        return points

    def argv(self, name: str, harness_point: str | None = None) -> list[str]:
        head = [sys.executable, str(HARNESS), harness_point] if harness_point else [sys.executable, "-m", "egressguard"]
        return ["ip", "netns", "exec", self.lab.pod, *head, "apply", "--policy", str(self.paths[name]),
                "--status-file", str(self.lab.status_file)]

    def blank(self) -> None:
        """Back to a namespace egressguard never touched (both families, filter and nat, no fence)."""
        for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
            subprocess.run(["ip", "netns", "exec", self.lab.pod, tool], input=EMPTY_TABLES, text=True, check=True,
                           capture_output=True, timeout=20)
        for family in ("-4", "-6"):
            for _ in range(4096):  # bounded: at most one rule per uid range
                if self.lab.in_pod("ip", family, "rule", "del", "pref", str(fence.PRIORITY),
                                   "protocol", str(fence.PROTOCOL)).returncode != 0:
                    break

    def fenced(self) -> bool:
        return f"proto {fence.PROTOCOL}" in self.lab.in_pod("ip", "rule").stdout + self.lab.in_pod("ip", "-6", "rule").stdout

    def guarded_families(self) -> set[int]:
        out = set()
        for family, tool in ((4, "iptables-legacy-save"), (6, "ip6tables-legacy-save")):
            if "-j EGRESSGUARD" in self.lab.in_pod(tool).stdout:
                out.add(family)
        return out

    def escapes(self, families: set[int]) -> list[str]:
        got = []
        for proto, dest, port in OUTSIDE:
            if (6 if ":" in dest else 4) not in families:
                continue
            r: Result = (self.lab.tcp if proto == "tcp" else self.lab.udp)(dest, port, uid=1000, timeout=0.5)
            if r.ok and str(r.answer).startswith("world"):
                got.append(f"{proto} {dest}:{port} -> {r.answer}")
        return got

    def check_after_kill(self, fresh: bool, what: str) -> str:
        """Check what a killed apply left, and say where it was killed (see _windows)."""
        families = self.guarded_families()
        fenced = self.fenced()
        if fresh and not families and not fenced:
            # Killed before its first kernel change: nothing may have changed at all (the agent never
            # starts: the apply did not exit 0).
            assert self.lab.ruleset_dump() == self.blank_dump, f"{what}: no fence, no guard, but the tables changed"
            _tally["before_first_change"] += 1
            return "before any change"
        if families != {4, 6}:
            # Killed during a first apply's first commits: the routing fence, raised for both families
            # in one system call before them, holds whatever family they have not reached yet.
            assert fresh and fenced, f"{what}: guarded families {families}, fence up: {fenced}"
            _tally["fenced"] += 1
        leaks = self.escapes({4, 6})
        _tally["escapes"] += len(leaks)
        assert not leaks, f"{what}: {leaks}"
        if not fenced:
            return "guarded"
        return {0: "fence only", 1: "fence + one family", 2: "fence + both families"}[len(families)]

    def restore_and_check(self, name: str, what: str) -> None:
        done = subprocess.run(self.argv(name), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{what}: fresh apply failed: {done.stderr[-800:]}"
        assert self.lab.ruleset_dump() == self.ref[name], f"{what}: state after a fresh apply is not exactly {name}"
        _tally["restored"] += 1


@pytest.fixture(scope="module")
def bed(module_lab: Lab) -> Bed:
    return Bed(module_lab)


def _kill_at_point(bed: Bed, point: str, victim: str) -> bool:
    fired = bed.lab.workdir / "fired"
    fired.unlink(missing_ok=True)
    env = {**os.environ, "EG_FAULT_FIRED": str(fired)}
    done = subprocess.run(bed.argv(victim, point), capture_output=True, text=True, timeout=60, env=env)
    if fired.exists():
        assert done.returncode == -signal.SIGKILL, done.stderr[-500:]
        return True
    assert done.returncode == 0, done.stderr[-500:]  # the point is not on this path (e.g. no lockdown on re-apply)
    return False


@pytest.mark.parametrize(("victim", "point"), [(v, p) for v, points in FIRST_APPLY_POINTS.items() for p in points])
def test_sigkill_at_named_point_of_a_first_apply(bed: Bed, victim: str, point: str) -> None:
    bed.blank()
    if not _kill_at_point(bed, point, victim):
        pytest.fail(f"{point} is on every first apply's path but did not fire")
    _tally["named"] += 1
    what = f"first apply of {victim} killed at {point}"
    if point in BETWEEN_THE_FAMILIES[victim]:
        # One family's commit is in, the other's (in its own process, side by side) is not or may
        # not be: the fence must be up.
        family_in, family_not = BETWEEN_THE_FAMILIES[victim][point]
        families = bed.guarded_families()
        assert bed.fenced() and (family_in is None or family_in in families) and family_not not in families
    bed.check_after_kill(fresh=True, what=what)
    bed.restore_and_check(victim, what)


def test_a_first_apply_without_host_entries_commits_no_separate_lockdown(bed: Bed) -> None:
    """The fence holds the confined uids while the policy goes in: one commit per table, not two."""
    bed.blank()
    done = subprocess.run(bed.argv("A"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-800:]
    assert "lockdown_committed" not in done.stderr
    st = json.loads(bed.lab.status_file.read_text())
    assert st["fence_first"] is True and st["lockdown_first"] is False
    assert not bed.fenced()
    bed.blank()
    done = subprocess.run(bed.argv("B"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-800:]
    assert "lockdown_committed" in done.stderr  # B must resolve a name first
    assert json.loads(bed.lab.status_file.read_text())["lockdown_first"] is True


@pytest.mark.parametrize("point", REAPPLY_POINTS)
def test_sigkill_at_named_point_of_a_reapply(bed: Bed, point: str) -> None:
    bed.blank()
    assert subprocess.run(bed.argv("A"), capture_output=True, timeout=60).returncode == 0
    assert _kill_at_point(bed, point, "B"), f"{point} did not fire on a re-apply"
    _tally["named"] += 1
    what = f"re-apply A->B killed at {point}"
    bed.check_after_kill(fresh=False, what=what)
    bed.restore_and_check("B", what)


def _kill_after(bed: Bed, victim: str, anchor: str, delay: float) -> None:
    """Run the harness (nothing armed), and SIGKILL it `delay` seconds after it passes `anchor`
    (announced on a pipe): the instant is measured from the anchor, not from process spawn."""
    r, w = os.pipe()
    env = {**os.environ, "EG_FAULT_ANCHOR": anchor, "EG_FAULT_ANCHOR_FD": str(w)}
    proc = subprocess.Popen(bed.argv(victim, "none"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(w,), env=env)
    os.close(w)
    try:
        announced = select.select([r], [], [], 30)[0] and os.read(r, 1) == b"a"
        if announced and delay > 0:
            time.sleep(delay)  # where in the window after the anchor the kill lands (not an ordering)
        proc.send_signal(signal.SIGKILL)  # our own child, by its pid
        proc.wait(timeout=30)
    finally:
        os.close(r)
    assert announced, f"the apply never passed {anchor}"
    _wait_until_harness_gone(bed)


def _wait_until_harness_gone(bed: Bed) -> None:
    """The killed apply's per-family worker dies with it (PR_SET_PDEATHSIG), but may first finish a
    system call in flight: wait until no process of the harness is left in the pod."""
    pod = os.stat(f"/run/netns/{bed.lab.pod}").st_ino
    for _ in range(1000):  # bounded: 10 s
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if (os.stat(f"/proc/{pid}/ns/net").st_ino == pod
                        and b"fault_apply.py" in Path(f"/proc/{pid}/cmdline").read_bytes()):
                    left.append(pid)
            except OSError:
                continue  # gone meanwhile
        if not left:
            return
        time.sleep(0.01)
    raise AssertionError(f"harness processes {left} outlived the killed apply")


def _kill_delays(points: dict[str, float], anchor: str, last: str) -> list[float]:
    """Kill instants after `anchor`, spread over where the kernel work happens (up to just after
    `last`, as the timing run measured it), not over the whole run."""
    hi = points[last] - points[anchor] + 0.01
    return [hi * i / (TIMED_KILLS_PER_SCENARIO - 1) for i in range(TIMED_KILLS_PER_SCENARIO)]


def test_sigkill_at_timed_instants_over_a_first_apply(bed: Bed, figures: list[str]) -> None:
    bed.blank()
    points = bed.timing("A")
    for i, delay in enumerate(_kill_delays(points, "fence:raise:before", "fence:lower:after")):
        bed.blank()
        _kill_after(bed, "A", "fence:raise:before", delay)
        _tally["timed"] += 1
        what = f"first apply killed {delay * 1000:.1f} ms after it started raising the fence"
        _windows[bed.check_after_kill(fresh=True, what=what)] += 1
        if i % EXACT_CHECK_EVERY == 0:
            bed.restore_and_check("A", what)
    figures.append("faults: first-apply timed kills landed: " + ", ".join(f"{k} {v}" for k, v in _windows.items()))
    fence_windows = ("fence only", "fence + one family", "fence + both families")
    inside = sum(_windows[w] for w in fence_windows)
    assert inside >= MIN_INSIDE_THE_FENCE, f"only {inside} kills landed while the fence held: {_windows}"
    # A window the spread left thin (under load one lasts as long as the gap between the two
    # families' side-by-side commits) gets kills aimed at its opening point, each checked the same way.
    aimed: dict[str, int] = {}
    for window, anchor in AIMED_AT.items():
        for _ in range(AIMED_KILLS_MAX):
            if _windows[window] >= MIN_PER_FENCE_WINDOW:
                break
            bed.blank()
            _kill_after(bed, "A", anchor, 0)
            _tally["timed"] += 1
            landed = bed.check_after_kill(fresh=True, what=f"first apply killed as it passed {anchor}")
            _windows[landed] += 1
            aimed[landed] = aimed.get(landed, 0) + 1
    if aimed:
        figures.append("faults: aimed kills for thin windows landed: " + ", ".join(f"{k} {v}" for k, v in aimed.items()))
    thin = [w for w in fence_windows if _windows[w] < MIN_PER_FENCE_WINDOW]
    assert not thin, f"fewer than {MIN_PER_FENCE_WINDOW} kills landed in {thin}: {_windows}"


def test_sigkill_at_timed_instants_over_a_reapply(bed: Bed) -> None:
    bed.blank()
    assert subprocess.run(bed.argv("A"), capture_output=True, timeout=60).returncode == 0
    points = bed.timing("B")  # a re-apply A->B (B resolves a name, then commits)
    assert subprocess.run(bed.argv("A"), capture_output=True, timeout=60).returncode == 0
    installed = "A"
    changed = 0
    for i, delay in enumerate(_kill_delays(points, "resolve", "verify")):
        victim = "B" if installed == "A" else "A"
        before = bed.lab.ruleset_dump()
        _kill_after(bed, victim, "resolve", delay)
        changed += bed.lab.ruleset_dump() != before
        _tally["timed"] += 1
        what = f"re-apply {installed}->{victim} killed after {delay:.3f}s"
        bed.check_after_kill(fresh=False, what=what)
        if i % EXACT_CHECK_EVERY == 0 or i == TIMED_KILLS_PER_SCENARIO - 1:
            bed.restore_and_check(victim, what)
        installed = victim  # or a mix of both policies, per table: a fine starting point for the next kill
    assert changed >= MIN_REAPPLY_CHANGED, f"only {changed} of the re-apply kills came after a kernel change"


def test_two_applies_at_once_both_finish_with_exactly_one_policy(bed: Bed) -> None:
    bed.blank()
    for _ in range(3):
        procs = [subprocess.Popen(bed.argv(n), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for n in ("A", "B")]
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [0, 0], [[line for line in p.stderr.read().splitlines() if not line.startswith("{") or '"error"' in line]
                                 for p in procs if p.stderr]  # the one human line and the error events say why
        assert bed.lab.ruleset_dump() in (bed.ref["A"], bed.ref["B"])  # one whole policy, no duplicates
        for p in procs:
            p.stderr.close() if p.stderr else None


def test_foreign_writer_racing_the_commit_does_not_break_apply(bed: Bed) -> None:
    script = ("iptables-legacy -N FOREIGN 2>/dev/null; ip6tables-legacy -N FOREIGN 2>/dev/null; "
              "for i in $(seq 1 600); do iptables-legacy -A FOREIGN -j RETURN; iptables-legacy -D FOREIGN -j RETURN; "
              "ip6tables-legacy -A FOREIGN -j RETURN; ip6tables-legacy -D FOREIGN -j RETURN; done")
    writer = subprocess.Popen(["ip", "netns", "exec", bed.lab.pod, "sh", "-c", script],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        applied = 0
        while writer.poll() is None and applied < 8:
            name = "A" if applied % 2 else "B"
            done = subprocess.run(bed.argv(name), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-800:]
            applied += 1
        assert applied >= 2, "the foreign writer finished before apply could race it"
    finally:
        if writer.poll() is None:
            writer.kill()  # our own child, by its pid
        writer.wait(timeout=30)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        bed.lab.in_pod(tool, "-F", "FOREIGN")
        bed.lab.in_pod(tool, "-X", "FOREIGN")
    last = "A" if (applied - 1) % 2 else "B"
    assert bed.lab.ruleset_dump() == bed.ref[last]  # the foreign chain is gone again: exactly the last policy


def _apply_with_broken_status_dir(bed: Bed, setup: str) -> subprocess.CompletedProcess[str]:
    """apply with its status directory read-only or full, in a private mount namespace (unshare -m):
    the mounts vanish with the process and the machine's /run is never touched."""
    sdir = bed.lab.workdir / "statusdir"
    sdir.mkdir(exist_ok=True)
    inner = (f"{setup} && exec {sys.executable} -m egressguard apply --policy {bed.paths['A']} "
             f"--status-file {sdir}/status.json")
    return subprocess.run(["ip", "netns", "exec", bed.lab.pod, "unshare", "-m", "--propagation", "private",
                           "sh", "-c", inner], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setup", [
    "mount --bind {d} {d} && mount -o remount,bind,ro {d}",
    "mount -t tmpfs -o size=8k tmpfs {d} && (dd if=/dev/zero of={d}/fill bs=1k count=64 2>/dev/null; true)",
], ids=["read-only", "full"])
def test_status_write_failure_exits_4_with_lockdown_in_place(bed: Bed, setup: str) -> None:
    bed.blank()
    sdir = bed.lab.workdir / "statusdir"
    done = _apply_with_broken_status_dir(bed, setup.format(d=sdir))
    assert done.returncode == 4, done.stderr[-800:]
    human = [ln for ln in done.stderr.splitlines() if not ln.startswith("{")]
    assert len(human) == 1 and "status file" in human[0], done.stderr[-800:]
    dump = bed.lab.ruleset_dump()
    assert '--comment lockdown' in dump and "allow[0]" not in dump  # fail-closed: lockdown, not the policy
    stopped(bed.lab, "tcp", "203.0.113.10", 22)  # the policy's allow is not in force; the exempt uid reaches it
    assert bed.lab.dns("allowed.test", RESOLVER_V4, uid=1000).ok  # lockdown keeps DNS to the resolvers
    assert not bed.escapes({4, 6})


def _xtables_dir() -> Path:
    for d in ("/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/aarch64-linux-gnu/xtables", "/usr/lib/xtables"):
        if Path(d, "libxt_owner.so").exists():
            return Path(d)
    pytest.skip("no xtables extension directory found")


def test_missing_owner_match_exits_3_with_a_clear_message_and_nothing_half_installed(bed: Bed, tmp_path: Path) -> None:
    libdir = tmp_path / "xtables"
    shutil.copytree(_xtables_dir(), libdir, symlinks=True)
    (libdir / "libxt_owner.so").unlink()
    bed.blank()
    before = bed.lab.ruleset_dump()
    done = bed.lab.egressguard("apply", "--policy", str(bed.paths["A"]), env={"XTABLES_LIBDIR": str(libdir)})
    assert done.returncode == 3, done.stderr[-800:]
    human = [ln for ln in done.stderr.splitlines() if not ln.startswith("{")]
    assert len(human) == 1 and "owner" in human[0], done.stderr[-800:]
    assert bed.guarded_families() in (set(), {4, 6})  # never one family guarded and the other not
    if not bed.guarded_families():
        assert bed.lab.ruleset_dump() == before
        # The lockdown was refused, so the routing fence raised before it stays: fail closed.
        assert bed.fenced()
        assert not bed.escapes({4, 6})
        assert bed.lab.tcp("127.0.0.1", 8443, timeout=1).ok
    bed.restore_and_check("A", "apply after the missing extension is back")
    assert not bed.fenced()


@pytest.fixture(scope="module", autouse=True)
def _report(figures: list[str]) -> Any:
    yield
    kills = _tally["named"] + _tally["timed"]
    if kills:
        figures.append(
            f"faults: {kills} SIGKILLs ({_tally['named']} at named points, {_tally['timed']} timed), "
            f"{_tally['escapes']} escapes beyond lockdown + policies, exact policy restored {_tally['restored']} times; "
            f"{_tally['before_first_change']} kills came before the first kernel change, {_tally['fenced']} during "
            f"a first apply's first commits (held by the routing fence until both families were guarded)"
        )
