"""A rule's header tests (ruleset.HeaderTest: bit ranges from the network header) as iptables u32
matches and as nft raw payload matches (@nh,offset,length), read back from either, and one normal
form: nft merges adjacent payload matches and rewrites a nibble as a masked byte, so a read-back
is compared as the bit ranges it constrains, not as text. Shared by both back ends."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from egressguard.errors import ApplyFailed
from egressguard.ruleset import HeaderTest as Test

U32_MAX_TESTS = 10  # tests one u32 match holds (xt_u32's U32_MAXSIZE)

_LOCATION = re.compile(r"^(0x[0-9a-fA-F]+|\d+)(?:>>(0x[0-9a-fA-F]+|\d+))?(?:&(0x[0-9a-fA-F]+|\d+))?$")


class UnsupportedU32(ApplyFailed):
    """A u32 test nft's raw payload matches cannot mean (exit 4)."""


def parse(text: str) -> list[Test]:
    """`0x0>>0x18&0xf=0x6:0xf&&0x4>>0x10=0x34` -> [(4, 4, ((6, 15),)), (32, 16, ((52, 52),))]."""
    tests = []
    for part in text.split("&&"):
        where, _, values = part.partition("=")
        m = _LOCATION.match(where.strip())
        if not m or not values:
            raise UnsupportedU32(f"u32 test {part!r}: only OFFSET[>>SHIFT][&MASK]=VALUES is expressible")
        off, shift = int(m.group(1), 0), int(m.group(2) or "0", 0)
        width = 32 - shift
        if m.group(3):
            mask = int(m.group(3), 0)
            if mask & (mask + 1) or mask.bit_length() > width:  # not 2^w - 1 within what the shift left
                raise UnsupportedU32(f"u32 test {part!r}: mask {m.group(3)} is not a run of low bits")
            width = mask.bit_length()
        ranges = []
        for v in values.split(","):
            lo, _, hi = v.partition(":")
            ranges.append((int(lo, 0), int(hi or lo, 0)))
        tests.append((off * 8 + 32 - shift - width, width, tuple(ranges)))
    return tests


def u32_text(test: Test) -> str:
    """One test as ip6tables-save prints it (hex): the 32-bit word holding its bits, shifted down
    to them and masked where bits above them remain: (4, 4, ((6, 15),)) -> `0x0>>0x18&0xf=0x6:0xf`."""
    bit, width, ranges = test
    word, inner = bit // 32 * 4, bit % 32
    if inner + width > 32:
        raise UnsupportedU32(f"header test at bit {bit}, {width} bits: crosses a 32-bit word")
    shift = 32 - inner - width
    where = hex(word) + (f">>{hex(shift)}" if shift else "") + (f"&{hex((1 << width) - 1)}" if inner else "")
    return where + "=" + ",".join(hex(lo) if lo == hi else f"{hex(lo)}:{hex(hi)}" for lo, hi in ranges)


def u32_matches(tests: Sequence[Test]) -> tuple[str, ...]:
    """The tests as `--u32` arguments, in order, at most U32_MAX_TESTS to a match."""
    return tuple("&&".join(u32_text(t) for t in tests[i:i + U32_MAX_TESTS]) for i in range(0, len(tests), U32_MAX_TESTS))


def nft_text(tests: Iterable[Test]) -> list[str]:
    out = []
    for bit, width, ranges in tests:
        vals = [hex(lo) if lo == hi else f"{hex(lo)}-{hex(hi)}" for lo, hi in ranges]
        out.append(f"@nh,{bit},{width} " + (vals[0] if len(vals) == 1 else "{ " + ", ".join(vals) + " }"))
    return out


def normal(tests: Iterable[Test]) -> tuple[Test, ...]:
    """Constraints, sorted: byte-aligned single values are taken apart into bytes and put back
    together as maximal runs of adjacent bytes (so merged and unmerged spellings agree); anything
    else stays one constraint. Two values for one byte (nothing matches) stay visible, byte by byte."""
    found: set[Test] = set()
    byte_values: dict[int, set[int]] = {}
    for bit, width, ranges in tests:
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and bit % 8 == 0 and width % 8 == 0:
            value, n = ranges[0][0], width // 8
            for i in range(n):
                byte_values.setdefault(bit // 8 + i, set()).add((value >> (8 * (n - 1 - i))) & 0xFF)
        else:
            found.add((bit, width, tuple(sorted(ranges))))
    run: list[int] = []
    for at in [*sorted(byte_values), -2]:
        if run and at != run[-1] + 1:
            vals = [byte_values[b] for b in run]
            if all(len(v) == 1 for v in vals):
                value = int.from_bytes(bytes(next(iter(v)) for v in vals), "big")
                found.add((run[0] * 8, len(run) * 8, ((value, value),)))
            else:
                found.update((b * 8, 8, ((x, x),)) for b in run for x in byte_values[b])
            run = []
        if at >= 0:
            run.append(at)
    return tuple(sorted(found))


# Network-header fields nft names when it lists a raw match that covers exactly one of them.
NAMED = {("ip", "version"): (0, 4), ("ip", "hdrlength"): (4, 4), ("ip6", "version"): (0, 4),
         ("ip6", "length"): (32, 16), ("ip6", "nexthdr"): (48, 8)}


def is_raw(left: Any) -> bool:
    if not isinstance(left, dict):
        return False
    if "&" in left:
        return True
    p = left.get("payload", {})
    return p.get("base") == "nh" or (p.get("protocol"), p.get("field")) in NAMED


def from_json(left: dict[str, Any], op: str, right: Any) -> Test | None:
    """One listed raw payload match (possibly masked) as a Test; None if it is not one."""
    if op not in ("==", "in"):
        return None
    mask = None
    if "&" in left:
        inner, mask = left["&"]
        left = inner
    p = left.get("payload", {})
    if (p.get("protocol"), p.get("field")) in NAMED:
        bit, width = NAMED[(p["protocol"], p["field"])]
    elif p.get("base") == "nh":
        bit, width = int(p["offset"]), int(p["len"])
    else:
        return None
    if mask is not None:
        mask = int(mask, 0) if isinstance(mask, str) else int(mask)
        if mask & (mask + 1):
            return None
        bit, width = bit + width - mask.bit_length(), mask.bit_length()
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    ranges = []
    for it in items:
        if isinstance(it, dict) and "range" in it:
            ranges.append((_int(it["range"][0]), _int(it["range"][1])))
        else:
            ranges.append((_int(it), _int(it)))
    return bit, width, tuple(sorted(ranges))


def _int(v: Any) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)
