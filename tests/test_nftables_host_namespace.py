"""tests/test_host_namespace.py on the nftables back end: the same warning, the same guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nftbed import nft_tables, nftables_env  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_host_namespace import *  # noqa: F403 - the suite's tests, collected again here

from egressguard.lab import Lab


@pytest.fixture(autouse=True)
def on_nftables(lab: Lab) -> Iterator[None]:
    yield
    if lab.status_file.exists():  # the tests that applied: with the nftables table
        assert "inet egressguard" in nft_tables(lab)
