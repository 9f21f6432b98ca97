"""apply's sequence, unit-tested against the in-memory back end (egressguard/backends/fake.py): no
root, no kernel, no namespace. Each test names the behaviour: deny first, what a refusal leaves
behind and its exit code, re-apply without a lockdown, reset.

These are on top of the real tests, never instead: the same behaviours are proved with real
commits and real traffic in real namespaces on both back ends (tests/test_faults.py,
tests/test_nftables_faults.py, tests/test_exit_paths.py, tests/test_fence.py,
tests/test_verify_status.py). Name resolution is replaced by a recorder here (it is not kernel
behaviour), so that its place in the sequence can be asserted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from egressguard import apply as apply_mod
from egressguard import facts
from egressguard.backends.fake import FakeBackend
from egressguard.errors import ApplyFailed, EgressGuardError, EnvironmentUnsupported, VerifyFailed
from egressguard.policy import Policy, validate
from egressguard.ruleset import CONFINED, Chain, Rule, Ruleset

RESOLVERS = ["198.51.100.53"]
CIDRS_ONLY = {"version": 1, "confine": {"uids": [1000]}, "dns": {"resolvers": RESOLVERS},
              "allow": [{"cidr": "203.0.113.0/24", "ports": [443]}]}
WITH_HOST = {**CIDRS_ONLY, "allow": [{"host": "api.test", "ports": [443]}]}
API_TEST = ("203.0.113.7",)

# The two shapes of back end apply knows: one commit for both families (nftables), or one commit per
# family with a hold that closes both at once before the first (iptables and its routing fence).
ATOMIC = {"atomic_families": True}
PER_FAMILY = {"atomic_families": False, "holds": True}


@pytest.fixture
def fake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend(**getattr(request, "param", ATOMIC))

    def resolve(names: list[tuple[str, bool]], resolvers: list[str], **_: Any) -> facts.Resolution:
        backend.calls.append("resolve")
        return facts.Resolution(addresses={n: API_TEST for n, _ in names}, skipped={}, shared={})

    monkeypatch.setattr(facts, "resolve_hosts", resolve)
    return backend


def _apply(backend: FakeBackend, data: dict[str, Any], status: Path) -> apply_mod.Outcome:
    policy: Policy = validate(data)
    return apply_mod.apply(policy, "test", backend, status)


def _status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _chain(rs: Ruleset | None, name: str) -> Chain:
    assert rs is not None
    return next(c for c in rs.table(4, "filter").chains if c.name == name)


@pytest.mark.parametrize(("fake", "hold"), [(ATOMIC, []), (PER_FAMILY, ["hold"])], indirect=["fake"],
                         ids=["one-commit", "per-family"])
def test_a_first_apply_that_must_resolve_names_commits_the_lockdown_before_resolving(
    fake: FakeBackend, hold: list[str], tmp_path: Path
) -> None:
    out = _apply(fake, WITH_HOST, tmp_path / "status.json")
    assert fake.calls == ["preflight", "read", *hold, "commit lockdown", "release", "resolve", "commit policy", "read"]
    assert out.lockdown_first and not out.fence_first and not fake.holding
    assert fake.installed is not None and fake.installed.kind == "policy"
    assert any(r.ctorigdst == "203.0.113.7/32" for r in _chain(fake.installed, CONFINED).rules)  # as resolved
    st = _status(tmp_path / "status.json")
    assert (st["state"], st["exit_code"], st["lockdown_first"], st["hosts"]) == ("policy", 0, True, {"api.test": list(API_TEST)})


def test_a_first_apply_with_nothing_to_resolve_holds_both_families_while_the_policy_goes_in(tmp_path: Path) -> None:
    """Per-family commits: the hold, not a lockdown commit, covers the gap between the families, and
    is lifted once both hold the policy."""
    fake = FakeBackend(**PER_FAMILY)
    out = _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert fake.calls == ["preflight", "read", "hold", "commit policy", "release", "read"]
    assert out.fence_first and not out.lockdown_first and not fake.holding
    assert _status(tmp_path / "status.json")["fence_first"] is True


def test_a_first_apply_with_nothing_to_resolve_on_one_commit_needs_no_lockdown(fake: FakeBackend, tmp_path: Path) -> None:
    out = _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert fake.calls == ["preflight", "read", "release", "resolve", "commit policy", "read"]
    assert not out.lockdown_first and not out.fence_first


@pytest.mark.parametrize("error", [ApplyFailed("kernel refused the commit"), EnvironmentUnsupported("no owner match")],
                         ids=["exit-4", "exit-3"])
def test_a_refused_commit_leaves_the_lockdown_and_the_errors_exit_code(
    fake: FakeBackend, error: EgressGuardError, tmp_path: Path
) -> None:
    fake.fail("commit policy", error)
    with pytest.raises(type(error)) as raised:
        _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert raised.value is error
    assert fake.calls[-2:] == ["commit policy", "commit lockdown"]
    assert fake.installed is not None and fake.installed.kind == "lockdown"
    st = _status(tmp_path / "status.json")
    assert (st["state"], st["exit_code"], st["error"]) == ("lockdown", error.exit_code, str(error))


def _foreign_rule(rs: Ruleset) -> Ruleset:
    """The read-back shows a rule nobody meant at the top of the confined chain (ipv4)."""
    def tampered(chain: Chain) -> Chain:
        if chain.name != CONFINED:
            return chain
        return Chain(chain.name, (Rule(target="RETURN", comment="tampered", dst="192.0.2.99/32"), *chain.rules))

    tables = tuple(dataclasses.replace(t, chains=tuple(map(tampered, t.chains))) if t.family == 4 and t.name == "filter"
                   else t for t in rs.tables)
    return dataclasses.replace(rs, tables=tables)


def test_a_read_back_that_differs_is_exit_5_with_the_lockdown(fake: FakeBackend, tmp_path: Path) -> None:
    fake.tamper = _foreign_rule
    with pytest.raises(VerifyFailed, match=r"chain EGRESSGUARD-CONFINED has \d+ rules") as raised:
        _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert raised.value.exit_code == 5
    assert fake.calls[-3:] == ["commit policy", "read", "commit lockdown"]
    assert fake.installed is not None and fake.installed.kind == "lockdown"
    st = _status(tmp_path / "status.json")
    assert (st["state"], st["exit_code"]) == ("lockdown", 5)


def test_a_lockdown_refused_too_is_reported_as_lockdown_failed(fake: FakeBackend, tmp_path: Path) -> None:
    fake.fail("commit policy", ApplyFailed("kernel refused the commit"))
    fake.fail("commit lockdown", ApplyFailed("kernel refused the lockdown"))
    with pytest.raises(ApplyFailed, match="refused the commit"):
        _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert fake.installed is None  # nothing the kernel refused is claimed
    st = _status(tmp_path / "status.json")
    assert (st["state"], st["exit_code"]) == ("lockdown_failed", 4)


def test_a_lockdown_refused_while_the_hold_is_up_keeps_the_hold_and_says_so(tmp_path: Path) -> None:
    fake = FakeBackend(**PER_FAMILY)
    fake.fail("commit policy", EnvironmentUnsupported("no owner match"))
    fake.fail("commit lockdown", EnvironmentUnsupported("no owner match"))
    with pytest.raises(EnvironmentUnsupported):
        _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert fake.holding and "release" not in fake.calls  # the confined uids stay closed
    st = _status(tmp_path / "status.json")
    assert (st["state"], st["exit_code"]) == ("fence", 3)


@pytest.mark.parametrize("fake", [ATOMIC, PER_FAMILY], indirect=True, ids=["one-commit", "per-family"])
def test_an_already_guarded_namespace_is_re_applied_without_a_lockdown(fake: FakeBackend, tmp_path: Path) -> None:
    _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    assert fake.guarded(fake.read())
    fake.calls.clear()
    out = _apply(fake, WITH_HOST, tmp_path / "status.json")
    assert fake.calls == ["preflight", "read", "release", "resolve", "commit policy", "read"]
    assert not out.lockdown_first and not out.fence_first
    assert _status(tmp_path / "status.json")["state"] == "policy"


def test_reset_commits_an_empty_ruleset_and_removes_the_status_file(fake: FakeBackend, tmp_path: Path) -> None:
    _apply(fake, CIDRS_ONLY, tmp_path / "status.json")
    fake.calls.clear()
    apply_mod.reset(fake, tmp_path / "status.json")
    assert fake.calls == ["preflight", "read", "commit policy", "release"]
    assert fake.installed is not None and fake.installed.rule_count() == 0
    assert all(not t.chains for t in fake.installed.tables) and len(fake.installed.tables) == 4
    assert not fake.guarded(fake.read())
    assert not (tmp_path / "status.json").exists()
