"""Unit tests of the policy: schema, one-line errors that locate the problem, loading order, digest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from egressguard import policy as policy_mod
from egressguard.errors import PolicyError
from egressguard.policy import DEFAULT_POLICY, digest, load, validate


def _error(data: Any) -> str:
    with pytest.raises(PolicyError) as info:
        validate(data, "p.yaml")
    message = str(info.value)
    assert "\n" not in message, "a policy error is one line"
    assert message.startswith("policy error: p.yaml: ")
    return message.removeprefix("policy error: p.yaml: ")


@pytest.fixture(autouse=True)
def no_system_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine's /etc/egressguard/policy.yaml (if any) must not leak into these tests."""
    monkeypatch.setattr(policy_mod, "DEFAULT_POLICY_PATH", tmp_path / "absent.yaml")


# -- defaults ----------------------------------------------------------------------------------


def test_minimal_policy_gets_the_documented_defaults() -> None:
    p = validate({"version": 1})
    assert p.confine.uids == "all" and p.confines_everyone
    assert p.exempt.uids == []
    assert p.action == "reject"
    assert p.loopback == "allow"
    assert p.dns.resolvers == "auto"
    assert p.deny_metadata is True
    assert p.allow == [] and p.deny == [] and p.redirect == []


def test_allow_entry_defaults_to_tcp_and_every_port() -> None:
    entry = validate({"version": 1, "allow": [{"cidr": "203.0.113.0/24"}]}).allow[0]
    assert entry.protocol == "tcp" and entry.ports is None


def test_deny_entry_defaults_to_every_protocol() -> None:
    assert validate({"version": 1, "deny": [{"cidr": "10.0.0.0/8"}]}).deny[0].protocol == "any"


def test_builtin_default_policy_confines_1000_exempts_1001_and_redirects_web_to_8444() -> None:
    p = validate(DEFAULT_POLICY)
    assert p.confine.uids == [1000] and p.exempt.uids == [1001]
    assert p.loopback == "allow" and p.dns.resolvers == "auto" and p.allow == []
    assert [(r.ports, r.to_port) for r in p.redirect] == [([80, 443], 8444)]


def test_networks_and_addresses_are_normalised() -> None:
    p = validate({"version": 1, "allow": [{"cidr": " 2001:DB8:0::/32 "}], "dns": {"resolvers": ["2001:DB8::53"]}})
    assert p.allow[0].cidr == "2001:db8::/32"
    assert p.dns.resolvers == ["2001:db8::53"]


def test_host_names_are_lowercased_without_trailing_dot() -> None:
    assert validate({"version": 1, "allow": [{"host": "API.Example.COM."}]}).allow[0].host == "api.example.com"


def test_empty_resolver_list_is_valid_and_means_no_dns() -> None:
    assert validate({"version": 1, "dns": {"resolvers": []}}).dns.resolvers == []


# -- errors: field, position and problem, on one line ------------------------------------------


def test_unknown_top_level_key_is_named() -> None:
    assert _error({"version": 1, "alow": []}) == "alow: unknown key"


def test_unknown_key_inside_an_entry_names_its_position() -> None:
    assert _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24"}, {"cidr": "192.0.2.0/24", "port": 1}]}) == (
        "allow[1].port: unknown key"
    )


def test_bad_cidr_names_field_position_and_problem() -> None:
    msg = _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24"}, {"cidr": "10.0.0.1/8"}]})
    assert msg.startswith("allow[1].cidr: '10.0.0.1/8' is not a valid IPv4 or IPv6 network")
    assert "host bits set" in msg


def test_bad_ipv6_cidr_in_deny_is_located() -> None:
    assert _error({"version": 1, "deny": [{"cidr": "2001:db8::zz/32"}]}).startswith("deny[0].cidr: ")


def test_port_out_of_range_names_the_port_position() -> None:
    msg = _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [443, 65536]}]})
    assert msg.startswith("allow[0].ports[1]: ") and "65535" in msg


def test_port_zero_is_refused() -> None:
    assert _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [0]}]}).startswith("allow[0].ports[0]: ")


def test_port_given_as_string_or_bool_is_refused() -> None:
    assert _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": ["443"]}]}).startswith("allow[0].ports[0]: ")
    assert _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [True]}]}).startswith("allow[0].ports[0]: ")


def test_empty_ports_list_is_an_error() -> None:
    msg = _error({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": []}]})
    assert msg.startswith("allow[0].ports: ") and "at least 1" in msg


def test_uid_in_both_confine_and_exempt_is_an_error() -> None:
    msg = _error({"version": 1, "confine": {"uids": [1000, 1002]}, "exempt": {"uids": [1001, 1002]}})
    assert msg == "exempt.uids[1]: uid 1002 is also in confine.uids"


def test_empty_confine_list_is_an_error() -> None:
    assert _error({"version": 1, "confine": {"uids": []}}).startswith("confine.uids: an empty list confines nobody")


def test_negative_uid_is_an_error() -> None:
    assert _error({"version": 1, "exempt": {"uids": [-1]}}).startswith("exempt.uids[0]: ")


def test_entry_needs_exactly_one_of_cidr_or_host() -> None:
    both = _error({"version": 1, "allow": [{"cidr": "192.0.2.0/24", "host": "a.test"}]})
    neither = _error({"version": 1, "deny": [{"ports": [443]}]})
    # (the list of keys grows with allow_file/deny_file)
    assert re.match(r"allow\[0\]: give exactly one of `cidr`(,| or) `host`", both)
    assert re.match(r"deny\[0\]: give exactly one of `cidr`(,| or) `host`", neither)


def test_ports_with_icmp_or_any_is_an_error() -> None:
    assert _error({"version": 1, "allow": [{"cidr": "192.0.2.0/24", "protocol": "icmp", "ports": [1]}]}) == (
        "allow[0]: `ports` needs protocol tcp or udp, not icmp"
    )


def test_unknown_protocol_is_an_error() -> None:
    assert _error({"version": 1, "allow": [{"cidr": "192.0.2.0/24", "protocol": "sctp"}]}).startswith("allow[0].protocol: ")


def test_address_given_as_host_is_an_error() -> None:
    assert "use `cidr`" in _error({"version": 1, "allow": [{"host": "192.0.2.1"}]})


def test_invalid_host_name_is_an_error() -> None:
    assert _error({"version": 1, "allow": [{"host": "bad_name!.test"}]}).startswith("allow[0].host: ")


def test_bad_resolver_address_is_located() -> None:
    assert _error({"version": 1, "dns": {"resolvers": ["198.51.100.53", "1.2.3"]}}).startswith("dns.resolvers")


def test_empty_loopback_port_list_is_an_error() -> None:
    assert _error({"version": 1, "loopback": []}).startswith("loopback: an empty port list")


def test_port_redirected_twice_is_an_error() -> None:
    msg = _error({"version": 1, "redirect": [{"ports": [80], "to_port": 8444}, {"ports": [443, 80], "to_port": 8445}]})
    assert msg == "redirect[1].ports: port 80 is already redirected by redirect[0]"


def test_wrong_version_and_missing_version_are_errors() -> None:
    assert _error({"version": 2}).startswith("version: ")
    assert _error({}) == "version: Field required"


def test_unknown_action_is_an_error() -> None:
    assert _error({"version": 1, "action": "accept"}).startswith("action: ")


def test_a_policy_that_is_not_a_mapping_is_an_error() -> None:
    assert _error(["version", 1]) == "the policy must be a mapping (got list)"


def test_many_errors_are_reported_on_one_line_capped_at_three() -> None:
    msg = _error({"version": 1, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    assert msg.count("unknown key") == 3 and msg.endswith("(and 2 more)")


# -- parsing -----------------------------------------------------------------------------------


def test_yaml_and_json_files_give_the_same_policy(tmp_path: Path) -> None:
    data = {"version": 1, "confine": {"uids": [1000]}, "allow": [{"cidr": "203.0.113.0/24", "ports": [443]}]}
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.yaml").write_text(
        "version: 1\nconfine:\n  uids: [1000]\nallow:\n  - cidr: 203.0.113.0/24\n    ports: [443]\n"
    )
    assert policy_mod.load_file(tmp_path / "p.json") == policy_mod.load_file(tmp_path / "p.yaml")


def test_invalid_yaml_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nallow: [\n")
    with pytest.raises(PolicyError, match=r"invalid YAML at line \d+ column \d+") as info:
        policy_mod.load_file(path)
    assert "\n" not in str(info.value)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\naction: drop\naction: reject\n")
    with pytest.raises(PolicyError, match="duplicate key 'action'"):
        policy_mod.load_file(path)


def test_duplicate_json_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"version": 1, "action": "drop", "action": "reject"}')
    with pytest.raises(PolicyError, match="duplicate key 'action'"):
        policy_mod.load_file(path)


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nexempt: &e {uids: [1001]}\nconfine: *e\n")
    with pytest.raises(PolicyError, match="aliases"):
        policy_mod.load_file(path)


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        policy_mod.load_file(tmp_path / "nope.yaml")


# -- where the policy comes from ---------------------------------------------------------------


def _files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("version: 1\naction: drop\n")
    b.write_text("version: 1\nloopback: deny\n")
    return a, b


def test_policy_option_wins_over_both_environment_variables(tmp_path: Path) -> None:
    a, b = _files(tmp_path)
    env = {"EGRESSGUARD_POLICY": str(b), "EGRESSGUARD_POLICY_JSON": '{"version": 1, "deny_metadata": false}'}
    loaded = load(str(a), env)
    assert loaded.source == str(a) and loaded.policy.action == "drop"


def test_policy_path_variable_wins_over_inline_json(tmp_path: Path) -> None:
    _, b = _files(tmp_path)
    loaded = load(None, {"EGRESSGUARD_POLICY": str(b), "EGRESSGUARD_POLICY_JSON": '{"version": 1}'})
    assert loaded.source == str(b) and loaded.policy.loopback == "deny"


def test_inline_json_variable_is_used_when_no_path_is_given() -> None:
    loaded = load(None, {"EGRESSGUARD_POLICY_JSON": '{"version": 1, "deny_metadata": false}'})
    assert loaded.source == "EGRESSGUARD_POLICY_JSON" and loaded.policy.deny_metadata is False


def test_inline_json_errors_name_the_variable() -> None:
    with pytest.raises(PolicyError, match=r"^policy error: EGRESSGUARD_POLICY_JSON: bogus: unknown key$"):
        load(None, {"EGRESSGUARD_POLICY_JSON": '{"version": 1, "bogus": 1}'})
    with pytest.raises(PolicyError, match=r"^policy error: EGRESSGUARD_POLICY_JSON: invalid JSON"):
        load(None, {"EGRESSGUARD_POLICY_JSON": "{version: 1"})


def test_empty_variables_are_ignored_and_the_builtin_default_is_used() -> None:
    loaded = load(None, {"EGRESSGUARD_POLICY": "", "EGRESSGUARD_POLICY_JSON": ""})
    assert loaded.source == "built-in default"
    assert loaded.policy == validate(DEFAULT_POLICY)


def test_system_policy_file_is_used_before_the_builtin_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = _files(tmp_path)
    monkeypatch.setattr(policy_mod, "DEFAULT_POLICY_PATH", a)
    assert load(None, {}).source == str(a)


# -- digest ------------------------------------------------------------------------------------


def test_digest_ignores_key_order_and_spelled_out_defaults() -> None:
    short = validate({"version": 1, "allow": [{"cidr": "203.0.113.0/24"}]})
    spelled = validate(
        {
            "allow": [{"protocol": "tcp", "cidr": "203.0.113.0/24"}],
            "deny_metadata": True,
            "action": "reject",
            "confine": {"uids": "all"},
            "version": 1,
        }
    )
    assert digest(short) == digest(spelled)


def test_digest_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from egressguard.policy import validate, digest; print(digest(validate({'version': 1, 'allow': "
    code += "[{'cidr': '203.0.113.0/24', 'ports': [443, 80]}], 'exempt': {'uids': [1001, 0]}})))"
    seen = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    here = digest(validate({"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [443, 80]}],
                            "exempt": {"uids": [1001, 0]}}))
    assert seen == {here}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", here)


def test_digest_changes_with_any_meaningful_change() -> None:
    base = {"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [443]}]}
    variants = [
        {**base, "action": "drop"},
        {**base, "allow": [{"cidr": "203.0.113.0/24", "ports": [444]}]},
        {**base, "allow": [{"cidr": "203.0.113.0/25", "ports": [443]}]},
        {**base, "loopback": [8443]},
        {**base, "dns": {"resolvers": []}},
    ]
    digests = {digest(validate(v)) for v in [base, *variants]}
    assert len(digests) == len(variants) + 1


def test_policy_is_immutable() -> None:
    p = validate({"version": 1})
    with pytest.raises(Exception):  # noqa: B017,PT011 - a frozen record's error
        p.action = "drop"  # type: ignore[misc]


def test_version_true_is_not_taken_for_1() -> None:
    with pytest.raises(PolicyError, match=r"version: must be the number 1"):
        validate({"version": True})


@pytest.mark.parametrize("text", ["version: 1.0\n", '{"version": 1.0}'])
def test_version_1_point_0_is_not_taken_for_1(text: str) -> None:
    with pytest.raises(PolicyError, match=r"version: must be the number 1"):
        validate(policy_mod.parse_text(text, "p"))


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("version: 1\ndns: {resolvers: !!set {198.51.100.53}}\n", "set"),  # a set's order is random
        ("version: 1\nallow: !!omap [{cidr: 192.0.2.0/24}]\n", "omap"),
        ("version: 1\nallow: !!pairs [{cidr: 192.0.2.0/24}]\n", "pairs"),
        ("version: 1\nexempt: {uids: [!!binary AAAA]}\n", "binary"),
    ],
)
def test_yaml_types_that_no_policy_field_has_are_refused_with_their_line(text: str, kind: str) -> None:
    with pytest.raises(PolicyError, match=rf"invalid YAML at line 2 column \d+: YAML type {kind} is not allowed"):
        policy_mod.parse_text(text, "p")


# -- log (issue 14) ------------------------------------------------------------------------------


def test_log_of_refusals_is_on_by_default_with_the_documented_rate() -> None:
    log = validate({"version": 1}).log
    assert (log.refused, log.rate, log.burst) == (True, "10/second", 50)


@pytest.mark.parametrize(("log", "where"), [
    ({"refused": "maybe"}, "log.refused: "),
    ({"rate": "10/sec"}, "log.rate: '10/sec' is not a rate such as 10/second"),
    ({"rate": "0/second"}, "log.rate: '0/second' is not a rate"),
    ({"rate": 10}, "log.rate: Input should be a valid string"),
    ({"rate": "20000/second"}, "log.rate: '20000/second': more than 10000/second"),
    ({"burst": 0}, "log.burst: "),
    ({"burst": 10001}, "log.burst: "),
    ({"burst": "50"}, "log.burst: "),
    ({"group": 3}, "log.group: unknown key"),
])
def test_bad_log_settings_are_one_line_naming_the_field(log: dict[str, Any], where: str) -> None:
    assert _error({"version": 1, "log": log}).startswith(where)


def test_keys_added_since_0_1_leave_the_digest_of_a_policy_that_does_not_set_them_unchanged() -> None:
    # An upgraded image must not refuse the digest a deployment pinned for the same policy file:
    # this is the digest 0.1.1 gave the policy of examples/kubernetes/pod.yaml.
    import yaml  # noqa: PLC0415

    manifest = Path(__file__).parent.parent / "examples" / "kubernetes" / "pod.yaml"
    config = next(d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "ConfigMap")
    assert policy_mod.digest(validate(yaml.safe_load(config["data"]["policy.yaml"]))) == (
        "sha256:764254f9cbafe6f48eb4f39553a9d7fe7db86bfa72526b107cd16a4bfd0374b0")
    for key in policy_mod.ADDED_KEYS:
        assert key.split(".")[0] in validate({"version": 1}).to_json()  # every path names a real key


def test_setting_an_added_key_away_from_its_default_changes_the_digest() -> None:
    base = policy_mod.digest(validate({"version": 1}))
    assert policy_mod.digest(validate({"version": 1, "log": {"refused": True}})) == base  # the default, spelled out
    assert policy_mod.digest(validate({"version": 1, "log": {"refused": False}})) != base
    assert policy_mod.digest(validate({"version": 1, "log": {"burst": 7}})) != base
