"""The x_tables entries the kernel holds, read with IPT_SO_GET_ENTRIES / IP6T_SO_GET_ENTRIES and decoded field by field.

Hand-written, not python-iptables or iptables-save: python-iptables decodes through the same code that
wrote the 0x01 interface masks (issue 9) and iptables-save prints `-o lo` whatever the mask holds.
Layouts (x86-64 and every other Linux ABI with 8-byte-aligned u64), from the kernel's uapi headers
netfilter_ipv4/ip_tables.h, netfilter_ipv6/ip6_tables.h and netfilter/x_tables.h, offsets checked
with offsetof(): ipt_entry 112 bytes (ipt_ip 84, nfcache 84, target_offset 88, next_offset 90,
comefrom 92, counters 96); ip6t_entry 168 (ip6t_ip6 136, nfcache 136, target_offset 140,
next_offset 142, comefrom 144, counters 152); ipt_getinfo 84; ipt_get_entries 40 (entries 8-aligned);
xt_entry_match / xt_entry_target 32 (u16 size, name[29], u8 revision); xt_standard_target 40;
xt_error_target 64.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

SOL_IP, SOL_IPV6 = 0, 41
SO_GET_INFO, SO_GET_ENTRIES = 64, 65  # IPT_BASE_CTL and IP6T_BASE_CTL are both 64
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
EXT_HEADER = 32  # xt_entry_match / xt_entry_target: u16 size, char name[29], u8 revision
_GETINFO = struct.Struct("=32sI5I5III")
_GET_ENTRIES_HEADER = 40
# -NF_x - 1 for the kernel's verdicts; RETURN is XT_RETURN = -NF_REPEAT - 1
VERDICTS = {-1: "DROP", -2: "ACCEPT", -3: "STOLEN", -4: "QUEUE", -5: "RETURN"}

# (field, offset, length); bytes fields are compared as bytes, ints as little-endian host order
_IPV4_HEADER = (
    ("src", 0, 4), ("dst", 4, 4), ("smsk", 8, 4), ("dmsk", 12, 4),
    ("iniface", 16, 16), ("outiface", 32, 16), ("iniface_mask", 48, 16), ("outiface_mask", 64, 16),
    ("proto", 80, 2), ("flags", 82, 1), ("invflags", 83, 1),
)
_IPV6_HEADER = (
    ("src", 0, 16), ("dst", 16, 16), ("smsk", 32, 16), ("dmsk", 48, 16),
    ("iniface", 64, 16), ("outiface", 80, 16), ("iniface_mask", 96, 16), ("outiface_mask", 112, 16),
    ("proto", 128, 2), ("tos", 130, 1), ("flags", 131, 1), ("invflags", 132, 1),
)
# entry size, offset of target_offset (next_offset follows it)
_ENTRY = {4: (112, 88), 6: (168, 140)}


@dataclass(frozen=True)
class Ext:
    """One match or target: its name, revision and data (everything after the 32-byte header)."""

    name: str
    revision: int
    data: bytes


# What is left out of the comparison, and why: counters (traffic), comefrom (the kernel's scratch
# field), target_offset/next_offset (follow from the sizes of the parts, which are compared through
# the data lengths), nfcache (no kernel reads it) and a standard target's verdict (an offset into
# this very blob: replaced by the verdict or chain name). Nothing inside a match's or target's data
# is masked: the kernel zeroes what it keeps private (beyond the extension's usersize) when it copies
# entries out, and no extension egressguard uses has such a part; one that has shows as a difference
# (exit 5), never as a silent pass. A `set` match's index is compared as is: the encoder looks it
# up by name in the same namespace, so a rule must refer to the set that now bears that name.


@dataclass(frozen=True)
class Entry:
    """One rule as the kernel holds it, minus counters, comefrom, nfcache and offsets.
    A standard target (verdict or jump) is Ext(verdict or chain name, 0, b"")."""

    header: tuple[tuple[str, bytes | int], ...]  # the ipt_ip / ip6t_ip6 fields, in struct order
    matches: tuple[Ext, ...]
    target: Ext

    def differences(self, other: Entry, labels: tuple[str, str] = ("kernel", "expected")) -> list[str]:
        """`FIELD differs (kernel SELF, expected OTHER)` for each field where self and other differ."""
        mine_l, theirs_l = labels
        out = []
        for (name, mine), (_, theirs) in zip(self.header, other.header, strict=True):
            if mine != theirs:
                out.append(f"{name} differs ({mine_l} {_show(mine)}, {theirs_l} {_show(theirs)})")
        mine_m = [m.name for m in self.matches]
        theirs_m = [m.name for m in other.matches]
        if mine_m != theirs_m:
            out.append(f"matches differ ({mine_l} {mine_m}, {theirs_l} {theirs_m})")
        else:
            for a, b in zip(self.matches, other.matches, strict=True):
                out += [f"match {a.name} {d}" for d in _ext_differences(a, b, labels)]
        out += [f"target {d}" for d in _ext_differences(self.target, other.target, labels, "name")]
        return out


def _ext_differences(a: Ext, b: Ext, labels: tuple[str, str], *fields: str) -> list[str]:
    mine_l, theirs_l = labels
    out = []
    for f in (*fields, "revision"):
        x, y = getattr(a, f), getattr(b, f)
        if x != y:
            out.append(f"{f} differs ({mine_l} {_show(x)}, {theirs_l} {_show(y)})")
    if a.data != b.data:
        at = next((i for i, (x, y) in enumerate(zip(a.data, b.data, strict=False)) if x != y), min(len(a.data), len(b.data)))
        start = at - at % 8
        out.append(f"data differs from byte {at} ({mine_l} {len(a.data)} bytes {_show(a.data[start:])}, "
                   f"{theirs_l} {len(b.data)} bytes {_show(b.data[start:])})")
    return out


def _show(value: bytes | int | str) -> str:
    if isinstance(value, bytes):
        text = value.hex()
        return text if len(text) <= 64 else text[:64] + "…"
    return str(value)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def parse_entry(family: int, buf: bytes) -> tuple[Entry, int]:
    """The entry at the start of `buf` (verdicts still raw: target Ext("", 0, verdict bytes) for a
    standard target), and its next_offset."""
    size, at = _ENTRY[family]
    target_offset, next_offset = struct.unpack_from("=HH", buf, at)
    if not size <= target_offset < next_offset <= len(buf):
        raise ValueError(f"malformed x_tables entry (target_offset {target_offset}, next_offset {next_offset})")
    header = tuple(
        (name, buf[off:off + n] if n > 2 else int.from_bytes(buf[off:off + n], "little"))
        for name, off, n in (_IPV6_HEADER if family == 6 else _IPV4_HEADER)
    )
    matches = []
    pos = size
    while pos < target_offset:
        ext, ext_size = _parse_ext(buf, pos, target_offset)
        matches.append(ext)
        pos += ext_size
    target, _ = _parse_ext(buf, target_offset, next_offset)
    return Entry(header, tuple(matches), target), next_offset


def _parse_ext(buf: bytes, pos: int, end: int) -> tuple[Ext, int]:
    (ext_size,) = struct.unpack_from("=H", buf, pos)
    if ext_size < EXT_HEADER or pos + ext_size > end:
        raise ValueError(f"malformed x_tables match/target (size {ext_size} at {pos})")
    return Ext(_cstr(buf[pos + 2:pos + 31]), buf[pos + 31], bytes(buf[pos + EXT_HEADER:pos + ext_size])), ext_size


def standard_target(ext: Ext) -> int | None:
    """The verdict of a standard target (name ""), else None."""
    if ext.name != "" or len(ext.data) < 4:
        return None
    return int.from_bytes(ext.data[:4], "little", signed=True)


def read_blob(family: int, table: str, attempts: int = 5) -> tuple[tuple[int, ...], tuple[int, ...], int, bytes]:
    """(hook_entry, underflow, valid_hooks, entries) of `table`, straight from the kernel."""
    level = SOL_IPV6 if family == 6 else SOL_IP
    libc = ctypes.CDLL(None, use_errno=True)
    with socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for _ in range(attempts):
            info = ctypes.create_string_buffer(_GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0), _GETINFO.size)
            length = ctypes.c_uint(_GETINFO.size)
            if libc.getsockopt(sock.fileno(), level, SO_GET_INFO, info, ctypes.byref(length)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{'IP6T' if family == 6 else 'IPT'}_SO_GET_INFO {table}: {os.strerror(err)}")
            fields = _GETINFO.unpack(info.raw)
            valid_hooks, hook_entry, underflow, size = fields[1], fields[2:7], fields[7:12], fields[13]
            req = ctypes.create_string_buffer(_GET_ENTRIES_HEADER + size)
            ctypes.memmove(req, struct.pack("=32sI", table.encode(), size), 36)
            length = ctypes.c_uint(_GET_ENTRIES_HEADER + size)
            if libc.getsockopt(sock.fileno(), level, SO_GET_ENTRIES, req, ctypes.byref(length)) == 0:
                return hook_entry, underflow, valid_hooks, req.raw[_GET_ENTRIES_HEADER:]
            err = ctypes.get_errno()
            if err != errno.EAGAIN:  # EAGAIN: a commit changed the size between the two calls
                raise OSError(err, f"{'IP6T' if family == 6 else 'IPT'}_SO_GET_ENTRIES {table}: {os.strerror(err)}")
    raise OSError(errno.EAGAIN, f"{table}: table kept changing while being read")


def read_chains(family: int, table: str) -> dict[str, list[Entry]]:
    """Every chain of `table` (built-in ones without their policy entry, user ones without their
    head and tail entries) as decoded entries, jumps named by the chain they lead to."""
    hook_entry, underflow, valid_hooks, blob = read_blob(family, table)
    return decode_table(family, blob, hook_entry, underflow, valid_hooks)


def decode_table(
    family: int, blob: bytes, hook_entry: tuple[int, ...], underflow: tuple[int, ...], valid_hooks: int
) -> dict[str, list[Entry]]:
    parsed: list[tuple[int, Entry]] = []
    pos = 0
    while pos < len(blob):
        entry, step = parse_entry(family, blob[pos:])
        parsed.append((pos, entry))
        pos += step
    starts = {hook_entry[h]: HOOKS[h] for h in range(len(HOOKS)) if valid_hooks >> h & 1}
    policies = {underflow[h] for h in range(len(HOOKS)) if valid_hooks >> h & 1}
    # A jump's verdict is the offset of the chain's first entry: the one after its ERROR head.
    first_of: dict[int, str] = {}
    for i, (_off, entry) in enumerate(parsed):
        if entry.target.name == "ERROR" and i + 1 < len(parsed):
            first_of[parsed[i + 1][0]] = _cstr(entry.target.data)
    chains: dict[str, list[Entry]] = {}
    current: list[Entry] | None = None
    user_chain = False
    for i, (off, entry) in enumerate(parsed):
        if off in starts:
            current, user_chain = chains.setdefault(starts[off], []), False
        if entry.target.name == "ERROR":
            if user_chain and current:
                current.pop()  # libiptc ends every user chain with an unconditional RETURN: not a rule
            name = _cstr(entry.target.data)
            current, user_chain = (chains.setdefault(name, []), True) if name != "ERROR" else (None, False)
            continue
        if off in policies:
            current = None  # a built-in chain's policy: not a rule
            continue
        if current is None:
            continue
        verdict = standard_target(entry.target)
        if verdict is not None:
            nxt = parsed[i + 1][0] if i + 1 < len(parsed) else -1
            if verdict < 0:
                name = VERDICTS.get(verdict, f"verdict {verdict}")
            elif verdict == nxt:
                name = ""  # fall through: no -j (libiptc's IPTC_LABEL_FALLTHROUGH)
            else:
                name = first_of.get(verdict, f"offset {verdict}")
            entry = Entry(entry.header, entry.matches, Ext(name, entry.target.revision, b""))
        current.append(entry)
    return chains
