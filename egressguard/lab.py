"""A throwaway test bed: a pod network namespace wired to a "world" namespace, with real servers,
and probes that send real traffic from the pod as a chosen uid. Used by `egressguard demo` and the tests.

    [pod]  eth0 198.51.100.2/24  2001:db8:100::2/64 ---- veth ---- [world] eth0w 198.51.100.1  2001:db8:100::1
           default routes via the world                          on lo: WORLD_HOSTS_V4/V6 (203.0.113.x,
           resolv.conf: 198.51.100.53, 2001:db8:53::53           2001:db8:2::x, resolvers, metadata)
           local servers: TCP 8443, 8444 (proxy), 7000           TCP listeners, UDP echo, DNS on 53

The topology is a parameter, because a rule that names an interface is only proven against the names
it was run with (issue 9): `Lab(iface=...)` names the pod's interface, `Lab(second_iface=...)` adds a
second link (192.0.2.0/24, 2001:db8:200::/64; world side `eth1w`) that SECOND_LINK_ROUTED hosts are
routed through, and the knobs `ipv6`, `dad`, `wide_ping` and `onlink_services` vary what deployments
vary. `Lab()` is the one-interface `eth0` pod every test used before.

Nothing here touches the namespace the caller runs in: every command is run inside the lab's own
namespaces (`ip -n` / `ip netns exec` / setns in a forked child), and `close()` removes them.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported here, not in the probe: a probe child has dropped to another uid and may not be able
# to read the interpreter's library directory any more.
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rrset

# For probes that run the egressguard CLI itself as the probe's uid (_op_egressguard); the CLI
# imports apply, the back end, PyYAML and structlog (at its first event) lazily, so they are loaded here too.
import structlog  # noqa: F401

from egressguard import apply as _eg_apply  # noqa: F401
from egressguard import cli as _eg_cli
from egressguard import strict_yaml as _eg_yaml  # noqa: F401
from egressguard.backends.iptables import backend as _eg_iptables  # noqa: F401

POD_V4, WORLD_V4 = "198.51.100.2", "198.51.100.1"
POD_V6, WORLD_V6 = "2001:db8:100::2", "2001:db8:100::1"
RESOLVER_V4, OTHER_RESOLVER_V4 = "198.51.100.53", "198.51.100.54"
RESOLVER_V6, OTHER_RESOLVER_V6 = "2001:db8:53::53", "2001:db8:53::54"
METADATA_V4, METADATA_V6 = "169.254.169.254", "fd00:ec2::254"
WORLD_HOSTS_V4 = ("203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.5", "192.0.2.10", METADATA_V4,
                  RESOLVER_V4, OTHER_RESOLVER_V4, "100.100.100.200", "169.254.170.2")
WORLD_HOSTS_V6 = ("2001:db8:2::10", "2001:db8:2::11", "2001:db8:2::12", RESOLVER_V6, OTHER_RESOLVER_V6, METADATA_V6)
WORLD_TCP_PORTS = (22, 53, 80, 443, 853, 5000, 8444)
WORLD_UDP_PORTS = (123, 443, 9999)
POD_TCP_PORTS = (7000, 8443, 8444)  # 8444: the redirect target (a stand-in proxy); 7000: "exempt's service"
CONFINED, EXEMPT, ROOT = 1000, 1001, 0

# Pod interface names the suites run with. The rule: the names deployments give a pod's interface
# (eth0: Docker and most CNIs; net1: Multus' second interface; tun0: VPN sidecars; veth...: CNIs that
# name the pod end after the host end), plus one name of the longest length (IFNAMSIZ - 1 = 15) that
# differs from `lo` in every byte the kernel compares (`l`, `o` and the NUL) while agreeing with it in
# each of those bytes' lowest bit, the one bit issue 9's 0x01 masks compared. net1, tun0 and veth...
# agree in that bit too; eth0 does not, which is why a lab that only ever said eth0 saw nothing.
IFACE_NAMES = ("eth0", "net1", "tun0", "veth1a2b3c4d", "tap-0123456789a")

# The optional second link and the world hosts routed through it (replies come back the same way:
# the pod picks its second-link address as the source).
SECOND_POD_V4, SECOND_WORLD_V4 = "192.0.2.2", "192.0.2.1"
SECOND_POD_V6, SECOND_WORLD_V6 = "2001:db8:200::2", "2001:db8:200::1"
SECOND_LINK_ROUTED = ("203.0.113.12", "192.0.2.10", "2001:db8:2::12")
WORLD_IFACE, SECOND_WORLD_IFACE = "eth0w", "eth1w"
ONLINK_SERVICES = (RESOLVER_V4, OTHER_RESOLVER_V4, METADATA_V4, RESOLVER_V6, OTHER_RESOLVER_V6, METADATA_V6)

CLONE_NEWNET = 0x40000000
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST is also 80 at SOL_IPV6
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)

DEFAULT_RECORDS: dict[str, dict[str, list[str]]] = {
    "allowed.test": {"A": ["203.0.113.10"], "AAAA": ["2001:db8:2::10"]},
    "other.test": {"A": ["203.0.113.11"], "AAAA": ["2001:db8:2::11"]},
    "alias.test": {"CNAME": ["allowed.test"]},
}


def _sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _become(uid: int, caps: int = 0) -> None:
    """Drop to `uid`; keep only the capability bits in `caps` (0: none, as for any non-root user)."""
    if uid != 0:
        if caps:
            _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if caps:
            _set_caps(caps)


def _set_caps(mask: int) -> None:
    hdr = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    lo, hi = mask & 0xFFFFFFFF, mask >> 32
    data = ctypes.create_string_buffer(struct.pack("6I", lo, lo, 0, hi, hi, 0))
    if _libc.capset(hdr, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@dataclass
class Result:
    """The outcome of one probe: ok (got an answer), refused (immediate error), timeout (silence)."""

    outcome: str  # ok | refused | timeout | eperm | unreachable | error
    detail: str = ""
    elapsed: float = 0.0
    answer: Any = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def proxied(self) -> bool:
        """Answered by the pod's stand-in proxy after a redirect (its banner names another original destination)."""
        banner = str(self.answer or "")
        orig = banner.partition(" orig=")[2]
        return self.ok and banner.startswith("pod ") and bool(orig) and not orig.startswith(("127.", "[::1]", "-"))

    @property
    def blocked(self) -> bool:
        return self.outcome in ("refused", "timeout", "eperm", "unreachable")

    def __str__(self) -> str:
        return f"{self.outcome}" + (f" ({self.detail})" if self.detail else "")


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, (socket.timeout, TimeoutError, dns.exception.Timeout)):
        return "timeout", ""
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "ECONNREFUSED"
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "eperm", name
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
            return "unreachable", name
        if exc.errno in (errno.ECONNRESET,):
            return "refused", name
        return "error", name
    return "error", f"{type(exc).__name__}: {exc}"


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# -- probe operations (run in a forked child inside the pod, as the uid) ---------------------


def _op_tcp(dest: str, port: int, timeout: float, payload: str = "") -> Result:
    s = socket.socket(_family(dest), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(_sockaddr(dest, port))
        if payload:
            s.sendall(payload.encode())
        data = s.recv(256).decode(errors="replace").strip()
        return Result("ok", answer=data)
    finally:
        s.close()


def _op_udp(dest: str, port: int, timeout: float) -> Result:
    s = socket.socket(_family(dest), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect(_sockaddr(dest, port))
        s.send(b"ping")
        data = s.recv(256).decode(errors="replace").strip()
        return Result("ok", answer=data)
    finally:
        s.close()


def _op_dns(name: str, server: str, timeout: float, rdtype: str = "A", tcp: bool = False) -> Result:
    q = dns.message.make_query(name, rdtype)
    r = (dns.query.tcp if tcp else dns.query.udp)(q, server, timeout=timeout)
    addrs = [str(item) for rrset in r.answer for item in rrset]
    return Result("ok", detail=dns.rcode.to_text(r.rcode()), answer=addrs)


def _op_ping(dest: str, timeout: float, raw: bool = False) -> Result:
    """ICMP echo through an unprivileged ping socket (needs the uid's gid in ping_group_range), or
    through a raw socket as the ping binary does (`raw`: needs CAP_NET_RAW)."""
    if raw:
        return _ping_raw(dest, timeout)
    fam = _family(dest)
    proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
    s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    s.settimeout(timeout)
    try:
        echo = struct.pack("!BBHHH", 128 if fam == socket.AF_INET6 else 8, 0, 0, 0, 1) + b"egressguard"
        s.sendto(echo, (dest, 0))
        s.recv(256)
        return Result("ok")
    finally:
        s.close()


def _ping_raw(dest: str, timeout: float) -> Result:
    fam = _family(dest)
    v6 = fam == socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    try:
        echo = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"egressguard"
        if not v6:  # the kernel fills in ICMPv6 checksums on raw sockets, not ICMPv4 ones
            echo = echo[:2] + struct.pack("!H", _checksum(echo)) + echo[4:]
        s.sendto(echo, (dest, 0))
        deadline = time.monotonic() + timeout
        while True:  # a raw socket sees every ICMP message: wait for the reply to this echo
            s.settimeout(max(0.001, deadline - time.monotonic()))
            data = s.recv(512)
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # past the IPv4 header
            icmp_type, _, _, got_id, _ = struct.unpack("!BBHHH", data[:8])
            if icmp_type == (129 if v6 else 0) and got_id == ident:
                return Result("ok", detail="raw socket")
    finally:
        s.close()


def _op_raw(dest: str, timeout: float) -> Result:
    s = socket.socket(_family(dest), socket.SOCK_RAW, socket.IPPROTO_UDP)
    s.close()
    return Result("ok", detail="raw socket opened")


def _op_upload(dest: str, port: int, timeout: float, size: int = 0) -> Result:
    """Connect, hand the kernel `size` bytes and close at once, as a client that uploads and exits
    does: what the peer has not yet taken is sent after close(), by a socket no process owns."""
    s = socket.socket(_family(dest), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)  # all of it fits: close() never waits for the peer
        s.connect(_sockaddr(dest, port))
        s.sendall(b"u" * size)
        return Result("ok", detail=f"{size} bytes written")
    finally:
        s.close()


def _op_exec(argv: list[str], timeout: float) -> Result:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
    return Result("ok" if p.returncode == 0 else "error", detail=f"exit {p.returncode}", answer=p.stdout + p.stderr)


_OPS: dict[str, Callable[..., Result]] = {
    "tcp": _op_tcp, "udp": _op_udp, "dns": _op_dns, "ping": _op_ping, "raw": _op_raw, "exec": _op_exec,
    "upload": _op_upload,
}


# Bypass-suite probes (tests/test_bypass.py): each tries one way out and reports what the kernel did.
# What they need from egressguard is imported at the top of this module (see there), never in a probe.

IPPROTO_UDPLITE = 136
CLONE_NEWUSER = 0x10000000
_PR_SET_KEEPCAPS = 8
_PR_SET_DUMPABLE = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_NET_RAW = 13


def _sockaddr(dest: str, port: int) -> tuple[Any, ...]:
    """(addr, port), or (addr, port, 0, ifindex) for a scoped address such as fe80::1%eth0."""
    addr, _, scope = dest.partition("%")
    return (addr, port, 0, socket.if_nametoindex(scope)) if scope else (addr, port)


def _op_send(dest: str, port: int, timeout: float, proto: str = "udp", broadcast: bool = False,
             sport: int = 0, src: str = "") -> Result:
    """One datagram (UDP or UDP-Lite), for destinations that need not answer (broadcast, multicast).
    ok = the kernel let it out of the socket (detail `sent`), with the answer if one came back."""
    s = socket.socket(_family(dest), socket.SOCK_DGRAM, IPPROTO_UDPLITE if proto == "udplite" else 0)
    s.settimeout(timeout)
    try:
        if sport or src:
            s.bind((src or ("::" if _family(dest) == socket.AF_INET6 else "0.0.0.0"), sport))
        if broadcast:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.sendto(b"egressguard", _sockaddr(dest, port))
        try:
            data = s.recv(256).decode(errors="replace").strip()
        except TimeoutError:
            data = ""
        except OSError as exc:  # an ICMP error from whoever answered
            data = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return Result("ok", detail="sent", answer=data)
    finally:
        s.close()


def _op_tcp_device(dest: str, port: int, timeout: float, device: str = "lo") -> Result:
    """TCP connect from a socket bound to `device` (SO_BINDTODEVICE needs no privilege the first time)."""
    s = socket.socket(_family(dest), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        s.connect(_sockaddr(dest, port))
        return Result("ok", answer=s.recv(256).decode(errors="replace").strip())
    finally:
        s.close()


def _op_socket(family: str, kind: str, timeout: float, proto: int = 0) -> Result:
    """Just open a socket: raw and packet sockets need CAP_NET_RAW."""
    fam = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "packet": socket.AF_PACKET}[family]
    typ = {"raw": socket.SOCK_RAW, "dgram": socket.SOCK_DGRAM}[kind]
    socket.socket(fam, typ, proto).close()
    return Result("ok", detail=f"{family}/{kind} socket opened")


def _op_setuid(target: int, timeout: float) -> Result:
    os.setresgid(target, target, target)
    os.setresuid(target, target, target)
    return Result("ok", detail=f"now uid {os.getuid()}")


def _op_userns(op: str, args: list[Any], kwargs: dict[str, Any], timeout: float) -> Result:
    """Become "root" in a new user namespace (every capability there), then run `op`."""
    uid, gid = os.getuid(), os.getgid()
    _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # reset by setuid; /proc/self/uid_map needs it
    if _libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    res = _call_op(op, args, kwargs, timeout)
    res.detail = (res.detail + " " if res.detail else "") + f"[uid {os.getuid()} in a user namespace]"
    return res


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp4_packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x4567, 0, 64, socket.IPPROTO_UDP, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:] + udp


def _op_crafted_udp(how: str, src: str, dst: str, dport: int, timeout: float, iface: str = "eth0",
                    dst_mac: str = "") -> Result:
    """A hand-made UDP datagram to dst:dport, sent through a raw IP socket (`how`="raw") or a packet
    socket (`how`="packet", an Ethernet frame to dst_mac). A normal UDP socket bound to the source
    port waits for the server's answer: ok = the datagram reached the server."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.settimeout(timeout)
    try:
        rx.bind((src, 0))
        sport = rx.getsockname()[1]
        ip = _udp4_packet(src, sport, dst, dport, b"crafted")
        if how == "raw":
            tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                tx.sendto(ip, (dst, 0))
            finally:
                tx.close()
        else:
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            try:
                tx.bind((iface, 0))
                src_mac = tx.getsockname()[4]  # not /sys/class/net: that sysfs shows the caller's namespace
                tx.send(bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + ip)
            finally:
                tx.close()
        return Result("ok", detail=f"{how} socket", answer=rx.recv(256).decode(errors="replace").strip())
    finally:
        rx.close()


def _op_parallel_tcp(dest: str, port: int, timeout: float, count: int = 200) -> Result:
    """`count` connects in flight at once; answer = {outcome: number}. ok if any connected."""
    sel = selectors.DefaultSelector()
    tally: dict[str, int] = {}
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(_family(dest), socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            err = s.connect_ex(_sockaddr(dest, port))
            if err in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE)
            else:
                outcome = _classify(OSError(err, os.strerror(err)))[0]
                tally[outcome] = tally.get(outcome, 0) + 1
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                outcome = "ok" if err == 0 else _classify(OSError(err, os.strerror(err)))[0]
                tally[outcome] = tally.get(outcome, 0) + 1
        if sel.get_map():
            tally["timeout"] = tally.get("timeout", 0) + len(sel.get_map())
    finally:
        for s in socks:
            s.close()
    return Result("ok" if tally.get("ok") else max(tally, key=tally.__getitem__), answer=tally)


def _op_egressguard(argv: list[str], timeout: float) -> Result:
    """The egressguard CLI, in this process (the probe's uid and capabilities): exit code and stderr."""
    with tempfile.TemporaryFile() as err:
        saved, saved_stderr = os.dup(2), sys.stderr
        os.dup2(err.fileno(), 2)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - sys.stderr may be a test runner's capture
        try:
            code = _eg_cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr.flush()
            sys.stderr = saved_stderr
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Result("ok" if code == 0 else "error", detail=f"exit {code}", answer={"exit": code, "stderr": text})


def _op_batch(probes: list[list[Any]], timeout: float, each: float = 1.0) -> Result:
    """Many probes in one child: [[op, args, kwargs], ...] -> answer = list of Result dicts."""
    out = []
    for op, args, kwargs in probes:
        t = time.monotonic()
        res = _call_op(op, args, kwargs, each)
        res.elapsed = time.monotonic() - t
        out.append(res.__dict__)
    return Result("ok", answer=out)


def _call_op(op: str, args: Any, kwargs: dict[str, Any], timeout: float) -> Result:
    try:
        return _OPS[op](*args, timeout=timeout, **kwargs)
    except BaseException as exc:  # noqa: BLE001
        outcome, detail = _classify(exc)
        return Result(outcome, detail)


_OPS.update({"send": _op_send, "tcp_device": _op_tcp_device, "socket": _op_socket, "setuid": _op_setuid,
             "userns": _op_userns, "crafted_udp": _op_crafted_udp, "parallel_tcp": _op_parallel_tcp,
             "egressguard": _op_egressguard, "batch": _op_batch})


def _run_probe(netns: str, uid: int, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float,
               caps: int = 0) -> Result:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _enter_netns(netns)
            _become(uid, caps)
            t = time.monotonic()
            try:
                res = _OPS[op](*args, timeout=timeout, **kwargs)
            except BaseException as exc:  # noqa: BLE001
                outcome, detail = _classify(exc)
                res = Result(outcome, detail)
            res.elapsed = time.monotonic() - t
            os.write(w, json.dumps(res.__dict__).encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout + 10
    chunks = []
    with os.fdopen(r, "rb") as fh:
        while True:
            chunk = fh.read()
            if not chunk:
                break
            chunks.append(chunk)
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return Result("error", "probe process died")
    return Result(**json.loads(data))


# -- servers -----------------------------------------------------------------------------------


def _listen(kind: int, port: int, addr: str = "::") -> socket.socket:
    s = socket.socket(_family(addr), kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if addr == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


def _plain(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def _original_dst(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack("!2xH4s8x", raw)
        return f"{socket.inet_ntop(socket.AF_INET, ip)}:{port}"
    except OSError:
        pass
    try:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, ip = struct.unpack("!2xH4x16s4x", raw)
        return f"[{socket.inet_ntop(socket.AF_INET6, ip)}]:{port}"
    except OSError:
        return "-"


def _dns_answer(data: bytes, records_file: str) -> bytes | None:
    try:
        q = dns.message.from_wire(data)
    except Exception:  # noqa: BLE001
        return None
    try:
        records = json.loads(Path(records_file).read_text())
    except (OSError, ValueError):
        records = DEFAULT_RECORDS
    resp = dns.message.make_response(q)
    question = q.question[0]
    name = question.name.to_text().rstrip(".").lower()
    rdtype = {1: "A", 28: "AAAA", 5: "CNAME"}.get(question.rdtype, "")
    seen = 0
    while seen < 8 and name in records:
        seen += 1
        entry = records[name]
        if "CNAME" in entry and rdtype != "CNAME":
            target = entry["CNAME"][0]
            resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "CNAME", target + "."))
            name = target
            continue
        values = entry.get(rdtype, [])
        if values:
            resp.answer.append(dns.rrset.from_text(name + ".", 60, "IN", rdtype, *values))
        break
    else:
        if not resp.answer:
            resp.set_rcode(dns.rcode.NXDOMAIN)
    return resp.to_wire()


def serve(role: str, records_file: str, ready_fd: int) -> None:
    """Serve the role's listeners forever (run inside the role's namespace)."""
    sel = selectors.DefaultSelector()
    tcp_ports = WORLD_TCP_PORTS if role == "world" else POD_TCP_PORTS
    udp_ports = (*WORLD_UDP_PORTS, 53) if role == "world" else ()
    for port in tcp_ports:
        sel.register(_listen(socket.SOCK_STREAM, port), selectors.EVENT_READ, ("tcp", port))
    for port in udp_ports:  # one socket per address, so each answer comes from the address asked
        for addr in (*WORLD_HOSTS_V4, *WORLD_HOSTS_V6, WORLD_V4, WORLD_V6):
            sel.register(_listen(socket.SOCK_DGRAM, port, addr), selectors.EVENT_READ, ("udp", port))
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            kind, port = key.data
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                if kind == "udp":
                    data, peer = sock.recvfrom(4096)
                    if port == 53:
                        out = _dns_answer(data, records_file)
                        if out:
                            sock.sendto(out, peer)
                    else:
                        sock.sendto(f"{role} udp {port} from {_plain(peer[0])}".encode(), peer)
                    continue
                conn, peer = sock.accept()
                conn.settimeout(1.0)
                local = _plain(conn.getsockname()[0])
                if role == "world" and port == 53:
                    _serve_dns_tcp(conn, records_file)
                    continue
                banner = f"{role} {local} {port} from {_plain(peer[0])}"
                if role == "pod":
                    banner += f" orig={_original_dst(conn)}"
                conn.sendall((banner + "\n").encode())
                conn.close()
            except OSError:
                continue


def _serve_dns_tcp(conn: socket.socket, records_file: str) -> None:
    try:
        hdr = conn.recv(2)
        if len(hdr) == 2:
            (length,) = struct.unpack("!H", hdr)
            data = b""
            while len(data) < length:
                chunk = conn.recv(length - len(data))
                if not chunk:
                    break
                data += chunk
            out = _dns_answer(data, records_file)
            if out:
                conn.sendall(struct.pack("!H", len(out)) + out)
    finally:
        conn.close()


# -- the lab -----------------------------------------------------------------------------------


def topology_name(iface: str = "eth0", second_iface: str = "", ipv6: bool = True, dad: bool = False,
                  wide_ping: bool = True, onlink_services: bool = False) -> str:
    """A lab's shape in a few characters, from the keywords `Lab` takes (for test ids and messages)."""
    return "".join((iface, f"+{second_iface}" if second_iface else "", "" if ipv6 else "-noipv6",
                    "-dad" if dad else "", "" if wide_ping else "-pingdefault", "-onlink" if onlink_services else ""))


@dataclass
class Lab:
    """Build with `with Lab() as lab:`; everything is removed on exit, also after a failure."""

    prefix: str = "eg"
    pod: str = ""
    world: str = ""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="egressguard-lab-")))
    records: dict[str, dict[str, list[str]]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_RECORDS)))
    iface: str = "eth0"  # the pod's interface (the world's end is always eth0w)
    second_iface: str = ""  # a second link from the pod to the world (world end eth1w), or none
    ipv6: bool = True  # False: an IPv6-disabled pod (disable_ipv6=1 in the pod; the world keeps IPv6)
    dad: bool = False  # True: IPv6 addresses go through duplicate address detection, as on real nodes
    wide_ping: bool = True  # ping_group_range open to every gid in the pod (as Docker sets it); False: the kernel's default
    onlink_services: bool = False  # resolvers and metadata on the pod's link (as on clouds), not behind the gateway
    _pids: list[int] = field(default_factory=list)
    _counting: set[tuple[str, str, str, int]] = field(default_factory=set, repr=False)  # world_counts' rules

    def __post_init__(self) -> None:
        for name in filter(None, (self.iface, self.second_iface)):
            if len(name) > 15 or not name.isprintable() or any(c in name for c in "/: ") or name in (".", ".."):
                raise ValueError(f"not a usable interface name: {name!r}")
        if self.iface == self.second_iface:
            raise ValueError("the second interface needs a name of its own")
        tag = f"{self.prefix}{os.getpid() % 100000}x{next(_counter)}"
        self.pod = self.pod or f"{tag}-pod"
        self.world = self.world or f"{tag}-world"

    @property
    def topology(self) -> str:
        """A short name for this lab's shape (as in test ids): `eth0`, `eth0+net1`, `net1-noipv6`..."""
        return topology_name(iface=self.iface, second_iface=self.second_iface, ipv6=self.ipv6, dad=self.dad,
                             wide_ping=self.wide_ping, onlink_services=self.onlink_services)

    @property
    def ifaces(self) -> tuple[str, ...]:
        """The pod's interfaces that lead to the world."""
        return (self.iface, self.second_iface) if self.second_iface else (self.iface,)

    @property
    def links(self) -> tuple[tuple[str, str, tuple[str, str], tuple[str, str]], ...]:
        """Each link from the pod to the world: (pod end, world end, (pod v4, world v4), (pod v6, world v6))."""
        first = (self.iface, WORLD_IFACE, (POD_V4, WORLD_V4), (POD_V6, WORLD_V6))
        if not self.second_iface:
            return (first,)
        return first, (self.second_iface, SECOND_WORLD_IFACE, (SECOND_POD_V4, SECOND_WORLD_V4),
                       (SECOND_POD_V6, SECOND_WORLD_V6))

    @property
    def world_ifaces(self) -> tuple[str, ...]:
        return tuple(world_dev for _, world_dev, _, _ in self.links)

    # context management ---------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def records_file(self) -> Path:
        return self.workdir / "records.json"

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    def set_records(self, records: dict[str, dict[str, list[str]]]) -> None:
        """Replace the world DNS server's records (read on every query)."""
        self.records = records
        tmp = self.records_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(self.records_file)

    def build(self) -> None:
        own = os.stat("/proc/self/ns/net").st_ino
        for ns in (self.pod, self.world):
            _sh("ip", "netns", "add", ns)
            if netns_inode(ns) == own:  # a lab must never be the caller's own namespace
                raise RuntimeError(f"netns {ns} is the caller's own namespace")
        # Before any interface exists, so that each one is made with these settings.
        if not self.ipv6:
            self._sysctl(self.pod, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        if self.dad:
            for ns in (self.pod, self.world):
                self._sysctl(ns, "net.ipv6.conf.all.accept_dad=1", "net.ipv6.conf.default.accept_dad=1",
                             "net.ipv6.conf.default.dad_transmits=1")
        _sh("ip", "-n", self.pod, "link", "set", "lo", "up")
        _sh("ip", "-n", self.world, "link", "set", "lo", "up")
        for pod_dev, world_dev, v4, v6 in self.links:
            _sh("ip", "-n", self.pod, "link", "add", pod_dev, "type", "veth", "peer", "name", world_dev,
                "netns", self.world)
            for ns, dev, a4, a6 in ((self.pod, pod_dev, v4[0], v6[0]), (self.world, world_dev, v4[1], v6[1])):
                _sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
                if ns == self.world or self.ipv6:
                    self._addr6(ns, f"{a6}/64", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", self.pod, "route", "add", "default", "via", WORLD_V4)
        if self.ipv6:
            _sh("ip", "-n", self.pod, "-6", "route", "add", "default", "via", WORLD_V6)
        onlink = ONLINK_SERVICES if self.onlink_services else ()
        for addr in WORLD_HOSTS_V4:
            if addr in onlink:  # on the link: the pod resolves it with ARP, not via the gateway
                _sh("ip", "-n", self.world, "addr", "add", f"{addr}/32", "dev", WORLD_IFACE)
            else:
                _sh("ip", "-n", self.world, "addr", "add", f"{addr}/32", "dev", "lo")
        for addr in WORLD_HOSTS_V6:
            self._addr6(self.world, f"{addr}/128", WORLD_IFACE if addr in onlink else "lo")
        for addr in onlink:
            if ":" not in addr:
                _sh("ip", "-n", self.pod, "route", "replace", f"{addr}/32", "dev", self.iface, "scope", "link")
            elif self.ipv6:  # IPv6 neighbour discovery answers only for addresses on the asking link
                _sh("ip", "-n", self.pod, "-6", "route", "replace", f"{addr}/128", "dev", self.iface)
        for addr in SECOND_LINK_ROUTED if self.second_iface else ():
            if ":" not in addr:
                _sh("ip", "-n", self.pod, "route", "replace", f"{addr}/32", "via", SECOND_WORLD_V4, "dev", self.second_iface)
            elif self.ipv6:
                _sh("ip", "-n", self.pod, "-6", "route", "replace", f"{addr}/128", "via", SECOND_WORLD_V6,
                    "dev", self.second_iface)
        if self.wide_ping:
            # Unprivileged ICMP echo sockets for every uid in the pod (as Docker does), so ping is a real probe.
            self._sysctl(self.pod, "net.ipv4.ping_group_range=0 2147483647")
        etc = Path("/etc/netns") / self.pod
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {RESOLVER_V4}\nnameserver {RESOLVER_V6}\n")
        self.set_records(self.records)
        os.chmod(self.workdir, 0o755)
        if self.dad:
            for ns in (self.pod, self.world):
                self._wait_dad(ns)
        self._start_server(self.world, "world")
        self._start_server(self.pod, "pod")
        self._wait_reachable()

    def _sysctl(self, netns: str, *settings: str) -> None:
        _sh("ip", "netns", "exec", netns, "sysctl", "-q", "-w", *settings)

    def _addr6(self, netns: str, cidr: str, dev: str) -> None:
        _sh("ip", "-n", netns, "addr", "add", cidr, "dev", dev, *(() if self.dad else ("nodad",)))

    def _wait_dad(self, netns: str) -> None:
        """Until no IPv6 address in `netns` is tentative (a tentative address cannot be a source yet)."""
        for _ in range(100):  # one DAD probe takes ~1 s (dad_transmits=1, retrans_time 1 s)
            links = json.loads(_sh("ip", "-j", "-n", netns, "-6", "addr", "show").stdout or "[]")
            flags = [a for link in links for a in link.get("addr_info", []) if a.get("tentative") or a.get("dadfailed")]
            if any(a.get("dadfailed") for a in flags):
                raise RuntimeError(f"duplicate address detection failed in {netns}: {flags}")
            if not flags:
                return
            time.sleep(0.1)
        raise RuntimeError(f"IPv6 addresses in {netns} still tentative after 10 s")

    def _start_server(self, netns: str, role: str) -> None:
        self._fork_server(netns, f"{role} server", serve, role, str(self.records_file))

    def _fork_server(self, netns: str, what: str, fn: Any, *args: Any) -> None:
        """Run `fn(*args, ready_fd)` forever in a child inside `netns`; return once it says ready."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the test process
                _enter_netns(netns)
                fn(*args, w)
            finally:
                os._exit(0)
        os.close(w)
        self._pids.append(pid)
        with os.fdopen(r, "rb") as fh:
            if fh.read() != b"ready":
                raise RuntimeError(f"{what} did not start")

    def _wait_reachable(self) -> None:
        hosts = [WORLD_HOSTS_V4[0], *(SECOND_LINK_ROUTED if self.second_iface else ())]
        if self.ipv6:
            hosts.append(WORLD_HOSTS_V6[0])
        else:
            hosts = [h for h in hosts if ":" not in h]
        for _ in range(50):  # IPv6 neighbour entries and routes settle within a few hundred ms
            hosts = [h for h in hosts if not self.tcp(h, 22, uid=ROOT, timeout=0.5).ok]
            if not hosts:
                return
            time.sleep(0.1)
        raise RuntimeError(f"lab world not reachable from the pod ({self.topology}): {hosts}")

    def close(self) -> None:
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._pids.clear()
        self._counting.clear()  # the world namespace, and its counting rules, are gone
        for ns in (self.pod, self.world):
            if os.path.exists(f"/run/netns/{ns}"):
                _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / self.pod, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # probes ---------------------------------------------------------------------------------

    def tcp(self, dest: str, port: int, uid: int = CONFINED, timeout: float = 2.0, payload: str = "") -> Result:
        return _run_probe(self.pod, uid, "tcp", (dest, port), {"payload": payload}, timeout)

    def udp(self, dest: str, port: int, uid: int = CONFINED, timeout: float = 2.0) -> Result:
        return _run_probe(self.pod, uid, "udp", (dest, port), {}, timeout)

    def dns(self, name: str, server: str, uid: int = CONFINED, rdtype: str = "A", tcp: bool = False,
            timeout: float = 2.0) -> Result:
        return _run_probe(self.pod, uid, "dns", (name, server), {"rdtype": rdtype, "tcp": tcp}, timeout)

    def ping(self, dest: str, uid: int = CONFINED, timeout: float = 2.0, raw: bool = False, caps: int = 0) -> Result:
        """ICMP echo; `raw` sends it through a raw socket (give the probe CAP_NET_RAW in `caps`)."""
        return _run_probe(self.pod, uid, "ping", (dest,), {"raw": raw} if raw else {}, timeout, caps=caps)

    def exec_as(self, argv: list[str], uid: int = CONFINED, timeout: float = 10.0) -> Result:
        """Run a real client (curl, dig, nc...) in the pod as `uid`."""
        return _run_probe(self.pod, uid, "exec", (argv,), {}, timeout)

    # egressguard in the pod -----------------------------------------------------------------

    def write_policy(self, policy: dict[str, Any] | str, name: str = "policy.yaml") -> Path:
        path = self.workdir / name
        path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
        os.chmod(path, 0o644)
        return path

    def egressguard(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
                    prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run `python -m egressguard ARGS` inside the pod namespace (the pod's resolv.conf applies)."""
        full_env = {**os.environ, "EGRESSGUARD_STATUS": str(self.status_file), **(env or {})}
        full_env.pop("EGRESSGUARD_POLICY", None)
        full_env.pop("EGRESSGUARD_POLICY_JSON", None)
        full_env.update(env or {})
        argv = ["ip", "netns", "exec", self.pod, *prefix, sys.executable, "-m", "egressguard", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env)

    def apply(self, policy: dict[str, Any] | str | Path, *extra: str) -> subprocess.CompletedProcess[str]:
        path = policy if isinstance(policy, Path) else self.write_policy(policy)
        return self.egressguard("apply", "--policy", str(path), *extra)

    def in_pod(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", self.pod, *argv, check=check)

    def ruleset_dump(self) -> str:
        """Every firewall rule in the pod namespace (legacy v4/v6, nftables), without counters."""
        parts = []
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            out = self.in_pod(tool).stdout
            parts.append("\n".join(line.split(" [")[0] if line.startswith(":") else line
                                   for line in out.splitlines() if not line.startswith("#")))
        if shutil.which("nft"):
            parts.append(self.in_pod("nft", "-s", "list", "ruleset").stdout)  # -s: without counters
        if shutil.which("ipset"):
            parts.append(self.in_pod("ipset", "list", "-n").stdout)
        return "\n".join(parts)

    # bypass-suite helpers -------------------------------------------------------------------

    def probe(self, op: str, *args: Any, uid: int = CONFINED, timeout: float = 2.0, caps: int = 0,
              **kwargs: Any) -> Result:
        """Any probe operation (see _OPS) in the pod as `uid`, optionally keeping capability bits `caps`."""
        return _run_probe(self.pod, uid, op, args, kwargs, timeout, caps=caps)

    def batch(self, probes: list[tuple[str, tuple[Any, ...], dict[str, Any]]], uid: int = CONFINED,
              each: float = 1.0) -> list[Result]:
        """Many probes in one child process (fast sweeps): [(op, args, kwargs), ...] -> results in order."""
        res = _run_probe(self.pod, uid, "batch", ([list(p) for p in probes],), {"each": each}, each * len(probes) + 5)
        if not isinstance(res.answer, list):
            raise RuntimeError(f"batch probe failed: {res}")
        return [Result(**r) for r in res.answer]

    def world_probe(self, op: str, *args: Any, timeout: float = 2.0, **kwargs: Any) -> Result:
        """A probe operation run as root in the world namespace (e.g. the world opening a flow first)."""
        return _run_probe(self.world, ROOT, op, args, kwargs, timeout)

    def hold_tcp(self, dest: str, port: int, uid: int = CONFINED, timeout: float = 2.0) -> HeldConnection:
        """Open a TCP connection from the pod as `uid` now and keep it open (send on it later)."""
        return HeldConnection(self.pod, uid, dest, port, timeout)

    def world_echo(self, port: int) -> Path:
        """Start a TCP echo server on every world address at `port`; returns its log of received lines."""
        log_path = self.workdir / f"echo-{port}.log"
        self._fork_server(self.world, "echo server", _serve_echo, port, log_path)
        return log_path

    def world_sink(self, port: int) -> Path:
        """Start a TCP sink on every world address at `port`. It accepts a connection and reads
        nothing until the file `<log>.go` exists (its receive window fills, the sender's data waits in
        the pod), then reads to the end and logs `<bytes received> <eof|reset|timeout>` (after a
        timeout it ends the connection with a reset: nothing of it lingers); returns the log. One
        connection at a time."""
        log_path = self.workdir / f"sink-{port}.log"
        log_path.touch()
        self._fork_server(self.world, "sink", _serve_sink, port, log_path)
        return log_path

    def start_relay(self, uid: int, port: int, divert: tuple[str, int] | None = None) -> Path:
        """A service-mesh relay in the pod (Envoy, linkerd2-proxy) running as `uid`: it listens on
        127.0.0.1 and ::1 at `port`, reads each connection's SO_ORIGINAL_DST, connects there as `uid`
        (or to `divert`, as a relay that routes by what the client says, e.g. an HTTP Host header,
        would), and answers `relay <uid> <where it connected> <upstream's first line>` (or `... failed
        <errno>`). Returns its log: one line per accepted connection, the original destination."""
        log_path = self.workdir / f"relay-{uid}-{port}.log"
        log_path.touch()
        os.chmod(log_path, 0o666)
        self._fork_server(self.pod, f"relay {uid}:{port}", _serve_relay, uid, port, divert, log_path)
        return log_path

    def world_answer_every_port(self) -> None:
        """Make every world address answer on every TCP and UDP port (REDIRECT in the world namespace
        to its TCP 5000 / UDP 9999 listeners), so a sweep of ports has a positive control everywhere."""
        tcp = ",".join(map(str, WORLD_TCP_PORTS))
        udp = ",".join(map(str, (*WORLD_UDP_PORTS, 53)))
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            for proto, keep, to in (("tcp", tcp, "5000"), ("udp", udp, "9999")):
                for dev in self.world_ifaces:
                    _sh("ip", "netns", "exec", self.world, tool, "-w", "-t", "nat", "-A", "PREROUTING", "-i", dev,
                        "-p", proto, "-m", "multiport", "!", "--dports", keep, "-j", "REDIRECT", "--to-ports", to)

    def world_link_local(self, second: bool = False) -> str:
        """The world's IPv6 link-local address as seen from the pod (fe80::...%<pod interface>), once
        usable; on the second link if `second`."""
        pod_dev, world_dev = (self.second_iface, SECOND_WORLD_IFACE) if second else (self.iface, WORLD_IFACE)
        for _ in range(60):
            info = json.loads(_sh("ip", "-j", "-n", self.world, "-6", "addr", "show", "dev", world_dev, "scope", "link").stdout)
            for a in info[0].get("addr_info", []) if info else []:
                if a.get("local") and not a.get("tentative"):
                    addr = f"{a['local']}%{pod_dev}"
                    if self.tcp(addr, 22, uid=ROOT, timeout=0.5).ok:
                        return addr
            time.sleep(0.1)
        raise RuntimeError("world link-local address not usable")

    def world_received(self, proto: str, port: int, devices: tuple[str, ...] = ()) -> int:
        """Packets (IPv4 + IPv6) that have reached the world for proto/port so far, counted before any
        other rule sees them (a rule in the world's raw table, added on first use), on every link
        from the pod or on the world-side `devices` named (eth0w, eth1w)."""
        return self.world_counts([(proto, port)], devices)[(proto, port)]

    def world_counts(self, wanted: Iterable[tuple[str, int]], devices: tuple[str, ...] = ()) -> dict[tuple[str, int], int]:
        """`world_received` for several (proto, port) pairs, read in one listing per family."""
        pairs = sorted(set(wanted))
        devs = devices or self.world_ifaces
        if any(proto == "tcp" for proto, _ in pairs):
            self._world_connections_settled()
        total = dict.fromkeys(pairs, 0)
        for tool in ("iptables-legacy", "ip6tables-legacy") if pairs else ():
            world = ("ip", "netns", "exec", self.world, tool, "-w", "-t", "raw")
            missing = [(tool, dev, proto, port) for proto, port in pairs for dev in devs
                       if (tool, dev, proto, port) not in self._counting]
            # Listed once per rule this lab has not made yet (only this method writes the world's raw
            # table). Not `-C`: ip6tables-legacy -C took the rule of another port as this one (1.8.9).
            listed = _sh(*world, "-S", "PREROUTING").stdout.splitlines() if missing else []
            for rule in missing:
                _, dev, proto, port = rule
                if f"-A PREROUTING -i {dev} -p {proto} -m {proto} --dport {port} -j ACCEPT" not in listed:
                    _sh(*world, "-A", "PREROUTING", "-i", dev, "-p", proto, "--dport", str(port), "-j", "ACCEPT")
                self._counting.add(rule)
            for line in _sh(*world, "-L", "PREROUTING", "-v", "-x", "-n").stdout.splitlines():
                fields = line.split()
                if len(fields) > 5 and fields[5] in devs:
                    for proto, port in pairs:
                        if line.rstrip().endswith(f"{proto} dpt:{port}"):  # not dpt:2200 for 22
                            total[(proto, port)] += int(fields[0])
        return total

    def _world_connections_settled(self, within: float = 2.0) -> None:
        """Wait (at most `within` seconds) until every established connection to a world listener
        has ended. An answered probe's client returns once it has the banner; its last ACK or FIN may
        still be on its way through the link and would be counted in the next window (read as a
        blocked probe's packet). A world listener sends its banner and closes, so every connection
        to one ends in TIME-WAIT (or is gone) once the client's last packet has arrived. Half-open
        ones (SYN-RECV) are not waited for: an answered probe's handshake is over before its answer,
        and a forged SYN's half-open connection lasts until the world gives up on it."""
        ports = " or ".join(f"sport = :{p}" for p in WORLD_TCP_PORTS)
        deadline = time.monotonic() + within
        while _sh("ss", "-N", self.world, "-Htn", "state", "all", "exclude", "listening", "exclude", "time-wait",
                  "exclude", "syn-recv",
                  f"( {ports} )").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.01)

    def world_mac(self, second: bool = False) -> str:
        dev = SECOND_WORLD_IFACE if second else WORLD_IFACE
        return json.loads(_sh("ip", "-j", "-n", self.world, "link", "show", dev).stdout)[0]["address"]


class HeldConnection:
    """A TCP connection opened inside the pod as some uid, kept open across later changes (an apply)."""

    def __init__(self, netns: str, uid: int, dest: str, port: int, timeout: float) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(cmd_w)
                os.close(res_r)
                _libc.prctl(1, signal.SIGKILL, 0, 0, 0)
                _enter_netns(netns)
                _become(uid)
                _hold(dest, port, timeout, os.fdopen(cmd_r, "r"), os.fdopen(res_w, "w"))
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(res_w)
        self._cmd = os.fdopen(cmd_w, "w")
        self._res = os.fdopen(res_r, "r")
        self.opened = self._read()

    def _read(self) -> Result:
        line = self._res.readline()
        return Result(**json.loads(line)) if line else Result("error", "holder process died")

    def exchange(self, payload: str, timeout: float = 2.0) -> Result:
        """Send one line on the held connection; ok = the server's answer came back."""
        self._cmd.write(json.dumps({"payload": payload, "timeout": timeout}) + "\n")
        self._cmd.flush()
        return self._read()

    def close(self) -> None:
        try:
            self._cmd.close()
            self._res.close()
        finally:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _hold(dest: str, port: int, timeout: float, cmds: Any, out: Any) -> None:
    s = socket.socket(_family(dest), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(_sockaddr(dest, port))
        res = Result("ok", detail="connected")
    except OSError as exc:
        res = Result(*_classify(exc))
    out.write(json.dumps(res.__dict__) + "\n")
    out.flush()
    for line in cmds:
        cmd = json.loads(line)
        s.settimeout(cmd["timeout"])
        t = time.monotonic()
        try:
            s.sendall((cmd["payload"] + "\n").encode())
            data = s.recv(256).decode(errors="replace").strip()
            res = Result("ok", answer=data) if data else Result("refused", "closed by peer")
        except OSError as exc:
            res = Result(*_classify(exc))
        res.elapsed = time.monotonic() - t
        out.write(json.dumps(res.__dict__) + "\n")
        out.flush()
    s.close()


def _serve_sink(port: int, log_path: Path, ready_fd: int) -> None:
    """See Lab.world_sink."""
    go = log_path.with_suffix(".go")
    lst = _listen(socket.SOCK_STREAM, port)
    lst.setblocking(True)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        conn, _ = lst.accept()
        deadline = time.monotonic() + 30
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        go.unlink(missing_ok=True)
        conn.settimeout(2.0)
        got, how = 0, "eof"
        try:
            while chunk := conn.recv(65536):
                got += len(chunk)
        except TimeoutError:
            how = "timeout"
        except OSError:
            how = "reset"
        if how == "timeout":
            # The rest never came (the guard cut it): end with a reset, not a FIN. The pod has no
            # socket left to take a FIN; its kernel's reset in answer is refused, so the FIN would be
            # sent again for minutes, each answer refused (and logged) during later tests.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        with open(log_path, "a") as fh:
            fh.write(f"{got} {how}\n")


def _serve_echo(port: int, log_path: Path, ready_fd: int) -> None:
    """TCP echo on every address at `port`; each received chunk is appended to `log_path`."""
    sel = selectors.DefaultSelector()
    lst = _listen(socket.SOCK_STREAM, port)
    sel.register(lst, selectors.EVENT_READ)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                if sock is lst:
                    conn, _ = lst.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                data = sock.recv(4096)
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    continue
                with open(log_path, "ab") as fh:
                    fh.write(data)
                sock.sendall(b"echo " + data)
            except OSError:
                try:
                    sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()


if __name__ == "__main__":  # pragma: no cover - manual use: python -m egressguard.lab
    with Lab() as _lab:
        print(f"pod={_lab.pod} world={_lab.world}")
        for who in (CONFINED, EXEMPT, ROOT):
            print(who, _lab.tcp("203.0.113.10", 22, uid=who), _lab.dns("allowed.test", RESOLVER_V4, uid=who))


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _serve_relay(uid: int, port: int, divert: tuple[str, int] | None, log_path: Path, ready_fd: int) -> None:
    """See Lab.start_relay. One connection at a time: probes are sequential, each bounded by timeouts."""
    _become(uid)
    sel = selectors.DefaultSelector()
    for addr in ("127.0.0.1", "::1"):
        sel.register(_listen(socket.SOCK_STREAM, port, addr), selectors.EVENT_READ)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            lst: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                conn, _peer = lst.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2.0)
                orig = _original_dst(conn)
                with open(log_path, "a") as log:
                    log.write(orig + "\n")
                target = divert or (_split_hostport(orig) if orig != "-" else None)
                answer = f"relay {uid} -"
                if target and target[1] == port and ipaddress.ip_address(target[0]).is_loopback:
                    answer = f"relay {uid} loop"  # connected to directly: no original destination to go to
                elif target:
                    where = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
                    try:
                        with socket.create_connection(target, timeout=1.5) as up:
                            answer = f"relay {uid} {where} " + up.recv(256).decode(errors="replace").strip()
                    except OSError as exc:
                        answer = f"relay {uid} {where} failed {_classify(exc)[1] or _classify(exc)[0]}"
                try:
                    conn.sendall((answer + "\n").encode())
                except OSError:
                    continue
