"""tests/test_traffic_dns_config.py on the nftables back end: same probes, same expectations."""

from __future__ import annotations

from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_traffic_dns_config import *  # noqa: F403 - the suite's tests, collected again here

LAB_TOPOLOGIES = [{"iface": "tun0"}]  # another shape than the iptables run
