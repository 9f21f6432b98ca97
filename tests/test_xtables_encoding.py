"""egressguard commits the very bytes the reference tool commits: for every golden policy, a policy
with kernel sets and hypothesis-drawn policies, the tables egressguard writes in one fresh namespace
equal, entry by entry and byte by byte (counters aside), what `ipset restore` + `iptables-legacy-restore
-n` / `ip6tables-legacy-restore -n` write from `egressguard plan` in another (issue 9, item 3).
Both are read back with egressguard.backends.iptables.xtables_raw (IPT_SO_GET_ENTRIES / IP6T_SO_GET_ENTRIES)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from test_model_vs_kernel import policies

from egressguard import facts as facts_mod
from egressguard.backends.iptables import xtables_raw
from egressguard.backends.iptables.backend import IptablesBackend, _in_children
from egressguard.backends.iptables.render import render
from egressguard.lab import _enter_netns, netns_inode
from egressguard.policy import load_file, validate
from egressguard.ruleset import Facts, Rule, Ruleset, build, hosts_of

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
RESOLV_CONF = GOLDEN / "resolv.conf"
MAX_EXAMPLES = 150  # ~0.1 s each
HOST_ADDRESSES = ("203.0.113.10", "203.0.113.11", "2001:db8:2::10")  # every host entry resolves to these
# More networks per (protocol, ports) than SET_THRESHOLD, so these go into kernel sets (the set match).
SETS_POLICY: dict[str, Any] = {
    "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001]}, "dns": {"resolvers": []},
    "allow": [{"cidr": f"198.18.{n}.0/24", "ports": [443]} for n in range(20)]
    + [{"cidr": f"2001:db8:{n:x}::/48", "ports": [443]} for n in range(20)],
    "deny": [{"cidr": f"192.0.2.{n}/32", "protocol": "udp"} for n in range(20)],
}
TABLES = ("filter", "nat")
_counter = itertools.count()
_tally = {"policies": 0, "entries": 0, "differences": 0}


def _in_netns(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child inside network namespace `name`, through the back end's own
    runner (it waits for the child and raises the child's error here)."""
    return _in_children((_entered, (name, fn, args)))[0]


def _entered(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    _enter_netns(name)
    return fn(*args)


def _read_all() -> dict[tuple[int, str], dict[str, list[xtables_raw.Entry]]]:
    """Every table this namespace has (one it never created counts as empty), without empty
    built-in chains: egressguard leaves an unused nat table uncreated, iptables-restore creates it."""
    out = {}
    for family in (4, 6):
        with open("/proc/net/ip6_tables_names" if family == 6 else "/proc/net/ip_tables_names") as fh:
            present = set(fh.read().split())
        for table in TABLES:
            chains = xtables_raw.read_chains(family, table) if table in present else {}
            out[family, table] = {c: e for c, e in chains.items() if e or c not in xtables_raw.HOOKS}
    return out


def _egressguard_commits(ruleset: Ruleset) -> Any:
    IptablesBackend().commit(ruleset)
    return _read_all()


def _blocks(text: str) -> tuple[str, dict[str, str]]:
    """The plan split into ipset restore input and each tool's iptables-restore input."""
    sets: list[str] = []
    blocks: dict[str, list[str]] = {"iptables": [], "ip6tables": []}
    tool = None
    for line in text.splitlines():
        if line.startswith(("# iptables ", "# ip6tables ")):
            tool = line.split()[1]
        if tool is None:
            if not line.startswith("#"):
                sets.append(line)
        else:
            blocks[tool].append(line)
    return "\n".join(sets) + "\n", {t: "\n".join(lines) + "\n" for t, lines in blocks.items()}


def _reference_commits(ns: str, ruleset: Ruleset) -> Any:
    sets, blocks = _blocks(render(ruleset))
    with_sets = bool(ruleset.sets or ruleset.learned_sets)
    steps = ([("ipset", "restore")] if with_sets else []) + [(f"{t}-legacy-restore", "-n") for t in blocks]
    for argv, stdin in zip(steps, ([sets] if with_sets else []) + list(blocks.values()), strict=True):
        done = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}\n{stdin}"
    return _in_netns(ns, _read_all)


def _differences(ours: Any, theirs: Any) -> list[str]:
    out = []
    for (family, table), chains in sorted(ours.items()):
        ref = theirs[family, table]
        where = f"ipv{family} {table}"
        if sorted(chains) != sorted(ref):
            out.append(f"{where}: chains {sorted(chains)}, reference {sorted(ref)}")
            continue
        for name, entries in sorted(chains.items()):
            if len(entries) != len(ref[name]):
                out.append(f"{where}: chain {name}: {len(entries)} entries, reference {len(ref[name])}")
                continue
            for i, (a, b) in enumerate(zip(entries, ref[name], strict=False)):
                out += [f"{where}: chain {name} rule {i}: {d}" for d in a.differences(b, ("egressguard", "iptables-restore"))]
    return out


def _compare(ruleset: Ruleset) -> None:
    tag = f"egraw{os.getpid() % 100000}x{next(_counter)}"
    names = (f"{tag}-eg", f"{tag}-ref")
    own = os.stat("/proc/self/ns/net").st_ino
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
            assert netns_inode(ns) != own
        ours = _in_netns(names[0], _egressguard_commits, ruleset)
        theirs = _reference_commits(names[1], ruleset)
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
    diffs = _differences(ours, theirs)
    _tally["policies"] += 1
    _tally["entries"] += sum(len(e) for chains in ours.values() for e in chains.values())
    _tally["differences"] += len(diffs)
    assert not diffs, "\n".join(diffs[:10])


def _ruleset(policy: Any) -> Ruleset:
    hosts = {name: HOST_ADDRESSES for name, _optional in hosts_of(policy)}
    return build(policy, Facts(resolvers=facts_mod.resolvers_for(policy, RESOLV_CONF), hosts=hosts))


GOLDEN_POLICIES = sorted(p.name for p in GOLDEN.glob("*.yaml"))


@pytest.mark.netns
@pytest.mark.parametrize("name", GOLDEN_POLICIES)
def test_golden_policy_and_its_lockdown_commit_the_bytes_iptables_restore_commits(name: str) -> None:
    policy = load_file(GOLDEN / name)
    ruleset = _ruleset(policy)
    assert not ruleset.unresolved_hosts
    _compare(ruleset)
    _compare(build(policy, Facts(resolvers=facts_mod.resolvers_for(policy, RESOLV_CONF)), lockdown=True))


@pytest.mark.netns
def test_policy_with_kernel_sets_commits_the_bytes_iptables_restore_commits() -> None:
    ruleset = _ruleset(validate(SETS_POLICY))
    assert len(ruleset.sets) >= 3  # the set match is really covered
    _compare(ruleset)


@pytest.mark.netns
def test_dns_proxy_policy_commits_the_bytes_iptables_restore_commits() -> None:
    """dns.mode proxy: the learned sets' match, the CONNMARK that marks and the connmark match that
    lets marked connections outlive their address."""
    ruleset = _ruleset(load_file(GOLDEN / "proxy" / "dns-proxy.yaml"))
    targets = {r.target for t in ruleset.tables for c in t.chains for r in c.rules}
    assert ruleset.learned_sets and "CONNMARK" in targets
    assert any(r.ctmark for t in ruleset.tables for c in t.chains for r in c.rules)
    _compare(ruleset)


@pytest.mark.netns
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policies())
def test_drawn_policy_commits_the_bytes_iptables_restore_commits(data: dict[str, Any]) -> None:
    _compare(_ruleset(validate(data)))


@pytest.mark.netns
def test_report_encoding_figure(figures: list[str]) -> None:
    assert _tally["policies"] > MAX_EXAMPLES // 2 and _tally["entries"] > 0
    figures.append(f"encoding: {_tally['policies']} policies, {_tally['entries']} entries, "
                   f"{_tally['differences']} differences")
    assert _tally["differences"] == 0


@pytest.mark.parametrize("name", ["lo", "net1", "eth0", "veth1a2b3c4d", "tun0", "a-15-char-iface", "!lo"])
def test_ipv6_interface_mask_is_0xff_over_the_name_and_its_nul(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ip6tables writes it (and python-iptables' IPv4 Rule): no kernel needed."""
    plain = name.lstrip("!")
    want = b"\xff" * (len(plain) + 1) + b"\0" * (15 - len(plain))
    backend = IptablesBackend()
    for cls in (backend.iptc.Table, backend.iptc.Table6):  # never open a table (it would be created here)
        monkeypatch.setattr(cls, "existing_table_names", {t: False for t in cls.ALL})
    for family in (6, 4):
        neg = name.startswith("!")
        x = backend._encode(family, Rule(target="RETURN", comment="loopback", out_iface=None if neg else name,
                                         out_iface_not=plain if neg else None))
        header = dict(xtables_raw.parse_entry(family, bytes(x.rule))[0].header)  # the bytes libiptc is given
        assert header["outiface_mask"] == want, family
        assert header["outiface"] == plain.encode().ljust(16, b"\0")
        assert header["iniface_mask"] == bytes(16)
        assert header["invflags"] & 0x02 == (0x02 if name.startswith("!") else 0)  # IP(6)T_INV_VIA_OUT


def _udata_writes_into_live_memory(iptc: Any, rounds: int) -> int:
    """How many of `rounds` parses wrote into memory that objects created after the match's reset
    own (a marker buffer of the scratch area's size changed): hashlimit's rate parse writes its unit
    to the extension's udata, once on creation and again after final_check's reset and re-parse."""
    import ctypes  # noqa: PLC0415

    hit = 0
    for n in range(rounds):
        m = iptc.Rule().create_match("hashlimit")
        size = m._module.udata_size
        for when in ("created", "final-checked"):
            if when == "final-checked":
                m.final_check()  # python-iptables resets the match and parses its saved text again
            markers = [(ctypes.c_ubyte * size)(*[0xAA] * size) for _ in range(50)]  # take what was freed
            for key, value in (("hashlimit-upto", "10/second"), ("hashlimit-burst", "5"),
                               ("hashlimit-name", f"eg{n}"), ("hashlimit-htable-expire", "1000")):
                m.set_parameter(key, value)
            hit += any(bytes(b) != b"\xaa" * size for b in markers)
    return hit


def test_an_extensions_scratch_memory_outlives_each_parse() -> None:
    """python-iptables let a hashlimit parse write into freed memory (about one apply in 200 had an
    iptables worker die with SIGSEGV: exit 4). Run in a worker, as commits are."""
    backend = IptablesBackend()
    assert _in_children((_udata_writes_into_live_memory, (backend.iptc, 200)))[0] == 0
