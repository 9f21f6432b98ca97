"""The fail-closed exit paths, each taken through an honest cause in a real pod namespace: the kernel
refusing a system call (a seccomp filter: the kernel answers as one that lacks the feature would),
a library that cannot be loaded, a foreign writer racing the read-back. Never by patching
egressguard's functions. Each checks the kernel state the README's exit-code table promises.

The exit-4 test tells the lockdown's commit from BIG's by size: the figures are at REFUSE_OVER.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from egtraffic import FAST, applied, dns_answered, normalized, policy, reached, stopped

from egressguard.lab import RESOLVER_V4, Lab

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.uname().machine != "x86_64", reason="seccomp filters: x86_64 syscall numbers")]

HERE = Path(__file__).parent
SECCOMP = str(HERE / "seccomp_exec.py")
TAMPER = str(HERE / "tamper.py")

ALLOWED = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}, {"cidr": "2001:db8:2::10/128", "ports": [22]}])
# 20 more entries per family, each its own rule (distinct ports, fewer than 16 networks per port list).
BIG = policy(allow=ALLOWED["allow"]
             + [{"cidr": f"192.0.2.{100 + i}/32", "ports": [3000 + i]} for i in range(20)]
             + [{"cidr": f"2001:db8:9::{i + 1:x}/128", "ports": [3000 + i]} for i in range(20)])
# Commit sizes measured on this kernel (bytes of the filter blob; IPv6 carries the MLD u32 rules),
# run V: lockdown 19,584 (IPv4) / 43,184 (IPv6); BIG 33,024 / 57,800. A threshold per family about
# halfway between the two, so the lockdown commits and BIG is refused. If the rules change, re-measure
# (strace -f -e setsockopt of the apply under this test's seccomp filter shows each
# IPT_SO_SET_REPLACE's size; the last figures had drifted to within 800 bytes of the old thresholds).
REFUSE_OVER = {4: 26_000, 6: 50_000}


def seccomp(*rules: str) -> tuple[str, ...]:
    return (sys.executable, SECCOMP, *rules, "--")


def fence_rules(lab: Lab) -> list[str]:
    """The routing fence in the pod: `prohibit` rules of protocol 235, both families."""
    out = lab.in_pod("ip", "rule", "show").stdout + lab.in_pod("ip", "-6", "rule", "show").stdout
    return [line for line in out.splitlines() if "proto 235" in line]


def status(lab: Lab) -> dict[str, object]:
    return json.loads(lab.status_file.read_text())


def events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def assert_lockdown_only(lab: Lab) -> None:
    """Confined uid 1000: DNS and loopback, nothing the policy allows; exempt 1001 unaffected (the control)."""
    dump = lab.ruleset_dump()
    assert "--comment lockdown" in dump and "allow[" not in dump, dump
    assert dns_answered(lab.dns("allowed.test", RESOLVER_V4, timeout=FAST))
    assert lab.tcp("127.0.0.1", 8443, timeout=FAST).ok and lab.tcp("::1", 8443, timeout=FAST).ok
    for host in ("203.0.113.10", "2001:db8:2::10"):
        stopped(lab, "tcp", host, 22)


# -- exit 4: the kernel refuses the commit ----------------------------------------------------


@pytest.mark.parametrize("installed", [False, True], ids=["first-apply", "over-a-policy"])
def test_kernel_refusing_the_policy_commit_exits_4_and_leaves_the_lockdown(lab: Lab, installed: bool) -> None:
    if installed:
        applied(lab, policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}]))
        assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")  # the lockdown will change this
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(BIG)),
                           prefix=seccomp(f"setsockopt,1=0,2=64,4>{REFUSE_OVER[4]}:EINVAL",
                                          f"setsockopt,1=41,2=64,4>{REFUSE_OVER[6]}:EINVAL"))
    assert done.returncode == 4, done.stderr[-1500:]
    assert "the kernel refused the commit: can't commit: b'Invalid argument'" in done.stderr
    names = [e["event"] for e in events(done.stderr)]
    assert "lockdown_committed" in names and "lockdown_failed" not in names
    st = status(lab)
    assert st["state"] == "lockdown" and st["exit_code"] == 4 and "refused" in str(st["error"])
    assert fence_rules(lab) == []  # the lockdown holds both families: the fence came down
    assert_lockdown_only(lab)


def test_kernel_refusing_every_commit_on_a_first_apply_exits_3_with_the_fence_up(lab: Lab) -> None:
    """README, exit 3: a kernel that lacks a match (here every commit answered ENOENT, as when
    xt_owner is missing) refuses the policy and the lockdown; the fence stays, so the confined uid
    reaches nothing but loopback."""
    before = lab.ruleset_dump()
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(ALLOWED)),
                           prefix=seccomp("setsockopt,1=0|41,2=64:ENOENT"))
    assert done.returncode == 3, done.stderr[-1500:]
    assert "a needed kernel module or xtables extension is missing" in done.stderr
    assert "lockdown_failed" in [e["event"] for e in events(done.stderr)]
    assert normalized(lab.ruleset_dump()) == normalized(before)  # nothing committed
    fence = fence_rules(lab)
    assert len(fence) == 2 and all("uidrange 1000-1000" in f and "prohibit" in f for f in fence), fence
    assert lab.tcp("127.0.0.1", 8443, timeout=FAST).ok and lab.tcp("::1", 8443, timeout=FAST).ok
    assert not dns_answered(lab.dns("allowed.test", RESOLVER_V4, timeout=FAST))
    for host in ("203.0.113.10", "2001:db8:2::10"):
        stopped(lab, "tcp", host, 22)
    st = status(lab)
    assert st["exit_code"] == 3 and st["state"] == "fence"  # not "lockdown": the kernel refused that too
    # The next apply on a kernel that accepts the commit lowers the fence.
    applied(lab, ALLOWED)
    assert fence_rules(lab) == [] and reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")


def test_image_without_the_owner_extension_exits_3_on_a_first_apply_with_the_fence_up(lab: Lab,
                                                                                     tmp_path: Path) -> None:
    """The same promise when the image's iptables package lacks libxt_owner.so (XTABLES_LIBDIR holds
    every other extension): neither the policy nor the lockdown can be encoded."""
    libdir = tmp_path / "xtables"
    libdir.mkdir()
    real = Path(os.path.realpath("/usr/lib/x86_64-linux-gnu/xtables"))
    for ext in real.iterdir():
        if ext.name != "libxt_owner.so":
            (libdir / ext.name).symlink_to(ext)
    before = lab.ruleset_dump()
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(ALLOWED)), env={"XTABLES_LIBDIR": str(libdir)})
    assert done.returncode == 3, done.stderr[-1500:]
    assert "owner" in done.stderr and "xtables extension is missing" in done.stderr
    assert normalized(lab.ruleset_dump()) == normalized(before)
    assert len(fence_rules(lab)) == 2 and status(lab)["state"] == "fence"
    stopped(lab, "tcp", "203.0.113.10", 22)
    assert lab.tcp("127.0.0.1", 8443, timeout=FAST).ok


# -- exit 3 before any change ------------------------------------------------------------------


@pytest.mark.parametrize("installed", [False, True], ids=["nothing-installed", "policy-installed"])
def test_kernel_without_legacy_x_tables_exits_3_and_changes_nothing(lab: Lab, installed: bool) -> None:
    """IPT_SO_GET_INFO / IP6T_SO_GET_INFO answered ENOPROTOOPT, as by a kernel built without
    ip_tables (iptables-legacy then says "iptables who? (do you need to insmod?)")."""
    if installed:
        applied(lab, ALLOWED)
    before, fence_before = lab.ruleset_dump(), fence_rules(lab)
    status_before = lab.status_file.read_text() if lab.status_file.exists() else None
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(policy(action="drop"), "other.yaml")),
                           prefix=seccomp("getsockopt,1=0|41,2=64:ENOPROTOOPT"))
    assert done.returncode == 3, done.stderr[-1500:]
    assert "lacks legacy x_tables" in done.stderr
    assert lab.ruleset_dump() == before and fence_rules(lab) == fence_before
    assert (lab.status_file.read_text() if lab.status_file.exists() else None) == status_before
    probe = lab.tcp("203.0.113.10", 22, timeout=FAST)
    assert reached(probe, "203.0.113.10") if installed else probe.ok  # the old policy (or none) still rules


def _site_without_iptc(tmp: Path) -> Path:
    """A copy of this venv's site-packages (symlinks) without python-iptables and its C part."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "iptc").is_dir()))
    dest = tmp / "site"
    dest.mkdir()
    for entry in site.iterdir():
        if entry.name == "iptc" or entry.name.startswith(("python_iptables", "libxtwrapper")) or entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_without_python_iptables_apply_exits_3_and_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    applied(lab, ALLOWED)
    before, status_before = lab.ruleset_dump(), lab.status_file.read_text()
    site = _site_without_iptc(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{site}"}
    argv = ["ip", "netns", "exec", lab.pod, sys.executable, "-S", "-m", "egressguard", "apply", "--policy",
            str(lab.write_policy(policy(action="drop"), "other.yaml")), "--status-file", str(lab.status_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 3, done.stderr[-1500:]
    assert "python-iptables cannot be loaded: No module named 'iptc'" in done.stderr
    assert lab.ruleset_dump() == before and lab.status_file.read_text() == status_before
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")


def test_unloadable_libiptc_exits_3_and_changes_nothing(lab: Lab) -> None:
    """libip4tc present but unreadable as a library (an empty file bind-mounted over it, in a
    private mount namespace of the egressguard process only)."""
    applied(lab, ALLOWED)
    lib = os.path.realpath("/lib/x86_64-linux-gnu/libip4tc.so.2")
    if not os.path.exists(lib):
        pytest.skip(f"no {lib}")
    before, status_before = lab.ruleset_dump(), lab.status_file.read_text()
    hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null "$0" && exec "$@"', lib)
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(policy(action="drop"), "other.yaml")),
                           prefix=hide)
    assert done.returncode == 3, done.stderr[-1500:]
    assert "python-iptables cannot be loaded" in done.stderr
    assert lab.ruleset_dump() == before and lab.status_file.read_text() == status_before
    assert os.path.getsize(lib) > 0  # the host's library was never touched


# -- the fence unavailable -----------------------------------------------------------------------


def test_fence_refused_by_the_kernel_means_lockdown_first_then_the_policy(lab: Lab) -> None:
    """sendmsg() refused (EOPNOTSUPP): the fence's one netlink message never reaches the kernel.
    apply uses sendmsg() only for the fence (listing rules uses send()), so the rest runs."""
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(ALLOWED)), prefix=seccomp("sendmsg:EOPNOTSUPP"))
    assert done.returncode == 0, done.stderr[-1500:]
    names = [e["event"] for e in events(done.stderr)]
    assert "fence_unavailable" in names
    assert names.index("fence_unavailable") < names.index("lockdown_committed") < names.index("rules_committed")
    st = status(lab)
    assert st["state"] == "policy" and st["lockdown_first"] is True and st["fence_first"] is False
    assert fence_rules(lab) == []
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")
    stopped(lab, "tcp", "203.0.113.11", 22)


# -- exit 1 at other points --------------------------------------------------------------------------


@pytest.mark.parametrize("installed", [False, True], ids=["first-apply", "over-a-policy"])
def test_kernel_refusing_routing_netlink_sockets_exits_1_with_the_lockdown(lab: Lab, installed: bool) -> None:
    """socket(AF_NETLINK, ..., NETLINK_ROUTE) refused (EACCES): on a first apply the fence cannot be
    raised (fence_unavailable, lockdown first); either way the fence cannot be listed to be lowered,
    an OSError no code path maps: exit 1, the lockdown stays.
    This is exit 1's honest cause: an error no code path expects, raised after the lockdown went in
    (as a bug would be), through the same `except BaseException` fall-back and the CLI's one line. It
    replaces a test that patched egressguard's resolver to raise."""
    if installed:
        applied(lab, policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}]))
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(ALLOWED)),
                           prefix=seccomp("socket,0=16,2=0:EACCES"))
    assert done.returncode == 1, done.stderr[-1500:]
    human = [line for line in done.stderr.splitlines() if line.startswith("egressguard:")]
    assert len(human) == 1 and human[0].startswith("egressguard: internal error: PermissionError: "), human
    assert events(done.stderr)[-1]["event"] == "run_finished" and events(done.stderr)[-1]["exit_code"] == 1
    assert ("fence_unavailable" in [e["event"] for e in events(done.stderr)]) is not installed
    st = status(lab)
    assert st["state"] == "lockdown" and st["exit_code"] == 1
    assert_lockdown_only(lab)


def test_namespace_lock_refused_exits_1_and_changes_nothing(lab: Lab) -> None:
    """socket(AF_UNIX) refused: apply cannot take its per-namespace lock, before any change."""
    applied(lab, ALLOWED)
    before, status_before = lab.ruleset_dump(), lab.status_file.read_text()
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(policy(action="drop"), "other.yaml")),
                           prefix=seccomp("socket,0=1:EACCES"))
    assert done.returncode == 1, done.stderr[-1500:]
    assert "egressguard: internal error: PermissionError" in done.stderr
    assert lab.ruleset_dump() == before and lab.status_file.read_text() == status_before
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")


# -- exit 5 from apply: a writer races the read-back -------------------------------------------------


def test_counters_refused_after_the_replace_landed_is_a_landed_commit(lab: Lab) -> None:
    """libiptc commits in two calls: the replace, then the old counters added to the new table. A
    lock-free writer committing between them makes the second fail (EINVAL) after the replace took
    effect. Here every counters call fails so (IPT_SO_SET_ADD_COUNTERS, both families): what the
    kernel holds decides, and it holds the policy."""
    done = lab.egressguard("apply", "--policy", str(lab.write_policy(ALLOWED)),
                           prefix=seccomp("setsockopt,1=0|41,2=65:EINVAL"))
    assert done.returncode == 0, done.stderr[-1500:]
    lost = [e["table"] for e in events(done.stderr) if e["event"] == "commit_landed_counters_lost"]
    assert {"ipv4/filter", "ipv6/filter"} <= set(lost), lost
    assert status(lab)["state"] == "policy"
    for host in ("203.0.113.10", "2001:db8:2::10"):
        assert reached(lab.tcp(host, 22, timeout=FAST), host)
    stopped(lab, "tcp", "203.0.113.11", 22)


def test_rule_slipped_in_between_commit_and_read_back_exits_5_with_the_lockdown(lab: Lab) -> None:
    """The writer lands after the commit (then the read-back finds its rule) or between the commit's
    replace and its counters call (then the counters call fails, the replace is judged landed by
    what the kernel holds, and the read-back finds the rule): exit 5 either way, never exit 4."""
    path = lab.write_policy(ALLOWED)
    argv = ["apply", "--policy", str(path), "--resolv-conf", f"/etc/netns/{lab.pod}/resolv.conf",
            "--status-file", str(lab.status_file)]
    tamperer = subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, TAMPER, "120"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    codes: list[int] = []
    try:
        assert tamperer.stdout is not None and tamperer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 90
        while len(codes) < 60 and time.monotonic() < deadline:
            res = lab.probe("egressguard", argv, uid=0, timeout=60)
            codes.append(res.answer["exit"])
            if codes[-1] != 0:
                break
    finally:
        try:
            out, _ = tamperer.communicate(timeout=10)  # closes its stdin: the tamperer stops
        except subprocess.TimeoutExpired:
            tamperer.kill()
            out, _ = tamperer.communicate()
    landed = out.count("tampered")
    retried = sum(1 for e in events(res.answer["stderr"]) if e["event"] == "commit_retried")
    print(f"exit 5 after {len(codes)} applies; the tamperer landed {landed} commits; "
          f"the failing apply retried {retried} commits")
    assert codes[-1] == 5, (codes, res.answer["stderr"][-1500:])
    assert set(codes[:-1]) <= {0}
    assert "read-back differs from the plan: ipv4 filter: chain EGRESSGUARD-CONFINED" in res.answer["stderr"]
    assert "found -d 192.0.2.99/32 -p tcp -m comment --comment tampered -j RETURN" in res.answer["stderr"]
    st = status(lab)
    assert st["state"] == "lockdown" and st["exit_code"] == 5
    assert "tampered" not in lab.ruleset_dump()
    assert_lockdown_only(lab)
