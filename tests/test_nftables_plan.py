"""nftables back end without traffic: `plan --backend nftables` golden files, every Rule field
rendered or refused, and each golden policy committed to a fresh namespace's kernel and read back
equal to its plan (model vs kernel, structurally)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from goldenfile import assert_matches_golden

from egressguard import cli
from egressguard.backends.nftables import render
from egressguard.ruleset import DISPATCH, Chain, Facts, Rule, Ruleset, Table, address_set, build

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path("tests/golden")
RESOLV_CONF = GOLDEN / "resolv.conf"
_CLONE_NEWNET = 0x40000000
POLICIES = sorted(p.stem for p in (ROOT / GOLDEN).glob("*.yaml"))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for var in ("EGRESSGUARD_POLICY", "EGRESSGUARD_POLICY_JSON", "EGRESSGUARD_BACKEND"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", POLICIES)
def test_nft_plan_matches_golden_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["plan", "--backend", "nftables", "--resolv-conf", str(RESOLV_CONF),
                     "--policy", str(GOLDEN / f"{name}.yaml")])
    got = capsys.readouterr().out
    assert code == 0
    assert_matches_golden(ROOT / GOLDEN / "nftables" / f"{name}.nft", got, "nft plan differs from")


def test_the_environment_picks_the_plan_back_end(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRESSGUARD_BACKEND", "nftables")
    assert cli.main(["plan", "--resolv-conf", str(RESOLV_CONF), "--policy", str(GOLDEN / "default.yaml")]) == 0
    assert "add table inet egressguard" in capsys.readouterr().out
    assert cli.main(["plan", "--backend", "iptables", "--resolv-conf", str(RESOLV_CONF),
                     "--policy", str(GOLDEN / "default.yaml")]) == 0
    assert "*filter" in capsys.readouterr().out


def test_every_rule_field_is_rendered_and_decoded() -> None:
    """A field added to Rule must be taught to this back end (render and decode) before it is used."""
    assert {f.name for f in dataclasses.fields(Rule)} == render.HANDLED_FIELDS


def test_a_rule_field_this_back_end_does_not_know_is_refused_not_dropped() -> None:
    Extended = dataclasses.make_dataclass("Extended", [("hashlimit", "str | None", dataclasses.field(default=None))],
                                          bases=(Rule,), frozen=True)
    plain = Extended(target="RETURN", comment="x")
    assert render.rule_text(4, "filter", plain).endswith('return comment "x"')  # unset: nothing to lose
    with pytest.raises(render.UnsupportedRule, match="hashlimit"):
        render.rule_text(4, "filter", Extended(target="RETURN", comment="x", hashlimit="5/second"))


@pytest.mark.parametrize("rule", [
    Rule(target="RETURN", comment="x", socketless=True),  # only in a chain of its own (kernel_rules)
    Rule(target="REJECT", comment="x", reject_with="icmp-host-prohibited"),
    Rule(target="REJECT", comment="x", reject_with="tcp-reset"),  # without -p tcp
    Rule(target="QUEUE", comment="x"),
    Rule(target="RETURN", comment="x", dports=(80,)),  # a port without a protocol
])
def test_rules_nft_cannot_mean_the_same_are_refused(rule: Rule) -> None:
    with pytest.raises(render.UnsupportedRule):
        render.rule_text(4, "filter", rule)


def test_rules_sharing_a_limit_jump_to_one_chain_and_must_agree_on_it() -> None:
    kernel = {"target": "RETURN", "comment": "x", "socketless": True, "limit": (10, "second"), "limit_burst": 20,
              "limit_name": "egressguard-x"}
    rs = build_one(Rule(**kernel, icmp6_type="143"), Rule(**kernel, icmp6_type="131"))
    script = render.rules_script(rs, render.Existing())
    assert script.count("jump kernel6-egressguard-x") == 2
    assert script.count("add rule inet egressguard kernel6-egressguard-x limit rate 10/second burst 20 packets") == 1
    other = build_one(Rule(**kernel, icmp6_type="143"), Rule(**{**kernel, "limit_burst": 5}, icmp6_type="131"))
    with pytest.raises(render.UnsupportedRule, match="sharing limit"):
        render.rules_script(other, render.Existing())
    with pytest.raises(render.UnsupportedRule, match="shared limit"):  # outside a socketless rule's chain
        render.rule_text(6, "filter", Rule(target="RETURN", comment="x", limit=(1, "second"), limit_name="egressguard-x"))


def build_one(*rules: Rule) -> Ruleset:
    """A ruleset holding just `rules` in the IPv6 filter dispatch chain."""
    return Ruleset(tables=(Table(6, "filter", (Chain(DISPATCH, rules),)),), kind="policy")


def test_overlapping_set_members_become_one_interval() -> None:
    st = address_set(4, ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/25", "192.0.2.128/25", "198.51.100.7",
                         "203.0.113.0/25", "203.0.113.128/26"])
    assert render.elements(st) == ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.7", "203.0.113.0-203.0.113.191"]
    six = address_set(6, ["2001:db8::/127", "2001:db8::2/127", "2001:db8::1/128"])
    assert render.elements(six) == ["2001:db8::/126"]


# -- the kernel: each plan committed in a namespace of its own, then read back ----------------


def _in_fresh_netns(fn: Callable[[], Any]) -> Any:
    """fn() in a forked child inside a new network namespace (gone when the child exits)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET) != 0:  # os.unshare: Python 3.12+
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                payload = (True, fn())
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                payload = (False, f"{type(exc).__name__}: {exc}")
            with os.fdopen(w, "wb") as fh:
                pickle.dump(payload, fh)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    assert data, "the namespace child died"
    ok, value = pickle.loads(data)
    assert ok, value
    return value


def _legacy_untouched() -> list[str]:
    from egressguard.backends.nftables.backend import legacy_tables_in_use  # noqa: PLC0415

    return legacy_tables_in_use()


def _rulesets(tmp: Path) -> dict[str, Any]:
    from egressguard import policy as policy_mod  # noqa: PLC0415
    from egressguard.facts import resolvers_for  # noqa: PLC0415

    out = {}
    for name in POLICIES:
        pol = policy_mod.load(str(ROOT / GOLDEN / f"{name}.yaml")).policy
        facts = Facts(resolvers=resolvers_for(pol, ROOT / RESOLV_CONF),
                      hosts={"api.example.com": ("203.0.113.20", "2001:db8:2::20"), "blocked.example.com": ("203.0.113.21",)})
        out[name] = build(pol, facts, orig_sets=True)  # as the nftables back end builds them
        out[f"{name}-lockdown"] = build(pol, facts, lockdown=True, orig_sets=True)
    allow = [{"cidr": f"198.18.{i // 256}.{i % 256}/32", "ports": [5000]} for i in range(40)]
    allow.append({"cidr": "198.18.0.0/24", "ports": [5000]})  # overlaps the /32s: one interval in the kernel
    allow += [{"cidr": f"2001:db8:3::{i:x}/128", "protocol": "udp", "ports": [53, 5000]} for i in range(20)]
    path = tmp / "sets.json"
    path.write_text(json.dumps({"version": 1, "confine": {"uids": [1000]}, "allow": allow,
                                "dns": {"resolvers": ["198.51.100.53"]}}))
    many = policy_mod.load(str(path)).policy
    out["sets"] = build(many, Facts(resolvers=("198.51.100.53",)), orig_sets=True)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_every_golden_ruleset_reads_back_equal_from_the_kernel(tmp_path: Path) -> None:
    """One namespace, every ruleset in turn (so each is also a re-apply over another): the kernel's
    listing decodes to exactly the plan, and no legacy x_tables table is created on the way."""
    from egressguard.backends.nftables.backend import NftablesBackend  # noqa: PLC0415
    from egressguard.verify import differences  # noqa: PLC0415

    rulesets = _rulesets(tmp_path)
    assert rulesets["sets"].sets, "the set policy must use kernel sets"

    def each() -> dict[str, list[str]]:
        backend = NftablesBackend()
        backend.preflight()
        found = {}
        for name, rs in [*rulesets.items(), ("default-again", rulesets["default"])]:
            backend.commit(rs)
            found[name] = differences(render.canonical(rs), backend.read(expect=rs.sets), backend.describe)
            if not rs.sets:
                found[name + " (read without expectations)"] = differences(render.canonical(rs), backend.read(), backend.describe)
            else:  # without `expect`, a set is reported as the kernel keeps it: collapsed intervals
                got = {st.name: st.members for st in backend.read().sets}
                want = {st.name: render.networks(st.family, render.intervals(st)) for st in rs.sets}
                found[name + " (kernel's own intervals)"] = [] if got == want else [f"{got} != {want}"]
        found["legacy tables"] = _legacy_untouched()
        return found

    found = _in_fresh_netns(each)
    assert {k: v for k, v in found.items() if v} == {}


def test_u32_tests_compare_by_the_bits_they_constrain_however_nft_merges_them() -> None:
    from egressguard.backends import u32  # noqa: PLC0415

    planned = u32.normal(u32.parse("0x4>>0x10=0x34&&0x4>>0x8&0xff=0x0&&0x0>>0x18&0xf=0x6:0xf"))
    # as nft 1.0.6 lists them: the two adjacent matches merged, the nibble as a masked byte
    merged = u32.from_json({"payload": {"base": "nh", "offset": 32, "len": 24}}, "==", 0x3400)
    nibble = u32.from_json({"&": [{"payload": {"base": "nh", "offset": 0, "len": 8}}, 15]}, "==", {"range": [6, 15]})
    assert merged and nibble
    assert u32.normal([merged, nibble]) == planned
    changed = u32.from_json({"payload": {"base": "nh", "offset": 32, "len": 24}}, "==", 0x3401)
    assert changed and u32.normal([changed, nibble]) != planned
    with pytest.raises(u32.UnsupportedU32):
        u32.parse("0x0>>0x18&0x5=0x1")  # a mask that is not a run of low bits
    with pytest.raises(u32.UnsupportedU32):
        u32.parse("6&0xff@0=0x1")  # header hops (@) have no nft raw equivalent here


def test_an_unknown_back_end_in_the_environment_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EGRESSGUARD_BACKEND", "pf")
    assert cli.main(["plan", "--resolv-conf", str(RESOLV_CONF), "--policy", str(GOLDEN / "default.yaml")]) == 2
    assert "unknown back end 'pf'" in capsys.readouterr().err
    assert cli.main(["status"]) == 2  # before anything touches the kernel


def test_the_default_back_end_is_one_constant() -> None:
    from egressguard.backends import BACKEND_CHOICES, DEFAULT_BACKEND  # noqa: PLC0415

    assert DEFAULT_BACKEND in BACKEND_CHOICES
