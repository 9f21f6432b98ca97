"""The pure core: Policy + Facts -> Ruleset. Every rule egressguard installs is decided here."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Literal, cast

from egressguard.canonical import json_sha256
from egressguard.policy import METADATA_CIDRS, AllowEntry, DenyEntry, Policy

Family = Literal[4, 6]
# A test on a packet's headers: (bit offset from the start of the network header, width in bits, the
# value ranges it may hold). The back ends spell them (iptables: u32 matches; nftables: raw payload).
HeaderTest = tuple[int, int, tuple[tuple[int, int], ...]]
FAMILIES: tuple[Family, ...] = (4, 6)

# Owned objects. Nothing else in the kernel is touched.
DISPATCH = "EGRESSGUARD"  # filter and nat: jumped to from OUTPUT; picks whose traffic is confined
CONFINED = "EGRESSGUARD-CONFINED"  # filter: what confined traffic may do
REDIRECT = "EGRESSGUARD-REDIRECT"  # nat: transparent-proxy redirects for confined traffic
JUMP_COMMENT = "egressguard"
OWNED_CHAINS = {"filter": (DISPATCH, CONFINED), "nat": (DISPATCH, REDIRECT)}
# filter, with `log.refused`: one chain per refusing policy line, holding its log rule and its
# refusal. The confined chain's refusal rules jump there, so allowed traffic meets no log rule.
REFUSE_PREFIX = "EGRESSGUARD-REFUSE-"  # then a number: at most 28 bytes, as x_tables allows


def refuse_chain(n: int) -> str:
    return f"{REFUSE_PREFIX}{n}"


def refuse_index(name: str) -> int | None:
    """n for one of our refusal chains (EGRESSGUARD-REFUSE-n), else None."""
    n = name[len(REFUSE_PREFIX):] if name.startswith(REFUSE_PREFIX) else ""
    return int(n) if n.isdigit() and str(int(n)) == n else None


def owned_chains(table: str, present: Iterable[str]) -> list[str]:
    """Our chains of `table` among `present` (the chains a kernel table holds), in Ruleset order."""
    refusals = sorted((i, c) for c in present if table == "filter" and (i := refuse_index(c)) is not None)
    return [c for c in OWNED_CHAINS[table] if c in present] + [c for _i, c in refusals]

# From this many networks with the same (protocol, ports) on, a list goes into a kernel set
# (ipset hash:net, one lookup per packet) instead of one rule per network (a linear walk).
# Measured in bench/: below it, rules are as fast per packet and cheaper to apply.
SET_THRESHOLD = 16
# Prefix of every set egressguard owns.
SET_PREFIX = "egressguard-"
SET_STAGING_SUFFIX = "-new"  # a set is filled under this suffix, then renamed or swapped into place
_SET_NAME_MAX = 31  # ipset names hold at most 31 bytes

# The NFLOG group refused packets are sent to (`log group` in nftables), read by `egressguard watch`.
# Groups are per network namespace: one pod's guard never sees another's.
LOG_GROUP = 14
LOG_PREFIX_MAX = 63  # NFLOG's prefix holds 64 bytes with its NUL (xt_nflog_info)

# IPv6 neighbour discovery (RS, RA, NS, NA) the kernel sends for itself.
_NDP_TYPES = ("133", "134", "135", "136")  # router solicitation, advertisement; neighbour solicitation, advertisement

# Multicast membership reports are socketless, and any process may join groups of its choice: the
# kernel then announces them. Only IPv6 needs reports (for the solicited-node groups of its own
# addresses, so that a snooping switch forwards neighbour solicitations): those pass when every
# record announces one solicited-node group (ff02::1:ff00:0/104) with no sources, at a bounded rate.
_MLD_V2_REPORT, _MLD_V1_REPORT, _MLD_V1_DONE = "143", "131", "132"
_SOLICITED_NODE = "ff02::1:ff00:0/104"
# One bucket for every report the rules let out, whatever its record count (a limit per rule would
# multiply the bound by the number of rules).
_MLD_LIMIT, _MLD_BURST, _MLD_LIMIT_NAME = (10, "second"), 20, SET_PREFIX + "mld"
# Reports with up to this many records pass. The kernel merges pending joins into one report: a
# pod with a link-local and a global address that adds a third sent 3 records (seen by capture);
# each record is one more 24-bit choice for a process that joins groups itself.
_MLD_MAX_RECORDS = 4


def _mld_report_tests(records: int) -> tuple[HeaderTest, ...]:
    """An MLDv2 report exactly as the kernel builds it: hop-by-hop header of 8 bytes (router alert) at
    byte 40, ICMPv6 at 48, records of 20 bytes from 56, each a join, leave or current state (type 2,
    3, 4) without aux data or sources, for a solicited-node group (ff02::1:ffXX:XXXX)."""
    def one(bit: int, width: int, *values: int) -> HeaderTest:
        return bit, width, tuple((v, v) for v in values)

    tests = [
        one(32, 16, 16 + 20 * records),  # payload length: hop-by-hop 8 + MLD header 8 + records
        one(48, 8, 0),  # next header: hop-by-hop
        one(320, 16, 0x3A00),  # hop-by-hop: next header ICMPv6, length 0 (8 bytes)
        one(432, 16, records),  # number of records
    ]
    for i in range(records):
        at = (56 + 20 * i) * 8
        tests += [
            one(at, 32, 0x2000000, 0x3000000, 0x4000000),  # record type 2-4, aux length 0, 0 sources
            one(at + 32, 32, 0xFF020000), one(at + 64, 32, 0), one(at + 96, 32, 1), one(at + 128, 8, 0xFF),
        ]
    return tuple(tests)


# IPv4 header length over 5 words: the packet carries IP options (an unprivileged socket may set
# loose or strict source routes with IP_OPTIONS).
_IP_OPTIONS: tuple[HeaderTest, ...] = ((4, 4, ((6, 15),)),)
# RFC 6052 well-known NAT64 prefix: IPv4 a.b.c.d is reached as 64:ff9b::a.b.c.d over IPv6.
NAT64_PREFIX = "64:ff9b::/96"
_NAT64_HEAD = socket.inet_pton(socket.AF_INET6, "64:ff9b::")[:12]


@dataclass(frozen=True)
class Rule:
    """One iptables rule, as plain data. Field order is render order (as iptables-save prints it)."""

    target: str  # RETURN (allowed: later rules decide), REJECT, DROP, REDIRECT, or an owned chain
    comment: str  # the policy line that decides, e.g. "allow[0]", "dns", "metadata"
    dst: str | None = None  # destination network, normalised (203.0.113.0/24)
    out_iface: str | None = None  # leaves by this interface ("lo")
    out_iface_not: str | None = None  # leaves by any interface but this one
    protocol: str | None = None  # tcp, udp, icmp, ipv6-icmp, igmp
    uid: int | None = None  # owner match: packets of this uid's sockets
    socketless: bool = False  # packets without a user socket's owner: the kernel's own (and a closed socket's)
    src_local: bool | None = None  # the source is (True) or is not (False) one of this namespace's addresses
    dst_local: bool | None = None  # the same of the destination
    ct_states: tuple[str, ...] = ()  # the connection is in one of these states: "related", "established"
    ct_dnat: bool = False  # the connection's destination was translated (DNAT, REDIRECT)
    ct_direction: str | None = None  # the packet goes the connection's "original" or "reply" way
    ctorigdst: str | None = None  # conntrack original destination (before any DNAT)
    ctorigdstport: int | None = None  # conntrack original destination port (before any DNAT/REDIRECT)
    ctorigdst_set: str | None = None  # set name, matched on the conntrack original destination (nftables only)
    hoplimit: int | None = None  # hl --hl-eq
    icmp6_type: str | None = None
    routing_header: bool = False  # -m rt: the IPv6 packet carries a routing header (any type)
    dports: tuple[int, ...] = ()  # one port: -m tcp --dport; more: -m multiport --dports
    sport: int | None = None  # -m tcp --sport (never with dports)
    match_set: str | None = None  # ipset name, matched on dst
    header: tuple[HeaderTest, ...] = ()  # tests on the packet's headers, every one must hold
    limit: tuple[int, str] | None = None  # at most this many packets per unit (LIMIT_PERIOD_MS), e.g. (10, "second")
    limit_burst: int | None = None
    # One bucket shared by every rule that names it (iptables: -m hashlimit --hashlimit-name; nftables:
    # the rules jump to one chain holding the limit). Those rules must agree on limit and burst.
    limit_name: str | None = None
    reject_with: str | None = None  # REJECT's answer: "tcp-reset", or "port-unreachable" (ICMP or ICMPv6, by family)
    to_ports: int | None = None  # REDIRECT --to-ports
    ctmark: int | None = None  # matches connections whose conntrack mark has these bits (connmark --mark N/N)
    ctmark_set: int | None = None  # ORs these bits into the connection's conntrack mark, then the verdict
    nflog_prefix: str | None = None  # NFLOG --nflog-prefix: the policy line, for `egressguard watch`
    nflog_group: int | None = None  # NFLOG --nflog-group
    # With an owned chain as target: the chain's end (or RETURN) also ends the chain this rule is in
    # (iptables -g, nft goto), so a packet judged there meets none of the rules after this one.
    goto: bool = False


LIMIT_PERIOD_MS = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}  # a limit's units


def shared_limit_expire_ms(limit: tuple[int, str], burst: int | None) -> int:
    """How long hashlimit keeps a shared bucket while no packet arrives: the time an empty bucket takes
    to refill (burst / rate). iptables' default, one rate period, would start a fresh full burst
    after an idle second: 20 reports a second from a 10/second limit with burst 20."""
    rate, unit = limit
    return -(-(burst or 5) * LIMIT_PERIOD_MS[unit] // rate)


@dataclass(frozen=True)
class AddressSet:
    """A kernel set of destination networks (ipset hash:net), named after its members."""

    name: str  # egressguard-<family>-<hash of the members>: same members, same name
    family: Family
    members: tuple[str, ...]  # networks in canonical form (see `canonical_members`), sorted


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_SLASH = tuple(f"/{n}" for n in range(129))  # "/24": formatted once, not per member
_BYTE = tuple(bytes([n]) for n in range(129))


def parse_member(member: str) -> tuple[bytes, int]:
    """A network as (packed network address, prefix length); '198.51.100.7' means /32."""
    addr, _, plen = member.partition("/")
    packed = socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    return packed, int(plen) if plen else len(packed) * 8


def member_key(packed: bytes, prefixlen: int) -> bytes:
    """A network as one bytes object, the address then the prefix length: keys sort as the
    networks do within a family, each comparison one memcmp (tuples take several calls)."""
    return packed + _BYTE[prefixlen]


def canonical_members(keys: Iterable[bytes], given: Mapping[bytes, str] | None = None) -> tuple[str, ...]:
    """The networks of `keys` (see `member_key`): sorted (IPv4 first, then by address and prefix
    length), unique, printed the way the kernel read-back prints them (inet_ntop). Cheap for
    100,000 networks, where `ipaddress` objects would cost more than the kernel work.

    `given`: how networks were written. Where that is already the canonical text, the same
    string object is used, so a set's members share their memory with the policy's list.
    """
    ordered = sorted(keys)
    if len({len(k) for k in ordered}) > 1:
        ordered.sort(key=len)  # stable: IPv4 first, each family still in order
    ntop, slash, af4, af6 = socket.inet_ntop, _SLASH, socket.AF_INET, socket.AF_INET6
    spelled = given or {}
    out = []
    last = None
    for k in ordered:
        if k == last:
            continue  # sorted: a repeat follows its first
        last = k
        text = ntop(af6 if len(k) == 17 else af4, k[:-1]) + slash[k[-1]]
        same = spelled.get(k)
        out.append(same if same == text else text)
    return tuple(out)


def address_set(family: Family, members: Iterable[str]) -> AddressSet:
    """The set holding `members` (strict networks of `family`), named after them."""
    pton, af, byte = socket.inet_pton, _AF[family], _BYTE
    whole = byte[32 if family == 4 else 128]  # an address without a prefix length
    keyed: dict[bytes, str] = {}
    for m in members:
        addr, _, plen = m.partition("/")
        keyed[pton(af, addr) + (byte[int(plen)] if plen else whole)] = m
    ordered = canonical_members(keyed, keyed)
    # A set of single addresses is a different kind of kernel set on nftables (a hash, not an
    # interval tree): its own name, so a kept set never changes kind under the same name.
    whole_text = _SLASH[32 if family == 4 else 128]
    kind = " hosts" if all(m.endswith(whole_text) for m in ordered) else ""
    digest = hashlib.sha256(f"{family}{kind}\n".encode())
    digest.update("\n".join(ordered).encode())
    keep = _SET_NAME_MAX - len(SET_PREFIX) - len(f"{family}-") - len(SET_STAGING_SUFFIX)
    return AddressSet(name=f"{SET_PREFIX}{family}-{digest.hexdigest()[:keep]}", family=family, members=ordered)


@dataclass(frozen=True)
class LearnedSet:
    """dns.mode proxy: a kernel set of one allow entry's addresses, each added by the DNS forwarder
    with a timeout (the answer's clamped TTL). Its members are never part of the plan: a re-apply
    keeps them, and the read-back checks the set is there, not what it holds."""

    name: str  # egressguard-d<family>-<hash of host, protocol, ports>: unchanged entry, same set
    family: Family
    host: str  # the entry's name or wildcard, e.g. "*.example.com"


@dataclass(frozen=True)
class LearnedEntry:
    """An allow entry whose addresses the forwarder learns: what it matches and where they go."""

    index: int  # position in `allow`
    host: str
    sets: Mapping[Family, str]  # family -> LearnedSet name

    def matches(self, name: str) -> bool:
        """`name` (lower case, no trailing dot) is this entry's: equal, or below a wildcard's
        domain at any depth (`*.example.com` admits a.example.com and a.b.example.com, not example.com)."""
        if self.host.startswith("*."):
            return name.endswith(self.host[1:]) and len(name) > len(self.host) - 1
        return name == self.host


def learned_entries(policy: Policy) -> list[LearnedEntry]:
    """The allow entries the forwarder fills (dns.mode proxy: every `host` entry), in policy order."""
    if not policy.proxy_dns:
        return []
    out = []
    for i, e in enumerate(policy.allow):
        if e.host is None:
            continue
        key = f"{e.host}|{e.protocol}|{','.join(map(str, sorted(set(e.ports or ()))))}"
        h = hashlib.sha256(key.encode()).hexdigest()[:12]
        out.append(LearnedEntry(index=i, host=e.host, sets={f: f"{SET_PREFIX}d{f}-{h}" for f in FAMILIES}))
    return out


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
    sets: tuple[AddressSet, ...] = ()  # kernel sets the rules match on (must exist, full, before them)
    learned_sets: tuple[LearnedSet, ...] = ()  # dns.mode proxy: sets the DNS forwarder fills (exist before rules)

    def table(self, family: Family, name: str) -> Table:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError((family, name))

    def rule_count(self) -> int:
        return sum(len(c.rules) for t in self.tables for c in t.chains)

    def summary(self) -> dict[str, object]:
        """What `plan --json` says of the ruleset whatever the back end: kind, digest, sets."""
        return {
            "kind": self.kind,
            "digest": self.digest(),
            "unresolved_hosts": list(self.unresolved_hosts),
            "sets": [{"name": st.name, "family": f"ipv{st.family}", "members": list(st.members)} for st in self.sets],
            "learned_sets": [{"name": st.name, "family": f"ipv{st.family}", "host": st.host} for st in self.learned_sets],
        }

    def digest(self) -> str:
        """Digest of exactly what is installed (covers resolved addresses and resolvers)."""
        data: list[object] = [_plain(t) for t in self.tables]
        if self.sets:  # set names hash their members; the members are hashed here all the same
            data.append([_plain(s) for s in self.sets])
        if self.learned_sets:
            data.append({"learned": [_plain(s) for s in self.learned_sets]})
        return json_sha256(data)


def _plain(obj: object) -> object:
    """What `dataclasses.asdict` makes of these frozen dataclasses, as JSON sees it, without its
    deep copy of every value (100,000 set members took most of the digest's time)."""
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple) and obj and is_dataclass(obj[0]):
        return [_plain(x) for x in obj]
    return obj  # str, int, None, or a tuple of them


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


def _port_list(ports: Sequence[int] | None) -> tuple[int, ...]:
    """A policy's ports as one rule's, sorted and unique (a back end whose port match holds fewer
    splits the rule: iptables' multiport takes 15)."""
    return tuple(sorted(set(ports))) if ports else ()


def _refuse(policy_action: str, family: Family, comment: str, **match: object) -> list[Rule]:
    """Refuse matching traffic the way the policy says (reject fails fast, drop stays silent)."""
    if policy_action == "drop":
        return [Rule(target="DROP", comment=comment, **match)]  # type: ignore[arg-type]
    # TCP gets a reset: an ICMP error can reach a connecting socket while connect() holds it, and
    # is then only a soft error (seen with IPv6: the refusal came a second later, on the SYN retry).
    proto = match.get("protocol")
    rules = []
    if proto in (None, "tcp"):
        rules.append(Rule(target="REJECT", comment=comment, reject_with="tcp-reset", **{**match, "protocol": "tcp"}))  # type: ignore[arg-type]
    if proto != "tcp":
        rules.append(Rule(target="REJECT", comment=comment, reject_with="port-unreachable", **match))  # type: ignore[arg-type]
    return rules


def _entry_nets(entry: AllowEntry | DenyEntry, facts: Facts, family: Family, embed_nat64: bool = False) -> list[str]:
    """The entry's networks of `family`; with `embed_nat64` (deny lists), IPv6 also gets each IPv4
    network in the NAT64 prefix, so a NAT64 gateway does not reach a denied IPv4 host for us."""
    if entry.host is not None:
        nets: Iterable[str] = [_host_net(a) for a in facts.hosts.get(entry.host, ())]
    else:
        nets = entry.networks
    if family == 6:
        six = [n for n in nets if ":" in n]  # what _family says, inline: lists run to 100,000
        return six + [nat64(n) for n in nets if ":" not in n] if embed_nat64 else six
    return [n for n in nets if ":" not in n]


def _match_rules(action: str, family: Family, comment: str, target: str | None, **match: object) -> list[Rule]:
    if target is None:
        return _refuse(action, family, comment, **match)
    return [Rule(target=target, comment=comment, **match)]  # type: ignore[arg-type]


def _span(kind: str, indices: Sequence[int]) -> str:
    """allow[0-9999] / deny[2,5,7-9]: which policy entries a set rule stands for."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    text = ",".join(parts)
    return f"{kind}[{text if len(text) <= 200 else text[:200] + '...'}]"


def _destination(orig: bool, net: str | None, ports: tuple[int, ...]) -> list[dict[str, object]]:
    """Matches for a destination network (None: everywhere) and ports: the packet's own (`dst`,
    `dports`), or with `orig` the connection's original ones (conntrack's original tuple, which a
    NAT leaves alone): one rule per port, as --ctorigdstport takes one."""
    if not orig:
        return [{"dst": net, "dports": ports}]
    return [{"ctorigdst": net, "ctorigdstport": p} for p in ports] or [{"ctorigdst": net}]


def _list_rules(
    entries: Sequence[AllowEntry | DenyEntry], kind: str, family: Family, facts: Facts, target: str | None, action: str,
    *, orig: bool = False, orig_sets: bool = False,
) -> tuple[list[Rule], list[AddressSet]]:
    """Rules for an allow or deny list. Networks sharing (protocol, ports) go into one kernel set
    once there are SET_THRESHOLD of them; the set's rule takes the place of the first such entry.
    Within a list every rule has the same verdict, so grouping does not change the meaning.

    `orig`: judge the connection's original destination (the filter table, which a mesh's redirect
    reaches with the relay's address); sets too if `orig_sets` (nftables), else by the packet's
    destination (ipset cannot read conntrack: see `_dnat_unjudged`)."""
    per_entry = []
    groups: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
    counts: dict[tuple[str | None, tuple[int, ...]], int] = {}
    for i, entry in enumerate(entries):
        key = (_protocol(entry.protocol, family), tuple(sorted(set(entry.ports))) if entry.ports else ())
        nets = _entry_nets(entry, facts, family, embed_nat64=kind == "deny")
        everywhere = [n for n in nets if n.endswith("/0")]  # hash:net cannot hold /0
        per_entry.append((i, entry, key, nets, everywhere))
        settable = len(nets) - len(everywhere)
        if settable:
            groups.setdefault(key, []).append(i)
            counts[key] = counts.get(key, 0) + settable
    big = {key for key, n in counts.items() if n >= SET_THRESHOLD}
    members: dict[tuple[str | None, tuple[int, ...]], list[str]] = {key: [] for key in big}
    for _i, _entry, key, nets, everywhere in per_entry:
        if key in big:
            members[key] += [n for n in nets if not n.endswith("/0")] if everywhere else nets
    sets = {key: address_set(family, nets) for key, nets in members.items()}
    rules: list[Rule] = []
    for i, entry, key, nets, everywhere in per_entry:
        if key in big:
            if groups[key][0] == i:
                name = sets[key].name
                if orig and orig_sets:
                    for port in key[1] or (None,):
                        match: dict[str, object] = {"ctorigdst_set": name, "protocol": key[0], "ctorigdstport": port}
                        rules += _match_rules(action, family, _span(kind, groups[key]), target, **match)
                else:
                    match = {"match_set": name, "protocol": key[0], "dports": key[1]}
                    rules += _match_rules(action, family, _span(kind, groups[key]), target, **match)
            nets = everywhere
        for net in nets:
            dst = None if net.endswith("/0") else net  # what iptables reads back for "everywhere"
            for match in _destination(orig, dst, _port_list(entry.ports)):
                rules += _match_rules(action, family, f"{kind}[{i}]", target, protocol=key[0], **match)
    return rules, list(sets.values())


# The conntrack mark bits of connections by whom they belong to, set by that uid's own packets in
# the filter table and only ever ORed in (as LEARNED_CTMARK). What the kernel sends for a connection
# once its socket is closed (data still buffered, the FIN, the last ACK from TIME_WAIT) has no socket
# owner, so no uid match sees it; the bit says whose it is. `confine: all`: an exempt uid's (its tail
# leaves with it, instead of being refused as confined). A uid list: a confined uid's (its tail is
# judged as it is, instead of leaving unconfined after a re-apply took its destination's allow away).
EXEMPT_CTMARK = 0x20000000
CONFINED_CTMARK = 0x10000000
KERNEL_OPENED = "kernel-opened"  # the rule for connections the kernel opens for a process (_dispatch)


def _dispatch(policy: Policy, into: str, mark: bool = False, orig_sets: bool = False,
              socketless: Sequence[Rule] = ()) -> tuple[Rule, ...]:
    """Under `confine: all`, exempt uids leave first, then everyone goes to `into`; under a uid
    list, only those uids go (a uid cannot be in both lists, so an exempt rule would only cost
    every confined packet one more owner lookup). `mark` (the filter table): the uids named mark
    their connections (EXEMPT_CTMARK, CONFINED_CTMARK), and socketless packets on a marked connection,
    in its opener's direction, go the same way (`exempt-closing`, `confine-closing`). `orig_sets`
    (nftables): a rule marks and jumps at once; iptables' CONNMARK marks and goes on to the next
    (a uid list's is the confined chain's first rule, `_confined_head`: no owner match to repeat).
    `socketless`: rules for packets without a socket owner (the kernel's membership reports), after
    the named uids' rules, which match by owner only (so no packet meets both), and before the closing
    and catch-all rules, which they must precede: a named uid's packet does not walk them. Under a uid
    list the last rule (`kernel-opened`) sends socketless packets that open a connection to `into`."""
    named, bit, verdict, closing = (
        (sorted(set(policy.exempt.uids)), EXEMPT_CTMARK, "RETURN", "exempt-closing") if policy.confines_everyone
        else (sorted(set(cast(list[int], policy.confine.uids))), CONFINED_CTMARK, into, "confine-closing"))
    comment = "exempt" if policy.confines_everyone else "confine"
    rules: list[Rule] = []
    for u in named:
        if mark and not orig_sets and policy.confines_everyone:  # a uid list's: atop the confined chain
            rules.append(Rule(target="CONNMARK", comment=comment, uid=u, ctmark_set=bit))
        # A confined uid's packet goes to `into` for good: nothing after this rule concerns it (the
        # other uids' rules, the closing rule's owner lookup), and each rule walked costs every packet.
        rules.append(Rule(target=verdict, comment=comment, uid=u, ctmark_set=bit if mark and orig_sets else None,
                          goto=verdict == into))
    rules += socketless
    if mark and named:
        rules.append(Rule(target=verdict, comment=closing, socketless=True, ct_direction="original", ctmark=bit))
    if mark and not policy.confines_everyone:
        # A connection the kernel opens on a process's behalf sends its first packet from a kernel
        # socket, which no owner match attributes to anyone: an MPTCP socket's extra subflows (to
        # addresses the peer announces), SMC's TCP handshake, RDS over TCP, RxRPC's UDP. Under a uid
        # list such a packet would leave unjudged, so every socketless packet that opens a connection
        # is judged as confined, whoever asked for it (under `confine: all` everything is). Marked as
        # confined, so that its connection's later socketless packets are judged too (`confine-closing`).
        rules.append(Rule(target=into, comment=KERNEL_OPENED, socketless=True, ct_states=("new",),
                          ct_direction="original", ctmark_set=bit if orig_sets else None))
    if policy.confines_everyone:
        rules.append(Rule(target=into, comment="confine", goto=True))
    return tuple(rules)


def _membership_reports(family: Family) -> list[Rule]:
    """The kernel's multicast membership reports, judged before any rule a socketless packet can meet
    (`_dispatch`): under `confine: uids` they would never be confined, yet any process may choose
    their groups."""
    if family == 4:
        # IPv4 works without IGMP: no report leaves.
        return [Rule(target="DROP", comment="igmp", protocol="igmp", socketless=True)]
    rules = [
        Rule(target="RETURN", comment="mld-solicited-node", protocol="ipv6-icmp", socketless=True,
             icmp6_type=_MLD_V2_REPORT, header=_mld_report_tests(n), limit=_MLD_LIMIT, limit_burst=_MLD_BURST,
             limit_name=_MLD_LIMIT_NAME)
        for n in range(1, _MLD_MAX_RECORDS + 1)
    ]
    rules.append(Rule(target="RETURN", comment="mld-solicited-node", dst=_SOLICITED_NODE, protocol="ipv6-icmp",
                      socketless=True, icmp6_type=_MLD_V1_REPORT, limit=_MLD_LIMIT, limit_burst=_MLD_BURST,
                      limit_name=_MLD_LIMIT_NAME))
    for t in (_MLD_V2_REPORT, _MLD_V1_REPORT, _MLD_V1_DONE):
        rules.append(Rule(target="DROP", comment="mld", protocol="ipv6-icmp", socketless=True, icmp6_type=t))
    return rules


def _confined_head(policy: Policy, family: Family, facts: Facts, orig_sets: bool = False) -> list[Rule]:
    """What confined traffic meets first, in lockdown and under the policy: the kernel's own packets
    that must keep working, then the source invariant and source routes, then replies."""
    rules: list[Rule] = []
    if not policy.confines_everyone and not orig_sets:
        # iptables, a uid list: only the listed uids' packets and their connections' socketless ones
        # come here, so marking every packet is marking the listed uids' connections (_dispatch).
        rules.append(Rule(target="CONNMARK", comment="confine", ctmark_set=CONFINED_CTMARK))
    if family == 6 and policy.confines_everyone:
        # The kernel's own neighbour discovery: only from kernel sockets, never a user's. Before the
        # source check: duplicate address detection sends from `::`.
        for t in _NDP_TYPES:
            rules.append(Rule(target="RETURN", comment="kernel-ndp", protocol="ipv6-icmp", socketless=True, icmp6_type=t))
    if policy.confines_everyone:
        # Kernel packets to a local destination never leave the pod: among them the reset our own
        # REJECT sends back to the local client, whose source is the refused destination.
        rules.append(Rule(target="RETURN", comment="kernel-local", socketless=True, dst_local=True))
    # The source invariant: a confined packet leaves only from one of this pod's own addresses.
    # IPV6_FREEBIND lets any socket send from an address the pod does not own; whatever answers
    # such a packet (the pod's own kernel over loopback, conntrack's idea of a reply, our REJECT)
    # answers the forged source. Dropped, never rejected: the guard never answers a non-local source.
    rules.append(Rule(target="DROP", comment="forged-source", src_local=False))
    # Source routes: the rules judge only the first hop of a routed packet. Refused here, a confined
    # uid's packet cannot reach the pod's FORWARD path either: a packet the pod sends is delivered
    # locally or sent out; it is forwarded only if, delivered locally, it names a next hop (a
    # routing header, a source-route option) or carries another packet that a tunnel device of the
    # pod unpacks (VXLAN, FOU, GENEVE: none without CAP_NET_ADMIN, and forwarding is off in a pod).
    if family == 6:
        rules += _refuse(policy.action, family, "routing-header", routing_header=True)
    else:
        rules += _refuse(policy.action, family, "ip-options", header=_IP_OPTIONS)
    rules += _forwarder_port(policy)
    # Replies on connections others opened to us (health probes, inbound services).
    rules.append(Rule(target="RETURN", comment="replies", ct_states=("related", "established"), ct_direction="reply"))
    return rules


def _forwarder_port(policy: Policy) -> list[Rule]:
    """dns.mode proxy: only the forwarder (exempt) answers from its port. While it is down a confined
    process may bind that port and be handed the queries the nat table redirects there; whatever it
    sends from the port (an answer, over UDP or TCP) is dropped, before `replies` would pass it. By
    source port, not by conntrack: the same holds for anything it sends, and a resolver's answers on
    connections some other NAT made (Docker's 127.0.0.11, root under `confine: all`) are untouched."""
    if not policy.proxy_dns:
        return []
    return [Rule(target="DROP", comment="dns-forwarder-port", protocol=proto, sport=policy.dns.forwarder_port)
            for proto in ("udp", "tcp")]


def _loopback(policy: Policy, family: Family) -> list[Rule]:
    rules: list[Rule] = []
    if policy.loopback == "allow":
        rules.append(Rule(target="RETURN", comment="loopback", out_iface="lo"))
    elif isinstance(policy.loopback, list):
        for proto in ("tcp", "udp"):
            rules.append(Rule(target="RETURN", comment="loopback", out_iface="lo", protocol=proto,
                              dports=_port_list(policy.loopback)))
    # A redirected packet reaches this chain with its new destination (the loopback address) but
    # still with its original output device, so `-o lo` does not see it: match the address.
    redirect_ports = sorted({r.to_port for r in policy.redirect})
    local = "::1/128" if family == 6 else "127.0.0.1/32"
    # Only connections our nat REDIRECT redirected (ct_dnat): a direct connection to the proxy
    # port is local traffic like any other, governed by `loopback`.
    if redirect_ports:
        rules.append(Rule(target="RETURN", comment="redirect", dst=local, protocol="tcp", ct_dnat=True,
                          dports=tuple(redirect_ports)))
    return rules


def _dns(policy: Policy, family: Family, facts: Facts) -> list[Rule]:
    if policy.proxy_dns:
        # Confined queries reach only the forwarder, where the nat table's redirect sent them (a
        # direct query to a resolver is refused like any other destination).
        local = "::1/128" if family == 6 else "127.0.0.1/32"
        return [Rule(target="RETURN", comment="dns-proxy", dst=local, protocol=proto, ct_dnat=True,
                     dports=(policy.dns.forwarder_port,)) for proto in ("udp", "tcp")]
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
    for net in metadata_nets(family):
        rules += _refuse(policy.action, family, "metadata", ctorigdst=net)
    return rules


def nat64(net: str) -> str:
    """An IPv4 network in the well-known NAT64 prefix: a.b.c.d/n -> 64:ff9b::a.b.c.d/(96+n)."""
    addr, _, plen = net.partition("/")
    packed = _NAT64_HEAD + socket.inet_pton(socket.AF_INET, addr)
    return socket.inet_ntop(socket.AF_INET6, packed) + _SLASH[96 + (int(plen) if plen else 32)]


def metadata_nets(family: Family) -> list[str]:
    """The metadata endpoints as `family` reaches them: IPv6 includes the IPv4 ones behind NAT64."""
    if family == 4:
        return [n for n in METADATA_CIDRS if _family(n) == 4]
    return [n for n in METADATA_CIDRS if _family(n) == 6] + [nat64(n) for n in METADATA_CIDRS if _family(n) == 4]


def _confined(
    policy: Policy, family: Family, facts: Facts, lockdown: bool, orig_sets: bool
) -> tuple[list[Rule], list[AddressSet]]:
    """EGRESSGUARD-CONFINED, in this order: kernel-ndp (confine: all, IPv6) -> kernel-local
    (confine: all) -> forged-source (drop) -> routing-header / ip-options -> replies -> metadata
    -> deny -> loopback -> redirect target -> dns -> nat-elsewhere -> dnat-set (sets on iptables)
    -> allow -> default. Nothing that lets a packet through, and no REJECT (which answers the
    source), comes before the source check.

    Destinations are judged as the connection was addressed (conntrack's original tuple): a
    mesh sidecar's nat redirect (Istio, Linkerd) reaches this chain with the relay's address,
    127.0.0.1:15001, and its original destination is what the confined process asked for."""
    rules = _confined_head(policy, family, facts, orig_sets)
    rules += _metadata(policy, family)
    sets: list[AddressSet] = []
    if not lockdown:
        deny, deny_sets = _list_rules(policy.deny, "deny", family, facts, None, policy.action, orig=True,
                                      orig_sets=orig_sets)
        rules += deny
        sets += deny_sets
    rules += _loopback(policy, family)
    if not lockdown or not policy.proxy_dns:  # proxy mode's lockdown: no DNS at all (no forwarder rules)
        rules += _dns(policy, family, facts)
    # Judged by where it was addressed, an allowed connection must also go there: a NAT may hand it
    # to a process on this host (a mesh relay, our proxy), whose own connections are judged by its
    # uid, never on to another host. After DNS: a resolver's service address may be DNATed to the
    # resolver (kube-dns style), as before.
    rules += _refuse(policy.action, family, "nat-elsewhere", ct_dnat=True, dst_local=False)
    if not lockdown:
        allow, allow_sets = _list_rules(policy.allow, "allow", family, facts, "RETURN", policy.action, orig=True,
                                        orig_sets=orig_sets)
        if (deny_sets or allow_sets or learned_entries(policy)) and not orig_sets:
            rules += _dnat_unjudged(policy, family)
        rules += allow
        sets += allow_sets
        rules += _learned_allow(policy, family, orig_sets)
    rules += _refuse(policy.action, family, "lockdown" if lockdown else "default")
    return rules, sets


def policy_line(comment: str) -> str:
    """The policy line a rule's comment stands for, named as `egressguard explain` names it."""
    return "deny_metadata" if comment == "metadata" else comment


def _log_refusals(rules: list[Rule], policy: Policy) -> tuple[list[Rule], list[Chain]]:
    """With `log.refused`, each refusal in the confined chain jumps instead to its line's chain:
    a log rule (the kernel hands the packet, rate-limited per line, to the NFLOG group with the
    line as its prefix), then the line's refusal. The confined chain keeps its rules, matches and
    order, less one of each pair _refuse makes (a TCP reset, then the same match for any protocol):
    both halves now jump to the same chain, whose verdicts tell TCP from the rest, so the first is
    folded into the second. An allowed packet meets no rule it does not meet with log off."""
    if not policy.log.refused:
        return rules, []
    rate, _, unit = policy.log.rate.partition("/")
    limit = (int(rate), unit)
    chains: dict[str, list[Rule]] = {}  # comment -> the chain's refusals, in first-seen order
    out: list[Rule] = []
    for r in rules:
        if r.target not in ("REJECT", "DROP"):
            out.append(r)
            continue
        verdicts = chains.setdefault(r.comment, [])
        name = refuse_chain(list(chains).index(r.comment))
        refusal = Rule(target=r.target, comment=r.comment, reject_with=r.reject_with,
                       protocol="tcp" if r.reject_with == "tcp-reset" else None)
        if refusal not in verdicts:
            verdicts.append(refusal)
        jump = replace(r, target=name, reject_with=None)
        if r.protocol is None and out and out[-1] == replace(jump, protocol="tcp"):
            out.pop()  # its TCP twin: the same chain, reached by this rule's wider match
        out.append(jump)
    built = []
    for i, (comment, verdicts) in enumerate(chains.items()):
        log_rule = Rule(target="NFLOG", comment=comment, limit=limit, limit_burst=policy.log.burst,
                        nflog_prefix=policy_line(comment)[:LOG_PREFIX_MAX], nflog_group=LOG_GROUP)
        # A TCP reset before the ICMP error that answers everything else, as _refuse orders them.
        verdicts.sort(key=lambda v: v.protocol != "tcp")
        built.append(Chain(refuse_chain(i), (log_rule, *verdicts)))
    return out, built


def _dnat_unjudged(policy: Policy, family: Family) -> list[Rule]:
    """ipset's set match reads the packet's destination, and a DNATed packet's is the relay's, so
    where sets judge (iptables), a DNATed connection the allow list would judge is refused: a set
    could neither allow it nor, for a deny set, refuse it. Fail-closed; nftables looks sets up by
    the original destination (`ct original ip daddr @set`) and needs none of this."""
    return _refuse(policy.action, family, "dnat-set", ct_dnat=True)


# dns.mode proxy: the conntrack mark bit of connections a learned address let through. Only ever
# ORed in, so other users of the mark (CNIs, service meshes) keep theirs.
LEARNED_CTMARK = 0x40000000
LEARNED_OPEN = "dns-learned-open"  # the comment of the rule that lets marked connections through
# An iptables learned set's default timeout (ipset needs one to take per-member timeouts); never
# used: the forwarder adds every member with its own.
LEARNED_SET_TIMEOUT_S = 300


def _learned_allow(policy: Policy, family: Family, orig_sets: bool) -> list[Rule]:
    """dns.mode proxy: each host entry allows what its learned set holds, on its ports, and marks
    the connection; a marked connection outlives its address's expiry (the kernel forgets the
    address, the connection that was allowed goes on)."""
    rules: list[Rule] = []
    entries = learned_entries(policy)
    if entries:
        rules.append(Rule(target="RETURN", comment=LEARNED_OPEN, ct_direction="original", ctmark=LEARNED_CTMARK))
    for entry in entries:
        e = policy.allow[entry.index]
        proto = _protocol(e.protocol, family)
        # Judged by the original destination where the back end can (as the other allow entries)
        ports: list[int | None] = [*_port_list(e.ports)] or [None]
        matches: list[dict[str, object]] = (
            [{"ctorigdst_set": entry.sets[family], "ctorigdstport": p} for p in ports]
            if orig_sets else [{"match_set": entry.sets[family], "dports": _port_list(e.ports)}])
        for match in matches:
            if not orig_sets:  # iptables: CONNMARK marks and goes on, the RETURN after it allows
                rules.append(Rule(target="CONNMARK", comment=f"allow[{entry.index}]", protocol=proto,
                                  ctmark_set=LEARNED_CTMARK, **match))  # type: ignore[arg-type]
            rules.append(Rule(target="RETURN", comment=f"allow[{entry.index}]", protocol=proto,
                              ctmark_set=LEARNED_CTMARK if orig_sets else None, **match))  # type: ignore[arg-type]
    return rules


def _learned_sets(policy: Policy) -> tuple[LearnedSet, ...]:
    found = {s: LearnedSet(s, f, e.host) for e in learned_entries(policy) for f, s in e.sets.items()}
    return tuple(found[name] for name in sorted(found))


def _dns_redirects(policy: Policy) -> list[Rule]:
    """dns.mode proxy: every confined query, UDP and TCP 53 to any address, goes to the forwarder.
    First in the chain: a query to a denied address never leaves either, so it need not be refused."""
    if not policy.proxy_dns:
        return []
    return [Rule(target="REDIRECT", comment="dns-proxy", protocol=proto, dports=(53,), to_ports=policy.dns.forwarder_port)
            for proto in ("udp", "tcp")]


def _redirects(policy: Policy, family: Family, facts: Facts) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, r in enumerate(policy.redirect):
        rules.append(Rule(target="REDIRECT", comment=f"redirect[{i}]", out_iface_not="lo", protocol="tcp",
                          dports=_port_list(r.ports), to_ports=r.to_port))
    if rules:
        # Denied destinations and metadata endpoints are not handed to the proxy (an exempt process
        # that would connect to them on the confined process's behalf): left as they are, the
        # filter table refuses them. `deny` wins over `redirect` as it wins over `allow`.
        deny, _sets = _list_rules(policy.deny, "deny", family, facts, "RETURN", policy.action)
        rules[:0] = deny
        if policy.deny_metadata:
            rules[:0] = [Rule(target="RETURN", comment="metadata", dst=n) for n in metadata_nets(family)]
    return (*_dns_redirects(policy), *rules)


def build(policy: Policy, facts: Facts, *, lockdown: bool = False, orig_sets: bool = False) -> Ruleset:
    """The complete ruleset for `policy` (or its lockdown: loopback, replies and DNS only).
    `orig_sets`: the back end looks kernel sets up by the connection's original destination
    (nftables); else sets match the packet's destination and DNATed connections get `dnat-set`.

    Allowed traffic RETURNs, so egressguard only ever restricts: rules after our jump (and other
    firewalls) still apply. Outbound packets are checked every time, not only when NEW, so an
    existing connection to a destination the policy does not allow is cut when the policy is applied.
    """
    tables: list[Table] = []
    sets: dict[str, AddressSet] = {}
    for family in FAMILIES:
        refusing, family_sets = _confined(policy, family, facts, lockdown, orig_sets)
        confined, refusal_chains = _log_refusals(refusing, policy)
        sets.update((s.name, s) for s in family_sets)
        tables.append(
            Table(
                family=family,
                name="filter",
                chains=(
                    Chain(DISPATCH, _dispatch(policy, CONFINED, mark=True, orig_sets=orig_sets,
                                              socketless=_membership_reports(family))),
                    Chain(CONFINED, tuple(confined)),
                    *refusal_chains,
                ),
            )
        )
        nat_rules = () if lockdown else _redirects(policy, family, facts)
        nat_chains = (Chain(DISPATCH, _dispatch(policy, REDIRECT)), Chain(REDIRECT, nat_rules)) if nat_rules else ()
        tables.append(Table(family=family, name="nat", chains=nat_chains))
    unresolved = () if policy.proxy_dns else tuple(
        e.host for e in policy.allow + policy.deny if e.host and e.host not in facts.hosts)  # type: ignore[operator]
    return Ruleset(
        tables=tuple(tables),
        kind="lockdown" if lockdown else "policy",
        unresolved_hosts=unresolved,
        sets=tuple(sorted(sets.values(), key=lambda s: s.name)),
        learned_sets=() if lockdown else _learned_sets(policy),
    )


def hosts_of(policy: Policy) -> list[tuple[str, bool]]:
    """(name, optional) for every host entry apply resolves, in policy order, each name once
    (none in dns.mode proxy: the forwarder learns them)."""
    if policy.proxy_dns:
        return []
    seen: dict[str, bool] = {}
    for e in list(policy.allow) + list(policy.deny):
        if e.host:
            seen[e.host] = seen.get(e.host, True) and e.optional
    return list(seen.items())
