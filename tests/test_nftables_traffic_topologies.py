"""tests/test_traffic_topologies.py on the nftables back end: same pod shapes, same expectations
(a second link counted at its own far end, an IPv6-disabled pod, the kernel's default ping range)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nftbed import legacy_tables, nftables_env  # noqa: F401 - the autouse fixture: EGRESSGUARD_BACKEND=nftables
from test_traffic_topologies import *  # noqa: F403 - the suite's tests, collected again here
from test_traffic_topologies import test_a_link_added_after_apply_is_guarded_from_its_first_packet

from egressguard.lab import Lab

# Runs on both back ends by its own parameter already.
del test_a_link_added_after_apply_is_guarded_from_its_first_packet


@pytest.fixture(autouse=True)
def no_legacy_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    """The nftables back end touched no legacy x_tables in the module's shared two-link pod."""
    yield
    if "two_links" in request.fixturenames:
        lab: Lab = request.getfixturevalue("two_links")
        assert legacy_tables(lab) == [], "the nftables back end touched legacy x_tables"
