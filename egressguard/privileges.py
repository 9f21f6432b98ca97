"""Who a process becomes: the command (no privilege at all) or a sidecar (CAP_NET_ADMIN only)."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
from collections.abc import Collection
from dataclasses import dataclass

from egressguard.errors import EnvironmentUnsupported, PolicyError

# prctl(2) options, from <linux/prctl.h>.
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NET_ADMIN = 12  # <linux/capability.h>
CAP_NET_RAW = 13


def effective_caps() -> int:
    """This process's effective capabilities (CapEff in /proc/self/status), as a bit mask."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def holds(cap: int) -> bool:
    """This process holds capability `cap` (e.g. CAP_NET_ADMIN) in its effective set."""
    return bool(effective_caps() >> cap & 1)


@dataclass(frozen=True)
class Identity:
    """Who a process runs as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def resolve_user(spec: str) -> Identity:
    """A user name or numeric uid from the image's passwd database."""
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        raise PolicyError(f"usage error: --user {spec!r}: no such user in this image") from None
    shell = pw.pw_shell if pw.pw_shell and os.access(pw.pw_shell, os.X_OK) and "nologin" not in pw.pw_shell else "/bin/sh"
    return Identity(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir or "/", shell=shell)


def drop_privileges(who: Identity, keep: Collection[int] = ()) -> None:
    """Become `who` for good: no groups, no capabilities but `keep` (held in every set, ambient
    included, so they survive an exec), no_new_privs; or raise. Needs CAP_SETUID, CAP_SETGID and
    CAP_SETPCAP (what root in a container has)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(option: int, arg2: int, what: str, arg3: int = 0) -> int:
        if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0:
            return 0
        err = ctypes.get_errno()
        if err == errno.EINVAL and option == PR_CAPBSET_DROP:
            return err  # beyond the kernel's last capability
        raise EnvironmentUnsupported(f"cannot {what}: {os.strerror(err)}")

    if who.uid == 0:
        raise EnvironmentUnsupported("refusing to drop privileges to uid 0")
    try:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, who.gid)
    except OSError as exc:
        raise EnvironmentUnsupported(f"cannot switch to group {who.gid} (needs CAP_SETGID): {exc.strerror}") from None
    # Empty the bounding set while CAP_SETPCAP is still held, so no later exec can regain anything.
    for cap in range(_cap_last_cap() + 1):
        if cap not in keep and prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set (needs CAP_SETPCAP)"):
            break
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capability set")
    prctl(PR_SET_KEEPCAPS, 1 if keep else 0, "keep capabilities across the uid switch")
    try:
        os.setresuid(who.uid, who.uid, who.uid)  # all ids non-zero: the effective set is cleared
    except OSError as exc:
        raise EnvironmentUnsupported(f"cannot switch to uid {who.uid} (needs CAP_SETUID): {exc.strerror}") from None
    prctl(PR_SET_KEEPCAPS, 0, "stop keeping capabilities")
    mask = sum(1 << cap for cap in keep)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = data[1].inheritable = mask >> 32
    if libc.capset(ctypes.byref(header), data) != 0:
        raise EnvironmentUnsupported(f"cannot set capabilities: {os.strerror(ctypes.get_errno())}")
    for cap in keep:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, f"raise capability {cap} in the ambient set", cap)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    problems = leftover_privileges(who, keep)
    if problems:
        raise EnvironmentUnsupported("privileges left after dropping: " + ", ".join(problems))


def leftover_privileges(who: Identity, keep: Collection[int] = ()) -> list[str]:
    """How /proc/self/status differs from `who` holding only `keep`: empty when the drop worked."""
    fields: dict[str, str] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    mask = sum(1 << cap for cap in keep)
    problems = [f"{k}={fields.get(k)}" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
                if int(fields.get(k, "1"), 16) != mask]
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
