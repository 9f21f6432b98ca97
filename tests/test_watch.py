"""The NFLOG reader's pure parts: decoding the kernel's packet messages, and folding flows within a
bound. (What the kernel really sends is tested with real traffic in tests/test_log_traffic.py.)"""

from __future__ import annotations

import socket
import struct
from typing import Any

from egressguard import watch
from egressguard.watch import Flows, Refusal, decode


def _nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _message(ethertype: int, payload: bytes, prefix: bytes = b"deny[3]\0", uid: int | None = 1000,
             ct: bytes = b"") -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(14))
    body += _nla(watch.NFULA_PACKET_HDR, struct.pack(">HBB", ethertype, 3, 0))
    body += _nla(watch.NFULA_PREFIX, prefix)
    if uid is not None:
        body += _nla(watch.NFULA_UID, struct.pack(">I", uid))
    return body + _nla(watch.NFULA_PAYLOAD, payload) + ct


NESTED = 0x8000  # NLA_F_NESTED, as ctnetlink sets it on nested attributes


def _ct_orig(dst: str, port: int) -> bytes:
    """NFULA_CT as ctnetlink builds it (linux/netfilter/nfnetlink_conntrack.h): CTA_TUPLE_ORIG holding
    CTA_TUPLE_IP (source, destination) and CTA_TUPLE_PROTO (number, ports), then a reply tuple."""
    af, (src_kind, dst_kind) = (socket.AF_INET6, (3, 4)) if ":" in dst else (socket.AF_INET, (1, 2))
    src = "2001:db8:100::2" if ":" in dst else "198.51.100.2"
    ip = _nla(src_kind, socket.inet_pton(af, src)) + _nla(dst_kind, socket.inet_pton(af, dst))
    proto = _nla(1, b"\x06") + _nla(2, struct.pack(">H", 40000)) + _nla(3, struct.pack(">H", port))
    orig = _nla(NESTED | 1, ip) + _nla(NESTED | 2, proto)
    reply = _nla(NESTED | 1, _nla(src_kind, socket.inet_pton(af, "::1" if ":" in dst else "127.0.0.1")))
    return _nla(NESTED | watch.NFULA_CT, _nla(NESTED | 1, orig) + _nla(NESTED | 2, reply))


def _ipv6(next_header: int, rest: bytes, dst: str = "2001:db8:2::11") -> bytes:
    return (struct.pack(">IHBB", 6 << 28, len(rest), next_header, 64) + socket.inet_pton(socket.AF_INET6, "2001:db8:100::2")
            + socket.inet_pton(socket.AF_INET6, dst) + rest)


def test_an_ipv4_udp_refusal_is_decoded() -> None:
    udp = struct.pack(">HHHH", 40000, 53, 8, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton("198.51.100.2"),
                     socket.inet_aton("203.0.113.11"))
    assert decode(_message(0x0800, ip + udp)) == Refusal("deny[3]", 1000, "udp", "203.0.113.11", 53)


def test_an_ipv6_tcp_refusal_behind_extension_headers_is_decoded() -> None:
    tcp = struct.pack(">HHII", 40000, 22, 0, 0)
    hop_by_hop = bytes([60, 0]) + b"\0" * 6  # then destination options
    dst_opts = bytes([6, 0]) + b"\0" * 6  # then TCP
    assert decode(_message(0x86DD, _ipv6(0, hop_by_hop + dst_opts + tcp))) == \
        Refusal("deny[3]", 1000, "tcp", "2001:db8:2::11", 22)


def test_icmpv6_is_named_icmp_as_explain_names_it_and_has_no_port() -> None:
    echo = struct.pack(">BBHHH", 128, 0, 0, 1, 1)
    assert decode(_message(0x86DD, _ipv6(58, echo), uid=None)) == Refusal("deny[3]", None, "icmp", "2001:db8:2::11", None)


def test_truncated_or_foreign_messages_are_skipped_not_misread() -> None:
    assert decode(_message(0x0800, b"\x45\0\0")) is None  # shorter than an IPv4 header
    assert decode(_message(0x0806, b"\0" * 28)) is None  # ARP
    short_udp = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, b"\0" * 4, socket.inet_aton("192.0.2.1"))
    assert decode(_message(0x0800, short_udp)) == Refusal("deny[3]", 1000, "udp", "192.0.2.1", None)


def test_a_redirected_connection_is_reported_by_its_original_destination_where_conntrack_is_attached() -> None:
    """Behind a mesh's redirect the packet goes to 127.0.0.1:15001; conntrack's original tuple says
    where the agent was going. (This machine's kernel attaches none: tests/test_traffic_mesh.py checks
    the fallback there with real traffic.)"""
    syn = struct.pack(">HHII", 40000, 15001, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton("198.51.100.2"),
                     socket.inet_aton("127.0.0.1"))
    assert decode(_message(0x0800, ip + syn)) == Refusal("deny[3]", 1000, "tcp", "127.0.0.1", 15001)
    assert decode(_message(0x0800, ip + syn, ct=_ct_orig("203.0.113.11", 443))) == \
        Refusal("deny[3]", 1000, "tcp", "203.0.113.11", 443)
    assert decode(_message(0x86DD, _ipv6(6, syn, dst="::1"), ct=_ct_orig("2001:db8:2::11", 443))) == \
        Refusal("deny[3]", 1000, "tcp", "2001:db8:2::11", 443)


def test_flows_fold_repeats_and_keep_at_most_max_flows() -> None:
    flows = Flows(max_flows=3)
    for port in (1, 1, 2, 3, 4, 5, 1):
        flows.add(Refusal("default", 1000, "udp", "192.0.2.1", port))
    events: list[tuple[str, dict[str, Any]]] = []
    flows.flush(lambda event, **kw: events.append((event, kw)), 10.0, lost=2)
    assert [(e, kw["port"], kw["packets"]) for e, kw in events if e == "connection_refused"] == \
        [("connection_refused", 1, 3), ("connection_refused", 2, 1), ("connection_refused", 3, 1)]
    assert events[-1] == ("refusals_not_itemised", {"packets": 2, "lost_in_kernel_queue": 2, "max_flows": 3,
                                                     "window_s": 10.0})
    assert flows.counts == {} and flows.not_itemised == 0
