"""tests/test_traffic_topologies.py on the nftables back end: same pod shapes, same expectations
(a second link counted at its own far end, an IPv6-disabled pod, the kernel's default ping range)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from nftbed import legacy_tables
from test_traffic_topologies import *  # noqa: F403 - the suite's tests, collected again here
from test_traffic_topologies import test_a_link_added_after_apply_is_guarded_from_its_first_packet

from egressguard.lab import Lab

# Runs on both back ends by its own parameter already.
del test_a_link_added_after_apply_is_guarded_from_its_first_packet


@pytest.fixture(scope="module", autouse=True)
def nftables_backend() -> Iterator[None]:
    """EGRESSGUARD_BACKEND=nftables for this module (its pods are its tests' own, not `module_lab`)."""
    saved = os.environ.get("EGRESSGUARD_BACKEND")
    os.environ["EGRESSGUARD_BACKEND"] = "nftables"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EGRESSGUARD_BACKEND", None)
        else:
            os.environ["EGRESSGUARD_BACKEND"] = saved


@pytest.fixture(autouse=True)
def no_legacy_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    """The nftables back end touched no legacy x_tables in the module's shared two-link pod."""
    yield
    if "two_links" in request.fixturenames:
        lab: Lab = request.getfixturevalue("two_links")
        assert legacy_tables(lab) == [], "the nftables back end touched legacy x_tables"
