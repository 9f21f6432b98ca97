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
    except TimeoutError:
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


def pid1():
    """Who is PID 1 in this container: its name and real uid."""
    with open("/proc/1/status") as fh:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    return {"name": fields.get("Name"), "uid": fields.get("Uid", "").split()[0]}


def orphan_reaped(wait_s=3.0):
    """Leave an orphan (a grandchild whose parent exits at once), let it exit, and see whether
    PID 1 reaps it: True once its /proc entry is gone, False if it is still a zombie after wait_s."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(0.1)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    grandchild = int(os.read(r, 32))
    os.close(r)
    os.waitpid(child, 0)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{grandchild}"):
            return True
        time.sleep(0.05)
    return False


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
        "pid1": pid1(),
        "orphan_reaped": orphan_reaped(),
    }
    if marker:
        with open(marker, "w") as fh:
            fh.write("the command ran\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
