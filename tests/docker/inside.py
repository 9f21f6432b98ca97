"""Run as the guarded command inside a container: report, as JSON on stdout, what this process can do.

Usage: python3 inside.py [--marker PATH] ALLOWED4 DENIED4 [ALLOWED6 DENIED6]
Standard library only (it runs under the image's system Python, not egressguard's venv).
"""

import errno
import json
import os
import socket
import subprocess
import sys
import time

PORT = 8080


def proc_status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def tcp(address, timeout=2.0):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((address, PORT))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return "connected" if s.recv(16).startswith(b"HTTP/") else "connected-no-reply"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def run(argv):
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        return {"rc": p.returncode, "out": p.stdout.strip()[-200:], "err": p.stderr.strip()[-200:]}
    except FileNotFoundError:
        return {"rc": 127, "out": "", "err": "not found"}
    except subprocess.TimeoutExpired:
        return {"rc": -1, "out": "", "err": "timeout"}


def raw_socket():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return "opened"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def setuid_root():
    try:
        os.setuid(0)
        return "became root"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def main(argv):
    started = time.time()  # wall clock, for the start-up figures
    marker = None
    if argv[:1] == ["--marker"]:
        marker, argv = argv[1], argv[2:]
    st = proc_status()
    report = {
        "started": started,
        "uid": st["Uid"], "gid": st["Gid"], "groups": st["Groups"],
        "caps": {k: st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": st["NoNewPrivs"], "seccomp": st.get("Seccomp"),
        "tcp": {addr: tcp(addr) for addr in argv},
        "iptables_F": run(["iptables", "-F"]),
        "iptables_legacy_F": run(["iptables-legacy", "-F"]),
        "ip6tables_legacy_F": run(["ip6tables-legacy", "-F"]),
        "egressguard_reset": run(["egressguard", "reset"]),
        "raw_socket": raw_socket(),
        "setuid_0": setuid_root(),
        "setpriv_root": run(["setpriv", "--reuid", "0", "--regid", "0", "--clear-groups", "id", "-u"]),
        "su_root": run(["su", "-c", "id -u", "root"]),
    }
    if marker:
        with open(marker, "w") as fh:
            fh.write("the command ran\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
