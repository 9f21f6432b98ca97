"""The apply sequence: preflight, deny first (the back end's hold, lockdown), resolve, commit, read
back, status. Fails closed. Names no back end: each one's mechanisms sit behind `Backend`."""

from __future__ import annotations

import datetime as dt
import errno
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressguard import conntrack, logs
from egressguard import facts as facts_mod
from egressguard import policy as policy_mod
from egressguard import status as status_mod
from egressguard._version import __version__
from egressguard.backends import Backend
from egressguard.errors import ApplyFailed, EgressGuardError, VerifyFailed
from egressguard.policy import Policy
from egressguard.ruleset import FAMILIES, Facts, Ruleset, Table, build, hosts_of
from egressguard.verify import differences

log = logs.get_logger("egressguard")

LOCK_NAME = b"\0egressguard-apply-lock"  # abstract socket: one per network namespace, no file needed
LOCK_WAIT_S = 60.0


@contextmanager
def namespace_lock(wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Serialise apply/reset within one network namespace (released when the process dies)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    end = time.monotonic() + wait_s
    try:
        while True:
            try:
                sock.bind(LOCK_NAME)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > end:
                    raise ApplyFailed(f"another egressguard apply/reset held the lock for more than {wait_s:g}s") from None
                time.sleep(0.02)
        yield
    finally:
        sock.close()


@dataclass
class Outcome:
    """What one apply did, for the summary event and the status file."""

    policy_digest: str
    source: str
    backend: str
    ruleset: Ruleset | None = None
    resolution: facts_mod.Resolution | None = None
    resolvers: tuple[str, ...] = ()
    lockdown_first: bool = False  # a lockdown was committed before the policy
    fence_first: bool = False  # the back end's hold (iptables: the routing fence) held the confined uids while the policy went in
    timings_ms: dict[str, float] = field(default_factory=dict)
    dns_mode: str = "static"

    def status(self, state: str, exit_code: int, error: str | None = None) -> dict[str, Any]:
        rs = self.ruleset
        return {
            "egressguard": __version__,
            "state": state,
            "exit_code": exit_code,
            "error": error,
            "applied_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "policy_source": self.source,
            "policy_digest": self.policy_digest,
            "ruleset_digest": rs.digest() if rs else None,
            "backend": self.backend,
            "resolvers": list(self.resolvers),
            "hosts": {k: list(v) for k, v in (self.resolution.addresses if self.resolution else {}).items()},
            "hosts_skipped": dict(self.resolution.skipped) if self.resolution else {},
            "rule_counts": {f"ipv{t.family}/{t.name}": sum(len(c.rules) for c in t.chains) for t in rs.tables}
            if rs
            else {},
            "lockdown_first": self.lockdown_first,
            "fence_first": self.fence_first,
            "netns": _netns_id(),  # lets `probe` in another container tell it shares this namespace
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            # dns.mode proxy: which set holds which entry's learned addresses (read by `status`)
            **({"dns_mode": "proxy", "learned_sets": {s.name: s.host for s in rs.learned_sets} if rs else {}}
               if self.dns_mode == "proxy" else {}),
        }


# Only the machine's own (initial) network namespace has net.core's global settings: the kernel
# registers netdev_max_backlog and the rest of net_core_table for init_net alone, and /proc/sys/net
# shows the namespace of the process that reads it.
INIT_NAMESPACE_ONLY = Path("/proc/sys/net/core/netdev_max_backlog")


def in_initial_namespace() -> bool:
    """This process is in its machine's own network namespace: a VM-isolated pod's (Kata and
    Firecracker run a pod's containers in the guest's), or a container given the host's
    (docker run --network host, hostNetwork: true). Unknown (no /proc/sys) reads as not."""
    return INIT_NAMESPACE_ONLY.exists()


def _netns_id() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


class _Clock:
    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.into[step] = (time.perf_counter() - t) * 1000


def apply(
    policy: Policy,
    source: str,
    backend: Backend,
    status_path: Path | None,
    resolv_conf: Path = facts_mod.RESOLV_CONF,
) -> Outcome:
    """Install `policy` in the current network namespace, or raise with lockdown in place."""
    out = Outcome(policy_digest=policy_mod.digest(policy), source=source, backend=backend.name,
                  dns_mode=policy.dns.mode)
    clock = _Clock(out.timings_ms)
    with clock("preflight"):
        if in_initial_namespace():
            # Not refused: a VM-isolated pod's containers run in the guest's own namespace.
            log.warning("initial_network_namespace", effect="the policy confines every process of this machine "
                        "that runs as a confined uid, and stays after the container ends",
                        hint="on a shared host (docker run --network host, hostNetwork: true) give the container "
                        "a network namespace of its own")
        backend.preflight()  # exit 3 before any change
        out.resolvers = facts_mod.resolvers_for(policy, resolv_conf)
        if policy.dns.resolvers == "auto" and not out.resolvers:
            log.warning("no_resolvers_found", resolv_conf=str(resolv_conf), effect="confined processes get no DNS")
        lockdown = build(policy, Facts(resolvers=out.resolvers), lockdown=True,
                         orig_sets=backend.sets_by_original_destination)
    with namespace_lock():
        with clock("read_before"):
            before = backend.read()
            first = not backend.guarded(before)
        # True while the back end's hold (hold_confined) stands in for a guard: until the policy is in.
        holding = _deny_first(backend, policy, lockdown, out, clock) if first else False
        try:
            if not holding:
                with clock("fence"):
                    lowered = backend.release_confined()  # also one a killed apply left behind
                if lowered:
                    log.debug("fence_lowered", rules=lowered)
            with clock("resolve"):
                try:
                    out.resolution = facts_mod.resolve_hosts(
                        hosts_of(policy), out.resolvers, max_addresses=policy.dns.max_addresses_per_host
                    )
                except ApplyFailed:
                    if out.lockdown_first or holding:
                        raise
                    # The policy in force may refuse this process's own queries (it confines root,
                    # and the resolvers changed); this lockdown lets them through. Once more:
                    backend.commit(lockdown)
                    out.lockdown_first = True
                    log.warning("lockdown_committed", reason="resolve_retry")
                    out.resolution = facts_mod.resolve_hosts(
                        hosts_of(policy), out.resolvers, max_addresses=policy.dns.max_addresses_per_host
                    )
            _report_resolution(out.resolution)
            ruleset = build(policy, Facts(resolvers=out.resolvers, hosts=out.resolution.addresses),
                            orig_sets=backend.sets_by_original_destination)
            out.ruleset = ruleset
            with clock("commit"):
                backend.commit(ruleset)
            log.info("rules_committed", rules=ruleset.rule_count(), digest=ruleset.digest())
            if holding:
                with clock("fence"):
                    lowered = backend.release_confined()  # both families hold the policy now
                holding = False
                log.debug("fence_lowered", rules=lowered)
            with clock("verify"):
                installed = backend.read(expect=ruleset.sets, want=ruleset)
                diffs = differences(backend.canonical(ruleset), installed, backend.describe)
            if diffs:
                raise VerifyFailed("read-back differs from the plan: " + "; ".join(diffs[:3]))
            log.info("rules_verified")
            suspect = conntrack.suspects(before, ruleset)
            if suspect is not None:
                with clock("cut"):
                    conntrack.cut_marked(policy, installed.learned_sets, suspect)
            if status_path is not None:
                with clock("status"):
                    status_mod.write(status_path, out.status("policy", 0))
            return out
        except BaseException as exc:
            _fall_back_to_lockdown(backend, lockdown, out, status_path, exc, holding)
            raise


def _deny_first(backend: Backend, policy: Policy, lockdown: Ruleset, out: Outcome, clock: _Clock) -> bool:
    """Nothing guarded yet: close the confined uids' egress before anything slow or fallible. True if
    the back end's hold (both families at once) stays while the policy itself goes in; otherwise the
    lockdown ruleset is in force and any hold is apply's to lift."""
    held = False
    if not backend.atomic_families:  # one commit for both families needs no hold
        with clock("fence_raise"):
            held = backend.hold_confined(policy)
    if (held or backend.atomic_families) and not hosts_of(policy):
        # Nothing to resolve: the hold stays while the policy itself goes in (or the policy's one
        # commit closes both families at once), so no separate lockdown commit is needed (the fault
        # suites kill apply at every step).
        out.fence_first = held
        return held
    # apply must query DNS (which the hold would refuse under `confine: all`), or the kernel has no
    # hold: the lockdown ruleset (DNS, loopback, replies) comes first.
    with clock("lockdown"):
        backend.commit(lockdown)
    out.lockdown_first = True
    log.info("lockdown_committed", rules=lockdown.rule_count())
    return False


def _report_resolution(res: facts_mod.Resolution) -> None:
    for name, addrs in res.addresses.items():
        log.info("host_resolved", host=name, addresses=list(addrs))
    for name, why in res.skipped.items():
        log.warning("optional_host_skipped", host=name, reason=why)
    for addr, names in res.shared.items():
        log.warning("hosts_share_address", address=addr, hosts=list(names))


def _fall_back_to_lockdown(
    backend: Backend, lockdown: Ruleset, out: Outcome, status_path: Path | None, exc: BaseException,
    holding: bool,
) -> None:
    code = exc.exit_code if isinstance(exc, EgressGuardError) else 1
    state = "lockdown"
    try:
        backend.commit(lockdown)
        log.warning("lockdown_committed", reason=type(exc).__name__)
    except Exception as again:  # noqa: BLE001 - the original error is what gets reported
        # A hold this apply made stays: the confined uids reach nothing but loopback.
        log.error("lockdown_failed", error=str(again))
        # The status must not claim a lockdown (DNS, replies) the kernel refused.
        state = "fence" if holding else "lockdown_failed"
    else:
        if holding:  # the lockdown holds both families now
            try:
                backend.release_confined()
            except Exception as again:  # noqa: BLE001 - a hold left in place only refuses more
                log.warning("fence_not_lowered", error=str(again))
    if status_path is not None:
        try:
            status_mod.write(status_path, out.status(state, code, error=str(exc)))
        except Exception:  # noqa: BLE001
            pass


def reset(backend: Backend, status_path: Path | None) -> None:
    backend.preflight()
    with namespace_lock():
        backend.read()  # exit 3 here, before any change, if a family's tables are unavailable
        backend.commit(build_empty())
        backend.release_confined()
    if status_path is not None:
        try:
            status_mod.remove(status_path)
        except ApplyFailed as exc:
            log.warning("status_not_removed", error=str(exc))


def build_empty() -> Ruleset:
    return Ruleset(tables=tuple(Table(f, n, ()) for f in FAMILIES for n in ("filter", "nat")))


def verify(
    policy: Policy, backend: Backend, resolv_conf: Path = facts_mod.RESOLV_CONF, hosts: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """Differences between the kernel and `policy` (hosts as resolved by the last apply)."""
    backend.preflight()
    resolvers = facts_mod.resolvers_for(policy, resolv_conf)
    want = build(policy, Facts(resolvers=resolvers, hosts=hosts or {}), orig_sets=backend.sets_by_original_destination)
    missing = [h for h, optional in hosts_of(policy) if not optional and h not in (hosts or {})]
    if missing:
        raise ApplyFailed(f"host {missing[0]}: no record of its resolved addresses (status file missing)")
    return differences(backend.canonical(want), backend.read(want=want), backend.describe)
