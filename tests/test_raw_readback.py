"""verify reads the kernel's entries byte for byte: an IPv6 interface mask written as python-iptables'
Rule6 writes it (0x01, issue 9) is exit 5 naming the field, `apply` repairs it, and with the pod's
interface named net1 the corrupted rule really lets confined IPv6 out while the repaired one does not."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from egtraffic import FAST, reached, stopped

from egressguard.lab import CONFINED, POD_V6, WORLD_V4, WORLD_V6, Lab, _sh

pytestmark = pytest.mark.netns

DEFAULT_POLICY = Path(__file__).resolve().parent / "golden" / "default.yaml"
TARGET_V6 = "2001:db8:2::10"
PORT = 5000  # not redirected by the default policy: the CONFINED chain alone decides

# Replace the IPv6 `-o lo ... loopback -j RETURN` rule by the same rule written through an unfixed
# python-iptables Rule6 (interface mask 0x01 0x01 0x01), in the same position; prints its index.
_CORRUPT = """
from egressguard.backends.iptables.backend import import_iptc
iptc = import_iptc()
table = iptc.Table6("filter", autocommit=False)
table.refresh()
chain = iptc.Chain(table, "EGRESSGUARD-CONFINED")
for i, rule in enumerate(chain.rules):
    comments = [m.comment for m in rule.matches if m.name == "comment"]
    if rule.out_interface == "lo" and rule.target.name == "RETURN":
        bad = iptc.Rule6()
        bad.out_interface = "lo"
        bad.create_match("comment").comment = comments[0]
        bad.create_target("RETURN")
        assert bytes(bad.entry.ipv6.outiface_mask)[:3] == b"\\x01\\x01\\x01", bytes(bad.entry.ipv6.outiface_mask)
        chain.replace_rule(bad, i)
        table.commit()
        print(i)
        break
else:
    raise SystemExit("no -o lo rule found")
"""


# Replace the first IPv4 DNS rule by the same rule as python-iptables writes it when left alone
# (conntrack --ctorigdst /32 mask over 16 bytes; iptables-save prints it the same); prints its index.
_UNFIXED_CONNTRACK = """
from egressguard.backends.iptables.backend import import_iptc
iptc = import_iptc()
table = iptc.Table("filter", autocommit=False)
table.refresh()
chain = iptc.Chain(table, "EGRESSGUARD-CONFINED")
for i, rule in enumerate(chain.rules):
    if any(m.name == "conntrack" and m.ctorigdst and m.ctorigdstport for m in rule.matches):
        old = {m.name: m.get_all_parameters() for m in rule.matches}
        bad = iptc.Rule()
        bad.protocol = rule.protocol
        m = bad.create_match("conntrack")
        m.set_parameter("ctorigdst", old["conntrack"]["ctorigdst"][0] + "/32")
        m.set_parameter("ctorigdstport", old["conntrack"]["ctorigdstport"][0])
        bad.create_match("comment").comment = old["comment"]["comment"][0]
        bad.create_target("RETURN")
        bad.final_check()
        chain.replace_rule(bad, i)
        table.commit()
        print(i)
        break
else:
    raise SystemExit("no conntrack --ctorigdst --ctorigdstport rule found")
"""


def _corrupt_loopback_mask(lab: Lab) -> int:
    done = lab.in_pod(sys.executable, "-c", _CORRUPT)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _rules_as_text(lab: Lab) -> list[str]:
    return [line for line in lab.in_pod("iptables-legacy-save", "-t", "filter").stdout.splitlines() if line.startswith("-A")]


def _verify(lab: Lab) -> tuple[int, str]:
    done = lab.egressguard("verify", "--policy", str(DEFAULT_POLICY))
    return done.returncode, done.stdout + done.stderr


def _rename_pod_iface(lab: Lab, name: str) -> None:
    """Name the pod's interface as Multus names a second interface (issue 9 needs a name other
    than eth0). Down, rename, and restore what going down removed (IPv6 addresses, routes)."""
    _sh("ip", "-n", lab.pod, "link", "set", "eth0", "down")
    _sh("ip", "-n", lab.pod, "link", "set", "eth0", "name", name)
    _sh("ip", "-n", lab.pod, "addr", "replace", f"{POD_V6}/64", "dev", name, "nodad")
    _sh("ip", "-n", lab.pod, "link", "set", name, "up")
    _sh("ip", "-n", lab.pod, "route", "replace", "default", "via", WORLD_V4)
    _sh("ip", "-n", lab.pod, "-6", "route", "replace", "default", "via", WORLD_V6)
    for _ in range(50):  # neighbour discovery settles within a few hundred ms
        if reached(lab.tcp(TARGET_V6, PORT, uid=0, timeout=0.5), TARGET_V6):
            return
        time.sleep(0.1)
    raise RuntimeError(f"world not reachable over {name}")


@pytest.fixture
def net1_lab() -> Iterator[Lab]:
    with Lab() as lab:
        _rename_pod_iface(lab, "net1")
        yield lab


def test_verify_exits_5_naming_the_mask_and_apply_repairs_it(lab: Lab) -> None:
    assert lab.apply(DEFAULT_POLICY).returncode == 0
    assert _verify(lab)[0] == 0
    index = _corrupt_loopback_mask(lab)
    saved = lab.in_pod("ip6tables-legacy-save", "-t", "filter").stdout
    assert "-A EGRESSGUARD-CONFINED -o lo -m comment --comment loopback -j RETURN" in saved  # text cannot see it
    code, out = _verify(lab)
    assert code == 5, out
    assert f"ipv6 filter: chain EGRESSGUARD-CONFINED rule {index}: outiface_mask differs (kernel 010101" in out, out
    done = lab.apply(DEFAULT_POLICY)
    assert done.returncode == 0, done.stderr[-2000:]
    code, out = _verify(lab)
    assert code == 0, out


def test_verify_exits_5_for_match_bytes_python_iptables_reads_back_the_same(lab: Lab) -> None:
    assert lab.apply(DEFAULT_POLICY).returncode == 0
    before = _rules_as_text(lab)
    done = lab.in_pod(sys.executable, "-c", _UNFIXED_CONNTRACK)
    assert done.returncode == 0, done.stderr
    assert _rules_as_text(lab) == before  # the text rendering cannot tell
    code, out = _verify(lab)
    assert code == 5, out
    expected = f"ipv4 filter: chain EGRESSGUARD-CONFINED rule {int(done.stdout)}: match conntrack data differs from byte 52"
    assert expected in out, out
    assert lab.apply(DEFAULT_POLICY).returncode == 0
    assert _verify(lab)[0] == 0


def test_corrupted_mask_lets_confined_ipv6_out_on_net1_and_the_repair_closes_it(net1_lab: Lab) -> None:
    lab = net1_lab
    assert lab.apply(DEFAULT_POLICY).returncode == 0
    stopped(lab, "tcp", TARGET_V6, PORT)  # with the exempt uid's same connection as control
    _corrupt_loopback_mask(lab)
    assert reached(lab.tcp(TARGET_V6, PORT, uid=CONFINED, timeout=FAST), TARGET_V6)  # the bypass of issue 9
    assert _verify(lab)[0] == 5
    assert lab.apply(DEFAULT_POLICY).returncode == 0
    stopped(lab, "tcp", TARGET_V6, PORT)
