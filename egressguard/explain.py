"""The policy as a pure evaluator: which verdict, and which policy line decides, for one connection.

Written from the policy's semantics, not from `ruleset.py`: it is the model the kernel is checked
against (tests/test_model_vs_kernel.py), and what `egressguard explain` prints.

Order of decision, for a new connection from `uid` to `destination:port/protocol`:
  exempt uid -> allowed; uid not in `confine` -> allowed (`not confined`);
  confined TCP to a `redirect` port, not to a local address, nor to a `deny` entry, nor (with
  `deny_metadata`) to a metadata endpoint -> sent to the local proxy port (and let through: every
  destination is judged as the connection was addressed, before any NAT);
  `deny_metadata` -> `deny[i]` -> `loopback` -> the redirect targets on loopback (only for a
  connection that was redirected: a direct one to the proxy port is loopback traffic) -> `dns`
  -> `allow[i]` -> `default` (refused). `deny` wins over everything, the redirect included.
`deny_metadata` and every IPv4 `deny` entry also cover their IPv4-embedded forms in the well-known
NAT64 prefix 64:ff9b::/96 (RFC 6052): 64:ff9b::a9fe:a9fe is 169.254.169.254 behind a NAT64.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from egressguard.errors import PolicyError
from egressguard.policy import METADATA_CIDRS, AllowEntry, DenyEntry, Policy

Protocol = Literal["tcp", "udp", "icmp"]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Destinations a namespace reaches over `lo` even without its own interface addresses.
LOOPBACK_NETS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
# RFC 6052's well-known prefix: a NAT64 gateway carries 64:ff9b::a.b.c.d to IPv4 a.b.c.d.
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Facts:
    """What a policy's meaning depends on besides its text."""

    resolvers: tuple[str, ...] = ()  # DNS servers confined processes may query
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # host entry -> resolved addresses
    local: tuple[str, ...] = LOOPBACK_NETS  # networks routed over `lo` (loopback, the namespace's own addresses)


@dataclass(frozen=True)
class Probe:
    """One new connection (or ICMP echo) from a process."""

    uid: int
    destination: str  # an IP address; an IPv4-mapped IPv6 address counts as its IPv4 address
    port: int | None  # None: ICMP, or a port not given
    protocol: Protocol = "tcp"

    @property
    def address(self) -> IpAddress:
        addr = ipaddress.ip_address(self.destination)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return addr.ipv4_mapped  # the kernel sends such a connection as IPv4
        return addr

    @property
    def family(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class Verdict:
    """allow | refuse | redirect, and the policy line that decides."""

    verdict: Literal["allow", "refuse", "redirect"]
    line: str  # allow[2], deny[0], deny_metadata, dns, loopback, redirect[0], exempt, not confined, default
    action: Literal["reject", "drop"] | None = None  # how a refusal looks to the client
    to_port: int | None = None  # redirect: the local port the connection lands on
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        how = f" ({self.action})" if self.verdict == "refuse" else ""
        where = f" to local port {self.to_port}" if self.verdict == "redirect" else ""
        return f"{self.verdict}{how}{where}: {self.line}"


def _in_any(addr: IpAddress, nets: object) -> bool:
    return any(addr in ipaddress.ip_network(n, strict=False) for n in nets)  # type: ignore[attr-defined]


def _entry_matches(entry: AllowEntry | DenyEntry, facts: Facts, addr: IpAddress, port: int | None, proto: str) -> bool:
    if entry.protocol != "any" and entry.protocol != proto:
        return False
    if entry.ports is not None and port not in entry.ports:
        return False
    if entry.cidr is not None:
        return addr in ipaddress.ip_network(entry.cidr)  # mixed families are simply not contained
    return any(addr == ipaddress.ip_address(a) for a in facts.hosts.get(entry.host or "", ()))


def _denied_forms(addr: IpAddress) -> list[IpAddress]:
    """The address, and for one in the NAT64 prefix the IPv4 host it stands for: `deny` and
    `deny_metadata` refuse both."""
    if isinstance(addr, ipaddress.IPv6Address) and addr in NAT64_WELL_KNOWN:
        return [addr, ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    return [addr]


def _is_denied(policy: Policy, facts: Facts, addr: IpAddress, port: int | None, proto: str) -> str | None:
    """The line that refuses addr:port/proto whatever else the policy says, if one does."""
    forms = _denied_forms(addr)
    if policy.deny_metadata and any(_in_any(a, METADATA_CIDRS) for a in forms):
        return "deny_metadata"
    for i, entry in enumerate(policy.deny):
        if any(_entry_matches(entry, facts, a, port, proto) for a in forms):
            return f"deny[{i}]"
    return None


def _confined(policy: Policy, uid: int) -> str | None:
    """None if `uid` is confined, else the line that frees it."""
    if uid in policy.exempt.uids:
        return "exempt"
    if policy.confine.uids != "all" and uid not in policy.confine.uids:
        return "not confined"
    return None


def _filter(policy: Policy, facts: Facts, addr: IpAddress, port: int | None, proto: str) -> Verdict:
    """What confined traffic to addr:port/proto meets when not redirected (a direct connection to the
    proxy port is loopback traffic like any other)."""
    refuse = policy.action
    denied = _is_denied(policy, facts, addr, port, proto)
    if denied:
        return Verdict("refuse", denied, refuse)
    if _in_any(addr, facts.local):
        if policy.loopback == "allow":
            return Verdict("allow", "loopback")
        if isinstance(policy.loopback, list) and proto in ("tcp", "udp") and port in policy.loopback:
            return Verdict("allow", "loopback")
    if proto in ("tcp", "udp") and port == 53 and any(addr == ipaddress.ip_address(r) for r in facts.resolvers):
        return Verdict("allow", "dns")
    for i, entry in enumerate(policy.allow):
        if _entry_matches(entry, facts, addr, port, proto):
            return Verdict("allow", f"allow[{i}]")
    return Verdict("refuse", "default", refuse)


def evaluate(policy: Policy, facts: Facts, probe: Probe) -> Verdict:
    """The verdict for one new connection, and the policy line that decides it."""
    freed = _confined(policy, probe.uid)
    if freed:
        return Verdict("allow", freed)
    addr = probe.address
    notes: tuple[str, ...] = ()
    if probe.port is None and probe.protocol != "icmp":
        notes = ("no port given: entries limited to ports, dns and redirect were not considered",)
    denied = _is_denied(policy, facts, addr, probe.port, "tcp")
    if probe.protocol == "tcp" and not _in_any(addr, facts.local) and not denied:
        for i, r in enumerate(policy.redirect):
            if probe.port in r.ports:
                return Verdict("redirect", f"redirect[{i}]", to_port=r.to_port)
    v = _filter(policy, facts, addr, probe.port, probe.protocol)
    return Verdict(v.verdict, v.line, v.action, v.to_port, notes)


# ---------------------------------------------------------------------------------------------
# `egressguard explain --policy FILE --uid U DEST[:PORT][/PROTO]`

_DEST = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<bare>[^/]+?))(?::(?P<port>\d{1,5}))?(?:/(?P<proto>tcp|udp|icmp))?$")


def parse_destination(text: str) -> tuple[str, int | None, Protocol]:
    """`203.0.113.5:443/tcp`, `[2001:db8::1]:53/udp`, `2001:db8::1`, `198.51.100.7/icmp`."""
    text = text.strip()
    if text.count(":") > 1 and not text.startswith("["):  # bare IPv6: no port possible
        addr, _, proto = text.partition("/")
        host, port = addr, None
        proto = proto or "tcp"
        if proto not in ("tcp", "udp", "icmp"):
            raise PolicyError(f"usage error: {text!r}: protocol must be tcp, udp or icmp")
    else:
        m = _DEST.match(text)
        if not m:
            raise PolicyError(f"usage error: {text!r} is not DEST[:PORT][/PROTO] (e.g. 203.0.113.5:443/tcp, [2001:db8::1]:443)")
        host = m.group("v6") or m.group("bare") or ""
        port = int(m.group("port")) if m.group("port") else None
        proto = m.group("proto") or "tcp"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise PolicyError(f"usage error: {host!r} is not an IP address (explain takes addresses, not names)") from None
    if port is not None and not 1 <= port <= 65535:
        raise PolicyError(f"usage error: port {port} is out of range 1-65535")
    if proto == "icmp" and port is not None:
        raise PolicyError("usage error: icmp has no ports")
    return host, port, proto  # type: ignore[return-value]


def _cli_facts(policy: Policy, args: argparse.Namespace) -> tuple[Facts, list[str]]:
    """Resolvers as apply would see them; host addresses from the last apply's status file, if it
    was this policy (explain sends no queries)."""
    from egressguard import facts as facts_mod  # noqa: PLC0415 - dnspython is only needed here
    from egressguard import policy as policy_mod  # noqa: PLC0415
    from egressguard import status as status_mod  # noqa: PLC0415

    notes: list[str] = []
    resolvers = facts_mod.resolvers_for(policy, args.resolv_conf)
    hosts: dict[str, tuple[str, ...]] = {}
    names = [e.host for e in (*policy.allow, *policy.deny) if e.host]
    if names:
        st = status_mod.read(getattr(args, "status_file", None) or status_mod.DEFAULT_STATUS_PATH) or {}
        if st.get("policy_digest") == policy_mod.digest(policy):
            hosts = {k: tuple(v) for k, v in (st.get("hosts") or {}).items() if isinstance(v, list)}
        for name in dict.fromkeys(names):
            if policy.proxy_dns:
                notes.append(f"host {name}: dns.mode proxy learns its addresses at run time (`egressguard status` "
                             "lists them); its entries were not considered")
            elif name not in hosts:
                notes.append(f"host {name}: addresses unknown (no status file from an apply of this policy); "
                             "its entries were not considered")
    return Facts(resolvers=resolvers, hosts=hosts), notes


def main(args: argparse.Namespace) -> int:
    from egressguard import policy as policy_mod  # noqa: PLC0415

    if args.uid < 0 or args.uid > 4294967294:
        raise PolicyError(f"usage error: uid {args.uid} is out of range")
    dest, port, proto = parse_destination(args.dest)
    loaded = policy_mod.load(args.policy)
    facts, notes = _cli_facts(loaded.policy, args)
    verdict = evaluate(loaded.policy, facts, Probe(uid=args.uid, destination=dest, port=port, protocol=proto))
    print(verdict)
    if verdict.line in ("exempt", "not confined"):
        notes = []  # decided by the uid alone: unresolved hosts do not matter
    for note in (*verdict.notes, *notes):
        print(f"note: {note}")
    return 0
