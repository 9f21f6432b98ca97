"""Ruleset -> nft script text (pure): what `plan --backend nftables` prints and `apply` commits."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from egressguard.errors import ApplyFailed
from egressguard.ruleset import CONFINED, DISPATCH, FAMILIES, REDIRECT, AddressSet, Family, Rule, Ruleset, Table

TABLE = "inet egressguard"
# Base chains: name -> spec. Priority 0 is iptables' filter, -100 its nat (dstnat) on output.
BASE = {
    "filter": ("filter", "output", 0),
    "nat": ("nat", "output", -100),
}
# A rule matching "no user socket" (iptables: ! --uid-owner 0-4294967294). nft's `meta skuid`
# matches nothing without a socket owner, so `!=` cannot express it: a user-owned packet returns
# from this chain and goes on; what is left (kernel sockets) gets the allowed verdict.
SOCKETLESS = "socketless"
ANY_USER = "0-4294967294"

_FAMILY_WORD = {4: "ipv4", 6: "ipv6"}
_ADDR = {4: "ip", 6: "ip6"}
ICMP6_NAMES = {
    "133": "nd-router-solicit",
    "134": "nd-router-advert",
    "135": "nd-neighbor-solicit",
    "136": "nd-neighbor-advert",
    "143": "mld2-listener-report",
}
REJECT = {  # iptables' --reject-with -> nft's reject statement
    "tcp-reset": "reject with tcp reset",
    "icmp-port-unreachable": "reject with icmp type port-unreachable",
    "icmp6-port-unreachable": "reject with icmpv6 type port-unreachable",
}
# ctstate words in iptables' print order, so a read-back spells them as the Ruleset does.
CT_STATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")

# Every field of Rule this back end renders and decodes. A field not listed here (added to the
# model for another back end first) is refused loudly, never silently left out of a rule.
HANDLED_FIELDS = frozenset({
    "target", "comment", "dst", "out_iface", "protocol", "uid", "ctstate", "ctdir", "ctorigdst",
    "ctorigdstport", "hoplimit", "icmp6_type", "dports", "match_set", "reject_with", "to_ports",
})


class UnsupportedRule(ApplyFailed):
    """A Rule this back end cannot express (exit 4): refused, never rendered without the part."""


def chain_name(family: Family, table: str, chain: str) -> str:
    """Our nft chain for the Ruleset's (family, table, chain): dispatch4, confined6, redirect4..."""
    if table == "filter":
        base = {DISPATCH: "dispatch", CONFINED: "confined"}.get(chain)
    else:
        base = {DISPATCH: "natdispatch", REDIRECT: "redirect"}.get(chain)
    if base is None:
        raise UnsupportedRule(f"no nftables chain for {table}/{chain}")
    return f"{base}{family}"


def chain_names(ruleset: Ruleset) -> list[str]:
    """Every chain this ruleset needs, base chains first."""
    names = [b for b in BASE if any(t.chains and t.name == b for t in ruleset.tables)]
    for t in ruleset.tables:
        names += [chain_name(t.family, t.name, c.name) for c in t.chains]
    if needs_socketless(ruleset):
        names.append(SOCKETLESS)
    return names


def needs_socketless(ruleset: Ruleset) -> bool:
    return any(r.uid and r.uid.startswith("!") for t in ruleset.tables for c in t.chains for r in c.rules)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _net(net: str) -> str:
    return net[:-3] if net.endswith("/32") and ":" not in net else net[:-4] if net.endswith("/128") else net


def rule_text(family: Family, table: str, r: Rule) -> str:
    """One Rule as an nft rule body (matches, counter, verdict, comment)."""
    unknown = {f.name for f in fields(r)} - HANDLED_FIELDS
    set_unknown = [n for n in sorted(unknown) if getattr(r, n) not in (None, (), "", False)]
    if set_unknown:
        raise UnsupportedRule(f"the nftables back end cannot express Rule field(s) {', '.join(set_unknown)} "
                              f"(rule {r.comment!r})")
    ip = _ADDR[family]
    a: list[str] = []
    if r.dst:
        a.append(f"{ip} daddr {_net(r.dst)}")
    if r.match_set:
        a.append(f"{ip} daddr @{r.match_set}")
    if r.out_iface:
        neg = r.out_iface.startswith("!")
        a.append(f"oifname {'!= ' if neg else ''}{quote(r.out_iface.lstrip('!'))}")
    if r.protocol:
        a.append(f"meta l4proto {r.protocol}")
    socketless = False
    if r.uid:
        if r.uid.startswith("!"):
            if r.uid != "!" + ANY_USER or r.target != "RETURN":
                raise UnsupportedRule(f"uid {r.uid} with {r.target}: only !{ANY_USER} RETURN is expressible")
            socketless = True
        else:
            a.append(f"meta skuid {r.uid}")
    if r.ctstate:
        a.append("ct state " + ",".join(s.lower() for s in r.ctstate.split(",")))
    if r.ctdir:
        a.append(f"ct direction {r.ctdir.lower()}")
    if r.ctorigdst:
        a.append(f"ct original {ip} daddr {_net(r.ctorigdst)}")
    if r.ctorigdstport is not None:
        if r.protocol not in ("tcp", "udp"):
            raise UnsupportedRule(f"ct original proto-dst needs protocol tcp or udp (rule {r.comment!r})")
        a.append(f"ct original proto-dst {r.ctorigdstport}")
    if r.hoplimit is not None:
        a.append(f"ip6 hoplimit {r.hoplimit}")
    if r.icmp6_type:
        a.append(f"icmpv6 type {ICMP6_NAMES.get(r.icmp6_type, r.icmp6_type)}")
    if r.dports:
        if r.protocol not in ("tcp", "udp"):
            raise UnsupportedRule(f"ports need protocol tcp or udp (rule {r.comment!r})")
        ports = str(r.dports[0]) if len(r.dports) == 1 else "{ " + ", ".join(map(str, r.dports)) + " }"
        a.append(f"{r.protocol} dport {ports}")
    a.append("counter")
    a.append(_verdict(family, table, r, socketless))
    a.append(f"comment {quote(r.comment)}")
    return " ".join(a)


def _verdict(family: Family, table: str, r: Rule, socketless: bool) -> str:
    if socketless:
        return f"jump {SOCKETLESS}"
    if r.reject_with and r.target != "REJECT" or r.to_ports is not None and r.target != "REDIRECT":
        raise UnsupportedRule(f"{r.target} with reject_with/to_ports (rule {r.comment!r})")
    if r.target == "RETURN":
        return "return"
    if r.target == "DROP":
        return "drop"
    if r.target == "REJECT":
        text = REJECT.get(r.reject_with or "")
        if text is None or (r.reject_with == "tcp-reset" and r.protocol != "tcp"):
            raise UnsupportedRule(f"REJECT --reject-with {r.reject_with} (rule {r.comment!r})")
        if (family == 6) != (r.reject_with == "icmp6-port-unreachable") and r.reject_with != "tcp-reset":
            raise UnsupportedRule(f"{r.reject_with} in an IPv{family} chain (rule {r.comment!r})")
        return text
    if r.target == "REDIRECT":
        if r.to_ports is None:
            raise UnsupportedRule(f"REDIRECT without a port (rule {r.comment!r})")
        return f"redirect to :{r.to_ports}"
    if r.target in (CONFINED, REDIRECT):
        return f"jump {chain_name(family, table, r.target)}"
    raise UnsupportedRule(f"target {r.target} (rule {r.comment!r})")


def elements(st: AddressSet) -> list[str]:
    """A set's members as interval-set elements: overlapping and adjacent networks collapsed
    (an nft interval set refuses overlaps; the kernel keeps the collapsed intervals)."""
    return collapse(st.family, st.members)


def collapse(family: Family, members: Iterable[str]) -> list[str]:
    cls = ipaddress.IPv6Network if family == 6 else ipaddress.IPv4Network
    nets = [cls(m) for m in members]
    return [_net(str(n)) for n in ipaddress.collapse_addresses(nets)]


def _set_decl(st: AddressSet) -> str:
    typ = "ipv6_addr" if st.family == 6 else "ipv4_addr"
    return f"add set {TABLE} {st.name} {{ type {typ}; flags interval; }}"


def fill_set(st: AddressSet, chunk: int = 4096) -> list[str]:
    """`add element` commands for `st` (in chunks: one line per 4096 members keeps lines sane)."""
    elems = elements(st)
    return [f"add element {TABLE} {st.name} {{ {', '.join(elems[i:i + chunk])} }}" for i in range(0, len(elems), chunk)]


def base_chain_decl(name: str) -> str:
    typ, hook, prio = BASE[name]
    return f"add chain {TABLE} {name} {{ type {typ} hook {hook} priority {prio}; policy accept; }}"


@dataclass(frozen=True)
class Existing:
    """What our table holds before a commit (names only), as read from the kernel."""

    table: bool = False
    chains: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    stale_base_chains: tuple[str, ...] = ()  # base chains whose type, hook, priority or policy differ


def new_sets_script(ruleset: Ruleset, existing: Existing) -> str | None:
    """Transaction 1: sets that do not exist yet, created and filled before any rule refers to
    them (a new interval set is published after rules committed with it: measured, TESTBED.md)."""
    new = [st for st in ruleset.sets if st.name not in existing.sets]
    if not new:
        return None
    lines = [f"add table {TABLE}"]
    for st in new:
        lines.append(_set_decl(st))
        lines += fill_set(st)
    return "\n".join(lines) + "\n"


def rules_script(ruleset: Ruleset, existing: Existing) -> str:
    """Transaction 2: the whole ruleset, both families. Table, chains and sets are kept and
    refilled, never deleted and re-created (that refused connections to kept destinations)."""
    if not any(t.chains for t in ruleset.tables):
        return f"delete table {TABLE}\n" if existing.table else ""
    wanted = chain_names(ruleset)
    lines = [f"add table {TABLE}"]
    # Empty every chain in our table first: then nothing refers to a chain or set being removed.
    lines += [f"flush chain {TABLE} {c}" for c in existing.chains]
    lines += [f"delete chain {TABLE} {c}" for c in existing.stale_base_chains]
    for name in wanted:
        lines.append(base_chain_decl(name) if name in BASE else f"add chain {TABLE} {name}")
    for st in ruleset.sets:
        if st.name in existing.sets:  # kept: refilled in place (repairs a tampered set)
            lines.append(f"flush set {TABLE} {st.name}")
            lines += fill_set(st)
    for base in BASE:
        if base not in wanted:
            continue
        for family in FAMILIES:
            t = _table(ruleset, family, base)
            if t is not None and t.chains:
                first = chain_name(family, base, DISPATCH)
                lines.append(f"add rule {TABLE} {base} meta nfproto {_FAMILY_WORD[family]} counter jump {first} "
                             f"comment {quote('egressguard')}")
    for t in ruleset.tables:
        for c in t.chains:
            name = chain_name(t.family, t.name, c.name)
            lines += [f"add rule {TABLE} {name} {rule_text(t.family, t.name, r)}" for r in c.rules]
    if SOCKETLESS in wanted:
        lines.append(f"add rule {TABLE} {SOCKETLESS} meta skuid {ANY_USER} return")
        lines.append(f"add rule {TABLE} {SOCKETLESS} accept")
    gone = [c for c in existing.chains if c not in wanted and c not in existing.stale_base_chains]
    # Regular chains before base chains: a base chain's jumps are gone already (flushed above).
    lines += [f"delete chain {TABLE} {c}" for c in gone]
    lines += [f"delete set {TABLE} {s}" for s in existing.sets if s not in {st.name for st in ruleset.sets}]
    return "\n".join(lines) + "\n"


def _table(ruleset: Ruleset, family: Family, name: str) -> Table | None:
    try:
        return ruleset.table(family, name)
    except KeyError:
        return None


def render(ruleset: Ruleset, *, header: Sequence[str] = ()) -> str:
    """The nft script a first apply commits (`nft -f` loads it as well): new sets in one
    transaction, then everything else in one more. A re-apply also deletes chains and sets the
    ruleset no longer needs (see rules_script)."""
    lines = [f"# {h}" for h in header]
    for host in ruleset.unresolved_hosts:
        lines.append(f"# host {host}: resolved at apply time (A and AAAA); its rules are not shown")
    if not any(t.chains for t in ruleset.tables):
        return "\n".join([*lines, f"delete table {TABLE}"]) + "\n"
    sets = new_sets_script(ruleset, Existing())
    if sets:
        lines.append(f"# transaction 1: {len(ruleset.sets)} set(s), created and filled before any rule uses them")
        lines.append(sets.rstrip("\n"))
    lines.append("# transaction 2: both families at once")
    lines.append(rules_script(ruleset, Existing(table=True)).rstrip("\n"))
    return "\n".join(lines) + "\n"
