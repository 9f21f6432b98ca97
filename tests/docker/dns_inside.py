"""Run as the command of a Docker-mode container with dns.mode proxy (uid 1000, no capability):
attack the DNS forwarder `egressguard run` started, then resolve and connect through it. Prints one
JSON report. Raw DNS bytes: the image's system python3 has no dnspython (egressguard's is in its venv)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import struct
from typing import Any

out: dict[str, Any] = {"uid": os.getuid()}
pids = []
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and b"egressguard\0dns\0" in open(f"/proc/{p}/cmdline", "rb").read():
            pids.append(int(p))
    except OSError:
        continue
out["pids"] = pids
pid = pids[0]
out["forwarder_status"] = {k: v.strip() for k, v in (line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                           if k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs")}


def attempt(name: str, fn: Any) -> None:
    try:
        fn()
        out[name] = "done"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))


libc = ctypes.CDLL(None, use_errno=True)


def ptrace() -> None:
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")


def bind() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 1053))


attempt("kill", lambda: os.kill(pid, signal.SIGKILL))
attempt("stop", lambda: os.kill(pid, signal.SIGSTOP))
attempt("ptrace", ptrace)
attempt("mem", lambda: open(f"/proc/{pid}/mem", "wb").close())
attempt("bind", bind)
RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def skip_name(r: bytes, at: int) -> int:
    while r[at]:
        if r[at] & 0xC0 == 0xC0:
            return at + 2
        at += r[at] + 1
    return at + 1


def ask(name: str) -> list[Any]:
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + bytes([len(name)]) + name.encode() + b"\0" + \
        struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, ("127.0.0.11", 53))
    r = s.recv(4096)
    addrs, at = [], skip_name(r, 12) + 4
    for _ in range(struct.unpack("!H", r[6:8])[0]):
        at = skip_name(r, at)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", r[at:at + 10])
        if rtype == 1:
            addrs.append(socket.inet_ntoa(r[at + 10:at + 14]))
        at += 10 + length
    return [RCODES.get(r[3] & 0xF, str(r[3] & 0xF)), addrs]


for name in ("allowed", "denied"):
    try:
        out[f"dns_{name}"] = ask(name)
    except OSError as exc:
        out[f"dns_{name}"] = [type(exc).__name__, []]
for name, addr in (("allowed", "198.19.7.10"), ("denied", "198.19.7.11")):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((addr, 8080))
        out[f"connect_{name}"] = "connected"
    except OSError as exc:
        out[f"connect_{name}"] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    finally:
        s.close()
print(json.dumps(out))
