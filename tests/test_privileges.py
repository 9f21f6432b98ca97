"""Dropping privileges for real: the command keeps nothing; a sidecar keeps CAP_NET_ADMIN and only it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")

UID = 64123  # no such user on the machine: nothing it owns can help it

CHILD = textwrap.dedent("""
    import json, os, signal, subprocess, sys
    from egressguard.privileges import CAP_NET_ADMIN, Identity, drop_privileges
    keep = (CAP_NET_ADMIN,) if sys.argv[1] == "net_admin" else ()
    victim = int(sys.argv[2])
    drop_privileges(Identity("sidecar", %(uid)d, %(uid)d, "/", "/bin/sh"), keep)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    out = {k: status[k].strip() for k in ("Uid", "CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")}
    # An exec'd program (nft) keeps what the process kept: it may change this namespace's firewall or not.
    out["nft"] = subprocess.run(["nft", "add", "table", "inet", "probe"], capture_output=True).returncode
    try:
        os.kill(victim, signal.SIGTERM)
        out["kill"] = "sent"
    except PermissionError:
        out["kill"] = "refused"
    try:
        os.setuid(0)
        out["setuid0"] = "became root"
    except PermissionError:
        out["setuid0"] = "refused"
    print(json.dumps(out))
""") % {"uid": UID}


def _become(keep: str) -> dict[str, object]:
    victim = subprocess.Popen(["sleep", "60"])  # root's process: a sidecar must not be able to signal it
    try:
        done = subprocess.run(["unshare", "--net", sys.executable, "-c", CHILD, keep, str(victim.pid)],
                              capture_output=True, text=True, timeout=30, check=True)
        assert victim.poll() is None, "the dropped process signalled a root process"
    finally:
        victim.kill()
        victim.wait()
    return json.loads(done.stdout)


def test_sidecar_keeps_net_admin_only_across_exec() -> None:
    got = _become("net_admin")
    mask = f"{1 << 12:016x}"
    assert got["Uid"].split() == [str(UID)] * 4
    assert (got["CapEff"], got["CapPrm"], got["CapBnd"], got["CapAmb"]) == (mask,) * 4
    assert got["NoNewPrivs"] == "1"
    assert got["nft"] == 0, "CAP_NET_ADMIN did not survive the exec: nft could not change its own namespace"
    assert (got["kill"], got["setuid0"]) == ("refused", "refused")


def test_command_keeps_no_capability_and_cannot_touch_the_firewall() -> None:
    got = _become("none")
    assert (got["CapEff"], got["CapPrm"], got["CapBnd"], got["CapAmb"]) == ("0" * 16,) * 4
    assert got["nft"] != 0  # the control of the test above: without the capability nft is refused
    assert (got["kill"], got["setuid0"]) == ("refused", "refused")
