"""Exit 1: an unexpected internal error (here: an exception no code path expects, raised while the
apply resolves names) still leaves the lockdown in place and says so in one line."""

from __future__ import annotations

import json
import sys

import pytest
from egtraffic import FAST, dns_answered, policy, reached

from egressguard.lab import EXEMPT, RESOLVER_V4, Lab

pytestmark = pytest.mark.netns

# A bug stand-in: resolve_hosts raises something that is not an EgressGuardError.
BROKEN = (
    "import sys; from egressguard import facts; "
    "facts.resolve_hosts = lambda *a, **k: (_ for _ in ()).throw(RuntimeError('simulated bug')); "
    "from egressguard.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_unexpected_error_exits_1_with_lockdown_in_place(lab: Lab) -> None:
    path = lab.write_policy(policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}]))
    done = lab.in_pod(sys.executable, "-c", BROKEN, "apply", "--policy", str(path),
                      "--status-file", str(lab.status_file))
    assert done.returncode == 1, done.stderr[-800:]
    human = [line for line in done.stderr.splitlines() if line.startswith("egressguard:")]
    assert human == ["egressguard: internal error: RuntimeError: simulated bug"]
    assert not reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")  # allow not installed
    assert lab.tcp("2001:db8:2::10", 22, timeout=FAST).blocked
    assert dns_answered(lab.dns("allowed.test", RESOLVER_V4))  # the lockdown keeps DNS
    assert lab.tcp("203.0.113.10", 22, uid=EXEMPT, timeout=FAST).ok
    st = json.loads(lab.status_file.read_text())
    assert st["state"] == "lockdown" and st["exit_code"] == 1
