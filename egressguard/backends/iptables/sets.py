"""Kernel address sets (ipset hash:net, netlink): create, fill, swap into place, read back, destroy."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator

from egressguard.errors import ApplyFailed, EnvironmentUnsupported
from egressguard.ruleset import SET_PREFIX, SET_STAGING_SUFFIX, AddressSet, canonical_members, member_key, parse_member

# Wire protocol (linux/netfilter/ipset/ip_set.h). We speak it directly rather than through
# pyroute2's IPSet: its attribute encoder costs ~0.2 ms per element (2.1 s to fill 10,000 CIDRs
# here, 0.46 s to list them) and `import pyroute2` ~0.28 s; batched by hand, the same fill takes
# a few ms and nothing is imported. bench/RESULTS.md has the measurement.
NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
PROTOCOL = 6  # IPSET_PROTOCOL_MIN: understood by every kernel with ipset over netlink
CMD_CREATE, CMD_DESTROY, CMD_RENAME, CMD_SWAP, CMD_LIST, CMD_ADD, CMD_TYPE = 2, 3, 5, 6, 7, 9, 13
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY = 1, 2, 3, 4, 5
ATTR_FLAGS, ATTR_DATA, ATTR_ADT, ATTR_LINENO, ATTR_PROTOCOL_MIN = 6, 7, 8, 9, 10
ATTR_SETNAME2 = ATTR_TYPENAME
DATA_IP, DATA_CIDR, DATA_TIMEOUT, DATA_HASHSIZE, DATA_MAXELEM, DATA_ELEMENTS = 1, 3, 6, 18, 19, 24
IPADDR_V4, IPADDR_V6 = 1, 2
FLAG_LIST_SETNAME, FLAG_LIST_HEADER = 1 << 1, 1 << 2
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
ERR_BUSY, ERR_EXIST_SETNAME2, ERR_REFERENCED = 4100, 4101, 4108
_IPSET_ERRORS = {
    4097: "ipset protocol error",
    4098: "set type not supported by the kernel",
    4099: "too many sets",
    ERR_BUSY: "set is in use by a rule",
    ERR_EXIST_SETNAME2: "second set does not exist",
    4102: "set types differ",
    4103: "element or set already exists",
    4104: "invalid prefix length",
    4106: "address family mismatch",
    ERR_REFERENCED: "set is referenced",
    4352: "set is full",
}
# One ADD message carries this many bytes of elements at most (ipset restore batches likewise).
_BATCH_BYTES = 32 * 1024
_RECV_BYTES = 1 << 20


class IpsetError(ApplyFailed):
    """The kernel refused an ipset request."""

    def __init__(self, what: str, code: int) -> None:
        self.code = code
        why = _IPSET_ERRORS.get(code) or os.strerror(code)
        super().__init__(f"ipset {what}: {why} (error {code})")


# ---------------------------------------------------------------------------------------------
# Attribute encoding


def _attr(kind: int, payload: bytes, flags: int = 0) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind | flags) + payload + b"\0" * (-length % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind, b"".join(parts), NLA_F_NESTED)


def _u8(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("B", value))


def _be32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value), NLA_F_NET_BYTEORDER)


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


# One hash:net element, DATA{IP{IPADDR_V4/V6 address}, CIDR prefix length}, by address size: its
# attribute headers (length, kind) as one struct with the address and prefix length.
_ELEMENT = {size: struct.Struct(f"=HHHHHH{size}sHHB3x") for size in (4, 16)}
_ELEMENT_HEAD = {
    size: (20 + size, ATTR_DATA | NLA_F_NESTED, 8 + size, DATA_IP | NLA_F_NESTED, 4 + size,
           (IPADDR_V6 if size == 16 else IPADDR_V4) | NLA_F_NET_BYTEORDER)
    for size in (4, 16)
}
_CIDR_HEAD = (5, DATA_CIDR | NLA_F_NET_BYTEORDER)
# The same element as bytes before the address, and after it for each prefix length.
_BEFORE = {size: struct.pack("=HHHHHH", *_ELEMENT_HEAD[size]) for size in (4, 16)}
_AFTER = tuple(struct.pack("=HHB3x", *_CIDR_HEAD, n) for n in range(129))


def _elements(members: Iterable[str]) -> Iterator[bytes]:
    """Each member (a network as text) as one element, the same bytes as nesting _attr()s, parsed
    and encoded inline from precomputed pieces: 10,000 in a few milliseconds."""
    pton, before, after, af4, af6 = socket.inet_pton, _BEFORE, _AFTER, socket.AF_INET, socket.AF_INET6
    for m in members:
        addr, _, plen = m.partition("/")
        af, size = (af6, 16) if ":" in addr else (af4, 4)
        yield before[size] + pton(af, addr) + after[int(plen) if plen else size * 8]


def _attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        yield kind & 0x3FFF, buf[off + 4 : off + length]
        off += (length + 3) & ~3


# ---------------------------------------------------------------------------------------------


class Ipsets:
    """A netlink connection to the ipset subsystem of the current network namespace."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.bind((0, 0))
        except OSError as exc:
            raise EnvironmentUnsupported(f"ipset netlink socket unavailable: {exc.strerror or exc}") from None
        self._seq = 0
        self._revision: dict[int, int] = {}

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Ipsets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    def _send(self, cmd: int, body: bytes, flags: int, family: int = 0) -> int:
        self._seq += 1
        payload = struct.pack("=BBH", family, 0, 0) + _u8(ATTR_PROTOCOL, PROTOCOL) + body
        header = struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_IPSET << 8) | cmd, flags, self._seq, 0)
        self._sock.send(header + payload)
        return self._seq

    def _request(self, what: str, cmd: int, body: bytes, family: int = 0) -> None:
        seq = self._send(cmd, body, NLM_F_REQUEST | NLM_F_ACK, family)
        for _ in self._replies(what, seq):
            pass

    def _dump(self, what: str, cmd: int, body: bytes) -> Iterator[bytes]:
        seq = self._send(cmd, body, NLM_F_REQUEST | NLM_F_DUMP)
        yield from self._replies(what, seq)

    def _replies(self, what: str, seq: int) -> Iterator[bytes]:
        """Attribute blocks of the replies to `seq`, until its ACK or end of dump."""
        while True:
            data = self._sock.recv(_RECV_BYTES)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    raise ApplyFailed(f"ipset {what}: malformed netlink reply")
                body = data[off + 16 : off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise IpsetError(what, code)
                    return
                if kind == NLMSG_DONE:
                    return
                yield body[4:]  # after the nfgenmsg header

    # -- operations -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every set in this namespace (names only)."""
        out = []
        for block in self._dump("list", CMD_LIST, _be32(ATTR_FLAGS, FLAG_LIST_SETNAME)):
            for kind, value in _attrs(block):
                if kind == ATTR_SETNAME:
                    out.append(value.rstrip(b"\0").decode())
        return sorted(set(out))

    def owned(self) -> list[str]:
        return [n for n in self.names() if n.startswith(SET_PREFIX)]

    def members(self, name: str) -> tuple[int, tuple[str, ...]] | None:
        """(family, sorted members) of set `name`, or None if there is no such set."""
        listed = self._keys(name)
        return None if listed is None else (listed[0], canonical_members(listed[1]))

    def holds(self, want: AddressSet) -> bool | None:
        """Whether set `want.name` holds exactly `want.members`, member by member, without
        printing the kernel's members as strings (10,000 of them: ~0.7 MB at apply's peak).
        None if there is no such set."""
        listed = self._keys(want.name)
        if listed is None:
            return None
        family, keys = listed
        if family != want.family or len(keys) != len(want.members):
            return False
        keys.sort()  # one family: the order of want.members (see canonical_members), no repeats
        return all(k == member_key(*parse_member(m)) for k, m in zip(keys, want.members, strict=False))

    def _keys(self, name: str) -> tuple[int, list[bytes]] | None:
        """(family, member keys in the kernel's order) of set `name`, or None if there is none."""
        family, found = 0, []
        try:
            for block in self._dump(f"list {name}", CMD_LIST, _str(ATTR_SETNAME, name)):
                for kind, value in _attrs(block):
                    if kind == ATTR_FAMILY:
                        family = {2: 4, 10: 6}.get(value[0], 0)
                    elif kind == ATTR_ADT:
                        found += [member_key(p, n) for p, n in _decode_elements(value)]
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        return family, found

    def count(self, name: str) -> int | None:
        """How many members set `name` holds (from its header: cheap), or None if there is none."""
        try:
            for block in self._dump(f"header {name}", CMD_LIST, _str(ATTR_SETNAME, name) + _be32(ATTR_FLAGS, FLAG_LIST_HEADER)):
                for kind, value in _attrs(block):
                    if kind == ATTR_DATA:
                        for k, v in _attrs(value):
                            if k == DATA_ELEMENTS:
                                return int(struct.unpack(">I", v[:4])[0])
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        return None

    def revision(self, family: int) -> int:
        """The newest hash:net revision this kernel offers (create needs one it knows)."""
        if family not in self._revision:
            body = _str(ATTR_TYPENAME, "hash:net") + _u8(ATTR_FAMILY, NFPROTO[family])
            seq = self._send(CMD_TYPE, body, NLM_F_REQUEST | NLM_F_ACK)
            rev = 0
            for block in self._replies("type hash:net", seq):
                for kind, value in _attrs(block):
                    if kind == ATTR_REVISION:
                        rev = value[0]
            self._revision[family] = rev
        return self._revision[family]

    def create(self, name: str, family: int, size: int, timeout: int | None = None) -> None:
        """A hash:net set; with `timeout` (seconds, its default), one whose members each expire."""
        hashsize = 64
        while hashsize < size // 2 and hashsize < 1 << 20:
            hashsize *= 2
        data = _nest(ATTR_DATA, _be32(DATA_HASHSIZE, hashsize), _be32(DATA_MAXELEM, max(65536, size)),
                     *([_be32(DATA_TIMEOUT, timeout)] if timeout is not None else []))
        body = (
            _str(ATTR_SETNAME, name)
            + _str(ATTR_TYPENAME, "hash:net")
            + _u8(ATTR_REVISION, self.revision(family))
            + _u8(ATTR_FAMILY, NFPROTO[family])
            + data
        )
        self._request(f"create {name}", CMD_CREATE, body, NFPROTO[family])

    def add(self, name: str, members: Iterable[str]) -> None:
        """Add members in batches (one netlink message per ~32 KiB of elements)."""
        head = _str(ATTR_SETNAME, name) + _be32(ATTR_LINENO, 0)
        batch: list[bytes] = []
        size = 0
        for e in _elements(members):
            batch.append(e)
            size += len(e)
            if size >= _BATCH_BYTES:
                self._request(f"add to {name}", CMD_ADD, head + _nest(ATTR_ADT, *batch))
                batch, size = [], 0
        if batch:
            self._request(f"add to {name}", CMD_ADD, head + _nest(ATTR_ADT, *batch))

    def add_timed(self, name: str, members: Iterable[tuple[str, int]]) -> None:
        """Add (address, seconds) members to a set created with a timeout, in one message; a member
        already there takes the new timeout (no NLM_F_EXCL: ipset's `-exist`)."""
        elements = []
        for addr, ttl in members:
            v6 = ":" in addr
            packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr)
            ip = _nest(DATA_IP, _attr((IPADDR_V6 if v6 else IPADDR_V4) | NLA_F_NET_BYTEORDER, packed))
            elements.append(_nest(ATTR_DATA, ip, _be32(DATA_TIMEOUT, ttl)))  # no CIDR: the address alone
        if elements:
            self._request(f"add to {name}", CMD_ADD,
                          _str(ATTR_SETNAME, name) + _be32(ATTR_LINENO, 0) + _nest(ATTR_ADT, *elements))

    def timed(self, name: str) -> tuple[int, str, bool, list[tuple[str, int]]] | None:
        """(family, type name, has a default timeout, [(member, seconds left)]) of set `name`, or
        None if there is none: what a learned-address set (dns.mode proxy) holds now."""
        family, typename, timeout, found = 0, "", False, []
        try:
            for block in self._dump(f"list {name}", CMD_LIST, _str(ATTR_SETNAME, name)):
                for kind, value in _attrs(block):
                    if kind == ATTR_FAMILY:
                        family = {2: 4, 10: 6}.get(value[0], 0)
                    elif kind == ATTR_TYPENAME:
                        typename = value.rstrip(b"\0").decode()
                    elif kind == ATTR_DATA:
                        timeout = timeout or any(k == DATA_TIMEOUT for k, _v in _attrs(value))
                    elif kind == ATTR_ADT:
                        for k, data in _attrs(value):
                            if k == ATTR_DATA:
                                addr, plen = _decode_element(data)
                                left = next((int(struct.unpack(">I", v[:4])[0]) for kk, v in _attrs(data)
                                             if kk == DATA_TIMEOUT), 0)
                                member = canonical_members([member_key(addr, plen)])[0]
                                found.append((member.removesuffix("/128" if ":" in member else "/32"), left))
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        return family, typename, timeout, found

    def swap(self, a: str, b: str) -> None:
        self._request(f"swap {a} {b}", CMD_SWAP, _str(ATTR_SETNAME, a) + _str(ATTR_SETNAME2, b))

    def rename(self, old: str, new: str) -> None:
        self._request(f"rename {old} {new}", CMD_RENAME, _str(ATTR_SETNAME, old) + _str(ATTR_SETNAME2, new))

    def destroy(self, name: str) -> None:
        self._request(f"destroy {name}", CMD_DESTROY, _str(ATTR_SETNAME, name))

    # -- what egressguard does with them ----------------------------------------------------

    def ensure(self, want: AddressSet) -> None:
        """Make set `want.name` hold exactly `want.members`, without it ever being empty or partial.

        A set already holding the right members is left alone (re-applying a large list costs
        nothing). Otherwise the members go into a staging set, which then takes the final name:
        by rename if there is none yet, by an atomic swap if there is (a set whose name says
        it holds these members but does not: a crash or tampering).
        """
        have = self.holds(want)
        if have:
            return
        staging = want.name + SET_STAGING_SUFFIX
        if self.count(staging) is not None:
            self.destroy(staging)  # left over from an interrupted apply
        self.create(staging, want.family, len(want.members))
        try:
            self.add(staging, want.members)
            if have is None:
                self.rename(staging, want.name)
            else:
                self.swap(staging, want.name)
                self.destroy(staging)
        except BaseException:
            try:
                self.destroy(staging)
            except ApplyFailed:
                pass
            raise

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Destroy owned sets not in `keep`; return those a rule still references (left in place)."""
        keep = set(keep)
        busy = []
        for name in self.owned():
            if name in keep:
                continue
            try:
                self.destroy(name)
            except IpsetError as exc:
                if exc.code in (ERR_BUSY, ERR_REFERENCED, errno.EBUSY):
                    busy.append(name)
                elif exc.code != errno.ENOENT:
                    raise
        return busy


_KIND = 0x3FFF  # an attribute kind without its flags
# What the kernel lists for a hash:net element, by the length of its DATA attribute: the lengths and
# kinds (without flags) of DATA, IP, the address and CIDR; then the address and the prefix length.
_LISTED = {
    20 + size: (
        _ELEMENT[size],
        (20 + size, ATTR_DATA, 8 + size, DATA_IP, 4 + size, IPADDR_V6 if size == 16 else IPADDR_V4, 5, DATA_CIDR),
    )
    for size in (4, 16)
}


def _decode_elements(adt: bytes) -> list[tuple[bytes, int]]:
    """(address, prefix length) of every element in an ADT attribute. Elements all shaped as
    hash:net lists them are unpacked by one struct; anything else takes the attribute walk."""
    listed = _LISTED.get(struct.unpack_from("=H", adt)[0]) if len(adt) >= 4 else None  # by the first one's length
    if listed is not None and len(adt) % listed[0].size == 0:
        layout, head = listed
        out = []
        for l1, k1, l2, k2, l3, k3, addr, l4, k4, plen in layout.iter_unpack(adt):
            if (l1, k1 & _KIND, l2, k2 & _KIND, l3, k3 & _KIND, l4, k4 & _KIND) != head:
                break
            out.append((addr, plen))
        else:
            return out
    return [_decode_element(d) for k, d in _attrs(adt) if k == ATTR_DATA]


def _decode_element(data: bytes) -> tuple[bytes, int]:
    """One element by the attribute walk (_decode_elements unpacks the regular ones at once)."""
    addr, cidr = b"", None
    for kind, value in _attrs(data):
        if kind == DATA_IP:
            for _k, raw in _attrs(value):
                addr = raw
        elif kind == DATA_CIDR:
            cidr = value[0]
    return addr, cidr if cidr is not None else len(addr) * 8
