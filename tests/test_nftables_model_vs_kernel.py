"""tests/test_model_vs_kernel.py on the nftables back end: the same generated policies and probes,
the kernel's verdict (judged at the world's end for refusals) against the independent model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_model_vs_kernel as suite
from nftbed import backend_env, nft_tables
from test_model_vs_kernel import *  # noqa: F403 - the suite's tests, collected again here

from egressguard.lab import Lab


@pytest.fixture(scope="module", autouse=True)
def nftables_backend(figures: list[str]) -> Iterator[None]:
    """EGRESSGUARD_BACKEND=nftables for this module; its own line of figures."""
    start = dict(suite._pairs)
    with backend_env("nftables"):
        yield
    done = {k: suite._pairs[k] - start.get(k, 0) for k in suite._pairs}
    if done["policies"]:
        figures.append(f"model vs kernel (nftables): {done['policies']} policies, {done['pairs']} policy x probe "
                       f"pairs, {done['disagreements']} disagreements between kernel and explain")


@pytest.fixture(autouse=True)
def on_nftables(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every pod this module applied in holds the nftables table (the back end really was nftables)."""
    yield
    labs: dict[str, Lab] = request.getfixturevalue("labs") if "labs" in request.fixturenames else {}
    for lab in labs.values():
        assert "inet egressguard" in nft_tables(lab), lab.topology
