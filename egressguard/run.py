"""`egressguard run`: apply the policy, drop every privilege, exec the command (the Docker entrypoint)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from egressguard import logs
from egressguard import policy as policy_mod
from egressguard.errors import ApplyFailed, EnvironmentUnsupported, PolicyError
from egressguard.policy import Policy
from egressguard.privileges import Identity, drop_privileges, resolve_user

log = logs.get_logger("egressguard")

EXIT_NOT_FOUND = 127  # what a shell returns for a command it cannot find
EXIT_NOT_EXECUTABLE = 126


def main(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    loaded = policy_mod.load(args.policy)
    who = resolve_user(args.user)
    check_confined(loaded.policy, who)
    if os.geteuid() != 0:
        raise EnvironmentUnsupported("`egressguard run` must start as root (it applies the policy, then drops to "
                                     f"{who.name}); as a non-root agent use `egressguard probe` instead")

    from egressguard import apply as apply_mod  # noqa: PLC0415 - loads python-iptables
    from egressguard.backends import select  # noqa: PLC0415

    out = apply_mod.apply(loaded.policy, loaded.source, select(getattr(args, "backend", None)), args.status_file,
                          resolv_conf=args.resolv_conf)
    log.info("policy_applied", policy_digest=out.policy_digest, source=out.source,
             timings_ms={k: round(v, 1) for k, v in out.timings_ms.items()})
    if not cmd:
        cmd = [who.shell]
    if loaded.policy.proxy_dns:
        start_forwarder(args)
    if loaded.policy.log.refused:
        start_watch(who, getattr(args, "watch_user", None))
    drop_privileges(who)
    cmd = with_init(cmd)
    log.info("command_exec", user=who.name, uid=who.uid, argv0=cmd[0], policy_digest=out.policy_digest)
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, HOME=who.home, USER=who.name, LOGNAME=who.name, SHELL=who.shell)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        print(f"egressguard: {cmd[0]}: command not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    except OSError as exc:
        print(f"egressguard: {cmd[0]}: cannot execute: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_EXECUTABLE


def start_forwarder(args: argparse.Namespace) -> int:
    """dns.mode proxy: `egressguard dns` as a process of its own (sidecar.start: its own session, ends
    with the command), before the command gets anything. Started as root, it becomes
    dns.forwarder_uid holding CAP_NET_ADMIN only: the command, another uid with no capability, can
    neither signal nor trace it, and cannot take its port while it runs. Exit 4 if it does not
    start (the policy stays in force: confined DNS is refused, fail-closed)."""
    from egressguard import sidecar  # noqa: PLC0415

    pid = sidecar.start(["dns", "--resolv-conf", str(args.resolv_conf), *(["--policy", args.policy] if args.policy else [])])
    if pid is None:
        raise ApplyFailed(f"the DNS forwarder (dns.mode proxy) did not start within {sidecar.READY_TIMEOUT_S:g} s: "
                          "confined DNS stays refused")
    log.info("dns_forwarder_started", pid=pid)
    return pid


def start_watch(who: Identity, user: str | None) -> None:
    """`egressguard watch` beside the command, as a user the command cannot signal; its events go
    to the container's log. The guard does not depend on it: if it does not start, a warning."""
    from egressguard import sidecar  # noqa: PLC0415

    argv = ["watch"] + (["--user", user] if user else [])
    if user and resolve_user(user).uid == who.uid:
        raise PolicyError(f"usage error: --watch-user {user}: the command's own user could signal it")
    pid = sidecar.start(argv)
    if pid is None:
        log.warning("watch_not_started", detail="refusals are still refused; they are not logged")
    else:
        log.info("watch_started_beside_command", pid=pid)


def with_init(cmd: list[str]) -> list[str]:
    """As PID 1 (a container's first process) the command would ignore SIGTERM unless it handles it,
    and never reap the orphans agents leave by the hundred: put an init in front of it. The init is
    exec'd after the privilege drop, so PID 1 holds nothing either. $EGRESSGUARD_INIT names it
    (default: tini on PATH); empty: no init."""
    if os.getpid() != 1 or shutil.which(cmd[0]) is None:
        return cmd  # (a missing or non-executable command: exec fails below with our exit 127/126)
    init = os.environ.get("EGRESSGUARD_INIT", "tini")
    path = shutil.which(init) if init else None
    if init and not path:
        log.warning("init_missing", init=init, detail="the command runs as PID 1 without an init")
    return [path, "--", *cmd] if path else cmd


def check_confined(policy: Policy, who: Identity) -> None:
    """The command must run as a uid the policy restricts: anything else would run unguarded."""
    if who.uid == 0:
        raise PolicyError("usage error: --user root: the command must not run as root")
    if who.uid in policy.exempt.uids:
        raise PolicyError(f"usage error: --user {who.name}: uid {who.uid} is exempt in the policy (unguarded)")
    if not policy.confines_everyone and who.uid not in policy.confine.uids:  # type: ignore[operator]
        raise PolicyError(f"usage error: --user {who.name}: uid {who.uid} is not in confine.uids (unguarded)")
