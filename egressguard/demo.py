"""`egressguard demo`: apply a policy in a throwaway pod namespace and show, with real traffic,
what is allowed and what is refused."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from egressguard.lab import (
    CONFINED,
    EXEMPT,
    METADATA_V4,
    OTHER_RESOLVER_V4,
    OTHER_RESOLVER_V6,
    RESOLVER_V4,
    RESOLVER_V6,
    ROOT,
    Lab,
    Result,
)

HOST4, HOST6 = "203.0.113.10", "2001:db8:2::10"


@dataclass(frozen=True)
class Probe:
    uid: int
    what: str
    run: Callable[[Lab, int], Result]
    expect: str  # for the built-in default policy: allowed | refused | proxied


PROBES: tuple[Probe, ...] = (
    Probe(CONFINED, f"DNS (UDP) to the pod's resolver {RESOLVER_V4}", lambda lab, u: lab.dns("allowed.test", RESOLVER_V4, uid=u), "allowed"),
    Probe(CONFINED, f"DNS (TCP) to the pod's resolver {RESOLVER_V6}", lambda lab, u: lab.dns("allowed.test", RESOLVER_V6, tcp=True, uid=u), "allowed"),
    Probe(CONFINED, f"DNS (UDP) to another resolver {OTHER_RESOLVER_V4}", lambda lab, u: lab.dns("allowed.test", OTHER_RESOLVER_V4, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"DNS (TCP) to another resolver {OTHER_RESOLVER_V6}", lambda lab, u: lab.dns("allowed.test", OTHER_RESOLVER_V6, tcp=True, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"HTTPS to {HOST4}:443", lambda lab, u: lab.tcp(HOST4, 443, uid=u), "proxied"),
    Probe(CONFINED, f"HTTP to [{HOST6}]:80", lambda lab, u: lab.tcp(HOST6, 80, uid=u), "proxied"),
    Probe(CONFINED, f"SSH to {HOST4}:22", lambda lab, u: lab.tcp(HOST4, 22, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"SSH to [{HOST6}]:22", lambda lab, u: lab.tcp(HOST6, 22, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"QUIC-style UDP to {HOST4}:443", lambda lab, u: lab.udp(HOST4, 443, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"metadata service {METADATA_V4}:5000", lambda lab, u: lab.tcp(METADATA_V4, 5000, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"ping {HOST4}", lambda lab, u: lab.ping(HOST4, timeout=1, uid=u), "refused"),
    Probe(CONFINED, f"ping {HOST6}", lambda lab, u: lab.ping(HOST6, timeout=1, uid=u), "refused"),
    Probe(CONFINED, "local service 127.0.0.1:8443", lambda lab, u: lab.tcp("127.0.0.1", 8443, uid=u), "allowed"),
    Probe(EXEMPT, f"SSH to {HOST4}:22", lambda lab, u: lab.tcp(HOST4, 22, uid=u), "allowed"),
    Probe(EXEMPT, f"HTTPS to [{HOST6}]:443 (direct, not proxied)", lambda lab, u: lab.tcp(HOST6, 443, uid=u), "allowed"),
    Probe(EXEMPT, f"DNS (UDP) to another resolver {OTHER_RESOLVER_V4}", lambda lab, u: lab.dns("allowed.test", OTHER_RESOLVER_V4, uid=u), "allowed"),
    Probe(ROOT, f"SSH to [{HOST6}]:22 (root: not in confine)", lambda lab, u: lab.tcp(HOST6, 22, uid=u), "allowed"),
)


def _verdict(r: Result) -> str:
    if r.proxied:
        return "proxied"
    return "allowed" if r.ok else "refused" if r.blocked else "error"


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("egressguard demo: needs root (it builds two network namespaces)", file=sys.stderr)
        return 3
    builtin = not args.policy and not os.environ.get("EGRESSGUARD_POLICY") and not os.environ.get("EGRESSGUARD_POLICY_JSON")
    who = {CONFINED: "confined uid 1000", EXEMPT: "exempt uid 1001", ROOT: "root"}
    mismatches = 0
    with Lab(prefix="egdemo") as lab:
        print(f"pod namespace {lab.pod} <-> world namespace {lab.world} (198.51.100.0/24, 2001:db8:100::/64)")
        applied = lab.egressguard("apply", *(["--policy", args.policy] if args.policy else []),
                                  *(["--backend", args.backend] if getattr(args, "backend", None) else []))
        summary = _summary(applied.stderr)
        print(f"egressguard apply ({'built-in default policy' if builtin else args.policy or 'policy from environment'}): "
              f"exit {applied.returncode}, {summary}")
        if applied.returncode != 0:
            print(applied.stderr, file=sys.stderr)
            return applied.returncode
        print()
        print(f"{'who':<18} {'probe':<52} {'result':<9} {'expected' if builtin else ''}")
        print("-" * (18 + 52 + 9 + 12))
        for p in PROBES:
            r = p.run(lab, p.uid)
            got = _verdict(r)
            mark = ""
            if builtin:
                ok = got == p.expect
                mismatches += not ok
                mark = f"{p.expect:<9}{'' if ok else '  <-- MISMATCH'}"
            detail = f" [{r.outcome}{' ' + r.detail if r.detail else ''}]" if got == "refused" else ""
            print(f"{who[p.uid]:<18} {p.what:<52} {got:<9} {mark}{detail}")
        print()
        print("proxied = the connection was redirected to the local proxy port 8444 (policy `redirect`);")
        print("refused = connection refused (REJECT), EPERM, or no answer (drop).")
    if mismatches:
        print(f"{mismatches} probe(s) did not match the default policy", file=sys.stderr)
        return 1
    return 0


def _summary(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "run_finished":
            return f"{event.get('rules')} rules, {event.get('duration_ms')} ms, policy {str(event.get('policy_digest'))[:19]}…"
    return "(no summary)"
