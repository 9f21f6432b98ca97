"""Large lists go into kernel sets (pure: the Ruleset), named after their members, verified by content."""

from __future__ import annotations

import ipaddress
import random
import socket
from typing import Any

from refusals import resolved

from egressguard.backends import Installed
from egressguard.backends.iptables import sets
from egressguard.backends.iptables.backend import IptablesBackend
from egressguard.backends.iptables.render import render
from egressguard.policy import validate
from egressguard.ruleset import (
    SET_THRESHOLD,
    AddressSet,
    Facts,
    address_set,
    build,
    canonical_members,
    member_key,
    parse_member,
)
from egressguard.verify import differences


def _policy(**kw: Any) -> Any:
    return validate({"version": 1, "confine": {"uids": [1000]}, "dns": {"resolvers": []}, **kw})


def _nets(n: int, base: str = "198.18") -> list[dict[str, Any]]:
    return [{"cidr": f"{base}.{i // 256}.{i % 256}/32", "ports": [443]} for i in range(n)]


def _confined(rs: Any, family: int = 4) -> list[Any]:
    return list(rs.table(family, "filter").chains[1].rules)


def test_short_list_stays_plain_rules() -> None:
    rs = build(_policy(allow=_nets(SET_THRESHOLD - 1)), Facts())
    assert rs.sets == ()
    assert sum(1 for r in _confined(rs) if r.ctorigdst and r.ctorigdst.startswith("198.18.")) == SET_THRESHOLD - 1


def test_long_list_becomes_one_set_rule_in_place_of_its_entries() -> None:
    rs = build(_policy(allow=_nets(1000)), Facts())
    (st,) = rs.sets
    assert st.family == 4 and len(st.members) == 1000
    set_rules = [r for r in _confined(rs) if r.match_set]
    assert len(set_rules) == 1
    rule = set_rules[0]
    assert (rule.match_set, rule.protocol, rule.dports, rule.target) == (st.name, "tcp", (443,), "RETURN")
    assert rule.comment == "allow[0-999]"
    assert not any(r.ctorigdst and r.ctorigdst.startswith("198.18.") for r in _confined(rs))


def test_entries_with_different_ports_or_protocols_keep_separate_sets() -> None:
    udp = [{**e, "protocol": "udp"} for e in _nets(20, "198.19")]
    rs = build(_policy(allow=_nets(20) + udp), Facts())
    rules = [r for r in _confined(rs) if r.match_set]
    assert {(r.protocol, r.dports) for r in rules} == {("tcp", (443,)), ("udp", (443,))}
    assert len(rs.sets) == 2


def test_set_name_follows_the_members_only() -> None:
    a = address_set(4, ["203.0.113.0/24", "198.51.100.7/32"])
    assert a == address_set(4, ["198.51.100.7/32", "203.0.113.0/24", "203.0.113.0/24"])
    assert a.name != address_set(4, ["203.0.113.0/24"]).name
    assert a.name.startswith("egressguard-4-") and len(a.name + "-new") <= 31


def test_everywhere_cannot_go_into_a_set_and_stays_a_rule() -> None:
    rs = build(_policy(allow=_nets(SET_THRESHOLD) + [{"cidr": "0.0.0.0/0", "ports": [443]}]), Facts())
    (st,) = rs.sets
    assert "0.0.0.0/0" not in st.members
    assert any(r.comment == f"allow[{SET_THRESHOLD}]" and r.ctorigdst is None and r.ctorigdstport == 443
               for r in _confined(rs))


def test_families_get_their_own_sets() -> None:
    v6 = [{"cidr": f"2001:db8:3::{i:x}/128", "ports": [443]} for i in range(1, 40)]
    rs = build(_policy(allow=_nets(40) + v6), Facts())
    assert sorted(s.family for s in rs.sets) == [4, 6]
    assert any(r.match_set for r in _confined(rs, 6))


def test_deny_list_set_refuses_before_the_allows() -> None:
    deny = [{"cidr": f"203.0.113.{i}/32"} for i in range(SET_THRESHOLD)]
    rs = build(_policy(deny=deny, allow=[{"cidr": "203.0.113.0/24"}]), Facts())
    rules = _confined(rs)
    first_deny = next(i for i, r in enumerate(rules) if r.match_set)
    allow = next(i for i, r in enumerate(rules) if r.comment == "allow[0]")
    assert first_deny < allow
    assert {r.target for r in resolved(rs.table(4, "filter"), rules) if r.match_set} == {"REJECT"}


def test_resolved_host_addresses_join_the_set_of_their_ports() -> None:
    hosts = {"cdn.test": tuple(f"198.51.100.{i}" for i in range(1, 30))}
    rs = build(_policy(allow=[{"host": "cdn.test", "ports": [443]}]), Facts(hosts=hosts))
    (st,) = rs.sets
    assert "198.51.100.29/32" in st.members


def test_digest_covers_set_members() -> None:
    one = build(_policy(allow=_nets(100)), Facts())
    other = build(_policy(allow=_nets(99) + [{"cidr": "192.0.2.1/32", "ports": [443]}]), Facts())
    assert one.digest() != other.digest()


def test_plan_shows_the_sets_before_the_rules() -> None:
    text = render(build(_policy(allow=_nets(20)), Facts()))
    assert text.index("create egressguard-4-") < text.index("*filter")
    assert "add egressguard-4-" in text and "--match-set egressguard-4-" in text


def test_verify_reports_a_set_missing_members() -> None:
    rs = build(_policy(allow=_nets(20)), Facts())
    (st,) = rs.sets
    short = AddressSet(st.name, st.family, st.members[:-1])
    from egressguard.backends import InstalledTable  # noqa: PLC0415

    tables = tuple(InstalledTable(t.family, t.name, True, (0,) if t.chains else (), t.chains) for t in rs.tables)
    describe = IptablesBackend().describe
    assert differences(rs, Installed(tables=tables, sets=(st,)), describe) == []
    diffs = differences(rs, Installed(tables=tables, sets=(short,)), describe)
    assert diffs == [f"set {st.name}: 19 members, expected 20 (1 missing, 0 unexpected)"]
    assert differences(rs, Installed(tables=tables), describe) == [f"set {st.name}: missing"]


def test_canonical_members_sorts_like_ipaddress_and_prints_like_inet_ntop() -> None:
    rnd = random.Random(7)
    nets = [ipaddress.ip_network(n) for n in ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1", "::/128", "::1/128",
                                              "::1.2.3.4/128", "255.255.255.255/32", "198.51.100.0/24", "198.51.100.0/25")]
    for _ in range(3000):
        bits = rnd.choice((32, 128))
        plen = rnd.randint(1, bits)
        value = rnd.getrandbits(bits) & ~((1 << (bits - plen)) - 1)
        nets.append(ipaddress.ip_network((value, plen)) if bits == 32 else ipaddress.IPv6Network((value, plen)))
    members = [(n.network_address.packed, n.prefixlen) for n in nets] * 2  # duplicates, in no order
    rnd.shuffle(members)
    ordered = sorted(set(nets), key=lambda n: (n.version, n.network_address, n.prefixlen))
    want = tuple(socket.inet_ntop(socket.AF_INET6 if n.version == 6 else socket.AF_INET, n.network_address.packed)
                 + f"/{n.prefixlen}" for n in ordered)
    assert canonical_members(member_key(p, n) for p, n in members) == want
    v4 = [n for n in ordered if n.version == 4]
    assert address_set(4, [str(n) for n in reversed(v4)]).members == tuple(str(n) for n in v4)


def _nested_element(packed: bytes, prefixlen: int, flags: int = sets.NLA_F_NET_BYTEORDER) -> bytes:
    """An element built attribute by attribute, as the netlink layout reads."""
    kind = sets.IPADDR_V6 if len(packed) == 16 else sets.IPADDR_V4
    ip = sets._nest(sets.DATA_IP, sets._attr(kind, packed, flags))
    return sets._nest(sets.ATTR_DATA, ip, sets._attr(sets.DATA_CIDR, bytes([prefixlen]), flags))


def test_element_encoding_matches_the_attribute_layout() -> None:
    members = ["198.51.100.7", "2001:db8::1", "::/0", "0.0.0.0/0", "255.255.255.255/32", "ffff::/16"]
    members += [f"198.51.{n}.0/{n}" for n in range(33)] + [f"2001:db8:{n:x}::/{n}" for n in range(129)]
    for member, element in zip(members, sets._elements(members), strict=True):
        assert element == _nested_element(*parse_member(member)), member


def format_all(members: list[tuple[bytes, int]]) -> list[str]:
    return [socket.inet_ntop(socket.AF_INET6 if len(p) == 16 else socket.AF_INET, p) + f"/{n}" for p, n in members]


def test_listed_elements_decode_in_one_pass_or_by_the_attribute_walk() -> None:
    v4 = [parse_member(f"198.18.{i}.0/{16 + i % 17}") for i in range(40)]
    v6 = [parse_member(f"2001:db8:{i:x}::/{48 + i}") for i in range(40)]
    for members in (v4, v6, v4[:1], v6[:1]):
        listed = b"".join(_nested_element(p, n, flags=0) for p, n in members)  # the kernel sets no flag
        assert sets._decode_elements(listed) == members
        assert sets._decode_elements(b"".join(sets._elements(format_all(members)))) == members
    # a family mix, or an element with another attribute, is still read whole by the walk
    mixed = b"".join(_nested_element(p, n) for p, n in v4[:3] + v6[:2] + v4[3:5])  # 8 lengths of 24 bytes
    assert sets._decode_elements(mixed) == v4[:3] + v6[:2] + v4[3:5]
    packed, plen = v4[0]
    ip = sets._nest(sets.DATA_IP, sets._attr(sets.IPADDR_V4, packed))
    odd = sets._nest(sets.ATTR_DATA, ip, sets._attr(sets.DATA_CIDR, bytes([plen])), sets._attr(9, b"\0\0\0\1"))
    assert sets._decode_elements(b"".join(sets._elements(format_all(v4[1:2]))) + odd) == [v4[1], v4[0]]
    assert sets._decode_elements(b"") == []


def test_set_members_are_printed_as_the_kernel_lists_them_sharing_the_policys_strings() -> None:
    given = [f"198.18.{i // 256}.{i % 256}/32" for i in range(300, 0, -1)]
    st = address_set(4, given)
    assert st.members == tuple(sorted(given, key=lambda n: ipaddress.ip_network(n)))
    assert {id(m) for m in st.members} <= {id(m) for m in given}  # the same objects, not copies
    # ipaddress prints ::/96 networks in hex, the kernel (inet_ntop) with an IPv4 tail: the latter
    assert address_set(6, ["::102:304/128", "2001:db8::/32"]).members == ("::1.2.3.4/128", "2001:db8::/32")


def test_the_set_threshold_is_the_one_the_readme_states() -> None:
    from pathlib import Path  # noqa: PLC0415

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"Once {SET_THRESHOLD} or more networks share the same (protocol, ports)" in readme.replace("\n", " ")
