"""The README's resolution limits, with a resolver that never answers (its queries dropped in the
world): one name gives up after 2 s, all names together after 10 s; the apply then fails closed
(exit 4, lockdown). The bounds are the documented timeouts; the upper slack covers start-up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from egtraffic import FAST, policy, reached

from egressguard.lab import EXEMPT, Lab

pytestmark = pytest.mark.netns

SILENT_RESOLVER = "192.0.2.10"  # a world host whose DNS listener's queries are dropped
PER_NAME_S, DEADLINE_S = 2.0, 10.0
SLACK_S = 3.5


@pytest.fixture(scope="module")
def silent_lab() -> Iterator[Lab]:
    with Lab() as lab:
        for proto in ("udp", "tcp"):
            rule = ["INPUT", "-d", SILENT_RESOLVER, "-p", proto, "--dport", "53", "-j", "DROP"]
            done = __import__("subprocess").run(["ip", "netns", "exec", lab.world, "iptables-legacy", "-w", "-A", *rule],
                                                capture_output=True, text=True, timeout=20)
            assert done.returncode == 0, done.stderr
        yield lab


def _apply_timed(lab: Lab, names: list[str], optional: bool = False) -> tuple[int, float]:
    entries = [{"host": n, "ports": [22], **({"optional": True} if optional else {})} for n in names]
    pol = policy(dns={"resolvers": [SILENT_RESOLVER]}, allow=entries)
    path = lab.write_policy(pol)
    started = time.monotonic()
    done = lab.egressguard("apply", "--policy", str(path))
    return done.returncode, time.monotonic() - started


def test_the_silent_resolver_is_really_silent(silent_lab: Lab) -> None:
    res = silent_lab.dns("allowed.test", SILENT_RESOLVER, uid=EXEMPT, timeout=FAST)
    assert res.outcome == "timeout", res
    assert reached(silent_lab.tcp(SILENT_RESOLVER, 22, uid=EXEMPT, timeout=FAST), SILENT_RESOLVER)  # the host is up


def test_one_unanswered_name_gives_up_after_two_seconds_and_fails_closed(silent_lab: Lab) -> None:
    code, took = _apply_timed(silent_lab, ["allowed.test"])
    assert code == 4
    assert PER_NAME_S <= took < PER_NAME_S + SLACK_S, took
    assert json.loads(silent_lab.status_file.read_text())["state"] == "lockdown"


def test_all_names_together_give_up_after_ten_seconds(silent_lab: Lab) -> None:
    """Optional names, so none ends the apply early: 8 x 2 s would be 16 s."""
    names = [f"n{i}.test" for i in range(8)]
    code, took = _apply_timed(silent_lab, names, optional=True)
    assert code == 0  # every name optional: skipped, the rest of the policy applied
    assert DEADLINE_S <= took < DEADLINE_S + SLACK_S, took
    skipped = json.loads(silent_lab.status_file.read_text())["hosts_skipped"]
    assert sorted(skipped) == names
    assert any("deadline of 10s passed" in why for why in skipped.values()), skipped
