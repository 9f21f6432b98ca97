"""The iptables back end's text: a Rule as iptables arguments, and `plan`'s iptables-save text (and
its JSON form) for a Ruleset. The Ruleset itself (ruleset.py) decides every rule; this only spells it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

from egressguard.backends import ANY_USER
from egressguard.backends.u32 import u32_matches
from egressguard.ruleset import (
    LEARNED_SET_TIMEOUT_S,
    LIMIT_PERIOD_MS,
    AddressSet,
    Family,
    Rule,
    Ruleset,
    shared_limit_expire_ms,
)

# A limit's unit as iptables-save prints it (--limit, --hashlimit-upto).
_LIMIT_WORD = {"second": "sec", "minute": "min", "hour": "hour", "day": "day"}


def limit_text(limit: tuple[int, str]) -> str:
    """(10, "second") -> "10/sec"."""
    return f"{limit[0]}/{_LIMIT_WORD[limit[1]]}"


def parse_limit(text: str) -> tuple[int, str] | None:
    """"10/sec" -> (10, "second"); None for a spelling iptables-save does not print."""
    rate, _, word = text.partition("/")
    unit = next((u for u, w in _LIMIT_WORD.items() if w == word), None)
    return (int(rate), unit) if rate.isdigit() and unit in LIMIT_PERIOD_MS else None


# The conntrack match's --ctstate words, in iptables-save's order; DNAT is a status bit it tests as a state.
CTSTATE_WORDS = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED")


def ctstate(rule: Rule) -> str:
    """`--ctstate` for the rule's states or its DNAT test ("" for neither). Both in one would be
    either, not both, to the conntrack match: refused."""
    if rule.ct_states and rule.ct_dnat:
        raise ValueError(f"connection states and DNAT in one rule (rule {rule.comment!r})")
    if rule.ct_dnat:
        return "DNAT"
    return ",".join(w for w in CTSTATE_WORDS if w.lower() in rule.ct_states)


def uses_conntrack(rule: Rule) -> bool:
    return bool(rule.ct_states or rule.ct_dnat or rule.ct_direction or rule.ctorigdst or rule.ctorigdstport is not None)


def reject_with(family: Family, answer: str) -> str:
    """`--reject-with` for a Rule's answer in `family`: the ICMP message is each family's own."""
    return f"icmp{'6' if family == 6 else ''}-{answer}" if answer == "port-unreachable" else answer


def args(rule: Rule, family: Family) -> list[str]:
    """The rule as `family`'s iptables arguments, in iptables-save's order."""
    a: list[str] = []
    if rule.dst:
        a += ["-d", rule.dst]
    if rule.out_iface:
        a += ["-o", rule.out_iface]
    elif rule.out_iface_not:
        a += ["!", "-o", rule.out_iface_not]
    if rule.protocol:
        a += ["-p", rule.protocol]
    if rule.uid is not None:
        a += ["-m", "owner", "--uid-owner", str(rule.uid)]
    elif rule.socketless:  # no uid at all: the owner match over every user uid, negated
        a += ["-m", "owner", "!", "--uid-owner", ANY_USER]
    if rule.ctorigdst_set:
        raise ValueError(f"iptables cannot look a set up by the original destination (rule {rule.comment!r})")
    # conntrack before addrtype: a rule with both (nat-elsewhere) tests the conntrack bit first,
    # and skips the address-type lookup for every packet that was not DNATed.
    if uses_conntrack(rule):
        a += ["-m", "conntrack"]
        if words := ctstate(rule):
            a += ["--ctstate", words]
        if rule.ctorigdst:
            a += ["--ctorigdst", rule.ctorigdst]
        if rule.ctorigdstport is not None:
            a += ["--ctorigdstport", str(rule.ctorigdstport)]
        if rule.ct_direction:
            a += ["--ctdir", rule.ct_direction.upper()]
    if rule.src_local is not None or rule.dst_local is not None:
        a += ["-m", "addrtype"]
        for opt, local in (("--src-type", rule.src_local), ("--dst-type", rule.dst_local)):
            if local is not None:
                a += ([opt, "LOCAL"] if local else ["!", opt, "LOCAL"])
    if rule.hoplimit is not None:
        a += ["-m", "hl", "--hl-eq", str(rule.hoplimit)]
    if rule.icmp6_type:
        a += ["-m", "icmp6", "--icmpv6-type", rule.icmp6_type]
    if rule.routing_header:
        a += ["-m", "rt"]
    if rule.sport is not None:
        a += ["-m", rule.protocol or "tcp", "--sport", str(rule.sport)]
    if len(rule.dports) == 1:
        a += ["-m", rule.protocol or "tcp", "--dport", str(rule.dports[0])]
    elif rule.dports:
        a += ["-m", "multiport", "--dports", ",".join(map(str, rule.dports))]
    if rule.match_set:
        a += ["-m", "set", "--match-set", rule.match_set, "dst"]
    for tests in u32_matches(rule.header):
        a += ["-m", "u32", "--u32", tests]
    if rule.ctmark is not None:
        a += ["-m", "connmark", "--mark", f"{rule.ctmark:#x}/{rule.ctmark:#x}"]
    if rule.limit and rule.limit_name:
        expire = shared_limit_expire_ms(rule.limit, rule.limit_burst)
        a += ["-m", "hashlimit", "--hashlimit-upto", limit_text(rule.limit), "--hashlimit-burst", str(rule.limit_burst or 5),
              "--hashlimit-name", rule.limit_name, "--hashlimit-htable-expire", str(expire)]
    elif rule.limit:
        a += ["-m", "limit", "--limit", limit_text(rule.limit)]
        if rule.limit_burst is not None:
            a += ["--limit-burst", str(rule.limit_burst)]
    a += ["-m", "comment", "--comment", rule.comment]
    if rule.ctmark_set is not None and rule.target != "CONNMARK":  # nftables only: mark and verdict in one
        a += ["--ctmark-or", f"{rule.ctmark_set:#x}"]
    a += ["-g" if rule.goto else "-j", rule.target]
    if rule.target == "CONNMARK" and rule.ctmark_set is not None:  # --or-mark, as iptables-save prints it
        a += ["--set-xmark", f"{rule.ctmark_set:#x}/{rule.ctmark_set:#x}"]
    if rule.reject_with:
        a += ["--reject-with", reject_with(family, rule.reject_with)]
    if rule.to_ports is not None:
        a += ["--to-ports", str(rule.to_ports)]
    if rule.nflog_prefix is not None:
        a += ["--nflog-prefix", rule.nflog_prefix]
    if rule.nflog_group is not None:
        a += ["--nflog-group", str(rule.nflog_group)]
    return a


def ipset_lines(st: AddressSet) -> list[str]:
    """As `ipset save` prints it (loadable with `ipset restore`)."""
    lines = [f"create {st.name} hash:net family {'inet6' if st.family == 6 else 'inet'}"]
    return lines + [f"add {st.name} {m}" for m in st.members]


MULTIPORT_MAX = 15  # ports one multiport match holds


def split_ports(ruleset: Ruleset) -> Ruleset:
    """The ruleset as this back end installs it: a rule of more than MULTIPORT_MAX ports becomes one
    rule per MULTIPORT_MAX of them, in its place (each the same match but for its ports, so a
    packet meets the same verdict)."""
    def split(r: Rule) -> list[Rule]:
        if len(r.dports) <= MULTIPORT_MAX:
            return [r]
        return [dataclasses.replace(r, dports=r.dports[i:i + MULTIPORT_MAX]) for i in range(0, len(r.dports), MULTIPORT_MAX)]

    if not any(len(r.dports) > MULTIPORT_MAX for t in ruleset.tables for c in t.chains for r in c.rules):
        return ruleset
    tables = tuple(dataclasses.replace(t, chains=tuple(dataclasses.replace(c, rules=tuple(x for r in c.rules for x in split(r)))
                                                       for c in t.chains)) for t in ruleset.tables)
    return dataclasses.replace(ruleset, tables=tables)


def render(ruleset: Ruleset, *, header: Iterable[str] = ()) -> str:
    """iptables-save style text, one block per family and table (loadable with iptables-restore -n)."""
    ruleset = split_ports(ruleset)
    lines = [f"# {h}" for h in header]
    for host in ruleset.unresolved_hosts:
        lines.append(f"# host {host}: resolved at apply time (A and AAAA); its rules are not shown")
    if ruleset.sets:
        # Created and filled before the rules that match on them (ipset restore syntax).
        lines.append(f"# ipset ({len(ruleset.sets)} sets, created and filled before the rules)")
        for st in ruleset.sets:
            lines += ipset_lines(st)
    if ruleset.learned_sets:
        # dns.mode proxy: created empty if missing (kept with what they hold), filled by `egressguard dns`.
        lines.append(f"# ipset ({len(ruleset.learned_sets)} learned-address sets, filled by the DNS forwarder)")
        for ls in ruleset.learned_sets:
            lines.append(f"# {ls.name}: {ls.host}")
            lines.append(f"create {ls.name} hash:net family {'inet6' if ls.family == 6 else 'inet'} "
                         f"timeout {LEARNED_SET_TIMEOUT_S}")
    for t in ruleset.tables:
        lines.append(f"# {'ip6tables' if t.family == 6 else 'iptables'} {t.name}")
        lines.append(f"*{t.name}")
        if not t.chains:
            lines.append("# (nothing owned here: any egressguard chains are removed)")
        for c in t.chains:
            lines.append(f":{c.name} - [0:0]")
        if t.jump:
            lines.append(_join(["-I", "OUTPUT", "1", *args(t.jump, t.family)]))
        for c in t.chains:
            for r in c.rules:
                lines.append(_join(["-A", c.name, *args(r, t.family)]))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _join(words: list[str]) -> str:
    return " ".join(a if a and " " not in a and '"' not in a else json.dumps(a) for a in words)


def to_json(ruleset: Ruleset) -> dict[str, object]:
    """`plan --json`: the Ruleset's summary, then its rules as iptables arguments."""
    head = ruleset.summary()  # the digest is the Ruleset's, as apply records it
    ruleset = split_ports(ruleset)  # the rules as installed
    return {
        **head,
        "tables": [
            {
                "family": f"ipv{t.family}",
                "table": t.name,
                "jump": args(t.jump, t.family) if t.jump else None,
                "chains": {c.name: [args(r, t.family) for r in c.rules] for c in t.chains},
            }
            for t in ruleset.tables
        ],
    }
