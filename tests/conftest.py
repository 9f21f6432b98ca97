"""Shared fixtures: real lab namespaces (root only), and per-suite figures printed at the end."""

from __future__ import annotations

import difflib
import itertools
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator

import pytest

from egressguard.lab import Lab, topology_name

_FIGURES: list[str] = []

# The suites that read iptables state (iptables-legacy-save, ipsets, python-iptables tampering) run
# on the iptables back end; their nftables twins (tests/test_nftables_*.py) pin nftables, and the
# default, `auto`, is what tests/test_demo.py, tests/test_nftables_select*.py and the container
# tests (tests/docker) run. A run with EGRESSGUARD_BACKEND set keeps it.
os.environ.setdefault("EGRESSGUARD_BACKEND", "iptables")


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
    `Lab()`'s unless the module lists LAB_TOPOLOGIES (see pytest_generate_tests); in a module whose
    `module_lab` is parametrized (an nftables twin's autouse fixture uses it), the shape of that
    test's `module_lab`, so a test id never names a topology its pod does not have."""
    shape = getattr(request, "param", None)
    if shape is None:
        callspec = getattr(request.node, "callspec", None)
        shape = callspec.params.get("module_lab") if callspec is not None else None
    with Lab(**(shape or {})) as built:
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


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest) -> object:
    """A lab fixture given a topology (LAB_TOPOLOGIES) must build that one: a module's own `module_lab`
    or `lab` that ignored `request.param` would run on eth0 under another topology's test id."""
    built = yield
    want = getattr(request, "param", None)
    if isinstance(built, Lab) and fixturedef.argname in ("lab", "module_lab") and isinstance(want, dict):
        assert built.topology == topology_name(**want), (
            f"fixture {fixturedef.argname} of {request.node.nodeid} built a {built.topology} pod, "
            f"not the {topology_name(**want)} its parameter asks for")
    return built


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Append one line per suite (e.g. 'bypass: 0 of 41 attempts got through'); printed at the end."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("egressguard figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


# -- host safety (read-only) -----------------------------------------------------------------------
# Everything egressguard can write in a network namespace, read in the machine's own namespace before
# and after the session: x_tables rules of both families (every table), the nftables ruleset (rules
# a foreign tool could add next to ours, and nf_tables back ends of iptables), ipsets with their
# members, and routing-policy rules of both families (the fence is `prohibit ... proto 235`). Whole
# dumps are compared, not only egressguard's names: a test that ran a command in the wrong namespace
# changes something, whatever it wrote. Only listing commands run here; none of them changes state.

_HOST_STATE = {
    "iptables-legacy-save": ("iptables-legacy-save",),
    "ip6tables-legacy-save": ("ip6tables-legacy-save",),
    "nft list ruleset": ("nft", "list", "ruleset"),
    "ipset save": ("ipset", "save"),
    "ip rule": ("ip", "rule", "show"),
    "ip -6 rule": ("ip", "-6", "rule", "show"),
}
_COUNTERS = re.compile(r"\[\d+:\d+\]|packets \d+ bytes \d+|expires \S+")


def host_state() -> dict[str, str]:
    """Normalised dumps (comments with dates, packet and byte counters removed) of the caller's namespace."""
    state = {}
    for name, argv in _HOST_STATE.items():
        if not shutil.which(argv[0]):
            state[name] = "(not installed)"
            continue
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        lines = [_COUNTERS.sub("#", line) for line in done.stdout.splitlines() if not line.startswith("#")]
        failed = f"\n(exit {done.returncode}: {done.stderr.strip()})" if done.returncode else ""
        state[name] = "\n".join(lines) + failed
    return state


@pytest.fixture(scope="session", autouse=True)
def host_namespace_untouched() -> Iterator[None]:
    """The machine's own namespace holds after the session exactly what it held before."""
    if os.geteuid() != 0:
        why = "host-safety check NOT run: reading the host's rules, sets and ip rules needs root"
        warnings.warn(why, pytest.PytestWarning, stacklevel=1)
        _FIGURES.append(why)
        yield
        return
    before = host_state()
    yield
    after = host_state()
    changed = [name for name in before if after[name] != before[name]]
    diff = "\n".join("\n".join(difflib.unified_diff(before[n].splitlines(), after[n].splitlines(), n, n, lineterm=""))
                     for n in changed)
    assert not changed, f"a test changed the machine's own network namespace:\n{diff}"
    _FIGURES.append(f"host safety: {', '.join(before)} unchanged in the machine's own namespace")


# -- CI: a container test may not skip ---------------------------------------------------------------
# Without a Docker daemon (or with EG_SKIP_DOCKER=1) the tests marked `docker` skip, and the run would
# pass with the Docker and Kubernetes privilege tables never exercised. Under CI=true such a skip is
# turned into a failure of that test, so a CI run proves them or goes red. (An xfail stays an xfail.)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail") and "docker" in item.keywords and _ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: container test skipped ({reason}): under CI every docker test must run"
