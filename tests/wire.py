"""Ground truth for traffic claims: frames captured on the world's side of the pod's link.

A `WireCapture` runs an AF_PACKET socket (ETH_P_ALL) in a forked child that has entered the lab's
world namespace. It records every frame the world RECEIVES on the world's end of each of the pod's
links (eth0w, and eth1w on a lab with a second link; or the one interface named), frames the world
itself sends (PACKET_OUTGOING) left out, whatever any firewall or socket on either side made of it: a
frame that is here reached the world, over whichever link the pod's routing chose.

Bounded: at most MAX_FRAMES frames and MAX_BYTES bytes are kept (each frame cut to SNAPLEN bytes),
for at most MAX_SECONDS; past a cap the child stops recording and says so (`cap.truncated`), and
`barrier` fails, so a test that relies on "no frame" cannot pass on a capture that stopped early.
The child is stopped by a message on a pipe and reaped on exit, also when the test fails; it dies
with the test process (PR_SET_PDEATHSIG).

    with WireCapture(lab) as cap:
        ...  # the attempt
        cap.barrier(lab)  # every frame the pod sent before this point has been read
        assert not cap.frames_with(marker)
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from egressguard.lab import EXEMPT, Lab, _become, _enter_netns, _libc

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SNAPLEN = 2048
MAX_FRAMES = 50_000
MAX_BYTES = 32 * 1024 * 1024
MAX_SECONDS = 300  # a capture nobody stopped ends by itself
_PR_SET_PDEATHSIG = 1
_RECORD = struct.Struct("!dIB")  # capture time, frame length, index of the interface; then the frame

_IPV6_EXT = {0: "hbh", 43: "rthdr", 44: "frag", 60: "dstopts"}


@dataclass(frozen=True)
class Frame:
    """One received frame, decoded as far as the tests need."""

    at: float  # time.time() when the child read it
    data: bytes = field(repr=False)  # the frame from the Ethernet header on (at most SNAPLEN bytes)
    iface: str = ""  # the world interface it arrived on
    ethertype: int = 0
    src: str = ""  # IP source (empty for non-IP frames)
    dst: str = ""
    proto: int = -1  # IP protocol after IPv6 extension headers (6 TCP, 17 UDP, 58 ICMPv6, 2 IGMP ...)
    sport: int = 0
    dport: int = 0
    icmp_type: int = -1  # ICMP, ICMPv6 or IGMP message type
    ext: tuple[str, ...] = ()  # IPv6 extension headers ("rthdr4" = segment routing), "ipopts" for IPv4 options
    l4: bytes = field(default=b"", repr=False)  # the transport header and what follows

    def __str__(self) -> str:
        ports = f" {self.sport}->{self.dport}" if self.sport or self.dport else ""
        icmp = f" type {self.icmp_type}" if self.icmp_type >= 0 else ""
        ext = f" [{','.join(self.ext)}]" if self.ext else ""
        return (f"{self.iface}: 0x{self.ethertype:04x} {self.src}->{self.dst} proto {self.proto}{ports}{icmp}{ext} "
                f"{len(self.data)}B")


def decode(at: float, data: bytes, iface: str = "") -> Frame:
    """Ethernet II (one optional 802.1Q tag), then IPv4 or IPv6 with its extension headers."""
    if len(data) < 14:
        return Frame(at, data, iface)
    (ethertype,) = struct.unpack_from("!H", data, 12)
    off = 14
    if ethertype == 0x8100 and len(data) >= 18:
        (ethertype,) = struct.unpack_from("!H", data, 16)
        off = 18
    fields: dict[str, Any] = {"ethertype": ethertype}
    ip = data[off:]
    l4_off = -1
    if ethertype == 0x0800 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        fields.update(src=socket.inet_ntop(socket.AF_INET, ip[12:16]), dst=socket.inet_ntop(socket.AF_INET, ip[16:20]),
                      proto=ip[9], ext=("ipopts",) if ihl > 20 else ())
        l4_off = ihl
    elif ethertype == 0x86DD and len(ip) >= 40:
        fields.update(src=socket.inet_ntop(socket.AF_INET6, ip[8:24]), dst=socket.inet_ntop(socket.AF_INET6, ip[24:40]))
        nxt, pos, ext = ip[6], 40, []
        for _ in range(8):  # a bounded walk: a hostile chain cannot loop
            if nxt not in _IPV6_EXT or len(ip) < pos + 8:
                break
            name = _IPV6_EXT[nxt]
            ext.append(f"rthdr{ip[pos + 2]}" if nxt == 43 else name)
            length = 8 if nxt == 44 else (ip[pos + 1] + 1) * 8
            nxt, pos = ip[pos], pos + length
        fields.update(proto=nxt, ext=tuple(ext))
        l4_off = pos
    if l4_off >= 0:
        l4 = ip[l4_off:]
        fields["l4"] = l4
        if fields["proto"] in (6, 17, 136) and len(l4) >= 4:
            fields["sport"], fields["dport"] = struct.unpack_from("!HH", l4)
        elif fields["proto"] in (1, 2, 58) and l4:
            fields["icmp_type"] = l4[0]
    return Frame(at, data, iface, **fields)


def new_marker() -> bytes:
    """A random byte string an attacker puts where it can choose the bytes (a payload, a DNS name)."""
    return b"EGM" + secrets.token_hex(8).encode()


def new_port() -> int:
    """A random port for channels whose only attacker-chosen field is a port (a SYN, a RST)."""
    return 20000 + secrets.randbelow(20000)


Match = bytes | Callable[[Frame], bool]


def _matches(frame: Frame, what: Match) -> bool:
    return what in frame.data if isinstance(what, bytes) else bool(what(frame))


def port_is(port: int, proto: int = 6) -> Callable[[Frame], bool]:
    """Frames of `proto` with `port` on either side (the SYN that carries it, or a RST sent back to it)."""
    return lambda f: f.proto == proto and port in (f.sport, f.dport)


def holds_address(addr: str) -> Callable[[Frame], bool]:
    """Frames whose IP payload (after the addresses) contains `addr` in binary: a multicast group or
    source named in a membership report, an address quoted in an ICMP error."""
    packed = ipaddress.ip_address(addr).packed
    return lambda f: packed in f.l4


def is_mld_report(frame: Frame) -> bool:
    """An MLDv1 report or done (ICMPv6 131, 132) or an MLDv2 report (143)."""
    return frame.proto == 58 and frame.icmp_type in (131, 132, 143)


def mld_groups(frame: Frame) -> list[str]:
    """The multicast addresses an MLD report names: one per group record (MLDv2, ICMPv6 type 143),
    or its one multicast address (MLDv1 report or done, 131 or 132)."""
    if frame.proto == 58 and frame.icmp_type in (131, 132) and len(frame.l4) >= 24:
        return [socket.inet_ntop(socket.AF_INET6, frame.l4[8:24])]
    if frame.proto != 58 or frame.icmp_type != 143 or len(frame.l4) < 8:
        return []
    (count,) = struct.unpack_from("!H", frame.l4, 6)
    groups, pos = [], 8
    for _ in range(min(count, 512)):
        if pos + 20 > len(frame.l4):
            break  # cut at SNAPLEN
        _, aux, sources = struct.unpack_from("!BBH", frame.l4, pos)
        groups.append(socket.inet_ntop(socket.AF_INET6, frame.l4[pos + 4:pos + 20]))
        pos += 20 + 16 * sources + 4 * aux
    return groups


class WireCapture:
    """Every frame the world receives from the pod while the `with` block runs: on every link of the
    lab, or on `iface` alone (see the module doc)."""

    def __init__(self, lab: Lab, iface: str = "") -> None:
        self.lab = lab
        self.ifaces = (iface,) if iface else lab.world_ifaces
        self.iface = "+".join(self.ifaces)
        self.path = Path(lab.workdir) / f"wire-{self.iface}-{os.getpid()}-{secrets.token_hex(4)}.cap"
        self.pid = 0
        self.truncated = False
        self._frames: list[Frame] = []
        self._offset = 0
        self._stop_w = -1

    def __enter__(self) -> Self:
        self.path.write_bytes(b"")
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                os.close(stop_w)
                _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                _enter_netns(self.lab.world)
                _capture(self.ifaces, str(self.path), ready_w, stop_r)
            finally:
                os._exit(0)
        self.pid = pid
        os.close(ready_w)
        os.close(stop_r)
        self._stop_w = stop_w
        with os.fdopen(ready_r, "rb") as fh:
            said = fh.read()
        if said != b"ready":
            self._reap()
            raise RuntimeError(f"wire capture on {self.iface} did not start: {said.decode(errors='replace')}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask the child to read what is queued and exit; then reap it (SIGKILL after 5 s)."""
        if not self.pid:
            return
        try:
            os.write(self._stop_w, b"stop")
        except OSError:
            pass
        self._reap()
        self._read_new()

    def _reap(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        if self._stop_w >= 0:
            os.close(self._stop_w)
            self._stop_w = -1
        self.pid = 0

    def _read_new(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            buf = fh.read()
        pos = 0
        while len(buf) - pos >= _RECORD.size:
            at, length, index = _RECORD.unpack_from(buf, pos)
            if length == 0xFFFFFFFF:  # the child's "cap reached" record
                self.truncated = True
                pos += _RECORD.size
                continue
            if len(buf) - pos - _RECORD.size < length:
                break  # the child is still writing this record
            start = pos + _RECORD.size
            self._frames.append(decode(at, buf[start:start + length], self.ifaces[index]))
            pos = start + length
        self._offset += pos

    def frames(self) -> list[Frame]:
        """Every frame received so far."""
        self._read_new()
        return list(self._frames)

    def frames_with(self, what: Match) -> list[Frame]:
        """Frames carrying `what`: a marker's bytes anywhere in the frame, or a predicate on Frame."""
        return [f for f in self.frames() if _matches(f, what)]

    def wait_for(self, what: Match, timeout: float = 2.0) -> list[Frame]:
        """Frames carrying `what`, as soon as one has arrived; [] after `timeout` seconds (for positive
        controls, where the kernel must have time to emit)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.frames_with(what)
            if found or time.monotonic() >= deadline or not self.pid:
                return found
            time.sleep(0.01)

    def barrier(self, lab: Lab, timeout: float = 3.0) -> None:
        """Send UDP datagrams from the pod (the exempt uid: root is confined under `confine: all`) over
        each captured link to the world's end of it, and wait until the capture has one per link:
        frames the pod sent before this point have then been delivered and read. Raises if one never
        arrives, since a capture that misses it cannot vouch for an absence either."""
        for _, iface, v4, v6 in lab.links:
            if iface not in self.ifaces:
                continue
            marker = new_marker()
            for addr in (v6[1], v4[1]):  # the world's end of this link
                in_pod(lab, EXEMPT, send_udp, addr, 9, marker.decode())
            seen = self.wait_for(lambda f, m=marker, i=iface: f.iface == i and m in f.data, timeout)
            if not seen or self.truncated:
                raise AssertionError(f"capture barrier: the pod's sentinel never reached {iface}"
                                     + (" (the capture hit a cap)" if self.truncated else ""))


def _capture(ifaces: tuple[str, ...], path: str, ready_fd: int, stop_fd: int) -> None:
    try:
        for iface in ifaces:
            socket.if_nametoindex(iface)  # each must exist: a capture of a missing link vouches for nothing
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        if len(ifaces) == 1:
            sock.bind((ifaces[0], ETH_P_ALL))  # else unbound: every interface, filtered by name below
        sock.setblocking(False)
    except OSError as exc:
        os.write(ready_fd, f"{'+'.join(ifaces)}: {exc}".encode())
        return
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    frames = size = 0
    full = False
    with open(path, "ab", buffering=0) as out:
        def drain() -> None:
            nonlocal frames, size, full
            for _ in range(100_000):  # bounded even if frames keep arriving faster than we read
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    return
                if addr[2] == PACKET_OUTGOING or full or addr[0] not in ifaces:
                    continue
                data = data[:SNAPLEN]
                if frames >= MAX_FRAMES or size + len(data) > MAX_BYTES:
                    full = True
                    out.write(_RECORD.pack(time.time(), 0xFFFFFFFF, 0))
                    continue
                frames, size = frames + 1, size + len(data)
                out.write(_RECORD.pack(time.time(), len(data), ifaces.index(addr[0])) + data)

        deadline = time.monotonic() + MAX_SECONDS
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock, stop_fd], [], [], 1.0)
            if sock in readable:
                drain()
            if stop_fd in readable:
                drain()
                return
        out.write(_RECORD.pack(time.time(), 0xFFFFFFFF, 0))


# -- running code in the pod as a uid -------------------------------------------------------------


def in_pod(lab: Lab, uid: int, fn: Callable[..., Any], *args: Any, timeout: float = 5.0, netns: str = "") -> Any:
    """Run `fn(*args)` in a forked child inside the pod (or `netns`) as `uid` (no capabilities unless
    root); return its JSON-able result, or {"error": "..."} if it raised. Killed after `timeout` s."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _enter_netns(netns or lab.pod)
            _become(uid)
            try:
                out: Any = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as fh:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fh], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fh.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    done, _ = os.waitpid(pid, os.WNOHANG)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return {"error": f"no result within {timeout} s"}
    return json.loads(data)


def send_udp(addr: str, port: int, payload: str) -> str:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.sendto(payload.encode(), (addr, port))
    return "sent"
