"""Read-back: `list table inet egressguard` (JSON) -> the Rules, chains and sets the Ruleset holds."""

from __future__ import annotations

import bisect
import ipaddress
import json
import operator
import re
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from egressguard.backends import ANY_USER, Installed, InstalledTable, LearnedHolding, u32
from egressguard.backends.nftables import transport
from egressguard.backends.nftables.render import (
    BASE,
    CT_STATES,
    ICMP6_NAMES,
    KERNEL_PREFIX,
    REJECT,
    Existing,
    bounds,
    chain_name,
    merge,
    networks,
    set_flags,
)
from egressguard.ruleset import (
    CONFINED,
    DISPATCH,
    FAMILIES,
    LIMIT_PERIOD_MS,
    OWNED_CHAINS,
    REDIRECT,
    SET_PREFIX,
    AddressSet,
    Chain,
    Family,
    Rule,
    owned_chains,
    refuse_chain,
)

_WORD_FAMILY = {"ipv4": 4, "ipv6": 6}
_ICMP6_NUMBER = {v: k for k, v in ICMP6_NAMES.items()}
_REJECT_BACK = {(text, family): name for (name, family), text in REJECT.items()}
_KERNEL_CHAIN = re.compile(rf"^(nat)?{KERNEL_PREFIX}[46]-(\d+|(?P<shared>{SET_PREFIX}[a-z0-9-]+))$")
_REFUSE_CHAIN = re.compile(r"^refuse([46])-(0|[1-9]\d*)$")
_SET_ELEM_KEY, _SET_ELEM_FLAGS, _SET_ELEM_USERDATA, _DATA_VALUE = 1, 3, 6, 1  # NFTA_SET_ELEM_*, NFTA_DATA_VALUE


def _refuse_chains(names: Sequence[str], family: Family) -> list[str]:
    """The Ruleset's names (EGRESSGUARD-REFUSE-n) of the family's refusal chains among nft `names`."""
    return [refuse_chain(int(m[2])) for n in names if (m := _REFUSE_CHAIN.match(n)) and int(m[1]) == family]


_USER_RETURN = [{"match": {"op": "==", "left": {"meta": {"key": "skuid"}},
                           "right": {"range": [0, int(ANY_USER.split("-")[1])]}}}, {"return": None}]


def objects_by_kind(objs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"table": [], "chain": [], "set": [], "rule": []}
    for o in objs:
        for kind, body in o.items():
            out.setdefault(kind, []).append(body)
    return out


def existing(objs: Sequence[dict[str, Any]]) -> Existing:
    """Names in our table, and which base chains no longer have our spec (re-created on commit)."""
    k = objects_by_kind(objs)
    stale = tuple(c["name"] for c in k["chain"] if c["name"] in BASE and _base_problem(c))
    return Existing(
        table=bool(k["table"]),
        chains=tuple(c["name"] for c in k["chain"]),
        sets=tuple(s["name"] for s in k["set"]),
        stale_base_chains=stale,
    )


def _base_problem(c: dict[str, Any]) -> str | None:
    typ, hook, prio = BASE[c["name"]]
    got = (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"))
    if got != (typ, hook, prio, "accept"):
        return (f"base chain {c['name']}: type {got[0]} hook {got[1]} priority {got[2]} policy {got[3]}, "
                f"expected type {typ} hook {hook} priority {prio} policy accept")
    return None


def installed(objs: Sequence[dict[str, Any]], expect: Sequence[AddressSet] = (),
              dumped: Mapping[str, Sequence[bytes]] | None = None) -> Installed:
    """What our table holds, in the Ruleset's terms: per (family, filter|nat) the Ruleset's chain
    names, each rule decoded, jump positions among the base chain's rules for that family.
    `dumped`: interval sets' elements as their netlink dumps (else the listing's `elem`)."""
    k = objects_by_kind(objs)
    present = bool(k["table"])
    chains = {c["name"]: c for c in k["chain"]}
    rules: dict[str, list[dict[str, Any]]] = {name: [] for name in chains}
    for r in k["rule"]:
        rules.setdefault(r["chain"], []).append(r)
    problems: list[str] = []
    known = set(BASE)
    for f in FAMILIES:
        for table, owned in OWNED_CHAINS.items():
            known |= {chain_name(f, table, c) for c in owned}
    problems += [f"unexpected chain {name}" for name in chains
                 if name not in known and not _KERNEL_CHAIN.match(name) and not _REFUSE_CHAIN.match(name)]
    for name in BASE:
        if name in chains and (p := _base_problem(chains[name])):
            problems.append(p)
    tables: list[InstalledTable] = []
    for family in FAMILIES:
        for table, owned in OWNED_CHAINS.items():
            if not present or table not in chains:
                tables.append(InstalledTable(family, table, present=False, jump_positions=(), chains=()))
                continue
            mine = [r for r in rules[table] if _applies_to(r, family)]
            first = chain_name(family, table, DISPATCH)
            jumps = tuple(i for i, r in enumerate(mine) if _is_our_jump(r, family, first))
            got_chains, counters = [], {}
            ours = owned_chains(table, [*owned, *_refuse_chains(list(chains), family)])
            for cname in ours:
                nft_name = chain_name(family, table, cname)
                if nft_name in chains:
                    got_chains.append(Chain(cname, tuple(decode_rule(r, family, table, rules) for r in rules[nft_name])))
                    counters[cname] = tuple(_counter(r) for r in rules[nft_name])
            tables.append(InstalledTable(
                family, table, present=True, jump_positions=jumps, chains=tuple(got_chains), counters=counters,
                foreign_output_rules=len(mine) - len(jumps),
                problems=tuple(problems) if (family, table) == (4, "filter") else (),
            ))
    dumped = dumped or {}
    learned = [s for s in k["set"] if s.get("flags") == ["timeout"]]
    return Installed(tables=tuple(tables), sets=tuple(_sets([s for s in k["set"] if s not in learned], expect, dumped)),
                     learned_sets=tuple(_learned(learned)))


def _learned(found: list[dict[str, Any]]) -> list[LearnedHolding]:
    """Sets with per-element timeouts (dns.mode proxy): each with what it holds and for how long."""
    out = []
    for s in found:
        family: Family = 6 if s.get("type") == "ipv6_addr" else 4
        elems = []
        for e in s.get("elem", []):
            body = e.get("elem", {}) if isinstance(e, dict) else {}
            if isinstance(body.get("val"), str):
                elems.append((body["val"], int(body.get("timeout", 0)), int(body.get("expires", 0))))
        out.append(LearnedHolding(name=s["name"], family=family, type=str(s.get("type")), elements=tuple(elems)))
    return out


def _applies_to(r: dict[str, Any], family: Family) -> bool:
    """False for a rule that matches only the other family (meta nfproto)."""
    for e in r.get("expr", []):
        m = e.get("match")
        if m and m.get("left") == {"meta": {"key": "nfproto"}} and m.get("op") == "==":
            return bool(_WORD_FAMILY.get(m.get("right")) == family)
    return True


def _is_our_jump(r: dict[str, Any], family: Family, target: str) -> bool:
    word = "ipv4" if family == 4 else "ipv6"
    exprs = [e for e in r.get("expr", []) if "counter" not in e]
    return r.get("comment") == "egressguard" and exprs == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": word}},
        {"jump": {"target": target}},
    ]


def _counter(r: dict[str, Any]) -> tuple[int, int]:
    for e in r.get("expr", []):
        if "counter" in e:
            return int(e["counter"].get("packets", 0)), int(e["counter"].get("bytes", 0))
    return 0, 0


def _addr(value: Any) -> str | None:
    """An address or prefix from JSON, as the Ruleset writes it (network/len)."""
    if isinstance(value, str):
        return str(ipaddress.ip_network(value))
    if isinstance(value, dict) and "prefix" in value:
        p = value["prefix"]
        return str(ipaddress.ip_network(f"{p['addr']}/{p['len']}"))
    raise ValueError(value)


def decode_rule(r: dict[str, Any], family: Family, table: str,
                chains: dict[str, list[dict[str, Any]]] | None = None) -> Rule:
    """One listed rule back into a Rule; anything unexpected makes it differ from every plan.
    `chains`: every chain's rules, to follow a jump to a socketless rule's own chain."""
    ip = "ip" if family == 4 else "ip6"
    f: dict[str, Any] = {"target": "", "comment": r.get("comment", "")}
    unknown: list[str] = []
    proto_implied: str | None = None
    exprs = list(r.get("expr", []))
    last = exprs[-1] if exprs else {}
    kernel_chain = _KERNEL_CHAIN.match(str(last["jump"].get("target"))) if "jump" in last else None
    if kernel_chain:
        body = (chains or {}).get(last["jump"]["target"])
        exprs.pop()
        if body is None or len(body) != 2 or body[0].get("expr") != _USER_RETURN:
            unknown.append(f"jump {last['jump']['target']} (not a socketless rule's chain)")
        else:
            f["socketless"] = True
            if kernel_chain["shared"]:
                f["limit_name"] = kernel_chain["shared"]
            exprs += [{"kernel": True}, *body[1].get("expr", [])]
    kernel = False
    for e in exprs:
        if e == {"kernel": True}:
            kernel = True
            continue
        if kernel and "accept" in e and not f["target"]:
            f["target"] = "RETURN"
            continue
        if kernel and "counter" not in e and "limit" not in e and "mangle" not in e and not _is_verdict(e):
            unknown.append("in the socketless chain: " + json.dumps(e, sort_keys=True))
            continue
        try:
            if not _decode_expr(e, f, family, table, ip, unknown):
                unknown.append(json.dumps(e, sort_keys=True))
        except (ValueError, KeyError, TypeError, AttributeError):
            unknown.append(json.dumps(e, sort_keys=True))
        proto_implied = f.pop("_implied", None) or proto_implied
    if "_u32" in f:
        f["header"] = u32.normal(f.pop("_u32"))
    # `tcp dport`, `icmpv6 type`, `reject with tcp reset` make nft drop the `meta l4proto` it implies
    if f.get("protocol") is None and proto_implied:
        f["protocol"] = proto_implied
    if not f["target"]:
        unknown.append("no verdict")
    if unknown:
        f["comment"] += " <unexpected: " + "; ".join(unknown) + ">"
    return Rule(**f)


def _is_verdict(e: dict[str, Any]) -> bool:
    return bool({"return", "drop", "reject", "accept", "jump", "goto", "redirect", "queue", "log"} & set(e))


def _decode_expr(e: dict[str, Any], f: dict[str, Any], family: Family, table: str, ip: str, unknown: list[str]) -> bool:
    if "counter" in e:
        return True
    if "limit" in e:
        lim = e["limit"]
        if set(lim) - {"rate", "burst", "per"} or lim.get("per") not in LIMIT_PERIOD_MS:
            return False
        _put(f, "limit_burst", int(lim.get("burst", 5)))
        return _put(f, "limit", (int(lim["rate"]), str(lim["per"])))
    if "match" in e:
        m = e["match"]
        left, op, right = m["left"], m["op"], m["right"]
        raw = u32.from_json(left, op, right) if u32.is_raw(left) else None
        if raw is not None:
            f.setdefault("_u32", []).append(raw)
            return True
        if "fib" in left:
            fib = left["fib"]
            word = {("saddr",): "src_local", ("daddr",): "dst_local"}.get(tuple(fib.get("flags", [])))
            if fib.get("result") != "type" or word is None or right != "local" or op not in ("==", "!="):
                return False
            return _put(f, word, op == "==")
        if "exthdr" in left:
            if left["exthdr"] == {"name": "rt"} and op == "==" and right is True and family == 6:
                return _put(f, "routing_header", True)
            return False
        if "payload" in left:
            p = left["payload"]
            key = (p.get("protocol"), p.get("field"))
            if key == (ip, "daddr") and op == "==":
                if isinstance(right, str) and right.startswith("@"):
                    return _put(f, "match_set", right[1:])
                return _put(f, "dst", _addr(right))
            if key in (("tcp", "sport"), ("udp", "sport")) and op == "==" and isinstance(right, int):
                f["_implied"] = p["protocol"]
                return _put(f, "sport", right)
            if key in (("tcp", "dport"), ("udp", "dport")) and op == "==":
                ports = right["set"] if isinstance(right, dict) else [right]
                f["_implied"] = p["protocol"]
                return _put(f, "dports", tuple(int(x) for x in ports))
            if key == ("ip6", "hoplimit") and family == 6 and op == "==":
                return _put(f, "hoplimit", int(right))
            if key == ("icmpv6", "type") and family == 6 and op == "==":
                f["_implied"] = "ipv6-icmp"
                return _put(f, "icmp6_type", _ICMP6_NUMBER.get(right, str(right)))
            return False
        if "meta" in left:
            mk = left["meta"]["key"]
            if mk == "nfproto" and op == "==" and _WORD_FAMILY.get(right) == family:
                return True  # a dependency nft adds (e.g. before `reject with icmpv6`); a no-op in this chain
            if mk == "l4proto" and op == "==":
                return _put(f, "protocol", str(right))
            if mk == "oifname" and op in ("==", "!="):
                return _put(f, "out_iface_not" if op == "!=" else "out_iface", str(right))
            if mk == "skuid" and op == "==" and isinstance(right, int):  # a range: not something a plan renders
                return _put(f, "uid", right)
            return False
        if "&" in left and op == "==" and left["&"][0] == {"ct": {"key": "mark"}}:
            bits = left["&"][1]
            return isinstance(bits, int) and bits == right and _put(f, "ctmark", bits)
        if "ct" in left:
            ck, cdir = left["ct"].get("key"), left["ct"].get("dir")
            if ck == "state" and op in ("==", "in") and cdir is None:
                states = {str(s) for s in (right if isinstance(right, list) else [right])}
                if states - set(CT_STATES):
                    return False
                return _put(f, "ct_states", tuple(s for s in CT_STATES if s in states))
            if ck == "status" and op in ("==", "in") and cdir is None and right in ("dnat", ["dnat"]):
                return _put(f, "ct_dnat", True)
            if ck == "direction" and op == "==" and cdir is None and right in ("original", "reply"):
                return _put(f, "ct_direction", right)
            if ck == f"{ip} daddr" and cdir == "original" and op == "==":
                if isinstance(right, str) and right.startswith("@"):
                    return _put(f, "ctorigdst_set", right[1:])
                return _put(f, "ctorigdst", _addr(right))
            if ck == "proto-dst" and cdir == "original" and op == "==":
                return _put(f, "ctorigdstport", int(right))
            return False
        return False
    if f["target"]:
        return False  # anything after the verdict
    if "mangle" in e:
        mg = e["mangle"]
        value = mg.get("value", {})
        if mg.get("key") == {"ct": {"key": "mark"}} and isinstance(value, dict) and "|" in value \
                and value["|"][0] == {"ct": {"key": "mark"}} and isinstance(value["|"][1], int):
            return _put(f, "ctmark_set", value["|"][1])
        return False
    if "return" in e:
        f["target"] = "RETURN"
        return True
    if "drop" in e:
        f["target"] = "DROP"
        return True
    if "reject" in e:
        rj = e["reject"] or {}
        text = "reject with tcp reset" if rj.get("type") == "tcp reset" else f"reject with {rj.get('type')} type {rj.get('expr')}"
        name = _REJECT_BACK.get((text, family))
        if name is None:
            return False
        f["target"], f["reject_with"] = "REJECT", name
        if name == "tcp-reset":
            f["_implied"] = "tcp"
        return True
    if "log" in e:
        lg = e["log"] or {}
        if set(lg) != {"prefix", "group"}:
            return False
        f["target"], f["nflog_prefix"], f["nflog_group"] = "NFLOG", str(lg["prefix"]), int(lg["group"])
        return True
    if "redirect" in e and table == "nat":
        rd = e["redirect"] or {}
        if set(rd) != {"port"}:
            return False
        f["target"], f["to_ports"] = "REDIRECT", int(rd["port"])
        return True
    if "jump" in e or "goto" in e:
        target = (e.get("jump") or e["goto"])["target"]
        if "goto" in e:
            f["goto"] = True
        for ours in (CONFINED, REDIRECT, *(_refuse_chains([str(target)], family) if table == "filter" else [])):
            try:
                if target == chain_name(family, table, ours):
                    f["target"] = ours
                    return True
            except Exception:  # noqa: BLE001 - not a chain of this table
                continue
        return False
    return False


def _put(f: dict[str, Any], key: str, value: Any) -> bool:
    if key in f:
        return False  # the same match twice: not something a plan renders
    f[key] = value
    return True


def _sets(found: list[dict[str, Any]], expect: Sequence[AddressSet],
          dumped: Mapping[str, Sequence[bytes]]) -> list[AddressSet]:
    """Every set in our table; one that holds exactly an expected set's networks (as intervals,
    the way the kernel keeps them) is reported as that very object, so verify compares it as equal.
    An interval address set's elements come from its netlink dump (`dumped`)."""
    by_name = {st.name: st for st in expect}
    out = []
    for s in found:
        typ, flags = s.get("type"), s.get("flags", [])
        family: Family = 6 if typ == "ipv6_addr" else 4
        want = by_name.get(s["name"])
        held: tuple[list[int], list[int]] = ([], [])
        members = None
        kinds = [set_flags(want)] if want else [[], ["interval"]]  # a hash of addresses, or an interval set
        if typ not in ("ipv4_addr", "ipv6_addr") or flags not in kinds:
            members = (f"<unexpected set type {typ} flags {flags}>",)
        else:
            try:
                held = held_intervals(dumped.get(s["name"], ()), family, interval=flags == ["interval"])
            except ValueError as exc:
                members = (f"<unexpected element in {s['name']}: {exc}>",)
        if members is None and want is not None and want.family == family:
            starts, ends = bounds(want)
            if held[0] != list(starts) or held[1] != list(ends):  # a tampered set may hold adjacent
                merged = merge(list(zip(*held, strict=True)))     # intervals nft would have merged
                held = ([a for a, _ in merged], [b for _, b in merged])
            if held[0] == list(starts) and held[1] == list(ends):
                out.append(want)
                continue
        pairs = list(zip(*held, strict=True))
        if flags != ["interval"]:  # a hash's addresses, reported as the ranges they make up
            pairs = merge(pairs)
        out.append(AddressSet(name=s["name"], family=family, members=members or networks(family, pairs)))
    return out


def holds_exactly(st: AddressSet, blocks: Sequence[bytes] | None) -> bool:
    """True if a set's netlink dump (None: none) holds exactly `st`'s intervals, as nft adds them."""
    try:
        first, last = (held_intervals(blocks, st.family, interval=set_flags(st) == ["interval"])
                       if blocks is not None else (None, None))
    except ValueError:
        return False
    starts, ends = bounds(st)
    return first == list(starts) and last == list(ends)


def _element_pattern(key: int, capture: str = "") -> bytes:
    """One element of an interval set as the kernel dumps what nft added: a start (the key alone)
    or an end (the key and NFTA_SET_ELEM_FLAGS = NFT_SET_ELEM_INTERVAL_END); `capture`: the key
    of that kind ("start" or "end") is the pattern's one group."""
    def hdr(size: int, kind: int) -> bytes:
        return re.escape(struct.pack("=HH", size, kind))

    def value(kind: str) -> bytes:  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
        return hdr(8 + key, 1) + hdr(4 + key, 1) + (b"(.{%d})" if kind == capture else b".{%d}") % key

    end = hdr(8, 3) + re.escape(struct.pack(">I", 1))  # NFTA_SET_ELEM_FLAGS: NFT_SET_ELEM_INTERVAL_END
    return hdr(12 + key, 1) + value("start") + b"|" + hdr(20 + key, 1) + value("end") + end


# Per family: a block of nothing but such elements, and the start / end keys found in one.
_ELEMENTS = {f: re.compile(b"(?:" + _element_pattern(n) + b")*", re.DOTALL) for f, n in ((4, 4), (6, 16))}
_KEYS = {(f, kind): re.compile(_element_pattern(n, kind), re.DOTALL) for f, n in ((4, 4), (6, 16)) for kind in ("start", "end")}


def _numbers(keys: bytes, size: int) -> list[int]:
    """Concatenated big-endian keys of `size` bytes (4 or 16) as integers."""
    if size == 4:
        return list(struct.unpack(f">{len(keys) // 4}I", keys))
    halves = iter(struct.unpack(f">{len(keys) // 8}Q", keys))
    return [hi << 64 | lo for hi, lo in zip(halves, halves, strict=True)]


def held_intervals(blocks: Sequence[bytes], family: Family, interval: bool = True) -> tuple[list[int], list[int]]:
    """What an interval set holds, from the element lists of its netlink dump: the kernel matches
    an address if the nearest element at or below it is a start (NFT_SET_ELEM_INTERVAL_END not
    set), so each start opens an interval that the next element, of either kind, closes. Returns
    the first and the last address of each interval, sorted (adjacent ones not merged); `interval`
    False: a hash set's addresses, each its own interval. Raises
    ValueError on an element that is not a plain key with those flags and nft's notes (a counter,
    a timeout, a catch-all: not what egressguard adds)."""
    key = _AF[family][1] // 8
    starts: list[bytes] = []
    ends: list[bytes] = []
    for block in blocks:
        if _ELEMENTS[family].fullmatch(block):  # every element plain: their keys in two passes
            starts += _KEYS[family, "start"].findall(block)
            ends += _KEYS[family, "end"].findall(block)
            continue
        for _, element in transport.attributes(block):
            got, end = None, False
            for kind, value in transport.attributes(element):
                if kind == _SET_ELEM_KEY:
                    got = b"".join(v for k, v in transport.attributes(value) if k == _DATA_VALUE)
                elif kind == _SET_ELEM_FLAGS and value in (bytes(4), b"\0\0\0\1"):
                    end = value == b"\0\0\0\1"
                elif kind == _SET_ELEM_USERDATA:
                    continue  # nft's own notes (an interval open to the top, a comment): no effect on matching
                else:
                    raise ValueError(f"an element with netlink attribute {kind} ({value.hex()})")
            if got is None or len(got) != key:
                raise ValueError(f"an element without a {key}-byte key")
            (ends if end else starts).append(got)
    first = sorted(_numbers(b"".join(starts), key))
    if not interval:  # a hash set: each element one address
        if b"".join(ends):  # (the pattern's findall gives b"" for each start)
            raise ValueError("an interval end in a set of addresses")
        return first, list(first)
    if not first:
        return [], []
    # An end sharing a start's key closes nothing (the start wins); ends below every start close nothing.
    last = sorted(set(_numbers(b"".join(ends), key)).difference(first))
    last = last[bisect.bisect_right(last, first[0]):]
    top = (1 << key * 8) - 1
    if len(last) in (len(first), len(first) - 1) and all(map(operator.lt, first, last)) \
            and all(map(operator.lt, last, first[1:])):  # starts and ends alternate: the usual case
        return first, [e - 1 for e in last] + [top] * (len(first) - len(last))
    events = sorted([(k, True) for k in first] + [(k, False) for k in last])
    closing = [events[i + 1][0] - 1 if i + 1 < len(events) else top for i, (_, start) in enumerate(events) if start]
    return first, closing


_AF = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}
