"""allow_file / deny_file: CIDR lists from files, errors with file and line number."""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
from pathlib import Path

import pytest
from refusals import confined

from egressguard import policy as policy_mod
from egressguard.errors import PolicyError
from egressguard.ruleset import Facts, build


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_allow_file_networks_are_read_relative_to_the_policy(tmp_path: Path) -> None:
    _write(tmp_path, "list.txt", "# provider\n203.0.113.0/24\n\n198.51.100.7   # one host\n2001:db8::/32\n")
    pol = policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: list.txt\n    ports: [443]\n"))
    assert pol.allow[0].networks == ("203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32")
    assert pol.allow[0].ports == [443]


def test_bad_lines_are_reported_with_file_and_line(tmp_path: Path) -> None:
    lst = _write(tmp_path, "bad.txt", "203.0.113.0/24\n10.0.0.1/8\n# fine\nnot-a-network\n")
    with pytest.raises(PolicyError) as err:
        policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: bad.txt\n"))
    msg = str(err.value)
    assert f"allow[0]: {lst}:2: '10.0.0.1/8' is not a network" in msg
    assert f"{lst}:4: 'not-a-network'" in msg


def test_many_bad_lines_are_counted_not_all_listed(tmp_path: Path) -> None:
    _write(tmp_path, "bad.txt", "".join(f"bogus{i}\n" for i in range(10)))
    with pytest.raises(PolicyError, match=r"bad.txt:3: .*\(and 7 more bad lines\)"):
        policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\ndeny:\n  - deny_file: bad.txt\n"))


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"allow\[0\]: cannot read .*missing.txt: No such file"):
        policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: missing.txt\n"))


def test_each_list_takes_only_its_own_file_key(tmp_path: Path) -> None:
    _write(tmp_path, "l.txt", "203.0.113.0/24\n")
    with pytest.raises(PolicyError, match=r"allow\[0\].deny_file: unknown key"):
        policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - deny_file: l.txt\n"))


def test_file_entry_cannot_also_name_a_cidr(tmp_path: Path) -> None:
    _write(tmp_path, "l.txt", "203.0.113.0/24\n")
    with pytest.raises(PolicyError, match="exactly one of"):
        policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - {allow_file: l.txt, cidr: 192.0.2.0/24}\n"))


def test_policy_digest_changes_with_the_file_contents(tmp_path: Path) -> None:
    lst = _write(tmp_path, "l.txt", "203.0.113.0/24\n")
    path = _write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: l.txt\n")
    before = policy_mod.digest(policy_mod.load_file(path))
    lst.write_text("203.0.113.0/25\n")
    assert policy_mod.digest(policy_mod.load_file(path)) != before


def test_deny_file_entries_refuse(tmp_path: Path) -> None:
    _write(tmp_path, "d.txt", "".join(f"192.0.2.{i}/32\n" for i in range(40)))
    pol = policy_mod.load_file(_write(tmp_path, "p.yaml", "version: 1\ndns: {resolvers: []}\ndeny:\n  - deny_file: d.txt\n"))
    rs = build(pol, Facts())
    (st,) = [s for s in rs.sets if s.family == 4]
    assert len(st.members) == 40
    assert {r.target for r in confined(rs, 4) if r.match_set} == {"REJECT"}
    (nat64,) = [s for s in rs.sets if s.family == 6]  # the same networks as NAT64 forms (64:ff9b::/96)
    assert nat64.members[0] == "64:ff9b::c000:200/128" and len(nat64.members) == 40
    assert {r.target for r in confined(rs, 6) if r.match_set} == {"REJECT"}


def test_plan_exits_2_naming_the_line(tmp_path: Path) -> None:
    _write(tmp_path, "bad.txt", "203.0.113.0/24\n203.0.113.300/32\n")
    path = _write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: bad.txt\n")
    done = subprocess.run([sys.executable, "-m", "egressguard", "plan", "--policy", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "bad.txt:2:" in done.stderr


def _addresses(n: int, start: int = 0) -> str:
    """n distinct IPv4 host addresses in 198.18.0.0/15 (131,072 of them)."""
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    return "".join(f"{ipaddress.IPv4Address(base + i)}\n" for i in range(start, start + n))


def _plan(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egressguard", "plan", "--policy", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_a_list_of_exactly_100000_entries_is_accepted(tmp_path: Path) -> None:
    _write(tmp_path, "big.txt", _addresses(100_000))
    done = _plan(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: big.txt\n"))
    assert done.returncode == 0, done.stderr[-500:]


def test_one_file_over_100000_entries_exits_2_in_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "big.txt", _addresses(100_001))
    done = _plan(_write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: big.txt\n"))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "big.txt" in lines[0] and "100001 networks, more than 100000" in lines[0], lines


def test_a_list_over_100000_entries_after_expanding_its_files_exits_2(tmp_path: Path) -> None:
    """The cap is per list, after expansion: two files of 60,000 in one `deny`."""
    _write(tmp_path, "a.txt", _addresses(60_000))
    _write(tmp_path, "b.txt", _addresses(60_000, start=60_000))
    text = "version: 1\ndeny:\n  - deny_file: a.txt\n  - deny_file: b.txt\n"
    done = _plan(_write(tmp_path, "p.yaml", text))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "deny" in lines[0] and "120000 entries after reading the list files" in lines[0], lines


# -- the fast parse of list lines agrees with ipaddress -----------------------------------------


def _tricky_items() -> list[str]:
    """Canonical and almost-canonical spellings of networks, valid and not, from a fixed seed."""
    rnd = random.Random(20240611)
    items = [
        "1.2.3.4", "1.2.3.4/32", "1.2.3.0/24", "1.2.3.4/24", "0.0.0.0/0", "1.0.0.0/0", "255.255.255.255",
        "1.2.3", "1.2.3.4.5", "1.2.3.", ".1.2.3", "1..2.3", "01.2.3.4", "1.2.3.04", "1.2.3.00", "1.2.3.0x4",
        "1.2.3.256", "1.2.3.-1", "1.2.3.4/", "1.2.3.4/33", "1.2.3.4/032", "1.2.3.0/024", "1.2.3.4/-1",
        "1.2.3.4/+32", "1.2.3.4/ 32", "1.2.3.4 /32", "1.2.3.0/255.255.255.0", "1.2.3.0/0.0.0.255",
        "1.2.3.4/32/32", "1.2.3.4/\u0663\u0662", "\uff11.2.3.4", "1.2.3.4\x00", "1.2.3.4\udcff", "1.2.3.4%eth0",
        "1.2.3.4/3\x002", "", "/", "/32", "::", "::/0", "::/1", "::1", "::1/128", "::/96", "::/80", "::/79",
        "::ffff:0:0/96", "::ffff:10.0.0.0/104", "::ffff:1.2.3.4", "::ffff:102:304", "::1.2.3.4", "::102:304",
        "64:ff9b::/96", "64:ff9b::1.2.3.4", "64:ff9b::102:304", "2001:db8::", "2001:db8::/32", "2001:db8::/33",
        "2001:DB8::/32", "2001:0db8::/32", "2001:db8:0::/48", "2001:db8::1/128", "2001:db8::1/127",
        "2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1", "2001:db8:0:0:1::1", "2001:db8:0:1:1:1:1:1",
        "2001:db8::1:1:1:1:1", "2001:db8:1:1:1:1:1:1", "2001:db8:1:1:1:1:1:1:1", "2001:db8:::1", ":::",
        "2001:db8::1::1", "2001:db8:10000::", "2001:db8:g::", "fe80::1%eth0", "fe80::1%eth0/128", "fe80::1%1",
        "fe80::/10", "fe80::/010", "fe80::/129", "fe80::/-0", "2001:db8::/64%eth0", "2001:db8:1::/ffff::",
        "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:1.2.3.4", "1:0:0:2:0:0:0:3", "1:0:0:0:2:0:0:3",
        "\u0662001:db8::", "2001:db8::\x00", "2001:db8::1 ",
    ]
    octets = ["0", "1", "9", "10", "99", "100", "199", "255", "256", "00", "01", "001", "010", "1000", "a", ""]
    plens = ["", "/0", "/1", "/8", "/16", "/24", "/31", "/32", "/33", "/08", "/032", "/", "/x", "/255.0.0.0"]
    for _ in range(2000):
        quad = ".".join(rnd.choice(octets) for _ in range(rnd.choice((3, 4, 4, 4, 4, 5))))
        items.append(quad + rnd.choice(plens))
    hextets = ["0", "0", "0", "0", "1", "a", "F", "ff", "ffff", "db8", "0db8", "00", "0000", "10000", "g"]
    plens6 = ["", "/0", "/16", "/32", "/48", "/64", "/96", "/112", "/127", "/128", "/129", "/064", "/%1"]
    for _ in range(3000):
        words = [rnd.choice(hextets) for _ in range(8)]
        if rnd.random() < 0.5:
            words[0] = rnd.choice(["2001", "fe80", "1", "0", "ffff"])
        text = ":".join(words)
        for _ in range(rnd.choice((0, 1, 1, 2))):  # compress a run of zeros, where there is one
            text = text.replace(":0:0:", "::", 1) if "::" not in text else text.replace(":0:", ":", 1)
        if rnd.random() < 0.1:
            text = text.rsplit(":", 2)[0] + ":" + rnd.choice(["1.2.3.4", "255.0.0.1", "1.2.3"])
        if rnd.random() < 0.05:
            text += rnd.choice(["%eth0", "%1", "%"])
        items.append(text + rnd.choice(plens6))
    # well-formed addresses with host parts zeroed to random prefixes, printed by ipaddress
    for _ in range(3000):
        v6 = rnd.random() < 0.6
        bits = 128 if v6 else 32
        plen = rnd.randint(0, bits)
        value = rnd.getrandbits(bits) & ~((1 << (bits - plen)) - 1) if rnd.random() < 0.8 else rnd.getrandbits(bits)
        if v6 and rnd.random() < 0.5:  # long runs of zeros, ties between runs
            value &= rnd.choice([0xFFFF0000FFFF00000000FFFFFFFFFFFF, 0xFFFF00000000FFFF00000000FFFF0000, (1 << 48) - 1])
        addr = ipaddress.ip_address(value) if not v6 else ipaddress.IPv6Address(value)
        items.append(f"{addr}/{plen}" if rnd.random() < 0.9 else str(addr))
    return items


def _old_parse(item: str) -> str:
    """What read_network_list accepted before the fast path, and how it printed it."""
    net = ipaddress.ip_network(item, strict=True)
    why = policy_mod._unusable(item, net)
    if why:
        raise ValueError(why)
    return str(net)


def test_canonical_network_accepts_only_what_ipaddress_accepts_and_prints_it_the_same() -> None:
    fast_taken = 0
    for item in _tricky_items():
        fast = policy_mod.canonical_network(item)
        if fast is None:
            continue
        fast_taken += 1
        assert fast == _old_parse(item), item
    assert fast_taken > 2000  # the generated list exercises the fast path, not only the fallback


def test_canonical_network_takes_the_usual_spellings() -> None:
    assert policy_mod.canonical_network("198.18.0.1/32") == "198.18.0.1/32"
    assert policy_mod.canonical_network("198.18.0.1") == "198.18.0.1/32"
    assert policy_mod.canonical_network("2001:db8::/32") == "2001:db8::/32"
    assert policy_mod.canonical_network("2001:db8::1") == "2001:db8::1/128"
    for left_to_ipaddress in ("1.2.3.4/24", "1.2.3.4/032", "01.2.3.4", "2001:DB8::/32", "::ffff:1.2.3.4",
                              "fe80::1%eth0", "::/0", "1.2.3.0/255.255.255.0"):
        assert policy_mod.canonical_network(left_to_ipaddress) is None, left_to_ipaddress


def _old_read(path: Path, lines: list[str]) -> tuple[str, ...] | str:
    """read_network_list as it was before the fast path: its networks, or its error message."""
    nets: list[str] = []
    bad: list[str] = []
    for lineno, item in enumerate(lines, 1):
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            bad.append(f"{path}:{lineno}: {item!r} is not a network or address ({exc})")
            continue
        why = policy_mod._unusable(item, net)
        if why:
            bad.append(f"{path}:{lineno}: {why}")
            continue
        nets.append(str(net))
    if bad:
        return "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more bad lines)" if len(bad) > 3 else "")
    return tuple(dict.fromkeys(nets))


def test_list_file_accepts_refuses_and_words_errors_as_before(tmp_path: Path) -> None:
    # One line each, as read_network_list sees it (no comment, stripped, encodable).
    items = [i for i in _tricky_items() if i and "#" not in i and i == i.strip() and len(i.splitlines()) == 1
             and "\udcff" not in i]
    chunks: list[list[str]] = [[]]
    bad_in_chunk = 0
    for item in items:  # at most three bad lines a file: the message names each of them
        bad = isinstance(_old_read(tmp_path, [item]), str)
        if bad and bad_in_chunk == 3:
            chunks.append([])
            bad_in_chunk = 0
        chunks[-1].append(item)
        bad_in_chunk += bad
    path = tmp_path / "list.txt"
    for chunk in chunks:
        path.write_text("\n".join(chunk) + "\n")
        want = _old_read(path, chunk)
        if isinstance(want, str):
            with pytest.raises(ValueError) as err:
                policy_mod.read_network_list(path)
            assert str(err.value) == want
        else:
            assert policy_mod.read_network_list(path) == want
