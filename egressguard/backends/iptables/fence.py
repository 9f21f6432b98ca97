"""The routing fence: FIB `prohibit` rules for the confined uids in both families, added in ONE
system call, held only while a first apply makes its first commits.

x_tables has one commit per family, so no single commit can close IPv4 and IPv6 together: a
SIGKILL between the two would leave the second family unguarded. Two netlink messages sent in one
sendmsg() are processed by the kernel before the call returns, and a signal cannot split a system
call, so the fence closes both families at once; the per-family commits (the policy itself, or the
lockdown when apply must resolve names first) follow, and the fence is lowered afterwards. A fence
left by a killed apply only refuses more (local traffic still works: the `local` table is consulted
before it), and the next apply or `reset` removes it.

We speak rtnetlink directly (a few fixed-size structs) rather than through pyroute2, whose import
costs ~0.25 s here, on the cold-start path of every first apply.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import cast

from egressguard.errors import ApplyFailed
from egressguard.policy import Policy

PRIORITY = 1  # after the `local` table (0), before any routing policy (main is 32766)
PROTOCOL = 0xEB  # FRA_PROTOCOL: marks the rules as egressguard's
MAX_UID = 0xFFFFFFFE

RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
FR_ACT_PROHIBIT = 8
FRA_PRIORITY, FRA_UID_RANGE, FRA_PROTOCOL = 6, 20, 21
_NLMSGHDR = struct.Struct("=IHHII")
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table res1 res2 action flags


def uid_ranges(policy: Policy) -> list[tuple[int, int]]:
    """The confined uids as inclusive ranges (exempt uids carved out of `all`)."""
    if policy.confines_everyone:
        ranges, start = [], 0
        for uid in sorted(set(policy.exempt.uids)):
            if uid > start:
                ranges.append((start, uid - 1))
            start = uid + 1
        if start <= MAX_UID:
            ranges.append((start, MAX_UID))
        return ranges
    uids = sorted(set(cast(list[int], policy.confine.uids)))  # a list here: `all` returned above
    ranges = []
    for uid in uids:
        if ranges and ranges[-1][1] == uid - 1:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return ranges


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _rule(family: int, first: int, last: int, seq: int) -> bytes:
    body = _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, FR_ACT_PROHIBIT, 0)
    body += _attr(FRA_PRIORITY, struct.pack("=I", PRIORITY))
    body += _attr(FRA_UID_RANGE, struct.pack("=II", first, last))
    body += _attr(FRA_PROTOCOL, struct.pack("=B", PROTOCOL))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWRULE, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        yield kind, seq, data[off + _NLMSGHDR.size : off + length]
        off += (length + 3) & ~3


SOL_NETLINK, NETLINK_CAP_ACK = 270, 10


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without a copy of each request
    s.bind((0, 0))
    s.settimeout(5)
    return s


def _acks(s: socket.socket, expected: int, what: str) -> None:
    """Read `expected` acknowledgements; EEXIST (the rule is already there) counts as done."""
    seen = 0
    while seen < expected:
        for kind, _seq, payload in _messages(s.recv(1 << 16)):
            if kind != NLMSG_ERROR:
                continue
            seen += 1
            (code,) = struct.unpack_from("=i", payload)
            if code not in (0, -errno.EEXIST, -errno.ENOENT):
                raise ApplyFailed(f"routing fence: {what}: {os.strerror(-code)}")


def raise_fence(policy: Policy) -> int:
    """Add the prohibit rules for both families in one sendmsg(). Returns the number of rules."""
    ranges = uid_ranges(policy)
    msgs = [
        _rule(family, first, last, seq)
        for seq, (family, (first, last)) in enumerate(
            ((f, r) for f in (socket.AF_INET, socket.AF_INET6) for r in ranges), start=1
        )
    ]
    if not msgs:
        return 0
    with _socket() as s:
        s.sendmsg([b"".join(msgs)])
        _acks(s, len(msgs), "cannot add prohibit rules")
    return len(msgs)


def _ours() -> list[bytes]:
    """Our rules, as the kernel dumps them (their bodies, ready to be sent back as deletes)."""
    found = []
    with _socket() as s:
        req = _FIB_RULE_HDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        done = False
        while not done:
            for kind, _seq, payload in _messages(s.recv(1 << 16)):
                if kind == NLMSG_DONE:
                    done = True
                    break
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise ApplyFailed(f"routing fence: cannot list rules: {os.strerror(-code)}")
                    continue
                if kind == RTM_NEWRULE and _is_ours(payload):
                    found.append(payload)
    return found


def _is_ours(payload: bytes) -> bool:
    off = _FIB_RULE_HDR.size
    while off + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, off)
        if length < 4:
            return False
        if kind & 0x3FFF == FRA_PROTOCOL and length >= 5:
            return payload[off + 4] == PROTOCOL
        off += (length + 3) & ~3
    return False


def lower_fence() -> int:
    """Remove every egressguard prohibit rule (a no-op when there is none). Returns how many."""
    bodies = _ours()
    if not bodies:
        return 0
    with _socket() as s:
        msgs = [
            _NLMSGHDR.pack(_NLMSGHDR.size + len(b), RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + b
            for seq, b in enumerate(bodies, start=1)
        ]
        s.sendmsg([b"".join(msgs)])
        _acks(s, len(msgs), "cannot remove prohibit rules")
    return len(bodies)


def fence_up() -> bool:
    return bool(_ours())


def describe(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
