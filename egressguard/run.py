"""`egressguard run`: apply the policy, drop every privilege, exec the command (the Docker entrypoint)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import pwd
import shutil
import sys
from dataclasses import dataclass

from egressguard import logs
from egressguard import policy as policy_mod
from egressguard.errors import EnvironmentUnsupported, PolicyError
from egressguard.policy import Policy

log = logs.get_logger("egressguard")

# prctl(2) options, from <linux/prctl.h>.
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
EXIT_NOT_FOUND = 127  # what a shell returns for a command it cannot find
EXIT_NOT_EXECUTABLE = 126


@dataclass(frozen=True)
class Identity:
    """Who the command runs as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


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


def resolve_user(spec: str) -> Identity:
    """A user name or numeric uid from the image's passwd database."""
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        raise PolicyError(f"usage error: --user {spec!r}: no such user in this image") from None
    shell = pw.pw_shell if pw.pw_shell and os.access(pw.pw_shell, os.X_OK) and "nologin" not in pw.pw_shell else "/bin/sh"
    return Identity(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir or "/", shell=shell)


def check_confined(policy: Policy, who: Identity) -> None:
    """The command must run as a uid the policy restricts: anything else would run unguarded."""
    if who.uid == 0:
        raise PolicyError("usage error: --user root: the command must not run as root")
    if who.uid in policy.exempt.uids:
        raise PolicyError(f"usage error: --user {who.name}: uid {who.uid} is exempt in the policy (unguarded)")
    if not policy.confines_everyone and who.uid not in policy.confine.uids:  # type: ignore[operator]
        raise PolicyError(f"usage error: --user {who.name}: uid {who.uid} is not in confine.uids (unguarded)")


def drop_privileges(who: Identity) -> None:
    """Become `who` for good: no groups, no capabilities in any set, no_new_privs; or raise."""
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(option: int, arg2: int, what: str) -> int:
        if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0:
            return 0
        err = ctypes.get_errno()
        if err == errno.EINVAL and option == PR_CAPBSET_DROP:
            return err  # beyond the kernel's last capability
        raise EnvironmentUnsupported(f"cannot {what}: {os.strerror(err)}")

    try:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
    except OSError as exc:
        raise EnvironmentUnsupported(f"cannot switch to group {who.gid} (needs CAP_SETGID): {exc.strerror}") from None
    # Empty the bounding set while CAP_SETPCAP is still held, so no later exec can regain anything.
    for cap in range(_cap_last_cap() + 1):
        if prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set (needs CAP_SETPCAP)"):
            break
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capability set")
    try:
        os.setresuid(who.uid, who.uid, who.uid)  # all ids non-zero: permitted and effective sets are cleared
    except OSError as exc:
        raise EnvironmentUnsupported(f"cannot switch to uid {who.uid} (needs CAP_SETUID): {exc.strerror}") from None
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero; setuid leaves the inheritable set as it was
    if libc.capset(ctypes.byref(header), data) != 0:
        raise EnvironmentUnsupported(f"cannot clear capabilities: {os.strerror(ctypes.get_errno())}")
    prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    problems = leftover_privileges(who)
    if problems:
        raise EnvironmentUnsupported("privileges left after dropping: " + ", ".join(problems))


def leftover_privileges(who: Identity) -> list[str]:
    """What /proc/self/status still shows beyond `who` with nothing: empty when the drop worked."""
    fields: dict[str, str] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    problems = [f"{k}={fields.get(k)}" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
                if int(fields.get(k, "1"), 16) != 0]
    if fields.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs={fields.get('NoNewPrivs')}")
    if fields.get("Groups", "") != "":
        problems.append(f"Groups={fields['Groups']}")
    for key, want in (("Uid", who.uid), ("Gid", who.gid)):
        if set(fields.get(key, "").split()) != {str(want)}:
            problems.append(f"{key}={fields.get(key)}")
    return problems


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 63  # try them all: the kernel answers EINVAL past its last one
