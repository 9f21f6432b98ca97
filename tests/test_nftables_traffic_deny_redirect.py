"""tests/test_traffic_deny_redirect.py on the nftables back end: same probes, same expectations."""

from __future__ import annotations

from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_traffic_deny_redirect import *  # noqa: F403 - the suite's tests, collected again here

LAB_TOPOLOGIES = [{"iface": "veth1a2b3c4d", "second_iface": "net1"}]  # another shape than the iptables run
