#!/usr/bin/env python3
"""egressguard side by side with what users would otherwise run: cold start, apply at scale,
per-packet cost, memory. Prints one table (medians of several runs, ratios). Not a test.

Run as root on a machine like ../shared/TESTBED.md's: every change happens in namespaces this
script creates (egb-<pid>-...) and removes, also on failure; traffic stays on documentation
addresses between them. Usage: python3 bench/bench.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

EG = [sys.executable, "-m", "egressguard"]
PID = os.getpid()
TMP = Path(tempfile.mkdtemp(prefix=f"egb-{PID}-"))
POD_V4, WORLD_V4 = "198.51.100.2", "198.51.100.1"
RESOLVER = "198.51.100.53"
HOST_NS = os.stat("/proc/self/ns/net").st_ino
_counter = 0


# ---------------------------------------------------------------------------------------------
# Namespaces


def sh(*cmd: str, ns: str | None = None, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    """A fresh, empty network namespace (lo up), removed afterwards whatever happens."""
    global _counter
    _counter += 1
    name = f"egb-{PID}-{tag}-{_counter}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        ino = int(sh("stat", "-L", "-c", "%i", "/proc/self/ns/net", ns=name).stdout)
        assert ino != HOST_NS, "refusing to work in the host network namespace"
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def pod_and_world() -> Iterator[tuple[str, str]]:
    """pod <-veth-> world, as in TESTBED.md; the world has no link to this machine's network."""
    with netns("pod") as pod, netns("world") as world:
        veth = f"egb{PID % 100000}{_counter}"
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod, ns=world)
        sh("ip", "addr", "add", f"{WORLD_V4}/24", "dev", veth, ns=world)
        sh("ip", "link", "set", veth, "up", ns=world)
        sh("ip", "addr", "add", f"{POD_V4}/24", "dev", "eth0", ns=pod)
        sh("ip", "link", "set", "eth0", "up", ns=pod)
        sh("ip", "route", "add", "default", "via", WORLD_V4, ns=pod)
        yield pod, world


def _pod_serving(stack: contextlib.ExitStack, dest: str) -> str:
    """A pod whose world answers TCP on `dest`:5000 (a server pinned to the second CPU), both
    removed when `stack` closes; the pod's name."""
    pod, world = stack.enter_context(pod_and_world())
    sh("ip", "addr", "add", f"{dest}/32", "dev", "lo", ns=world)
    sh("ip", "route", "add", "198.18.0.0/15", "via", WORLD_V4, ns=pod)
    server = subprocess.Popen(["ip", "netns", "exec", world, *PIN[1], sys.executable, "-c", SERVER, dest, "5000"],
                              stdout=subprocess.PIPE, text=True)
    stack.callback(server.wait)
    stack.callback(server.kill)
    assert server.stdout and server.stdout.readline().startswith("ready")
    return pod


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


# ---------------------------------------------------------------------------------------------
# What is applied


def write_policy(n: int, redirect: bool = True, networks: bool = False) -> Path:
    """The default policy plus an allow list of n /32s (TCP 5000) from a file; n=0: the default.
    Without `redirect` no nat table is used (every new connection then skips NAT set-up).
    `networks`: the list holds /31s instead (nftables then needs an interval set, not a hash)."""
    policy = TMP / f"policy-{n}{'' if redirect else '-noredirect'}{'-nets' if networks else ''}.yaml"
    lines = [
        "version: 1",
        "confine: {uids: [1000]}",
        "exempt: {uids: [1001]}",
        f"dns: {{resolvers: [{RESOLVER}]}}",
    ]
    if redirect:
        lines.append("redirect: [{ports: [80, 443], to_port: 8444}]")
    if n:
        if networks:  # every fourth pair of addresses: no two merge into one interval
            nets = [f"198.{18 + i // 16384}.{i // 64 % 256}.{i % 64 * 4}/31" for i in range(n - 1)] + ["198.19.255.254/31"]
        else:
            nets = [f"{addr}/32" for addr in list_addresses(n)]
        name = f"list-{n}{'-nets' if networks else ''}.txt"
        (TMP / name).write_text("".join(f"{net}\n" for net in nets))
        lines += ["allow:", f"  - allow_file: {name}", "    ports: [5000]"]
    policy.write_text("\n".join(lines) + "\n")
    return policy


def list_addresses(n: int) -> list[str]:
    """n addresses in 198.18.0.0/15 (benchmark range), every other one so that no two merge into one
    interval (the kernel set then holds n elements); the last is the world's 198.19.255.254."""
    out = [f"198.{18 + i // 32768}.{i // 128 % 256}.{i % 128 * 2}" for i in range(n - 1)]
    return out + ["198.19.255.254"]


def plan(policy: Path, backend: str = "iptables") -> str:
    return sh(*EG, "plan", "--policy", str(policy), "--resolv-conf", "/dev/null", "--backend", backend).stdout


def split_plan(text: str) -> tuple[str, dict[int, str]]:
    """The plan as `ipset restore` input and iptables-restore input per family."""
    ipset, tables, family = [], {4: [], 6: []}, 0
    for line in text.splitlines():
        if line.startswith("# iptables "):
            family = 4
        elif line.startswith("# ip6tables "):
            family = 6
        elif line.startswith(("create ", "add ")) and not family:
            ipset.append(line)
        elif family and not line.startswith("#"):
            tables[family].append(line)
    return "\n".join(ipset) + "\n", {f: "\n".join(v) + "\n" for f, v in tables.items()}


def shell_script(text: str) -> str:
    """The plan as one iptables call per chain and rule (the pattern of seed PR 448)."""
    _, tables = split_plan(text)
    out = ["#!/bin/sh", "set -e"]
    for family, body in tables.items():
        tool = "ip6tables-legacy" if family == 6 else "iptables-legacy"
        table = "filter"
        for line in body.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                out.append(f"{tool} -w -t {table} -N {line[1:].split()[0]}")
            elif line.startswith(("-A", "-I")):  # quoted again: u32 matches hold `>>` and `&`
                out.append(f"{tool} -w -t {table} {shlex.join(shlex.split(line))}")
    return "\n".join(out) + "\n"


def per_entry_script(n: int) -> str:
    """One iptables call per allow entry, plus the default policy's rules."""
    base = shell_script(plan(write_policy(0))).splitlines()
    # the default's final refusals stay last: insert the entries before them
    tail = [i for i, line in enumerate(base)
            if "EGRESSGUARD-CONFINED" in line and "comment default" in line and "iptables-legacy " in line]
    entries = [
        f"iptables-legacy -w -t filter -I EGRESSGUARD-CONFINED 1 -d {a}/32 -p tcp --dport 5000 -j RETURN"
        for a in list_addresses(n)
    ]
    return "\n".join(base[: tail[0]] + entries + base[tail[0] :]) + "\n"


def restore(ns: str, text: str) -> None:
    ipset, tables = split_plan(text)
    if ipset.strip():
        sh("ipset", "restore", ns=ns, input=ipset)
    sh("iptables-legacy-restore", "-n", ns=ns, input=tables[4])
    sh("ip6tables-legacy-restore", "-n", ns=ns, input=tables[6])


def eg_apply(ns: str, policy: Path, backend: str = "iptables", *extra: str) -> float:
    resolv = TMP / "resolv.conf"
    resolv.write_text(f"nameserver {RESOLVER}\n")
    status = ("--no-status",) if "--status-file" not in extra else ()
    return timed(lambda: sh(*EG, "apply", "--backend", backend, "--policy", str(policy), *status, *extra,
                            "--resolv-conf", str(resolv), ns=ns))


def plan_file(text: str) -> Path:
    path = TMP / f"plan-{abs(hash(text))}.nft"
    if not path.exists():
        path.write_text(text)
    return path


def nft_f(ns: str, text: str) -> float:
    path = plan_file(text)
    return timed(lambda: sh("nft", "-f", str(path), ns=ns))


# The floor of any Python program that commits a script through libnftables: the interpreter,
# ctypes, the library and one nft_run_cmd_from_buffer of the whole file, nothing else.
CTYPES_COMMIT = ("import ctypes, sys; lib = ctypes.CDLL('libnftables.so.1'); lib.nft_ctx_new.restype = ctypes.c_void_p; "
                 "ctx = ctypes.c_void_p(lib.nft_ctx_new(0)); "
                 "sys.exit(lib.nft_run_cmd_from_buffer(ctx, open(sys.argv[1], 'rb').read()))")


def ctypes_f(ns: str, text: str) -> float:
    path = plan_file(text)
    return timed(lambda: sh(sys.executable, "-c", CTYPES_COMMIT, str(path), ns=ns))


def interleaved(runs: int, rows: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Median of `runs` of each row, measured in rounds (one run of every row per round): drift in
    the machine's load then spreads over all rows alike."""
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(runs):
        for key, fn in rows.items():
            times[key].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def fresh(fn: Callable[[str], float]) -> Callable[[], float]:
    def run() -> float:
        with netns("apply") as ns:
            return fn(ns)

    return run


# ---------------------------------------------------------------------------------------------
# Sections


def cold_start(runs: int) -> list[tuple[str, str, float, float | None, float | None]]:
    """(what, back end, wall time, / that back end's per-rule script, / its restore tool)."""
    policy = write_policy(0)
    text = plan(policy, "iptables")
    nft_text = plan(policy, "nftables")
    script = TMP / "default.sh"
    script.write_text(shell_script(text))
    calls = sum(1 for line in script.read_text().splitlines() if "tables-legacy" in line)
    # The same script as the image's plain `iptables` runs it: on Debian and Ubuntu that is iptables-nft.
    nft_script = TMP / "default-nft.sh"
    legacy_text = script.read_text()
    nft_script.write_text(legacy_text.replace("ip6tables-legacy ", "ip6tables-nft ").replace("iptables-legacy ", "iptables-nft "))
    rows: dict[str, Callable[[], float]] = {
        "eg_nft": fresh(lambda ns: eg_apply(ns, policy, "nftables")),
        "script_nft": fresh(lambda ns: timed(lambda: sh("sh", str(nft_script), ns=ns))),
        "nft_f": fresh(lambda ns: nft_f(ns, nft_text)),
        "eg_ipt": fresh(lambda ns: eg_apply(ns, policy, "iptables")),
        "script_legacy": fresh(lambda ns: timed(lambda: sh("sh", str(script), ns=ns))),
        "restore": fresh(lambda ns: timed(lambda: restore(ns, text))),
        "pass": lambda: timed(lambda: sh(sys.executable, "-c", "pass")),
        "floor_nft": lambda: timed(lambda: sh(sys.executable, "-c", IMPORTS_FOR_APPLY["nftables"])),
        "floor_ipt": lambda: timed(lambda: sh(sys.executable, "-c", IMPORTS_FOR_APPLY["iptables"])),
    }
    t = interleaved(runs, rows)
    nft = (t["script_nft"], t["nft_f"])
    legacy = (t["script_legacy"], t["restore"])

    def row(name: str, backend: str, key: str, base: tuple[float, float]) -> tuple[str, str, float, float | None, float | None]:
        return (name, backend, t[key], t[key] / base[0], t[key] / base[1])

    return [
        row("egressguard apply (default policy, incl. read-back)", "nftables", "eg_nft", nft),
        row(f"shell script, one `iptables-nft` call per rule ({calls} calls)", "nftables", "script_nft", nft),
        row("`nft -f` of the same ruleset (egressguard's nft plan)", "nftables", "nft_f", nft),
        row("egressguard apply (default policy, incl. deny-first fence + read-back)", "iptables", "eg_ipt", legacy),
        row(f"shell script, one `iptables-legacy` call per rule ({calls} calls)", "iptables", "script_legacy", legacy),
        row("`iptables-legacy-restore` (both families)", "iptables", "restore", legacy),
        row("python start (`python -c pass`)", "-", "pass", nft),
        row("python start + every import apply needs (import floor)", "nftables", "floor_nft", nft),
        row("python start + every import apply needs (import floor)", "iptables", "floor_ipt", legacy),
    ]


# What `apply` imports before its first kernel call, and its first event (structlog): the floor of
# any apply on that back end, whatever the policy.
_FLOOR = "import egressguard.cli, egressguard.apply, egressguard.policy, egressguard.logs as l; l._structlog(); "
IMPORTS_FOR_APPLY = {
    "nftables": _FLOOR + "import egressguard.backends.nftables.backend, egressguard.backends.nftables.transport as t; t.load()",
    "iptables": _FLOOR + "import egressguard.backends.iptables.backend as b; b.import_iptc()",
}


def probe_time(runs: int) -> list[tuple[str, float, float]]:
    """`egressguard probe` as the agent runs it in a guarded pod (nftables), beside python's own start:
    (row, median wall time, median CPU time of the process). The agent here is uid 0 without any
    capability (securebits noroot, empty bounding set, no_new_privs) under `confine: all`: a uid other
    than 0 cannot read this machine's Python under /root, and a start that searches an unreadable
    library path is not what a container's agent pays. CPU time (user + system, of the process and
    its `ip netns exec`/`setpriv` wrappers) does not count time spent waiting for a CPU another
    session holds, so it varies less with the machine's load than wall time."""
    policy = TMP / "policy-probe.yaml"
    policy.write_text(f"version: 1\nexempt: {{uids: [1001]}}\ndns: {{resolvers: [{RESOLVER}]}}\n")
    status = TMP / "status.json"
    agent = ["setpriv", "--securebits=+noroot,+noroot_locked", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
    cpu: dict[str, list[float]] = {"probe": [], "verbose": [], "pass": []}

    def run(key: str, *cmd: str) -> Callable[[], float]:
        def once() -> float:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = timed(lambda: sh(*agent, *cmd, ns=pod))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[key].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            return wall
        return once

    with pod_and_world() as (pod, _):
        eg_apply(pod, policy, "nftables", "--status-file", str(status))
        rows = {
            "probe": run("probe", *EG, "probe", "--status-file", str(status)),
            "verbose": run("verbose", *EG, "-v", "probe", "--status-file", str(status)),
            "pass": run("pass", sys.executable, "-c", "pass"),
        }
        t = interleaved(runs, rows)
    names = {"probe": "egressguard probe (an agent without capabilities, guarded pod, default targets)",
             "verbose": "egressguard -v probe (the same, logging its `probe_finished` event: imports structlog)",
             "pass": "python start (`python -c pass`, the same agent)"}
    return [(names[k], t[k], statistics.median(cpu[k])) for k in rows]


def apply_at_scale(runs: int, sizes: list[int]) -> list[tuple[int, float, float, float, str]]:
    rows = []
    for n in sizes:
        policy = write_policy(n)
        text = plan(policy)
        eg = median_of(runs, fresh(lambda ns, p=policy: eg_apply(ns, p)))  # type: ignore[misc]
        rest = median_of(runs, fresh(lambda ns, x=text: timed(lambda: restore(ns, x))))  # type: ignore[misc]
        script = TMP / f"entries-{n}.sh"
        script.write_text(per_entry_script(n))
        if n <= 1000:
            per = median_of(max(1, runs // 2), fresh(lambda ns, f=script: timed(lambda: sh("sh", str(f), ns=ns))))  # type: ignore[misc]
            note = ""
        else:
            per, note = estimate_per_entry(n), "est."
        rows.append((n, eg, rest, per, note))
    return rows


def nft_at_scale(runs: int, sizes: list[int]) -> list[tuple[int, float, float, float]]:
    """(N, egressguard apply --backend nftables, `nft -f` of the same ruleset, the same script
    committed by a Python process through ctypes and libnftables alone)."""
    rows = []
    for n in sizes:
        policy = write_policy(n)
        text = plan(policy, "nftables")
        t = interleaved(runs, {"eg": fresh(lambda ns, p=policy: eg_apply(ns, p, "nftables")),
                               "nft": fresh(lambda ns, x=text: nft_f(ns, x)),
                               "ctypes": fresh(lambda ns, x=text: ctypes_f(ns, x))})
        rows.append((n, t["eg"], t["nft"], t["ctypes"]))
    return rows


def estimate_per_entry(n: int) -> float:
    """One call per entry at n entries takes minutes (each call rewrites the whole table), so
    time the first and the last 50 calls and integrate the linear growth in between."""
    sample = 50
    lines = per_entry_script(n).splitlines()
    head = [i for i, line in enumerate(lines) if "-d 198." in line]
    with netns("est") as ns:
        pre = TMP / "pre.sh"
        pre.write_text("\n".join(lines[: head[0]] + lines[head[0] : head[0] + sample]) + "\n")
        t_first = timed(lambda: sh("sh", str(pre), ns=ns))
        base_calls = head[0]
        # load the remaining entries but the last `sample` fast, then time the last ones
        rules = "".join(
            f"-I EGRESSGUARD-CONFINED 1 -d {a}/32 -p tcp -m tcp --dport 5000 -j RETURN\n"
            for a in list_addresses(n)[sample : n - sample]
        )
        sh("iptables-legacy-restore", "-n", ns=ns, input=f"*filter\n{rules}COMMIT\n")
        post = TMP / "post.sh"
        post.write_text("\n".join(lines[head[0] + n - sample : head[0] + n]) + "\n")
        t_last = timed(lambda: sh("sh", str(post), ns=ns))
    first_call = t_first / (base_calls + sample)
    last_call = t_last / sample
    return first_call * base_calls + n * (first_call + last_call) / 2


CLIENT = r"""
import socket, struct, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, so ports never run out
t, cpu = time.perf_counter(), time.process_time()
for _ in range(count):
    s = socket.create_connection((host, port), timeout=2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
print(count / (time.perf_counter() - t), count / (time.process_time() - cpu))
"""

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096); s.settimeout(60)
print("ready", flush=True)
try:
    while True:
        c, _ = s.accept(); c.close()
except OSError:
    pass
"""


# Client and server pinned to CPUs of their own: where the scheduler happens to put them (same CPU
# or not) otherwise moves the rate of a namespace pair by more than the rules do.
PIN = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else ([], [])


def conn_rate(pod: str, dest: str, count: int) -> tuple[float, float]:
    """(new connections per second of wall time, per second of the client's CPU time). The output
    path's netfilter hooks run in the client's system calls, so its CPU time carries the rules'
    cost; unlike the wall rate, it does not count time the client waited for a busy CPU."""
    out = sh(*PIN[0], "setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
             sys.executable, "-c", CLIENT, dest, "5000", str(count), ns=pod, timeout=120)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


NFT_TRACKED = "table inet egb { chain in { type filter hook input priority 0; ct state invalid drop; }; }\n"
# What any nftables guard's output hook costs before its first rule, and what a `redirect` adds
# before its first rule (NAT set-up of every new connection): the floors of the rows below.
NFT_FILTER_HOOK = "table inet egbf { chain out { type filter hook output priority 0; policy accept; }; }\n"
NFT_NAT_HOOK = "table inet egbn { chain out { type nat hook output priority -101; policy accept; }; }\n"


def per_packet(runs: int, count: int, sizes: list[int]) -> dict[str, list[tuple[float, float]]]:
    """Every configuration gets its own pod/world pair, set up once: a namespace never carries state
    from another row (a legacy nat table, once used, keeps its per-connection NAT set-up even after
    its rules are gone). The rows are measured in rounds, one run of each per round, so drift in
    the machine's load spreads over all of them alike."""
    dest = list_addresses(2)[-1]
    tracked = "iptables-legacy -A INPUT -m conntrack --ctstate INVALID -j DROP"
    configs: list[tuple[str, Callable[[str], None]]] = [
        ("no guard", lambda pod: None),
        # egressguard needs connection tracking (replies, DNS by original destination). In a real
        # Docker or Kubernetes pod it is on anyway (NAT, kube-proxy); here an idle rule switches it on.
        ("no guard, connection tracking on", lambda pod: sh(*tracked.split(), ns=pod)),
        # What any `redirect` costs before a single rule is walked: NAT set-up for each new connection.
        ("no guard, connection tracking + an idle nat rule", lambda pod: (
            sh(*tracked.split(), ns=pod),
            sh("iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", "RETURN", ns=pod))),
        # The same, switched on by an nftables rule: the baseline of the nftables rows.
        ("no guard, connection tracking on (nft rule)", lambda pod: sh("nft", "-f", "-", ns=pod, input=NFT_TRACKED)),
        ("no guard, connection tracking + an empty nft output filter chain", lambda pod: sh(
            "nft", "-f", "-", ns=pod, input=NFT_TRACKED + NFT_FILTER_HOOK)),
        ("no guard, connection tracking + an empty nft output nat chain", lambda pod: sh(
            "nft", "-f", "-", ns=pod, input=NFT_TRACKED + NFT_NAT_HOOK)),
    ]
    for n in sizes:
        for backend in ("iptables", "nftables"):
            configs.append((f"egressguard {backend}, default (redirect: nat) + {n:,} entries (kernel set), dest last",
                            lambda pod, n=n, b=backend: eg_apply(pod, write_policy(n, True), b)))
            configs.append((f"egressguard {backend}, no redirect (no nat) + {n:,} entries (kernel set), dest last",
                            lambda pod, n=n, b=backend: eg_apply(pod, write_policy(n, False), b)))
        if n == sizes[-1]:  # networks, not addresses: an interval set on nftables
            configs.append((f"egressguard nftables, no redirect (no nat) + {n:,} /31 networks (interval set), dest last",
                            lambda pod, n=n: eg_apply(pod, write_policy(n, False, networks=True), "nftables")))
        rules = "".join(f"-A EGB-LINEAR -d {a}/32 -p tcp -m tcp --dport 5000 -j RETURN\n" for a in list_addresses(n))
        linear = ("*filter\n:EGB-LINEAR - [0:0]\n-I OUTPUT 1 -m owner --uid-owner 1000 -j EGB-LINEAR\n"
                  f"-A EGB-LINEAR -o lo -j RETURN\n{rules}-A EGB-LINEAR -j REJECT\nCOMMIT\n")
        configs.append((f"linear chain, {n:,} rules, dest last",
                        lambda pod, text=linear: sh("iptables-legacy-restore", "-n", ns=pod, input=text)))
    return _interleaved_rates(configs, dest, runs, count)


def _interleaved_rates(configs: Sequence[tuple[str, Callable[[str], object]]], dest: str, runs: int,
                       count: int) -> dict[str, list[tuple[float, float]]]:
    """Connection rates of each config's pod (set up by its callable), measured in interleaved rounds."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
    with contextlib.ExitStack() as stack:
        pods = []
        for name, setup in configs:
            pod = _pod_serving(stack, dest)
            setup(pod)
            conn_rate(pod, dest, 200)  # warm up
            pods.append((name, pod))
        for _ in range(runs):
            for name, pod in pods:
                rates[name].append(conn_rate(pod, dest, count))
    return rates


def _without(text: str, *comments: str, chain: str = "confined4") -> str:
    """An nft plan less the rules of `chain` whose comment is one of `comments` (all if none given)."""
    head = f"add rule inet egressguard {chain} "
    return "".join(line + "\n" for line in text.splitlines()
                   if not (line.startswith(head) and (not comments or any(f'comment "{c}"' in line for c in comments))))


def _verdict_cache(text: str) -> str:
    """NOT what egressguard installs: an upper bound of a per-connection verdict cache, i.e. an
    established connection already allowed (a conntrack mark set by the allowing rule) skips the
    destination checks. Sound only with a way to forget marks when the policy changes (see RESULTS)."""
    head = "add rule inet egressguard confined4 "
    out = []
    for line in text.splitlines():
        if line.startswith(head) and 'comment "replies"' in line:
            out.append(head + "ct state established ct direction original ct mark and 0x20000000 == 0x20000000 return")
        if line.startswith(head) and 'comment "allow[' in line:
            line = line.replace(" counter return", " counter ct mark set ct mark or 0x20000000 return")
        out.append(line)
    return "".join(line + "\n" for line in out)


def ablation(runs: int, count: int, n: int) -> dict[str, list[tuple[float, float]]]:
    """Where the nftables guard's per-packet cost is: its plan (no redirect, n addresses, the
    destination last) loaded with `nft -f`, less one group of rules at a time, rows interleaved."""
    dest = list_addresses(2)[-1]
    text = plan(write_policy(n, False), "nftables")
    redirecting = plan(write_policy(n, True), "nftables")
    configs = {
        "no guard, connection tracking on (nft rule)": NFT_TRACKED,
        "+ an empty output filter chain (no rule)": NFT_TRACKED + NFT_FILTER_HOOK,
        "egressguard as installed": text,
        "less its counters": text.replace(" counter ", " "),
        "less the forged-source check (fib saddr type)": _without(text, "forged-source"),
        "less the ip-options check": _without(text, "ip-options"),
        "less the metadata refusals": _without(text, "metadata"),
        "less loopback, dns, nat-elsewhere": _without(text, "loopback", "dns", "nat-elsewhere"),
        "less everything but the allow rule": _without(text, "forged-source", "ip-options", "replies", "metadata",
                                                       "loopback", "dns", "nat-elsewhere", "default"),
        "less the whole confined chain (dispatch only)": _without(text),
        "less confine-closing (closed sockets' packets go unjudged, as before run U)":
            _without(text, "confine-closing", chain="dispatch4"),
        "less confine-closing and the connection mark": _without(text, "confine-closing", chain="dispatch4").replace(
            " ct mark set ct mark or 0x10000000 goto confined4", " goto confined4"),
        "its dispatch jumping to the confined chain (as before run V: the rules after it walked on return)":
            text.replace(" goto confined4", " jump confined4"),
        "its set as an interval set (as before run T)": text.replace("{ type ipv4_addr; }",
                                                                     "{ type ipv4_addr; flags interval; }"),
        "not installed: a verdict cache for allowed connections": _verdict_cache(text),
        # Issue 12's target is the default policy's, which redirects (a nat chain on the output hook).
        "+ empty output filter and nat chains (no rule)": NFT_TRACKED + NFT_FILTER_HOOK + NFT_NAT_HOOK,
        "default policy (redirect: nat) + the same addresses, as installed": redirecting,
        "default policy, dispatch only (owner match, nothing judged: the floor of a uid guard with a redirect)":
            _without(redirecting),
    }
    def load(script: str) -> Callable[[str], object]:
        return lambda pod: sh("nft", "-f", "-", ns=pod, input=script)

    return _interleaved_rates([(name, load(script)) for name, script in configs.items()], dest, runs, count)


def peak_rss(sizes: list[int], runs: int = 3) -> list[tuple[str, float]]:
    """Largest peak RSS of `runs` applies per back end and size (the process tree's largest process);
    at the largest size also a re-apply of the same policy, and one after a set element was
    deleted by hand (the set is refilled whole: on nftables over netlink, transport.SetRefill); on
    nftables the largest size again as networks (an interval set)."""
    rows = []
    for backend in ("nftables", "iptables"):
        for n, nets in [(n, False) for n in sizes] + ([(max(sizes), True)] if backend == "nftables" else []):
            policy = write_policy(n, networks=nets)
            cases = ["cold", "again", "tampered"] if n == max(sizes) and backend == "nftables" else ["cold"]
            for case in cases:
                peak = 0
                for _ in range(runs):
                    with netns("rss") as ns:
                        argv = (*EG, "apply", "--backend", backend, "--policy", str(policy), "--no-status",
                                "--resolv-conf", "/dev/null")
                        if case != "cold":
                            sh(*argv, ns=ns)
                        if case == "tampered":
                            first = "198.18.0.0/31" if nets else list_addresses(n)[0]
                            sh("nft", "delete", "element", "inet", "egressguard", _set_of(ns), f"{{ {first} }}", ns=ns)
                        out = sh("/usr/bin/time", "-f", "%M", *argv, ns=ns)
                        peak = max(peak, int(out.stderr.strip().splitlines()[-1]))
                what = {"cold": "", "again": ", re-applied", "tampered": ", re-applied after an element was deleted"}[case]
                entries = f"{n:,} /31 networks (an interval set)" if nets else f"{n:,} entries" if n else "default policy"
                rows.append((f"egressguard apply --backend {backend}, {entries}{what}", peak / 1024))
    return rows


def _set_of(ns: str) -> str:
    """The name of the (one) IPv4 set in our table."""
    listing = json.loads(sh("nft", "-j", "-t", "list", "sets", "table", "inet", "egressguard", ns=ns).stdout)
    return next(o["set"]["name"] for o in listing["nftables"] if o.get("set", {}).get("type") == "ipv4_addr")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and connections")
    ap.add_argument("--sections", default="1234567", help="which sections to run, e.g. 13 (6: the DNS forwarder, "
                    "7: import time, b: section 3b alone)")
    ap.add_argument("--dns-rt", action="store_true", help="section 6: forwarder, client and upstream as "
                    "real-time processes (chrt -f 10) instead of nice -20")
    ap.add_argument("--dns-against", metavar="DIR", help="section 6 only: rounds alternating between this "
                    "checkout's forwarder and the egressguard package under DIR (e.g. `git archive main egressguard`)")
    args = ap.parse_args()
    if args.dns_rt:
        _FIRST[:] = ["chrt", "-f", "10"]
    if os.geteuid() != 0 or not shutil.which("ipset") or not shutil.which("iptables-legacy-restore"):
        print("bench: needs root, ipset and iptables-legacy", file=sys.stderr)
        return 2
    sizes = [10, 100, 1000] if args.quick else [10, 100, 1_000, 10_000]
    runs = args.runs
    print(f"# egressguard bench, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}, Python {platform.python_version()}")
    print(f"# medians of {runs} runs; every run in a fresh network namespace; load average at start: "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
    # Bytecode compiled as `pip install` leaves it: with PYTHONDONTWRITEBYTECODE set, a source
    # checkout would otherwise recompile the package on every start.
    sh(sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parent.parent / "egressguard"))

    if "1" in args.sections:
        section_cold_start(runs)
        section_probe(runs)
    if "2" in args.sections:
        section_scale(runs, sizes)
    if "3" in args.sections:
        section_per_packet(runs, args.quick)
    if "3" in args.sections or "b" in args.sections:
        section_ablation(runs, args.quick)
    if "5" in args.sections:
        section_log_cost(runs, args.quick)
    if args.dns_against:
        section_dns_against(args.quick, args.dns_against)
    elif "6" in args.sections:
        section_dns_forwarder(args.quick)
    if "4" in args.sections:
        print("\n## 4. Peak RSS of apply (largest process)\n")
        print("| what | peak RSS |\n|---|---:|")
        for name, mib in peak_rss([0, sizes[-1]]):
            print(f"| {name} | {mib:.1f} MiB |")
    if "7" in args.sections:
        section_import_time(runs)
    print(f"\n# load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


def section_cold_start(runs: int) -> None:
    rows = cold_start(runs)
    print("## 1. Cold start (whole processes, fresh namespace each run, rounds interleaved)\n")
    print("| what | back end | wall time | / that back end's per-rule script | / its restore tool |\n"
          "|---|---|---:|---:|---:|")
    for name, backend, t, script, restore_ in rows:
        print(f"| {name} | {backend} | {t * 1000:.0f} ms | {script:.2f}x | {restore_:.2f}x |")


def section_scale(runs: int, sizes: list[int]) -> None:
    print("\n## 2. Apply at scale (allow list of N /32s, TCP 5000)\n")
    print("| N | egressguard | iptables-restore + ipset restore | one iptables call per entry "
          "| eg / restore | per-entry / eg |\n|---:|---:|---:|---:|---:|---:|")
    for n, eg, rest, per, note in apply_at_scale(runs, sizes):
        print(f"| {n:,} | {eg * 1000:.0f} ms | {rest * 1000:.0f} ms | {per * 1000:,.0f} ms {note} "
              f"| {eg / rest:.2f}x | {per / eg:.1f}x |")
    print("\n### nftables back end: egressguard apply vs `nft -f` of the same ruleset (its nft plan)\n")
    print("The floor: the same script committed by `python -c` through ctypes and libnftables, nothing else.\n")
    print("| N | egressguard apply | nft -f | python + ctypes, same script | eg / nft -f | floor / nft -f |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for n, eg, nft, floor in nft_at_scale(runs, sizes):
        print(f"| {n:,} | {eg * 1000:.0f} ms | {nft * 1000:.0f} ms | {floor * 1000:.0f} ms "
              f"| {eg / nft:.2f}x | {floor / nft:.2f}x |")


def section_per_packet(runs: int, quick: bool) -> None:
    count = 1000 if quick else 3000
    rates = per_packet(runs, count, [16, 1_000] if quick else [16, 1_000, 10_000])
    baselines = ("no guard", "no guard, connection tracking on", "no guard, connection tracking on (nft rule)")
    # The floor of a policy with a `redirect`: connection tracking with an idle nat hook, same back end's kind.
    nat_floor = {"iptables": "no guard, connection tracking + an idle nat rule",
                 "nftables": "no guard, connection tracking + an empty nft output nat chain"}

    def ratio(name: str, base: str, i: int) -> float:
        """Median of the per-round ratios: each round measures every row once, so a round's ratio
        compares runs taken seconds apart (the machine's load drifts over minutes)."""
        return statistics.median(r[i] / b[i] for r, b in zip(rates[name], rates[base], strict=True))

    print(f"\n## 3. Per-packet cost (new TCP connections, uid 1000, {count} per run; ratios: median of per-round ratios)\n")
    print("Per second of the client's CPU time (the output path's rules run in its system calls), "
          "then per second of wall time.\n")
    vs = "vs no guard | vs conntrack on (iptables rule) | vs conntrack on (nft rule) | vs conntrack + idle nat"
    print(f"| what | conns per CPU-s | {vs} | conns/s (wall) | {vs} |\n|---|" + "---:|" * 10)
    for name, found in rates.items():
        floor = next((f for b, f in nat_floor.items() if f"egressguard {b}, default" in name), None)
        cells = []
        for i in (1, 0):
            cells.append(f"{statistics.median(r[i] for r in found):,.0f}")
            cells += [f"{ratio(name, b, i):.2f}x" for b in baselines]
            cells.append(f"{ratio(name, floor, i):.2f}x" if floor else "")
        print(f"| {name} | " + " | ".join(cells) + " |")


def section_ablation(runs: int, quick: bool) -> None:
    count, n = (1000, 1_000) if quick else (3000, 10_000)
    rates = ablation(runs, count, n)
    base = "no guard, connection tracking on (nft rule)"
    full = "egressguard as installed"
    print(f"\n### 3b. Where the nftables guard's cost is (no redirect, {n:,} addresses, dest last; "
          f"its nft plan less one group of rules at a time; the last rows with the default policy's "
          f"redirect; {count} connections per run)\n")
    print("| what | conns per CPU-s | vs conntrack on (nft rule) | vs egressguard as installed |\n|---|---:|---:|---:|")
    for name, found in rates.items():
        cpu = statistics.median(r[1] for r in found)
        vs = [statistics.median(r[1] / b[1] for r, b in zip(found, rates[k], strict=True)) for k in (base, full)]
        print(f"| {name} | {cpu:,.0f} | {vs[0]:.2f}x | {vs[1]:.2f}x |")


def section_probe(runs: int) -> None:
    print("\n## 1b. The agent's self-check\n")
    print("| what | wall time | CPU time |\n|---|---:|---:|")
    for name, t, cpu in probe_time(runs):
        print(f"| {name} | {t * 1000:.0f} ms | {cpu * 1000:.0f} ms |")


def section_import_time(runs: int) -> None:
    """`python -X importtime` of a whole apply per back end: the sum of every module's own import time
    (median per module over the runs) and the largest packages."""
    policy = write_policy(0)
    print("\n## 7. Import time of apply (`python -X importtime`, default policy, medians per module)\n")
    print("| back end | all imports | egressguard | structlog | PyYAML | python-iptables | ctypes | argparse | rest (stdlib) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend in ("nftables", "iptables"):
        per: dict[str, list[int]] = {}
        for _ in range(runs):
            with netns("imp") as ns:
                err = sh(sys.executable, "-X", "importtime", *EG[1:], "apply", "--backend", backend, "--policy", str(policy),
                         "--no-status", "--resolv-conf", "/dev/null", ns=ns).stderr
            for line in err.splitlines():
                if line.startswith("import time:") and "|" in line and "self [us]" not in line:
                    own, _, name = line.removeprefix("import time:").split("|")
                    per.setdefault(name.strip(), []).append(int(own))
        own_ms = {name: statistics.median(v) / 1000 for name, v in per.items()}

        def total(*prefixes: str, own: dict[str, float] = own_ms) -> float:
            return sum(v for k, v in own.items() if k.split(".")[0] in prefixes)

        everything = sum(own_ms.values())
        parts = [total("egressguard"), total("structlog"), total("yaml", "_yaml"), total("iptc"), total("ctypes", "_ctypes"),
                 total("argparse", "gettext")]
        print(f"| {backend} | {everything:.1f} ms | " + " | ".join(f"{p:.1f} ms" for p in parts)
              + f" | {everything - sum(parts):.1f} ms |")


# ---------------------------------------------------------------------------------------------
# 5. The DNS forwarder (dns.mode proxy): latency it adds per query, time to commit a learned address

# A UDP DNS server for the world namespace: answers every A query with one address (TTL 300) from a
# prepared template, so the upstream costs the same for both paths; the address is derived from the
# name (in 198.18.0.0/15), so a new name is a new address that the forwarder must commit.
_DNS_UPSTREAM = r"""
import socket, struct, sys, zlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    end = 12
    while q[end]:
        end += q[end] + 1
    question = q[12:end + 5]
    address = struct.pack("!I", 0xC6120000 | zlib.crc32(q[12:end].lower()) & 0x1FFFF)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + address
    s.sendto(q[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0) + question + answer, peer)
"""

# The client: `count` A queries for `name` at `rate` per second (open loop, paced), each timed from
# send to answer; prints the latencies in ms (lost queries are left out and counted).
_DNS_CLIENT = r"""
import json, socket, struct, sys, threading, time
server, name, rate, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
def wire_name(text):
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + bytes(1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
sent, got = {}, {}
def receive():
    s.settimeout(2)
    while len(got) < count:
        try:
            r = s.recv(512)
        except OSError:
            return
        got[struct.unpack("!H", r[:2])[0]] = time.perf_counter()
t = threading.Thread(target=receive)
t.start()
start = time.perf_counter()
for i in range(count):
    while time.perf_counter() < start + i / rate:
        time.sleep(0.0002)
    qname = wire_name(name.replace("N", f"q{i}-{int(start * 1e6)}"))  # "N": a name never asked before
    sent[i] = time.perf_counter()
    s.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1))
t.join()
print(json.dumps({"ms": [(got[i] - sent[i]) * 1000 for i in sent if i in got], "lost": count - len(got)}))
"""


# The forwarder, the client and the upstream run first on their CPUs (nice -20), or with --dns-rt
# as real-time processes (SCHED_FIFO): on a shared machine they then get the core they would have
# alone (with nice -20 alone they still waited for the CPU longer than they ran at a load average
# of 13), and other work there gets what they leave.
_FIRST = ["nice", "-n", "-20"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dns_forwarder(quick: bool, backend: str = "nftables",
                  rounds: int = 3) -> tuple[list[tuple[str, int, float, float, int, float | None]], dict[str, object]]:
    """Per rate: (path, qps, median ms, p99 ms, lost, forwarder CPU ms per query) for the confined
    uid through the forwarder (its queries redirected; every answer commits its address to the
    kernel set before release) and for the exempt uid straight to the same upstream; and the
    forwarder's commit times. Forwarder on CPU 0, client and upstream on CPU 1. Each row's queries
    are sent in `rounds` parts, the rows taking turns (direct, forwarded, direct, ...), and pooled."""
    rows: list[tuple[str, int, float, float, int, float | None]] = []
    stopped: dict[str, object] = {}
    with pod_and_world() as (pod, world):
        upstream = subprocess.Popen(["ip", "netns", "exec", world, *_FIRST, "taskset", "-c", "1", sys.executable, "-c",
                                     _DNS_UPSTREAM, WORLD_V4], stdout=subprocess.PIPE, text=True)
        fwd = None
        try:
            assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
            policy = TMP / "dns-proxy.json"
            policy.write_text(json.dumps({
                "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]},
                "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": [WORLD_V4]},
                "allow": [{"host": "bench.test", "ports": [443]}, {"host": "*.bench.test", "ports": [443]}]}))
            os.chmod(TMP, 0o755)
            os.chmod(policy, 0o644)
            sh(*EG, "apply", "--backend", backend, "--policy", str(policy), "--no-status", ns=pod)
            r, w = os.pipe()
            log = TMP / "forwarder.log"
            with open(log, "w") as err:
                fwd = subprocess.Popen(["ip", "netns", "exec", pod, *_FIRST, "taskset", "-c", "0", *EG, "--log-format", "json",
                                        "dns", "--policy", str(policy), "--ready-fd", str(w)], pass_fds=(w,),
                                       stderr=err, env={**os.environ, "EGRESSGUARD_DNS_TIMINGS": "1"})
            os.close(w)
            with os.fdopen(r, "rb") as fh:
                assert fh.read(1) == b"1", log.read_text()[-2000:]  # sidecar.report_ready
            paths = (("direct (exempt uid)", 1001), ("through the forwarder (confined uid)", 1000))
            for qps in (100, 1000):
                count = qps * (2 if quick else 5) // rounds
                for names, name in (("one name (answered from the cache)", "bench.test"),
                                    ("a new name each query (forwarded, committed)", "N.bench.test")):
                    ms: dict[int, list[float]] = {1001: [], 1000: []}
                    lost = {1001: 0, 1000: 0}
                    cpu, answered = 0.0, 0
                    for _ in range(rounds):
                        for _path, uid in paths:
                            before = _cpu_seconds(fwd.pid)
                            out = sh(*_FIRST, "taskset", "-c", "1", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                                     "--clear-groups", sys.executable, "-c", _DNS_CLIENT, WORLD_V4, name, str(qps),
                                     str(count), ns=pod, check=False)
                            if out.returncode:
                                raise RuntimeError(f"the DNS client (uid {uid}, {qps} qps) failed: {out.stderr[-1500:]}")
                            res = json.loads(out.stdout)
                            if uid == 1000:
                                cpu += _cpu_seconds(fwd.pid) - before
                                answered += len(res["ms"])
                            ms[uid] += res["ms"]
                            lost[uid] += res["lost"]
                    for path, uid in paths:
                        got = sorted(ms[uid]) or [float("nan")]
                        rows.append((f"{names}: {path}", qps, statistics.median(got),
                                     got[min(len(got) - 1, int(len(got) * 0.99))], lost[uid],
                                     cpu * 1000 / max(1, answered) if uid == 1000 else None))
        finally:
            if fwd is not None:
                fwd.terminate()
                fwd.wait(10)
                for line in (TMP / "forwarder.log").read_text().splitlines():
                    if '"dns_forwarder_stopped"' in line:
                        stopped = json.loads(line)
            upstream.kill()
            upstream.wait()
    return rows, stopped


def section_dns_forwarder(quick: bool) -> None:
    print("\n## 6. DNS forwarder (dns.mode proxy): latency per query, open loop, rounds interleaved\n")
    print(f"forwarder, client and upstream run under `{' '.join(_FIRST)}`")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for backend, commit in (("nftables", "nft transaction"), ("iptables", "ipset netlink message per set")):
        rows, stopped = dns_forwarder(quick, backend)
        print(f"\n{backend} back end\n\n| path | qps | median | p99 | lost | forwarder CPU per answered query |"
              "\n|---|---:|---:|---:|---:|---:|")
        for path, qps, med, p99, lost, cpu in rows:
            print(f"| {path} | {qps:,} | {med:.2f} ms | {p99:.2f} ms | {lost} | "
                  f"{'-' if cpu is None else f'{cpu:.2f} ms'} |")
        print(f"\nanswer received -> kernel set holds the address (one {commit} per batch of answers ready "
              f"together): median {stopped.get('commit_ms_median')} ms, p99 {stopped.get('commit_ms_p99')} ms "
              f"over {stopped.get('commits')} answers, {stopped.get('batches')} commits")
        print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


def section_dns_against(quick: bool, other: str, rounds: int = 3) -> None:
    """Section 6 for two versions of the forwarder, in rounds that alternate between them (one
    pod per round and version), so that both meet the same machine load: per row, the median over
    rounds of each round's median, p99 and forwarder CPU per query."""
    print(f"\n## 6b. DNS forwarder, this checkout against {other}: {rounds} alternating rounds\n")
    print(f"forwarder, client and upstream run under `{' '.join(_FIRST)}`")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    saved = os.environ.get("PYTHONPATH")
    for backend in ("nftables", "iptables"):
        got: dict[str, dict[tuple[str, int], list[tuple[float, float, int, float | None]]]] = {"this": {}, "other": {}}
        for _ in range(rounds):
            for version in ("other", "this"):
                if version == "other":
                    os.environ["PYTHONPATH"] = other
                elif saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
                rows, _ = dns_forwarder(quick, backend, rounds=1)
                for path, qps, med, p99, lost, cpu in rows:
                    got[version].setdefault((path, qps), []).append((med, p99, lost, cpu))
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        print(f"\n{backend} back end (medians over rounds; lost: summed)\n\n| path | qps | median before | median now | "
              "p99 before | p99 now | lost before | lost now | CPU/query before | CPU/query now |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (path, qps), now in got["this"].items():
            before = got["other"][(path, qps)]

            def mid(values: list[tuple[float, float, int, float | None]], i: int) -> str:
                xs = [v[i] for v in values if v[i] is not None]
                return f"{statistics.median(xs):.2f} ms" if xs else "-"  # type: ignore[type-var]
            print(f"| {path} | {qps:,} | {mid(before, 0)} | {mid(now, 0)} | {mid(before, 1)} | {mid(now, 1)} | "
                  f"{sum(v[2] for v in before)} | {sum(v[2] for v in now)} | {mid(before, 3)} | {mid(now, 3)} |")
        print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


# 5. The log of refusals (issue 14): kept apart from the sections above


REFUSED_CLIENT = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t, cpu = time.perf_counter(), time.process_time()
for _ in range(count):
    try:
        s.sendto(b"x", (host, port))
    except OSError:  # refused: EPERM from the reject
        pass
print(count / (time.perf_counter() - t), count / (time.process_time() - cpu))
"""


def datagram_rate(pod: str, dest: str, count: int, port: int = 5001) -> tuple[float, float]:
    """UDP datagrams uid 1000 sends to dest:port (5001: refused; ALLOWED_UDP_PORT: allowed) per second
    of wall time and per second of the client's CPU time (which carries the output hooks' cost)."""
    out = sh(*PIN[0], "setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
             sys.executable, "-c", REFUSED_CLIENT, dest, str(port), str(count), ns=pod, timeout=120)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


# Allowed for UDP in section 5: each datagram is an allowed packet that walks the whole confined
# chain (every refusal rule, then the allow list) to its RETURN, never a reply that leaves early.
ALLOWED_UDP_PORT = 5002


def log_cost(runs: int, count: int) -> list[tuple[str, str, list[float]]]:
    """Per back end: allowed and refused UDP datagrams/s and allowed new TCP connections/s of uid
    1000, with the log off (`log: {refused: false}`), on with nobody reading the group, and on with
    `watch` reading. Same policy otherwise (16 allowed /32s in a kernel set, UDP to one of them
    allowed, no redirect); one pod/world pair per row, rows measured in interleaved rounds as in section 3."""
    dest = list_addresses(2)[-1]
    rows = [(backend, how) for backend in ("nftables", "iptables") for how in ("log off", "log on", "log on, watch reading")]
    # per row: allowed datagrams/s (wall, CPU), refused datagrams/s (wall, CPU), allowed conns/s (wall, CPU)
    rates: dict[tuple[str, str], list[list[float]]] = {r: [[] for _ in range(6)] for r in rows}
    with contextlib.ExitStack() as stack:
        pods = []
        for backend, how in rows:
            pod = _pod_serving(stack, dest)
            policy = TMP / f"policy-log-{how == 'log off'}.yaml"
            policy.write_text(write_policy(16, False).read_text()
                              + f"  - {{cidr: {dest}/32, protocol: udp, ports: [{ALLOWED_UDP_PORT}]}}\n"
                              + ("log: {refused: false}\n" if how == "log off" else ""))
            os.environ["EGRESSGUARD_BACKEND"] = backend
            eg_apply(pod, policy)
            if "watch" in how:
                reader = subprocess.Popen(["ip", "netns", "exec", pod, *EG, "watch"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True)
                stack.callback(reader.wait)
                stack.callback(reader.terminate)
                assert reader.stderr and "watch_started" in reader.stderr.readline()
            conn_rate(pod, dest, 200)  # warm up
            datagram_rate(pod, dest, 200)
            datagram_rate(pod, dest, 200, ALLOWED_UDP_PORT)
            pods.append(((backend, how), pod))
        os.environ.pop("EGRESSGUARD_BACKEND", None)
        for _ in range(runs):
            for row, pod in pods:
                got = (*datagram_rate(pod, dest, count, ALLOWED_UDP_PORT), *datagram_rate(pod, dest, count),
                       *conn_rate(pod, dest, count // 10))
                for series, value in zip(rates[row], got, strict=True):
                    series.append(value)
    return [(b, h, [statistics.median(s) for s in rates[(b, h)]]) for b, h in rows]


def section_log_cost(runs: int, quick: bool) -> None:
    count = 5000 if quick else 30000
    rows = log_cost(runs, count)
    print(f"\n## 5. The log of refusals (uid 1000; {count} allowed and {count} refused UDP datagrams, "
          f"{count // 10} allowed TCP connections per run)\n")
    print("CPU: per second of the sending client's CPU time (the output hooks run in its system calls; on a "
          "shared machine steadier than wall time). µs: CPU time per allowed datagram.\n")
    print("| back end | log | allowed datagrams/s (wall) | allowed /s (CPU) | µs per allowed | vs log off "
          "| refused /s (CPU) | vs log off | allowed conns/s (CPU) | vs log off |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    off = {b: m for b, h, m in rows if h == "log off"}
    for b, h, m in rows:
        o = off[b]
        print(f"| {b} | {h} | {m[0]:,.0f} | {m[1]:,.0f} | {1e6 / m[1]:.2f} | {m[1] / o[1]:.2f}x "
              f"| {m[3]:,.0f} | {m[3] / o[3]:.2f}x | {m[5]:,.0f} | {m[5] / o[5]:.2f}x |")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
