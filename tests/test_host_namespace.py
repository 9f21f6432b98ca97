"""Started in its machine's own network namespace, egressguard guards it and says so in a warning. It
does not refuse: a VM-isolated pod (Kata, Firecracker) runs its containers in the guest's own
namespace, where refusing would stop every sandbox; on a shared host (`docker run --network host`,
`hostNetwork: true`) the warning names the mistake.

Never tried in this machine's namespace (that would guard this machine): the pod is made to look
like it. The only difference egressguard reads, net.core's settings that the kernel gives the
initial namespace alone, is put in a private mount of /proc/sys/net/core in the pod; the test that
reads the real difference only reads.
"""

from __future__ import annotations

import json
import sys

import pytest
from egtraffic import policy, reached, stopped

from egressguard.apply import in_initial_namespace
from egressguard.lab import Lab

pytestmark = pytest.mark.netns

LAB_TOPOLOGIES = [{"iface": "net1"}, {}]

POLICY = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}])
# A private mount namespace in which /proc/sys/net/core holds what only the initial namespace has.
LOOKS_LIKE_THE_MACHINE = ("unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                          "mount -t tmpfs egtest /proc/sys/net/core && : > /proc/sys/net/core/netdev_max_backlog"
                          ' && exec "$@"', "sh")


def warnings(stderr: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "initial_network_namespace"]


def test_the_machines_own_namespace_is_told_apart_from_a_pods(lab: Lab) -> None:
    """Read only: the suite runs as root in the machine's own namespace (../shared/TESTBED.md), the
    pod is a namespace of its own."""
    assert in_initial_namespace(), "the test process is in the machine's own network namespace"
    asked = lab.in_pod(sys.executable, "-c", "from egressguard.apply import in_initial_namespace as f; print(f())")
    assert asked.stdout.strip() == "False", asked


def test_apply_in_a_machines_own_namespace_guards_it_and_warns(lab: Lab) -> None:
    done = lab.egressguard("--log-format", "json", "apply", "--policy", str(lab.write_policy(POLICY)),
                           prefix=LOOKS_LIKE_THE_MACHINE)
    assert done.returncode == 0, done.stderr[-2000:]
    said = warnings(done.stderr)
    assert len(said) == 1 and said[0]["level"] == "warning", done.stderr
    assert "--network host" in str(said[0]["hint"]) and "every process of this machine" in str(said[0]["effect"])
    assert reached(lab.tcp("203.0.113.10", 22), "203.0.113.10")
    stopped(lab, "tcp", "203.0.113.11", 22)


def test_apply_in_a_pods_own_namespace_does_not_warn(lab: Lab) -> None:
    done = lab.egressguard("--log-format", "json", "apply", "--policy", str(lab.write_policy(POLICY)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert warnings(done.stderr) == []
    assert any(json.loads(line).get("event") == "run_finished" for line in done.stderr.splitlines()
               if line.startswith("{")), "the log was read as JSON"
