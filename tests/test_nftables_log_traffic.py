"""tests/test_log_traffic.py on the nftables back end: same probes, same expectations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from egtraffic import applied
from nftbed import legacy_tables, nft_tables, nftables_backend  # noqa: F401 - the autouse fixture
from test_log_traffic import *  # noqa: F403 - the suite's tests, collected again here
from test_log_traffic import POLICY

from egressguard.lab import Lab

# Other names than the iptables run's, and the metadata service and resolvers on the pod's link (as on clouds).
LAB_TOPOLOGIES = [{"iface": "tun0", "second_iface": "tap-0123456789a", "onlink_services": True}]


@pytest.fixture
def lab(module_lab: Lab, nftables_backend: None) -> Iterator[Lab]:  # noqa: F811
    applied(module_lab, POLICY)
    assert "inet egressguard" in nft_tables(module_lab)
    assert legacy_tables(module_lab) == []
    yield module_lab
