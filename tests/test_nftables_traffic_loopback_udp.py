"""tests/test_traffic_loopback_udp.py on the nftables back end: same probes, same expectations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nftbed import legacy_tables, nft_tables, nftables_env  # noqa: F401 - the autouse fixture
from test_traffic_loopback_udp import *  # noqa: F403 - the suite's tests, collected again here

from egressguard.lab import Lab


@pytest.fixture(autouse=True)
def on_nftables(udp_lab: Lab) -> Iterator[None]:  # noqa: F811
    assert "inet egressguard" in nft_tables(udp_lab) and legacy_tables(udp_lab) == []
    yield
