"""`egressguard watch`: the refused packets the kernel logs to our NFLOG group, one event per flow.

Hand-written netlink (NFNL_SUBSYS_ULOG) over a plain socket: pyroute2 0.9 has no NFLOG socket,
only the subsystem's number. Layouts from the kernel's uapi headers linux/netlink.h,
linux/netfilter/nfnetlink.h and linux/netfilter/nfnetlink_log.h.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from egressguard import logs, sidecar
from egressguard.errors import EnvironmentUnsupported, PolicyError
from egressguard.privileges import CAP_NET_ADMIN, Identity, drop_privileges, holds, resolve_user
from egressguard.ruleset import LOG_GROUP

log = logs.get_logger("egressguard")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 1, 2, 3, 4, 5, 6
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_CONNTRACK = 0x0004  # (0x1, 0x2: sequence numbers)
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID, NFULA_CT = 1, 9, 10, 11, 18
# Inside NFULA_CT (linux/netfilter/nfnetlink_conntrack.h): the original tuple's address and port.
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 1, 2
CTA_IP_V4_DST, CTA_IP_V6_DST = 2, 4
CTA_PROTO_DST_PORT = 3
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian: the group)
_NLA = struct.Struct("=HH")
# Bytes of each packet copied to us: an IPv6 header (40), a few extension headers, the port.
COPY_RANGE = 128
RCVBUF = 1 << 20
# As `egressguard explain` names them: ICMPv6 is `icmp` (the address says which family).
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp", 132: "sctp"}
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: (next, length/8 - 1)
_FRAGMENT = 44

# Aggregation: at most this many flows per window are itemised; packets of further flows are
# counted in one `refused_flows_not_itemised` event. Whatever a process sends, the reader holds at
# most this many keys (each a few hundred bytes) and one receive buffer.
MAX_FLOWS = 4096
DEFAULT_WINDOW_S = 10.0
NOBODY = 65534


@dataclass(frozen=True)
class Refusal:
    """One logged packet, as much as the reader needs of it."""

    line: str  # the policy line (the NFLOG prefix)
    uid: int | None  # the sending socket's owner (None: the kernel did not say)
    protocol: str
    destination: str
    port: int | None  # destination port (TCP, UDP, SCTP), None otherwise


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _config(seq: int, family: int, group: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(family, 0, socket.htons(group)) + attrs
    kind = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def open_group(group: int = LOG_GROUP) -> tuple[socket.socket, bool]:
    """A netlink socket bound to NFLOG `group` in this network namespace (needs CAP_NET_ADMIN), and
    whether the kernel attaches each packet's conntrack entry (not without CONFIG_NETFILTER_NETLINK_GLUE_CT)."""
    conntrack = True
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        steps = (
            ("bind the group", _nla(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND) + b"\0" * 3)),
            ("copy packet headers", _nla(NFULA_CFG_MODE, struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0))),
            ("deliver each packet at once", _nla(NFULA_CFG_QTHRESH, struct.pack(">I", 1))),
            # A mesh's redirect leaves the packet addressed to its relay (127.0.0.1:15001): the
            # connection's original destination is what was refused. Without ctnetlink in the
            # kernel (EOPNOTSUPP) the packet's own header is reported.
            ("attach conntrack", _nla(NFULA_CFG_FLAGS, struct.pack(">H", NFULNL_CFG_F_CONNTRACK))),
        )
        for seq, (what, attrs) in enumerate(steps, 1):
            sock.send(_config(seq, socket.AF_UNSPEC, group, attrs))
            err = _ack(sock, seq)
            if err == errno.EOPNOTSUPP and what == "attach conntrack":
                conntrack = False
            elif err:
                held = f" (another reader holds NFLOG group {group} in this namespace)"
                # the kernel answers EPERM both without CAP_NET_ADMIN and for a group bound by another socket
                hint = {errno.EPERM: held if holds(CAP_NET_ADMIN) else " (needs CAP_NET_ADMIN)", errno.EBUSY: held}.get(err, "")
                raise EnvironmentUnsupported(f"NFLOG group {group}: cannot {what}: {os.strerror(err)}{hint}")
    except BaseException:
        sock.close()
        raise
    return sock, conntrack


def _ack(sock: socket.socket, seq: int) -> int:
    while True:
        data = sock.recv(65536)
        for kind, _flags, got_seq, body in _messages(data):
            if kind == NLMSG_ERROR and got_seq == seq:
                return -struct.unpack_from("=i", body)[0]


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    at = 0
    while at + _NLMSG.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSG.unpack_from(data, at)
        if length < _NLMSG.size or at + length > len(data):
            return
        yield kind, flags, seq, data[at + _NLMSG.size:at + length]
        at += (length + 3) & ~3


def _attrs(body: bytes, at: int = _NFGEN.size) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while at + _NLA.size <= len(body):
        length, kind = _NLA.unpack_from(body, at)
        if length < _NLA.size:
            break
        out[kind & NLA_TYPE_MASK] = body[at + _NLA.size:at + length]
        at += (length + 3) & ~3
    return out


def decode(body: bytes) -> Refusal | None:
    """One NFULNL_MSG_PACKET body as a Refusal; None if it is not an IP packet we can read."""
    a = _attrs(body)
    payload, hdr = a.get(NFULA_PAYLOAD, b""), a.get(NFULA_PACKET_HDR, b"")
    if len(hdr) < 2 or not payload:
        return None
    line = a.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace") or "?"
    uid = struct.unpack(">I", a[NFULA_UID])[0] if len(a.get(NFULA_UID, b"")) == 4 else None
    ethertype = struct.unpack_from(">H", hdr)[0]
    if ethertype == 0x0800 and len(payload) >= 20:
        proto, start = payload[9], (payload[0] & 0xF) * 4
        dst = socket.inet_ntop(socket.AF_INET, payload[16:20])
    elif ethertype == 0x86DD and len(payload) >= 40:
        proto, start = payload[6], 40
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        for _ in range(8):  # a bounded walk over extension headers
            if proto in _IPV6_EXTENSIONS and start + 2 <= len(payload):
                proto, start = payload[start], start + (payload[start + 1] + 1) * 8
            elif proto == _FRAGMENT and start + 8 <= len(payload):
                proto, start = payload[start], start + 8
            else:
                break
    else:
        return None
    port = None
    if proto in (6, 17, 132) and start + 4 <= len(payload):
        port = struct.unpack_from(">H", payload, start + 2)[0]
    dst, port = _original_destination(a.get(NFULA_CT), dst, port)
    return Refusal(line=line, uid=uid, protocol=PROTOCOLS.get(proto, str(proto)), destination=dst, port=port)


def _original_destination(ct: bytes | None, dst: str, port: int | None) -> tuple[str, int | None]:
    """The connection's original destination (conntrack's original tuple) where the kernel attached
    it, else the packet's (`dst`, `port`)."""
    orig = _attrs(ct, 0).get(CTA_TUPLE_ORIG) if ct else None
    if orig is None:
        return dst, port
    tup = _attrs(orig, 0)
    ip = _attrs(tup.get(CTA_TUPLE_IP, b""), 0)
    if len(ip.get(CTA_IP_V4_DST, b"")) == 4:
        dst = socket.inet_ntop(socket.AF_INET, ip[CTA_IP_V4_DST])
    elif len(ip.get(CTA_IP_V6_DST, b"")) == 16:
        dst = socket.inet_ntop(socket.AF_INET6, ip[CTA_IP_V6_DST])
    dport = _attrs(tup.get(CTA_TUPLE_PROTO, b""), 0).get(CTA_PROTO_DST_PORT, b"")
    if port is not None and len(dport) == 2:
        port = struct.unpack(">H", dport)[0]
    return dst, port


class Flows:
    """Refusals folded per (uid, protocol, destination, port, line) over one window, in at most
    `max_flows` keys; what does not fit is counted, never stored."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self.max_flows = max_flows
        self.counts: dict[Refusal, int] = {}
        self.not_itemised = 0

    def add(self, r: Refusal) -> None:
        n = self.counts.get(r)
        if n is not None:
            self.counts[r] = n + 1
        elif len(self.counts) < self.max_flows:
            self.counts[r] = 1
        else:
            self.not_itemised += 1

    def flush(self, emit: Callable[..., Any], window_s: float, lost: int = 0) -> None:
        for r, n in self.counts.items():
            emit("connection_refused", uid=r.uid, protocol=r.protocol, destination=r.destination, port=r.port,
                 line=r.line, packets=n, window_s=window_s)
        if self.not_itemised or lost:
            emit("refusals_not_itemised", packets=self.not_itemised, lost_in_kernel_queue=lost,
                 max_flows=self.max_flows, window_s=window_s)
        self.counts = {}
        self.not_itemised = 0


def _read(sock: socket.socket, buf: bytearray, flows: Flows, more: int) -> int:
    """One receive (and up to `more` further ones, until nothing is queued) into `flows`;
    returns how often the kernel reported messages lost (ENOBUFS: the reader fell behind)."""
    lost = 0
    for _ in range(more + 1):
        try:
            n = sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                lost += 1
                continue
            raise
        for kind, _flags, _seq, body in _messages(memoryview(buf)[:n].tobytes()):
            if kind == NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET:
                r = decode(body)
                if r is not None:
                    flows.add(r)
    return lost


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024


def serve(sock: socket.socket, window_s: float = DEFAULT_WINDOW_S, max_flows: int = MAX_FLOWS,
          ready: Callable[[], None] | None = None, until: int | None = None, conntrack: bool = True) -> int:
    """Read the group until SIGTERM or SIGINT (or `until` becomes readable: the parent's pidfd);
    one event per flow per window, and at the end. `conntrack`: the kernel attaches conntrack entries,
    so destinations are the connections' original ones (else the packets', e.g. a mesh relay's)."""
    stop = False

    def _stop(_sig: int, _frm: Any) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    wake_r, wake_w = socket.socketpair()  # a signal wakes select() at once, not at the window's end
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    flows = Flows(max_flows)
    emit = log.info
    buf = bytearray(RCVBUF // 4)
    lost = 0
    window_end = time.monotonic() + window_s
    log.info("watch_started", group=LOG_GROUP, window_s=window_s, max_flows=max_flows, pid=os.getpid(),
             destination="original" if conntrack else "packet")
    if ready:
        ready()
    while not stop:
        timeout = max(0.0, window_end - time.monotonic())
        try:
            readable, _, _ = select.select([sock.fileno(), wake_r.fileno(), *([until] if until is not None else [])],
                                           [], [], timeout)
        except InterruptedError:
            readable = []
        if sock.fileno() in readable:
            lost += _read(sock, buf, flows, 0)
        if until is not None and until in readable:
            stop = True
        if time.monotonic() >= window_end:
            flows.flush(emit, window_s, lost)
            lost = 0
            window_end = time.monotonic() + window_s
    signal.set_wakeup_fd(-1)
    wake_r.close()
    wake_w.close()
    sock.setblocking(False)  # what the kernel queued before the stop is still reported
    lost += _read(sock, buf, flows, MAX_FLOWS)
    rss = _rss_kib()  # with the last window's flows still held: what the reader's memory came to
    flows.flush(emit, window_s, lost)
    log.info("watch_stopped", rss_kib=rss)
    return 0


def main(args: Any) -> int:
    """`egressguard watch`: as root, first become --user (default nobody) with CAP_NET_ADMIN only."""
    window = DEFAULT_WINDOW_S if args.window is None else args.window
    max_flows = MAX_FLOWS if args.max_flows is None else args.max_flows
    if not 0.05 <= window <= 3600:
        raise PolicyError(f"usage error: --window {window}: between 0.05 and 3600 seconds")
    if not 1 <= max_flows <= 1_000_000:
        raise PolicyError(f"usage error: --max-flows {max_flows}: between 1 and 1000000")
    if os.geteuid() == 0:
        logs.load()  # its events are logged as the user it becomes
        drop_privileges(_watch_user(args.user), keep=(CAP_NET_ADMIN,))
    until = None if args.parent is None else sidecar.parent_exit_fd(args.parent)
    sock, conntrack = open_group()
    with sock:
        ready = None if args.ready_fd is None else (lambda: sidecar.report_ready(args.ready_fd))
        return serve(sock, window, max_flows, ready=ready, until=until, conntrack=conntrack)


def _watch_user(name: str | None) -> Identity:
    """--user, else nobody (uid 65534 even where the image's passwd lacks it)."""
    if name is not None:
        return resolve_user(name)
    try:
        return resolve_user("nobody")
    except PolicyError:
        return Identity(name="nobody", uid=NOBODY, gid=NOBODY, home="/", shell="/bin/sh")
