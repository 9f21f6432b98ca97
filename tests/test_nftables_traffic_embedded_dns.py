"""tests/test_traffic_embedded_dns.py on the nftables back end: Docker's embedded DNS (its DNAT
rules in legacy x_tables, as a Docker with the iptables firewall writes them) beside our nft table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nftbed import nft_tables, nftables_env  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_traffic_embedded_dns import *  # noqa: F403 - the suite's tests, collected again here

from egressguard.lab import Lab


@pytest.fixture(autouse=True)
def on_nftables(docker_like: Lab) -> Iterator[None]:  # noqa: F811
    assert "inet egressguard" in nft_tables(docker_like)
    yield
