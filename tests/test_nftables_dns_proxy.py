"""tests/test_dns_proxy.py on the nftables back end: same server, forwarder, probes and expectations."""

from __future__ import annotations

from nftbed import nftables_backend  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_dns_proxy import *  # noqa: F403 - the suite's tests, collected again here

LAB_TOPOLOGIES = [{"iface": "tap-0123456789a", "second_iface": "net1"}]  # other names than the iptables run's
