"""Golden files of what the kernel holds after a real apply, and `plan` agreeing with it.

tests/golden/*.plan pin what egressguard means to install; tests/golden/kernel/*.save pin what the
kernel holds afterwards, as `iptables-legacy-save` / `ip6tables-legacy-save` print it (the reference
tools' own decoding, not python-iptables'). The pod namespace holds nothing else, so the dump is
whole: a rule egressguard left behind or a table it created needlessly is a diff too.

Regenerate after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_kernel_golden.py`.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from goldenfile import assert_matches_golden

from egressguard.lab import DEFAULT_RECORDS, Lab

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
POLICIES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))
# The golden policies' host entries, answered by the lab's DNS server.
RECORDS = {
    **DEFAULT_RECORDS,
    "api.example.com": {"A": ["203.0.113.12"], "AAAA": ["2001:db8:2::12"]},
    "blocked.example.com": {"A": ["203.0.113.5"]},
}
_ADDRESS_OPTIONS = {"-d", "-s", "--ctorigdst"}


@pytest.fixture(scope="module", params=POLICIES)
def applied(request: pytest.FixtureRequest) -> Iterator[tuple[str, Lab, str]]:
    """(policy name, its own fresh lab, the kernel dump after applying it there): a table an
    earlier policy made would otherwise show in the dump (x_tables tables are never removed)."""
    with Lab(iface="net1") as lab:  # not eth0: the interface masks are in the dump's bytes (issue 9)
        lab.set_records(RECORDS)
        yield request.param, lab, _apply(lab, request.param)


def _kernel_dump(lab: Lab) -> str:
    """Both families' tables as the reference tools print them; counters and timestamps removed."""
    parts = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        done = lab.in_pod(tool)
        assert done.returncode == 0, done.stderr
        parts.append(f"# {tool}")
        for line in done.stdout.splitlines():
            if line.startswith("#"):
                continue
            parts.append(line.split(" [", 1)[0] if line.startswith(":") else line)
    sets = lab.in_pod("ipset", "save").stdout.splitlines()
    parts.append("# ipset save (egressguard sets)")
    parts += sorted(line for line in sets if " egressguard-" in f" {line}")
    return "\n".join(parts) + "\n"


def _apply(lab: Lab, name: str) -> str:
    done = lab.egressguard("apply", "--policy", str(GOLDEN / f"{name}.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    return _kernel_dump(lab)


def test_kernel_holds_the_golden_dump_after_apply(applied: tuple[str, Lab, str]) -> None:
    name, _lab, got = applied
    assert_matches_golden(GOLDEN / "kernel" / f"{name}.save", got, "the kernel holds something else than")


def _normalised(line: str) -> tuple[str, ...]:
    """A rule line as tokens, written the way the kernel's save prints it: `-I OUTPUT 1` is the
    `-A OUTPUT` the kernel lists first; an address without a prefix length is a host network."""
    tokens = shlex.split(line)
    if tokens[:3] == ["-I", "OUTPUT", "1"]:
        tokens = ["-A", "OUTPUT", *tokens[3:]]
    out = []
    for i, tok in enumerate(tokens):
        if i and tokens[i - 1] in _ADDRESS_OPTIONS:
            tok = str(ipaddress.ip_network(tok, strict=False))
        out.append(tok)
    return tuple(out)


def _rule_lines(text: str) -> dict[str, list[tuple[str, ...]]]:
    """`-A`/`-I` lines per '(tool) *table', in order."""
    blocks: dict[str, list[tuple[str, ...]]] = {}
    tool, table = "iptables", ""
    for line in text.splitlines():
        if line.startswith(("# iptables", "# ip6tables")):
            tool = "ip6tables" if "ip6tables" in line else "iptables"
        elif line.startswith("*"):
            table = line[1:]
        elif line.startswith(("-A ", "-I ")):
            blocks.setdefault(f"{tool} {table}", []).append(_normalised(line))
    return blocks


def test_plan_lists_exactly_the_rules_the_kernel_holds(applied: tuple[str, Lab, str]) -> None:
    name, lab, dump = applied
    kernel = _rule_lines(dump)
    done = lab.egressguard("plan", "--resolve", "--policy", str(GOLDEN / f"{name}.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    plan = _rule_lines(done.stdout)
    assert set(kernel) == set(plan), (sorted(kernel), sorted(plan))
    for block, rules in plan.items():
        assert kernel[block] == rules, f"{block}: plan and kernel differ"
