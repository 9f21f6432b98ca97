"""Facts the ruleset depends on: the resolvers, and the addresses of `host` entries (dnspython)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from egressguard.errors import ApplyFailed
from egressguard.policy import Policy

RESOLV_CONF = Path("/etc/resolv.conf")
PER_NAME_TIMEOUT_S = 2.0  # one name, both record types
DEADLINE_S = 10.0  # all names together
MAX_ADDRESSES_PER_NAME = 64


def system_resolvers(path: Path = RESOLV_CONF) -> tuple[str, ...]:
    """The `nameserver` lines of resolv.conf, in order (scope ids dropped, duplicates removed)."""
    found: list[str] = []
    try:
        text = path.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = str(ipaddress.ip_address(parts[1].split("%", 1)[0]))
            except ValueError:
                continue
            if addr not in found:
                found.append(addr)
    return tuple(found)


def resolvers_for(policy: Policy, resolv_conf: Path = RESOLV_CONF) -> tuple[str, ...]:
    if policy.dns.resolvers == "auto":
        return system_resolvers(resolv_conf)
    return tuple(dict.fromkeys(policy.dns.resolvers))


@dataclass(frozen=True)
class Resolution:
    addresses: dict[str, tuple[str, ...]]  # name -> addresses (sorted); optional names that failed are absent
    skipped: dict[str, str]  # optional name -> why it was skipped
    shared: dict[str, tuple[str, ...]]  # address -> names that share it (only where more than one)


def resolve_hosts(
    names: Sequence[tuple[str, bool]],
    resolvers: Sequence[str],
    *,
    per_name_timeout: float = PER_NAME_TIMEOUT_S,
    deadline: float = DEADLINE_S,
    max_addresses: int = MAX_ADDRESSES_PER_NAME,
) -> Resolution:
    """Resolve every (name, optional) through `resolvers` (A and AAAA, CNAMEs followed).

    A required name with no address fails the apply (ApplyFailed); an optional one is skipped.
    """

    addresses: dict[str, tuple[str, ...]] = {}
    skipped: dict[str, str] = {}
    if not names:
        return Resolution(addresses, skipped, {})
    if not resolvers:
        required = [n for n, opt in names if not opt]
        if required:
            raise ApplyFailed(f"host {required[0]}: no DNS resolver is configured (dns.resolvers), so it cannot resolve")
        return Resolution(addresses, {n: "no resolver" for n, _ in names}, {})
    import dns.exception  # noqa: PLC0415 - 0.06 s to import; most policies name no hosts
    import dns.rdatatype  # noqa: PLC0415
    import dns.resolver  # noqa: PLC0415

    res = dns.resolver.Resolver(configure=False)
    res.nameservers = list(resolvers)
    res.cache = None
    end = time.monotonic() + deadline
    for name, optional in names:
        found: list[str] = []
        problem = ""
        name_end = min(time.monotonic() + per_name_timeout, end)  # one budget for A and AAAA together
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            left = name_end - time.monotonic()
            if left <= 0 and found:
                break  # A answered in time; AAAA had none of the budget left
            if left <= 0:
                problem = (f"overall resolution deadline of {deadline:g}s passed" if end <= name_end
                           else f"no answer within {per_name_timeout:g}s")
                break
            try:
                answer = res.resolve(name + ".", rdtype, lifetime=left, search=False)
                found += [r.address for r in answer]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.Timeout:
                problem = f"no answer within {left:.1f}s"
            except dns.exception.DNSException as exc:
                problem = str(exc) or type(exc).__name__
        if not found:
            why = problem or "no A or AAAA record"
            if optional:
                skipped[name] = why
                continue
            raise ApplyFailed(f"host {name}: did not resolve ({why})")
        uniq = sorted(set(found), key=lambda a: (":" in a, ipaddress.ip_address(a).packed))
        if len(uniq) > max_addresses:
            why = f"resolved to {len(uniq)} addresses, more than dns.max_addresses_per_host ({max_addresses})"
            if optional:
                skipped[name] = why
                continue
            raise ApplyFailed(f"host {name}: {why}")
        addresses[name] = tuple(uniq)
    owners: dict[str, list[str]] = {}
    for name, addrs in addresses.items():
        for a in addrs:
            owners.setdefault(a, []).append(name)
    shared = {a: tuple(ns) for a, ns in owners.items() if len(ns) > 1}
    return Resolution(addresses, skipped, shared)
