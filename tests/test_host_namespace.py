"""egressguard guards a container's or pod's own network namespace. Started in the machine's own
(`docker run --network host`, a pod with `hostNetwork: true`), `apply` and `run` exit 3 and change
nothing, unless told to guard it (`--host-namespace`, `EGRESSGUARD_HOST_NAMESPACE=1`: a microVM's
guest, whose own namespace is the sandbox's).

Never tried in this machine's namespace (a broken check would lock the machine down): the pod is
made to look like it. The only difference egressguard reads, net.core's settings that the kernel
gives the initial namespace alone, is put in a private mount of /proc/sys/net/core in the pod; the
test below that reads the real difference only reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from egtraffic import policy, stopped

from egressguard.apply import HOST_NAMESPACE_ENV, in_initial_namespace
from egressguard.lab import Lab

pytestmark = pytest.mark.netns

LAB_TOPOLOGIES = [{"iface": "net1"}, {}]

POLICY = policy(allow=[{"cidr": "203.0.113.10/32", "ports": [22]}])


def looks_like_the_machine(passwd: Path | None = None) -> tuple[str, ...]:
    """Prefix for lab.egressguard: a private mount namespace in which /proc/sys/net/core holds what
    only the initial namespace has (and /etc/passwd is `passwd`, if given)."""
    script = "mount -t tmpfs egtest /proc/sys/net/core && : > /proc/sys/net/core/netdev_max_backlog"
    if passwd is not None:
        script += f" && mount --bind {passwd} /etc/passwd"
    return ("unshare", "-m", "--propagation", "private", "--", "sh", "-c", script + ' && exec "$@"', "sh")


def kernel_state(lab: Lab) -> str:
    rules = lab.in_pod("ip", "rule", "show").stdout + lab.in_pod("ip", "-6", "rule", "show").stdout
    return lab.ruleset_dump() + rules


def test_the_machines_own_namespace_is_told_apart_from_a_pods(lab: Lab) -> None:
    """Read only: the suite runs as root in the machine's own namespace (../shared/TESTBED.md), the
    pod is a namespace of its own."""
    assert in_initial_namespace(), "the test process is in the machine's own network namespace"
    asked = lab.in_pod(sys.executable, "-c", "from egressguard.apply import in_initial_namespace as f; print(f())")
    assert asked.stdout.strip() == "False", asked


def test_apply_in_the_machines_namespace_exits_3_and_changes_nothing(lab: Lab) -> None:
    before = kernel_state(lab)
    path = lab.write_policy(POLICY)
    done = lab.egressguard("apply", "--policy", str(path), prefix=looks_like_the_machine())
    assert done.returncode == 3, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "machine's own network namespace" in line]
    assert len(errors) == 1 and "--host-namespace" in errors[0] and HOST_NAMESPACE_ENV in errors[0], done.stderr
    assert kernel_state(lab) == before
    assert not lab.status_file.exists()


def test_the_docker_entrypoints_run_in_the_machines_namespace_exits_3_and_never_starts_the_command(lab: Lab) -> None:
    before = kernel_state(lab)
    path = lab.write_policy(POLICY)
    started = lab.workdir / "command-started"
    passwd = lab.workdir / "passwd"  # the image's user, confined by the policy
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/tmp:/bin/sh\n")
    passwd.chmod(0o644)
    done = lab.egressguard("run", "--policy", str(path), "--user", "sandbox", "--", "touch", str(started),
                           prefix=looks_like_the_machine(passwd))
    assert done.returncode == 3, done.stderr[-2000:]
    assert "machine's own network namespace" in done.stderr
    assert not started.exists()
    assert kernel_state(lab) == before


@pytest.mark.parametrize("how", ["option", "environment"])
def test_told_to_guard_the_machines_namespace_it_applies_the_policy(lab: Lab, how: str) -> None:
    path = lab.write_policy(POLICY)
    extra, env = (("--host-namespace",), {}) if how == "option" else ((), {HOST_NAMESPACE_ENV: "1"})
    done = lab.egressguard("apply", "--policy", str(path), *extra, env=env, prefix=looks_like_the_machine())
    assert done.returncode == 0, done.stderr[-2000:]
    stopped(lab, "tcp", "203.0.113.11", 22)
    stopped(lab, "tcp", "2001:db8:2::10", 22)


@pytest.mark.parametrize("value", ["yes", "true", " 1"])
def test_another_value_of_the_variable_is_a_usage_error_and_changes_nothing(lab: Lab, value: str) -> None:
    before = kernel_state(lab)
    path = lab.write_policy(POLICY)
    done = lab.egressguard("apply", "--policy", str(path), env={HOST_NAMESPACE_ENV: value},
                           prefix=looks_like_the_machine())
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{HOST_NAMESPACE_ENV}={value!r}" in done.stderr
    assert kernel_state(lab) == before


def test_a_pods_own_namespace_needs_no_option(lab: Lab) -> None:
    done = lab.apply(POLICY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "machine's own" not in done.stderr
    stopped(lab, "tcp", "203.0.113.11", 22)
