"""tests/test_hosts_traffic.py on the nftables back end: same probes, same expectations."""

from __future__ import annotations

from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_hosts_traffic import *  # noqa: F403 - the suite's tests, collected again here

LAB_TOPOLOGIES = [{"iface": "veth1a2b3c4d"}]  # another shape than the iptables run
