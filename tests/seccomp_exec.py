"""Run a command under a seccomp filter that makes the kernel refuse chosen system calls.

    python3 seccomp_exec.py RULE [RULE ...] -- CMD ARGS...

Each RULE is `SYSCALL[,ARG=V1|V2][,ARG>N]...:ERRNO`, e.g.
    setsockopt,1=0|41,2=64,4>6000:EINVAL   refuse iptables commits (IPT_SO_SET_REPLACE, both
                                           families) whose table blob is larger than 6000 bytes
    getsockopt,1=0|41,2=64:ENOPROTOOPT     answer IPT_SO_GET_INFO as a kernel without x_tables does

ARG is the argument's index (0-5); only its low 32 bits are compared. A matching call fails with
ERRNO and does nothing in the kernel; everything else is allowed. The filter is inherited by every
child and survives exec, so it holds for the whole command (egressguard's per-family workers too).
x86_64 only (the test machines); elsewhere this exits 125 and the tests using it skip.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

SYSCALLS_X86_64 = {"socket": 41, "sendto": 44, "sendmsg": 46, "bind": 49, "setsockopt": 54, "getsockopt": 55}
AUDIT_ARCH_X86_64 = 0xC000003E
LD_ABS_W, JEQ_K, JGT_K, RET_K = 0x20, 0x15, 0x25, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
FAIL = "fail"


def parse(rule: str) -> tuple[int, list[tuple[int, str, list[int]]], int]:
    spec, _, err = rule.rpartition(":")
    name, *conds = spec.split(",")
    parsed = []
    for cond in conds:
        if ">" in cond:
            idx, value = cond.split(">")
            parsed.append((int(idx), "gt", [int(value, 0)]))
        else:
            idx, values = cond.split("=")
            parsed.append((int(idx), "eq", [int(v, 0) for v in values.split("|")]))
    return SYSCALLS_X86_64[name], parsed, getattr(errno, err)


def block(nr: int, conds: list[tuple[int, str, list[int]]], err: int) -> list[tuple[int, int, int, int]]:
    """Instructions that return ERRNO when the call matches; otherwise fall through past the block."""
    body: list[tuple[int, int | str, int | str, int]] = [(LD_ABS_W, 0, 0, 0), (JEQ_K, 0, FAIL, nr)]
    for idx, op, values in conds:
        body.append((LD_ABS_W, 0, 0, 16 + 8 * idx))  # seccomp_data.args[idx], low half (little endian)
        if op == "gt":
            body.append((JGT_K, 0, FAIL, values[0]))
            continue
        for j, v in enumerate(values):
            last = j == len(values) - 1
            body.append((JEQ_K, 0 if last else len(values) - 1 - j, FAIL if last else 0, v))
    body.append((RET_K, 0, 0, RET_ERRNO | err))
    end = len(body)
    return [(c, end - i - 1 if jt == FAIL else jt, end - i - 1 if jf == FAIL else jf, k)  # type: ignore[misc]
            for i, (c, jt, jf, k) in enumerate(body)]


def program(rules: list[str]) -> list[tuple[int, int, int, int]]:
    prog = [(LD_ABS_W, 0, 0, 4), (JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (RET_K, 0, 0, RET_ALLOW)]
    for rule in rules:
        prog += block(*parse(rule))
    return prog + [(RET_K, 0, 0, RET_ALLOW)]


def install(prog: list[tuple[int, int, int, int]]) -> None:
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> None:
    if platform.machine() != "x86_64":
        sys.exit(125)
    split = argv.index("--")
    install(program(argv[:split]))
    os.execvp(argv[split + 1], argv[split + 1 :])


if __name__ == "__main__":
    main(sys.argv[1:])
