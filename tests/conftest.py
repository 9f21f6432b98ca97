"""Shared fixtures: real lab namespaces (root only), and per-suite figures printed at the end."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from egressguard.lab import Lab, topology_name

_FIGURES: list[str] = []


def _can_build_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables-legacy", "ip6tables-legacy"):
        if not shutil.which(tool):
            return f"needs {tool} (run scripts/bootstrap)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = _can_build_namespaces()
    if why:
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh pod + world pair for one test; removed afterwards, also on failure. Its shape is
    `Lab()`'s unless the module lists LAB_TOPOLOGIES (see pytest_generate_tests)."""
    with Lab(**getattr(request, "param", {})) as built:
        yield built


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One pod + world pair shared by a module's tests (for read-only probe batteries); one per
    topology when the module lists LAB_TOPOLOGIES."""
    with Lab(**getattr(request, "param", {})) as built:
        yield built


_turns: dict[str, Iterator[int]] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets LAB_TOPOLOGIES (a list of `Lab` keyword dicts) runs on each of them, sampled
    so the run time stays small: every test that uses `module_lab` runs once per topology (one lab
    built per topology), and each test that builds its own `lab` gets the next topology in turn."""
    topologies = getattr(metafunc.module, "LAB_TOPOLOGIES", None)
    if not topologies:
        return
    if "module_lab" in metafunc.fixturenames:
        metafunc.parametrize("module_lab", topologies, ids=[topology_name(**t) for t in topologies],
                             indirect=True, scope="module")
    elif "lab" in metafunc.fixturenames:
        turn = next(_turns.setdefault(metafunc.module.__name__, itertools.count()))
        chosen = topologies[turn % len(topologies)]
        metafunc.parametrize("lab", [chosen], ids=[topology_name(**chosen)], indirect=True)


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Append one line per suite (e.g. 'bypass: 0 of 41 attempts got through'); printed at the end."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("egressguard figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def host_namespace_untouched() -> Iterator[None]:
    """The machine's own namespace must never carry egressguard rules (checked read-only)."""
    def ours() -> int:
        count = 0
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            if shutil.which(tool) and os.geteuid() == 0:
                out = subprocess.run([tool], capture_output=True, text=True).stdout
                count += out.count("EGRESSGUARD")
        return count

    before = ours()
    yield
    assert ours() == before, "a test changed the machine's own network namespace"
