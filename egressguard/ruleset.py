"""The pure core: Policy + Facts -> Ruleset. Every rule egressguard installs is decided here."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from egressguard.policy import METADATA_CIDRS, AllowEntry, DenyEntry, Policy

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)

# Owned objects. Nothing else in the kernel is touched.
DISPATCH = "EGRESSGUARD"  # filter and nat: jumped to from OUTPUT; picks whose traffic is confined
CONFINED = "EGRESSGUARD-CONFINED"  # filter: what confined traffic may do
REDIRECT = "EGRESSGUARD-REDIRECT"  # nat: transparent-proxy redirects for confined traffic
JUMP_COMMENT = "egressguard"
OWNED_CHAINS = {"filter": (DISPATCH, CONFINED), "nat": (DISPATCH, REDIRECT)}

# A multiport match takes at most 15 ports.
_MULTIPORT_MAX = 15
# IPv6 neighbour discovery (RS, RA, NS, NA) and MLDv2 reports the kernel sends for itself.
_NDP_TYPES = ("133", "134", "135", "136")  # router solicitation, advertisement; neighbour solicitation, advertisement
_MLD_REPORT = "143"
# Uids of user processes: `! --uid-owner` over the whole range matches only socketless (kernel) packets.
_ANY_USER = "0-4294967294"


@dataclass(frozen=True)
class Rule:
    """One iptables rule, as plain data. Field order is render order (as iptables-save prints it)."""

    target: str  # RETURN (allowed: later rules decide), REJECT, DROP, REDIRECT, or an owned chain
    comment: str  # the policy line that decides, e.g. "allow[0]", "dns", "metadata"
    dst: str | None = None  # destination network, normalised (203.0.113.0/24)
    out_iface: str | None = None  # "lo" or "!lo"
    protocol: str | None = None  # tcp, udp, icmp, ipv6-icmp
    uid: str | None = None  # owner match: "1000" or "!0-4294967294"
    ctstate: str | None = None  # conntrack states, e.g. "RELATED,ESTABLISHED"
    ctdir: str | None = None  # ORIGINAL or REPLY
    ctorigdst: str | None = None  # conntrack original destination (before any DNAT)
    ctorigdstport: int | None = None
    hoplimit: int | None = None  # hl --hl-eq
    icmp6_type: str | None = None
    dports: tuple[int, ...] = ()  # one port: -m tcp --dport; more: -m multiport --dports
    match_set: str | None = None  # ipset name, matched on dst
    reject_with: str | None = None
    to_ports: int | None = None  # REDIRECT --to-ports

    def args(self) -> list[str]:
        """The rule as iptables arguments, in iptables-save's order."""
        a: list[str] = []
        if self.dst:
            a += ["-d", self.dst]
        if self.out_iface:
            a += ["!", "-o", self.out_iface[1:]] if self.out_iface.startswith("!") else ["-o", self.out_iface]
        if self.protocol:
            a += ["-p", self.protocol]
        if self.uid:
            neg = self.uid.startswith("!")
            a += ["-m", "owner"] + (["!"] if neg else []) + ["--uid-owner", self.uid.lstrip("!")]
        if self.ctstate or self.ctdir or self.ctorigdst:
            a += ["-m", "conntrack"]
            if self.ctstate:
                a += ["--ctstate", self.ctstate]
            if self.ctorigdst:
                a += ["--ctorigdst", self.ctorigdst]
            if self.ctorigdstport is not None:
                a += ["--ctorigdstport", str(self.ctorigdstport)]
            if self.ctdir:
                a += ["--ctdir", self.ctdir]
        if self.hoplimit is not None:
            a += ["-m", "hl", "--hl-eq", str(self.hoplimit)]
        if self.icmp6_type:
            a += ["-m", "icmp6", "--icmpv6-type", self.icmp6_type]
        if len(self.dports) == 1:
            a += ["-m", self.protocol or "tcp", "--dport", str(self.dports[0])]
        elif self.dports:
            a += ["-m", "multiport", "--dports", ",".join(map(str, self.dports))]
        if self.match_set:
            a += ["-m", "set", "--match-set", self.match_set, "dst"]
        a += ["-m", "comment", "--comment", self.comment]
        a += ["-j", self.target]
        if self.reject_with:
            a += ["--reject-with", self.reject_with]
        if self.to_ports is not None:
            a += ["--to-ports", str(self.to_ports)]
        return a


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Table:
    """What egressguard owns in one (family, table): its chains and the jump at the top of OUTPUT."""

    family: Family
    name: Literal["filter", "nat"]
    chains: tuple[Chain, ...]  # empty: egressguard owns nothing here (objects are removed)

    @property
    def jump(self) -> Rule | None:
        return Rule(target=DISPATCH, comment=JUMP_COMMENT) if self.chains else None


@dataclass(frozen=True)
class Ruleset:
    """Everything one `apply` installs, for both families. Plain data: rendered by `plan`,
    committed by a back end, compared with the read-back by `verify`."""

    tables: tuple[Table, ...]
    kind: Literal["policy", "lockdown"] = "policy"
    unresolved_hosts: tuple[str, ...] = ()  # host entries shown, not resolved (plan only)

    def table(self, family: Family, name: str) -> Table:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError((family, name))

    def rule_count(self) -> int:
        return sum(len(c.rules) for t in self.tables for c in t.chains)

    def digest(self) -> str:
        """Digest of exactly what is installed (covers resolved addresses and resolvers)."""
        blob = json.dumps([asdict(t) for t in self.tables], sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Facts:
    """What the policy's meaning depends on besides its text, gathered before building."""

    resolvers: tuple[str, ...] = ()  # DNS servers confined processes may query
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> resolved addresses


# ---------------------------------------------------------------------------------------------


def _family(net: str) -> Family:
    return 6 if ":" in net else 4


def _host_net(addr: str) -> str:
    return str(ipaddress.ip_network(addr))


def _protocol(proto: str, family: Family) -> str | None:
    if proto == "any":
        return None
    if proto == "icmp":
        return "ipv6-icmp" if family == 6 else "icmp"
    return proto


def _port_groups(ports: Sequence[int] | None) -> list[tuple[int, ...]]:
    if not ports:
        return [()]
    uniq = sorted(set(ports))
    return [tuple(uniq[i : i + _MULTIPORT_MAX]) for i in range(0, len(uniq), _MULTIPORT_MAX)]


def _refuse(policy_action: str, family: Family, comment: str, **match: object) -> list[Rule]:
    """Refuse matching traffic the way the policy says (reject fails fast, drop stays silent)."""
    if policy_action == "drop":
        return [Rule(target="DROP", comment=comment, **match)]  # type: ignore[arg-type]
    # TCP gets a reset: an ICMP error can reach a connecting socket while connect() holds it, and
    # is then only a soft error (seen with IPv6: the refusal came a second later, on the SYN retry).
    unreachable = "icmp6-port-unreachable" if family == 6 else "icmp-port-unreachable"
    proto = match.get("protocol")
    rules = []
    if proto in (None, "tcp"):
        rules.append(Rule(target="REJECT", comment=comment, reject_with="tcp-reset", **{**match, "protocol": "tcp"}))  # type: ignore[arg-type]
    if proto != "tcp":
        rules.append(Rule(target="REJECT", comment=comment, reject_with=unreachable, **match))  # type: ignore[arg-type]
    return rules


def _entry_rules(
    entry: AllowEntry | DenyEntry, comment: str, family: Family, facts: Facts, target: str | None, action: str
) -> Iterator[Rule]:
    if entry.cidr is not None:
        nets = [entry.cidr]
    else:
        nets = [_host_net(a) for a in facts.hosts.get(entry.host or "", ())]
    for net in nets:
        if _family(net) != family:
            continue
        proto = _protocol(entry.protocol, family)
        for group in _port_groups(entry.ports):
            match = {"dst": net, "protocol": proto, "dports": group}
            if target is None:
                yield from _refuse(action, family, comment, **match)
            else:
                yield Rule(target=target, comment=comment, **match)  # type: ignore[arg-type]


def _dispatch(policy: Policy, into: str) -> tuple[Rule, ...]:
    """Exempt uids leave first; then the confined uids (or everyone) go to `into`."""
    rules = [Rule(target="RETURN", comment="exempt", uid=str(u)) for u in sorted(set(policy.exempt.uids))]
    if policy.confines_everyone:
        rules.append(Rule(target=into, comment="confine"))
    else:
        rules += [Rule(target=into, comment="confine", uid=str(u)) for u in sorted(set(policy.confine.uids))]
    return tuple(rules)


def _confined_head(policy: Policy, family: Family, facts: Facts) -> list[Rule]:
    """What confined traffic may always do, in lockdown and under the policy."""
    rules = [
        # Replies on connections others opened to us (health probes, inbound services).
        Rule(target="RETURN", comment="replies", ctstate="RELATED,ESTABLISHED", ctdir="REPLY"),
    ]
    if family == 6 and policy.confines_everyone:
        # The kernel's own neighbour discovery and MLD: only from kernel sockets, never a user's.
        for t in (*_NDP_TYPES, _MLD_REPORT):
            rules.append(Rule(target="RETURN", comment="kernel-ndp", protocol="ipv6-icmp", uid="!" + _ANY_USER, icmp6_type=t))
    return rules


def _loopback(policy: Policy, family: Family) -> list[Rule]:
    rules: list[Rule] = []
    if policy.loopback == "allow":
        rules.append(Rule(target="RETURN", comment="loopback", out_iface="lo"))
    elif isinstance(policy.loopback, list):
        for proto in ("tcp", "udp"):
            for group in _port_groups(policy.loopback):
                rules.append(Rule(target="RETURN", comment="loopback", out_iface="lo", protocol=proto, dports=group))
    # A redirected packet reaches this chain with its new destination (the loopback address) but
    # still with its original output device, so `-o lo` does not see it: match the address.
    redirect_ports = sorted({r.to_port for r in policy.redirect})
    local = "::1/128" if family == 6 else "127.0.0.1/32"
    for group in _port_groups(redirect_ports) if redirect_ports else []:
        rules.append(Rule(target="RETURN", comment="redirect", dst=local, protocol="tcp", dports=group))
    return rules


def _dns(family: Family, facts: Facts) -> list[Rule]:
    # Matched on the original destination, so a resolver reached through DNAT (Docker's 127.0.0.11)
    # is still recognised, and a DNAT to elsewhere does not make a non-resolver look like one.
    rules = []
    for server in facts.resolvers:
        if _family(server) != family:
            continue
        for proto in ("udp", "tcp"):
            rules.append(
                Rule(target="RETURN", comment="dns", protocol=proto, ctorigdst=_host_net(server), ctorigdstport=53)
            )
    return rules


def _metadata(policy: Policy, family: Family) -> list[Rule]:
    if not policy.deny_metadata:
        return []
    rules: list[Rule] = []
    for net in METADATA_CIDRS:
        if _family(net) == family:
            rules += _refuse(policy.action, family, "metadata", dst=net)
    return rules


def _confined(policy: Policy, family: Family, facts: Facts, lockdown: bool) -> tuple[Rule, ...]:
    rules = _confined_head(policy, family, facts)
    rules += _metadata(policy, family)
    if not lockdown:
        for i, entry in enumerate(policy.deny):
            rules += _entry_rules(entry, f"deny[{i}]", family, facts, None, policy.action)
    rules += _loopback(policy, family)
    rules += _dns(family, facts)
    if not lockdown:
        for i, entry in enumerate(policy.allow):
            rules += _entry_rules(entry, f"allow[{i}]", family, facts, "RETURN", policy.action)
    rules += _refuse(policy.action, family, "lockdown" if lockdown else "default")
    return tuple(rules)


def _redirects(policy: Policy) -> tuple[Rule, ...]:
    rules = []
    for i, r in enumerate(policy.redirect):
        for group in _port_groups(r.ports):
            rules.append(
                Rule(target="REDIRECT", comment=f"redirect[{i}]", out_iface="!lo", protocol="tcp", dports=group, to_ports=r.to_port)
            )
    return tuple(rules)


def build(policy: Policy, facts: Facts, *, lockdown: bool = False) -> Ruleset:
    """The complete ruleset for `policy` (or its lockdown: loopback, replies and DNS only).

    Allowed traffic RETURNs, so egressguard only ever restricts: rules after our jump (and other
    firewalls) still apply. Outbound packets are checked every time, not only when NEW, so an
    existing connection to a destination the policy does not allow is cut when the policy is applied.
    """
    tables: list[Table] = []
    for family in FAMILIES:
        tables.append(
            Table(
                family=family,
                name="filter",
                chains=(
                    Chain(DISPATCH, _dispatch(policy, CONFINED)),
                    Chain(CONFINED, _confined(policy, family, facts, lockdown)),
                ),
            )
        )
        nat_rules = () if lockdown else _redirects(policy)
        nat_chains = (Chain(DISPATCH, _dispatch(policy, REDIRECT)), Chain(REDIRECT, nat_rules)) if nat_rules else ()
        tables.append(Table(family=family, name="nat", chains=nat_chains))
    unresolved = tuple(e.host for e in policy.allow + policy.deny if e.host and e.host not in facts.hosts)  # type: ignore[operator]
    return Ruleset(tables=tuple(tables), kind="lockdown" if lockdown else "policy", unresolved_hosts=unresolved)


def hosts_of(policy: Policy) -> list[tuple[str, bool]]:
    """(name, optional) for every host entry, in policy order, each name once."""
    seen: dict[str, bool] = {}
    for e in list(policy.allow) + list(policy.deny):
        if e.host:
            seen[e.host] = seen.get(e.host, True) and e.optional
    return list(seen.items())


# ---------------------------------------------------------------------------------------------
# Rendering (`plan`)


def render(ruleset: Ruleset, *, header: Iterable[str] = ()) -> str:
    """iptables-save style text, one block per family and table (loadable with iptables-restore -n)."""
    lines = [f"# {h}" for h in header]
    for host in ruleset.unresolved_hosts:
        lines.append(f"# host {host}: resolved at apply time (A and AAAA); its rules are not shown")
    for t in ruleset.tables:
        lines.append(f"# {'ip6tables' if t.family == 6 else 'iptables'} {t.name}")
        lines.append(f"*{t.name}")
        if not t.chains:
            lines.append("# (nothing owned here: any egressguard chains are removed)")
        for c in t.chains:
            lines.append(f":{c.name} - [0:0]")
        if t.jump:
            lines.append(_join(["-I", "OUTPUT", "1", *t.jump.args()]))
        for c in t.chains:
            for r in c.rules:
                lines.append(_join(["-A", c.name, *r.args()]))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _join(args: list[str]) -> str:
    return " ".join(a if a and " " not in a and '"' not in a else json.dumps(a) for a in args)


def to_json(ruleset: Ruleset) -> dict[str, object]:
    return {
        "kind": ruleset.kind,
        "digest": ruleset.digest(),
        "unresolved_hosts": list(ruleset.unresolved_hosts),
        "tables": [
            {
                "family": f"ipv{t.family}",
                "table": t.name,
                "jump": t.jump.args() if t.jump else None,
                "chains": {c.name: [r.args() for r in c.rules] for c in t.chains},
            }
            for t in ruleset.tables
        ],
    }
