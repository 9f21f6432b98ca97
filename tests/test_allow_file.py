"""allow_file / deny_file: CIDR lists from files, errors with file and line number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    (st,) = rs.sets
    assert len(st.members) == 40
    assert {r.target for r in rs.table(4, "filter").chains[1].rules if r.match_set} == {"REJECT"}


def test_plan_exits_2_naming_the_line(tmp_path: Path) -> None:
    _write(tmp_path, "bad.txt", "203.0.113.0/24\n203.0.113.300/32\n")
    path = _write(tmp_path, "p.yaml", "version: 1\nallow:\n  - allow_file: bad.txt\n")
    done = subprocess.run([sys.executable, "-m", "egressguard", "plan", "--policy", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "bad.txt:2:" in done.stderr
