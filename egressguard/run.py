"""`egressguard run`: apply the policy, drop every privilege, exec the command (the Docker entrypoint)."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys

import structlog

from egressguard import policy as policy_mod
from egressguard.errors import ApplyFailed, EnvironmentUnsupported, PolicyError
from egressguard.policy import Policy
from egressguard.privileges import Identity, drop_privileges, resolve_user

log = structlog.get_logger("egressguard")

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
        start_forwarder(args, loaded.policy)
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


FORWARDER_START_S = 20.0


def start_forwarder(args: argparse.Namespace, policy: Policy) -> int:
    """dns.mode proxy: `egressguard dns` as a process of its own, before the command gets anything.
    It becomes dns.forwarder_uid holding CAP_NET_ADMIN only, in a session of its own: the command,
    another uid with no capability, can neither signal nor trace it, and cannot take its port while
    it runs. Returns its pid once it listens; exit 4 if it does not start (the policy stays: DNS is
    refused, fail-closed)."""
    uid = policy.dns.forwarder_uid
    assert uid is not None  # proxy mode requires it
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs
        try:
            os.close(r)
            os.setsid()
            argv = [sys.executable, "-m", "egressguard", "dns", "--resolv-conf", str(args.resolv_conf),
                    "--ready-fd", str(w), *(["--policy", args.policy] if args.policy else [])]
            # Started as root, it becomes dns.forwarder_uid with CAP_NET_ADMIN only (dnsproxy.main) once
            # the interpreter is loaded (which another uid may not be able to read).
            os.set_inheritable(w, True)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.execv(sys.executable, argv)
        except BaseException as exc:  # noqa: BLE001
            print(f"egressguard: the DNS forwarder could not start: {exc}", file=sys.stderr)
        finally:
            os._exit(EXIT_NOT_EXECUTABLE)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], FORWARDER_START_S)
        said = os.read(r, 16) if ready else b""
    finally:
        os.close(r)
    if said != b"ready\n":
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise ApplyFailed(f"the DNS forwarder (dns.mode proxy) did not start within {FORWARDER_START_S:g} s: "
                          "confined DNS stays refused")
    log.info("dns_forwarder_started", pid=pid, uid=uid)
    return pid


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
