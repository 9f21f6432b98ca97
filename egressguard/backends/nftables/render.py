"""Ruleset -> nft script text (pure): what `plan --backend nftables` prints and `apply` commits."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import socket
from array import array
from collections.abc import Iterator, MutableSequence, Sequence
from dataclasses import dataclass, fields

from egressguard.backends import ANY_USER, u32
from egressguard.backends.nftables.transport import TABLE, address_elements, interval_elements
from egressguard.errors import ApplyFailed
from egressguard.ruleset import (
    CONFINED,
    DISPATCH,
    FAMILIES,
    LIMIT_PERIOD_MS,
    REDIRECT,
    AddressSet,
    Family,
    LearnedSet,
    Rule,
    Ruleset,
    Table,
    refuse_index,
)

# Base chains: name -> spec. Priority 0 is iptables' filter. nat runs at -101, just before dstnat
# (-100), where iptables' nat table and meshes' nat chains (Istio's `inet istio-proxy-nat`) hook:
# the kernel asks nat chains in priority order until one maps the connection, so our `redirect`
# wins on its ports whoever registered first (at equal priority the later-registered chain runs first).
BASE = {
    "filter": ("filter", "output", 0),
    "nat": ("nat", "output", -101),
}
# A rule for packets without a user socket (iptables: ! --uid-owner 0-4294967294, the kernel's
# own packets). nft's `meta skuid` matches nothing at all without a socket owner (checked: neither
# `==` nor `!=` counted the kernel's neighbour solicitations), so the rule jumps to a chain of its
# own: a user-owned packet returns from it and goes on; what is left gets the rule's verdict there
# (after its limit, which thus counts only kernel packets, as with iptables). An allowed verdict
# there is `accept`: our base chains hold only jumps, so it ends our table's say, as RETURN does.
KERNEL_PREFIX = "kernel"

_FAMILY_WORD = {4: "ipv4", 6: "ipv6"}
_ADDR = {4: "ip", 6: "ip6"}
ICMP6_NAMES = {
    "133": "nd-router-solicit",
    "134": "nd-router-advert",
    "135": "nd-neighbor-solicit",
    "136": "nd-neighbor-advert",
    "131": "mld-listener-report",
    "132": "mld-listener-done",
    "143": "mld2-listener-report",
}
REJECT = {  # (a Rule's reject_with, family) -> nft's reject statement
    ("tcp-reset", 4): "reject with tcp reset",
    ("tcp-reset", 6): "reject with tcp reset",
    ("port-unreachable", 4): "reject with icmp type port-unreachable",
    ("port-unreachable", 6): "reject with icmpv6 type port-unreachable",
}
# Connection states, in the order the Ruleset lists them (a read-back spells them the same way).
CT_STATES = ("invalid", "new", "related", "established", "untracked")

# Every field of Rule this back end renders and decodes. A field not listed here (added to the
# model for another back end first) is refused loudly, never silently left out of a rule.
HANDLED_FIELDS = frozenset({
    "target", "comment", "dst", "out_iface", "out_iface_not", "protocol", "uid", "socketless", "ct_states",
    "ct_dnat", "ct_direction", "ctorigdst", "ctorigdstport", "ctorigdst_set", "hoplimit", "icmp6_type",
    "dports", "sport", "match_set", "reject_with", "to_ports", "src_local", "dst_local", "routing_header",
    "header", "limit", "limit_burst", "limit_name", "nflog_prefix", "nflog_group", "ctmark", "ctmark_set",
    "goto",
})
DEFAULT_BURST = 5  # iptables' and nft's


class UnsupportedRule(ApplyFailed):
    """A Rule this back end cannot express (exit 4): refused, never rendered without the part."""


def chain_name(family: Family, table: str, chain: str) -> str:
    """Our nft chain for the Ruleset's (family, table, chain): dispatch4, confined6, redirect4,
    refuse4-0 (EGRESSGUARD-REFUSE-0)..."""
    if table == "filter" and (n := refuse_index(chain)) is not None:
        return f"refuse{family}-{n}"
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
    names += kernel_chain_bodies(ruleset)
    return names


def kernel_chain(family: Family, table: str, n: int | str) -> str:
    return f"{'nat' if table == 'nat' else ''}{KERNEL_PREFIX}{family}-{n}"


def kernel_rules(ruleset: Ruleset) -> list[tuple[Table, Rule, str]]:
    """Rules for socketless packets, each with the chain of its own (numbered in rule order); rules
    with a shared limit (limit_name) all jump to one chain named after it, whose one limit they share."""
    out = []
    for t in ruleset.tables:
        n = 0
        for c in t.chains:
            for r in c.rules:
                if r.socketless:
                    if r.limit_name:
                        out.append((t, r, kernel_chain(t.family, t.name, r.limit_name)))
                        continue
                    out.append((t, r, kernel_chain(t.family, t.name, n)))
                    n += 1
    return out


def kernel_chain_bodies(ruleset: Ruleset) -> dict[str, list[str]]:
    """Every socketless rule's chain and its rules; rules sharing a chain must agree on its body."""
    bodies: dict[str, list[str]] = {}
    for t, r, k in kernel_rules(ruleset):
        body = kernel_chain_rules(t.family, t.name, r)
        if bodies.setdefault(k, body) != body:
            raise UnsupportedRule(f"rules sharing limit {r.limit_name} differ in limit or verdict (rule {r.comment!r})")
    return bodies


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _net(net: str) -> str:
    return net[:-3] if net.endswith("/32") and ":" not in net else net[:-4] if net.endswith("/128") else net


def rule_text(family: Family, table: str, r: Rule, kernel: str | None = None) -> str:
    """One Rule as an nft rule body (matches, counter, verdict, comment). `kernel`: the chain that
    holds the rest of a rule for socketless packets (see KERNEL_PREFIX)."""
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
        a.append(f"oifname {quote(r.out_iface)}")
    elif r.out_iface_not:
        a.append(f"oifname != {quote(r.out_iface_not)}")
    if r.protocol:
        a.append(f"meta l4proto {r.protocol}")
    if r.socketless and kernel is None:
        raise UnsupportedRule(f"a socketless match needs a chain of its own (rule {r.comment!r})")
    if r.uid is not None:
        a.append(f"meta skuid {r.uid}")
    if r.ct_states:
        if set(r.ct_states) - set(CT_STATES):
            raise UnsupportedRule(f"connection state {r.ct_states} (rule {r.comment!r})")
        a.append("ct state " + ",".join(r.ct_states))
    if r.ct_dnat:
        a.append("ct status dnat")
    if r.ct_direction:
        if r.ct_direction not in ("original", "reply"):
            raise UnsupportedRule(f"connection direction {r.ct_direction} (rule {r.comment!r})")
        a.append(f"ct direction {r.ct_direction}")
    if r.ctorigdst:
        a.append(f"ct original {ip} daddr {_net(r.ctorigdst)}")
    if r.ctorigdstport is not None:
        if r.protocol not in ("tcp", "udp"):
            raise UnsupportedRule(f"ct original proto-dst needs protocol tcp or udp (rule {r.comment!r})")
        a.append(f"ct original proto-dst {r.ctorigdstport}")
    if r.ctorigdst_set:
        a.append(f"ct original {ip} daddr @{r.ctorigdst_set}")
    # After conntrack (as with iptables): a rule with both looks the route up only for DNATed packets.
    for word, local in (("saddr", r.src_local), ("daddr", r.dst_local)):
        if local is not None:
            a.append(f"fib {word} type {'' if local else '!= '}local")
    if r.hoplimit is not None:
        a.append(f"ip6 hoplimit {r.hoplimit}")
    if r.icmp6_type:
        a.append(f"icmpv6 type {ICMP6_NAMES.get(r.icmp6_type, r.icmp6_type)}")
    if r.routing_header:
        if family != 6:
            raise UnsupportedRule(f"a routing header match in an IPv4 chain (rule {r.comment!r})")
        a.append("exthdr rt exists")
    if r.sport is not None:
        if r.protocol not in ("tcp", "udp"):
            raise UnsupportedRule(f"ports need protocol tcp or udp (rule {r.comment!r})")
        a.append(f"{r.protocol} sport {r.sport}")
    if r.dports:
        if r.protocol not in ("tcp", "udp"):
            raise UnsupportedRule(f"ports need protocol tcp or udp (rule {r.comment!r})")
        ports = str(r.dports[0]) if len(r.dports) == 1 else "{ " + ", ".join(map(str, r.dports)) + " }"
        a.append(f"{r.protocol} dport {ports}")
    a += u32.nft_text(r.header)
    if r.ctmark is not None:
        a.append(f"ct mark and {r.ctmark:#x} == {r.ctmark:#x}")
    if kernel is not None:
        a += ["counter", f"jump {kernel}", f"comment {quote(r.comment)}"]
        return " ".join(a)
    if r.limit_name:
        raise UnsupportedRule(f"a shared limit outside a socketless rule's chain (rule {r.comment!r})")
    a += limit_text(r)
    a.append("counter")
    if r.ctmark_set is not None:
        a.append(f"ct mark set ct mark or {r.ctmark_set:#x}")
    a.append(_verdict(family, table, r))
    a.append(f"comment {quote(r.comment)}")
    return " ".join(a)


def limit_text(r: Rule) -> list[str]:
    if not r.limit:
        if r.limit_burst is not None:
            raise UnsupportedRule(f"limit_burst without limit (rule {r.comment!r})")
        return []
    rate, unit = r.limit
    if rate < 1 or unit not in LIMIT_PERIOD_MS:
        raise UnsupportedRule(f"limit {r.limit} (rule {r.comment!r})")
    burst = r.limit_burst if r.limit_burst is not None else DEFAULT_BURST
    return [f"limit rate {rate}/{unit} burst {burst} packets"]


def kernel_chain_rules(family: Family, table: str, r: Rule) -> list[str]:
    """The body of a socketless rule's own chain: user-owned packets go back, the rest is judged."""
    verdict = "accept" if r.target == "RETURN" else _verdict(family, table, r)
    mark = [f"ct mark set ct mark or {r.ctmark_set:#x}"] if r.ctmark_set is not None else []
    return [f"meta skuid {ANY_USER} return", " ".join([*limit_text(r), *mark, verdict])]


def _owned_chain(target: str) -> bool:
    return target in (CONFINED, REDIRECT) or refuse_index(target) is not None


def _verdict(family: Family, table: str, r: Rule) -> str:
    if r.goto and not _owned_chain(r.target):
        raise UnsupportedRule(f"goto {r.target} (rule {r.comment!r}): only to an owned chain")
    if r.reject_with and r.target != "REJECT" or r.to_ports is not None and r.target != "REDIRECT":
        raise UnsupportedRule(f"{r.target} with reject_with/to_ports (rule {r.comment!r})")
    if (r.nflog_prefix is not None or r.nflog_group is not None) != (r.target == "NFLOG"):
        raise UnsupportedRule(f"{r.target} with nflog_prefix/nflog_group, or NFLOG without (rule {r.comment!r})")
    if r.target == "NFLOG":  # not a verdict: the packet goes on to the next rule, as with iptables' NFLOG
        return f"log prefix {quote(r.nflog_prefix or '')} group {r.nflog_group}"
    if r.target == "RETURN":
        return "return"
    if r.target == "DROP":
        return "drop"
    if r.target == "REJECT":
        text = REJECT.get((r.reject_with or "", family))
        if text is None or (r.reject_with == "tcp-reset" and r.protocol != "tcp"):
            raise UnsupportedRule(f"REJECT with {r.reject_with} (rule {r.comment!r})")
        return text
    if r.target == "REDIRECT":
        if r.to_ports is None:
            raise UnsupportedRule(f"REDIRECT without a port (rule {r.comment!r})")
        return f"redirect to :{r.to_ports}"
    if _owned_chain(r.target):
        return f"{'goto' if r.goto else 'jump'} {chain_name(family, table, r.target)}"
    raise UnsupportedRule(f"target {r.target} (rule {r.comment!r})")


def canonical(ruleset: Ruleset) -> Ruleset:
    """The ruleset as this back end reads it back: header tests as the bit ranges they constrain (nft
    merges and rewrites raw matches), a limit with its burst."""
    tables = []
    for t in ruleset.tables:
        chains = []
        for c in t.chains:
            chains.append(type(c)(c.name, tuple(_canonical_rule(r) for r in c.rules)))
        tables.append(type(t)(t.family, t.name, tuple(chains)))
    return type(ruleset)(tables=tuple(tables), kind=ruleset.kind, unresolved_hosts=ruleset.unresolved_hosts,
                         sets=ruleset.sets)


def _canonical_rule(r: Rule) -> Rule:
    changes: dict[str, object] = {}
    if r.header:
        changes["header"] = u32.normal(r.header)
    if r.limit:
        changes["limit_burst"] = r.limit_burst if r.limit_burst is not None else DEFAULT_BURST
    return dataclasses.replace(r, **changes) if changes else r  # type: ignore[arg-type]


Interval = tuple[int, int]  # first and last address, as integers
_AF = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}
_bounds_cache: dict[tuple[str, int, int], tuple[Sequence[int], Sequence[int]]] = {}


def bounds(st: AddressSet) -> tuple[Sequence[int], Sequence[int]]:
    """A set's members as the kernel keeps them in an interval set: sorted, overlapping and
    adjacent networks merged (nft refuses overlapping elements), as the first and the last
    address of each interval. Integer arithmetic: ipaddress objects cost ~0.3 s per 10,000
    members here. Cached per set (its name hashes its members), IPv4 in arrays: 10,000 intervals
    as tuples of ints hold 1.3 MiB while libnftables commits them, as arrays 160 KiB."""
    key = (st.name, st.family, len(st.members))
    if key not in _bounds_cache:
        af, bits = _AF[st.family]
        pton, frm = socket.inet_pton, int.from_bytes
        packed = []  # first address and host bits in one int: sorts by the first address
        for m in st.members:
            addr, _, plen = m.partition("/")
            host = bits - (int(plen) if plen else bits)
            packed.append((frm(pton(af, addr), "big") >> host << host << 8) | host)
        packed.sort()
        starts: MutableSequence[int] = array("Q") if st.family == 4 else []
        ends: MutableSequence[int] = array("Q") if st.family == 4 else []
        last = -2
        for p in packed:
            start = p >> 8
            end = start + (1 << (p & 0xFF)) - 1
            if start <= last + 1:
                if end > last:
                    ends[-1] = last = end
            else:
                starts.append(start)
                ends.append(last := end)
        if len(_bounds_cache) > 64:
            _bounds_cache.clear()
        _bounds_cache[key] = (starts, ends)
    return _bounds_cache[key]


def intervals(st: AddressSet) -> list[Interval]:
    """bounds(st) as (first, last) pairs."""
    return list(zip(*bounds(st), strict=True))


def merge(found: list[Interval]) -> list[Interval]:
    found.sort()
    merged: list[Interval] = []
    for start, end in found:
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _ntop(family: Family, n: int) -> str:
    af, bits = _AF[family]
    return socket.inet_ntop(af, n.to_bytes(bits // 8, "big"))


def hosts_only(st: AddressSet) -> bool:
    """Every member is one address: the set is a hash (one lookup per packet, whatever its size),
    not an interval tree, whose walk cost 3-5% of the new-connection rate at 10,000 members
    (bench/RESULTS.md, run T)."""
    whole = "/32" if st.family == 4 else "/128"
    return all(m.endswith(whole) for m in st.members)


def set_flags(st: AddressSet) -> list[str]:
    """The set's flags as nft lists them."""
    return [] if hosts_only(st) else ["interval"]


def elements(st: AddressSet) -> list[str]:
    """A set's members as its elements: each address of a hash set; for an interval set, a prefix
    where an interval is one, else a range."""
    return list(_elements(st))


def _elements(st: AddressSet) -> Iterator[str]:
    if hosts_only(st):
        yield from (m.rpartition("/")[0] for m in st.members)
        return
    af, bits = _AF[st.family]
    ntop, width = socket.inet_ntop, bits // 8
    for start, end in zip(*bounds(st), strict=True):
        first = ntop(af, start.to_bytes(width, "big"))
        size = end - start + 1
        if size == 1:
            yield first
        elif size & (size - 1) == 0 and start % size == 0:
            yield f"{first}/{bits - size.bit_length() + 1}"
        else:
            yield f"{first}-{ntop(af, end.to_bytes(width, 'big'))}"


def networks(family: Family, found: list[Interval]) -> tuple[str, ...]:
    """Intervals as the fewest networks covering exactly them, in canonical form (203.0.113.7/32)."""
    bits = _AF[family][1]
    cls = ipaddress.IPv6Address if family == 6 else ipaddress.IPv4Address
    out: list[str] = []
    for start, end in found:
        size = end - start + 1
        if size & (size - 1) == 0 and start % size == 0:  # one network: no ipaddress objects
            out.append(f"{_ntop(family, start)}/{bits - size.bit_length() + 1}")
        else:
            out += [str(n) for n in ipaddress.summarize_address_range(cls(start), cls(end))]
    return tuple(out)


def _set_decl(st: AddressSet) -> str:
    """A new set, declared with its elements: nft 1.0.6 sends the elements of an `add element`
    into a set created in the same transaction twice (801 KB instead of 400 KB of netlink for
    10,000 intervals: twice the kernel's work, 16 MiB against 9 MiB in libnftables)."""
    typ = "ipv6_addr" if st.family == 6 else "ipv4_addr"
    elems = _element_lines(st)
    inline = f" elements = {{ {elems} }};" if elems else ""
    flags = "".join(f" flags {f};" for f in set_flags(st))
    return f"add set {TABLE} {st.name} {{ type {typ};{flags}{inline} }}"


def learned_set_decl(st: LearnedSet) -> str:
    """A set the DNS forwarder fills: every element carries its own timeout (no default)."""
    typ = "ipv6_addr" if st.family == 6 else "ipv4_addr"
    return f"add set {TABLE} {st.name} {{ type {typ}; flags timeout; }}"


def encoded_elements(st: AddressSet) -> list[bytes]:
    """A kept set's elements as netlink attributes, for its refill (transport.SetRefill): the
    elements `_elements` spells in text, encoded as nft encodes them."""
    af, bits = _AF[st.family]
    if hosts_only(st):
        return address_elements(socket.inet_pton(af, m.rpartition("/")[0]) for m in st.members)
    return interval_elements(bits // 8, *bounds(st))


def _element_lines(st: AddressSet, per_line: int = 4096) -> str:
    """A set's elements, comma-separated, a line break after every `per_line` (lines stay sane)."""
    elems = _elements(st)  # one line of strings at a time, not 10,000
    return ",\n".join(iter(lambda: ", ".join(itertools.islice(elems, per_line)), ""))


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
    learned = [st for st in ruleset.learned_sets if st.name not in existing.sets]
    if not new and not learned:
        return None
    lines = [f"add table {TABLE}"]
    for st in new:
        lines.append(_set_decl(st))
    # Learned sets start empty and are never refilled by an apply: what the forwarder learned stays.
    lines += [learned_set_decl(st) for st in learned]
    return "\n".join(lines) + "\n"


def rules_script(ruleset: Ruleset, existing: Existing) -> str:
    """Transaction 2: the whole ruleset, both families. Table, chains and sets are kept and
    refilled, never deleted and re-created (that refused connections to kept destinations). A kept
    set is not in this script: a set is named after its members, so a kept one holds them already,
    or was tampered with and is refilled in a transaction of its own before this one
    (NftablesBackend._attempt, transport.SetRefill)."""
    if not any(t.chains for t in ruleset.tables):
        return f"delete table {TABLE}\n" if existing.table else ""
    wanted = chain_names(ruleset)
    lines = [f"add table {TABLE}"]
    # Empty every chain in our table first: then nothing refers to a chain or set being removed.
    lines += [f"flush chain {TABLE} {c}" for c in existing.chains]
    lines += [f"delete chain {TABLE} {c}" for c in existing.stale_base_chains]
    for name in wanted:
        lines.append(base_chain_decl(name) if name in BASE else f"add chain {TABLE} {name}")
    for base in BASE:
        if base not in wanted:
            continue
        for family in FAMILIES:
            t = _table(ruleset, family, base)
            if t is not None and t.chains:
                first = chain_name(family, base, DISPATCH)
                lines.append(f"add rule {TABLE} {base} meta nfproto {_FAMILY_WORD[family]} counter jump {first} "
                             f"comment {quote('egressguard')}")
    kernel = {id(r): k for _t, r, k in kernel_rules(ruleset)}
    for t in ruleset.tables:
        for c in t.chains:
            name = chain_name(t.family, t.name, c.name)
            lines += [f"add rule {TABLE} {name} {rule_text(t.family, t.name, r, kernel.get(id(r)))}" for r in c.rules]
    for k, bodies in kernel_chain_bodies(ruleset).items():
        lines += [f"add rule {TABLE} {k} {body}" for body in bodies]
    gone = [c for c in existing.chains if c not in wanted and c not in existing.stale_base_chains]
    # Regular chains before base chains: a base chain's jumps are gone already (flushed above).
    lines += [f"delete chain {TABLE} {c}" for c in gone]
    keep = {st.name for st in ruleset.sets} | {st.name for st in ruleset.learned_sets}
    lines += [f"delete set {TABLE} {s}" for s in existing.sets if s not in keep]
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
        lines.append(f"# transaction 1: {len(ruleset.sets) + len(ruleset.learned_sets)} set(s), created and filled "
                     "before any rule uses them")
        lines += [f"# learned set {st.name}: addresses of {st.host}, added by `egressguard dns`"
                  for st in ruleset.learned_sets]
        lines.append(sets.rstrip("\n"))
    lines.append("# transaction 2: both families at once")
    lines.append(rules_script(ruleset, Existing(table=True)).rstrip("\n"))
    return "\n".join(lines) + "\n"
