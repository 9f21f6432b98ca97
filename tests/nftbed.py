"""Run a real-traffic suite written for the iptables back end on the nftables back end: the same
test functions, imported into a test_nftables_* module, with EGRESSGUARD_BACKEND=nftables for every
egressguard the lab runs, and a check that the pod never used legacy x_tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from egressguard.lab import Lab


def legacy_tables(lab: Lab) -> list[str]:
    """x_tables tables the pod namespace has (an nftables-only run must create none)."""
    found = []
    for path in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        found += [f"{path}:{n}" for n in lab.in_pod("cat", path).stdout.split()]
    return found


def nft_tables(lab: Lab) -> list[str]:
    out = lab.in_pod("nft", "-j", "list", "tables", check=True).stdout
    return [f"{o['table']['family']} {o['table']['name']}" for o in json.loads(out)["nftables"] if "table" in o]


@pytest.fixture(scope="module", autouse=True)
def nftables_backend(module_lab: Lab) -> Iterator[None]:
    with backend_env("nftables"):
        yield
        assert legacy_tables(module_lab) == [], "the nftables back end touched legacy x_tables"


@pytest.fixture(scope="module", autouse=True)
def nftables_env() -> Iterator[None]:
    """EGRESSGUARD_BACKEND=nftables for a module whose pods are its own fixtures' (not `module_lab`):
    those fixtures check the back end themselves."""
    with backend_env("nftables"):
        yield


@contextmanager
def backend_env(name: str) -> Iterator[None]:
    saved = os.environ.get("EGRESSGUARD_BACKEND")
    os.environ["EGRESSGUARD_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EGRESSGUARD_BACKEND", None)
        else:
            os.environ["EGRESSGUARD_BACKEND"] = saved


# -- a process the kernel refuses nf_tables to ----------------------------------------------------
# A seccomp filter makes socket(AF_NETLINK, *, NETLINK_NETFILTER) fail with EPERM (and, with `raw`,
# raw IPv4/IPv6 sockets, which libiptc needs for legacy x_tables): what a container runtime's
# seccomp profile that leaves nf_tables out does. Same kernel, same namespace, same root.

_SECCOMP_SET_MODE_FILTER, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 38, 22
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1
_LD, _JEQ, _AND, _RET = 0x20, 0x15, 0x54, 0x06
_NR_SOCKET = 41  # x86_64
_AF_INET, _AF_INET6, _AF_NETLINK, _NETLINK_NETFILTER, _SOCK_RAW = 2, 10, 16, 12, 3


def _seccomp_program(raw: bool) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions; jumps are relative. seccomp_data: nr at 0, args[i] at 16+8i."""
    allow, deny = "allow", "deny"
    prog: list[tuple[int, object, object, int]] = [
        (_LD, 0, 0, 0),
        (_JEQ, 0, allow, _NR_SOCKET),
        (_LD, 0, 0, 16),
        (_JEQ, "netlink", 0, _AF_NETLINK),
        (_JEQ, "raw", 0, _AF_INET) if raw else (_JEQ, allow, allow, 0),
        (_JEQ, "raw", allow, _AF_INET6) if raw else (_JEQ, allow, allow, 0),
        ("netlink", 0, 0, 0),
        (_LD, 0, 0, 32),
        (_JEQ, deny, allow, _NETLINK_NETFILTER),
        ("raw", 0, 0, 0),
        (_LD, 0, 0, 24),
        (_AND, 0, 0, 0xF),
        (_JEQ, deny, allow, _SOCK_RAW),
        ("allow", 0, 0, 0),
        (_RET, 0, 0, _RET_ALLOW),
        ("deny", 0, 0, 0),
        (_RET, 0, 0, _RET_EPERM),
    ]
    labels, out = {}, []
    for ins in prog:
        if isinstance(ins[0], str):
            labels[ins[0]] = len(out)
        else:
            out.append(ins)
    final = []
    for i, (code, jt, jf, k) in enumerate(out):
        def rel(j: object, i: int = i) -> int:
            return labels[j] - i - 1 if isinstance(j, str) else int(j)  # type: ignore[arg-type]
        final.append((int(code), rel(jt), rel(jf), k))
    return final


def deny_nf_tables(raw: bool = False) -> None:
    """Install the filter in this process (inherited by what it execs)."""
    import ctypes  # noqa: PLC0415
    import struct  # noqa: PLC0415

    prog = _seccomp_program(raw)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":  # python tests/nftbed.py [--raw] -- CMD...: CMD without nf_tables
    import sys

    argv = sys.argv[1:]
    deny_nf_tables(raw="--raw" in argv[: argv.index("--")])
    cmd = argv[argv.index("--") + 1:]
    os.execvp(cmd[0], cmd)
