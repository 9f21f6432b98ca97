"""The pure evaluator behind `egressguard explain`: verdicts and the deciding policy line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from egressguard import cli
from egressguard.errors import PolicyError
from egressguard.explain import Facts, Probe, evaluate, parse_destination
from egressguard.policy import validate

RESOLVERS = ("198.51.100.53", "2001:db8:53::53")
FACTS = Facts(resolvers=RESOLVERS, hosts={"api.test": ("203.0.113.20", "2001:db8:2::20")},
              local=("127.0.0.0/8", "::1/128", "198.51.100.2/32"))

POLICY = validate({
    "version": 1,
    "confine": {"uids": [1000]},
    "exempt": {"uids": [1001]},
    "loopback": [8443],
    "allow": [
        {"cidr": "203.0.113.0/24", "ports": [443]},
        {"cidr": "2001:db8:2::/64", "protocol": "udp", "ports": [9999]},
        {"host": "api.test", "protocol": "any"},
        {"cidr": "169.254.169.254/32"},
        {"cidr": "192.0.2.0/24", "protocol": "icmp"},
    ],
    "deny": [{"cidr": "203.0.113.66/32"}, {"cidr": "2001:db8:2::66/128", "protocol": "tcp", "ports": [443]}],
    "redirect": [{"ports": [80], "to_port": 8444}],
})


def verdict(uid: int, dest: str, port: int | None, proto: str = "tcp", policy=POLICY, facts=FACTS) -> tuple[str, str]:
    v = evaluate(policy, facts, Probe(uid=uid, destination=dest, port=port, protocol=proto))  # type: ignore[arg-type]
    return v.verdict, v.line


@pytest.mark.parametrize(
    ("uid", "dest", "port", "proto", "expected"),
    [
        (1001, "192.0.2.99", 22, "tcp", ("allow", "exempt")),
        (0, "192.0.2.99", 22, "tcp", ("allow", "not confined")),
        (1000, "203.0.113.10", 443, "tcp", ("allow", "allow[0]")),
        (1000, "203.0.113.10", 443, "udp", ("refuse", "default")),
        (1000, "203.0.113.10", 22, "tcp", ("refuse", "default")),
        (1000, "203.0.113.66", 443, "tcp", ("refuse", "deny[0]")),
        (1000, "2001:db8:2::5", 9999, "udp", ("allow", "allow[1]")),
        (1000, "2001:db8:2::66", 443, "tcp", ("refuse", "deny[1]")),
        (1000, "2001:db8:2::66", 443, "udp", ("refuse", "default")),
        (1000, "203.0.113.20", 5000, "udp", ("allow", "allow[2]")),
        (1000, "2001:db8:2::20", 22, "tcp", ("allow", "allow[2]")),
        (1000, "169.254.169.254", 22, "tcp", ("refuse", "deny_metadata")),
        (1000, "192.0.2.7", None, "icmp", ("allow", "allow[4]")),
        (1000, "192.0.2.7", 22, "tcp", ("refuse", "default")),
        (1000, "203.0.113.99", 80, "tcp", ("redirect", "redirect[0]")),
        (1000, "169.254.169.254", 80, "tcp", ("refuse", "deny_metadata")),  # never handed to the proxy
        (1000, "203.0.113.99", 80, "udp", ("refuse", "default")),
        (1000, "198.51.100.53", 53, "udp", ("allow", "dns")),
        (1000, "2001:db8:53::53", 53, "tcp", ("allow", "dns")),
        (1000, "198.51.100.54", 53, "udp", ("refuse", "default")),
        (1000, "127.0.0.1", 8443, "tcp", ("allow", "loopback")),
        (1000, "198.51.100.2", 8443, "udp", ("allow", "loopback")),
        (1000, "127.0.0.1", 7000, "tcp", ("refuse", "default")),
        # A direct connection to the proxy port is loopback traffic (loopback lists 8443 only here).
        (1000, "127.0.0.1", 8444, "tcp", ("refuse", "default")),
        (1000, "::1", 8444, "tcp", ("refuse", "default")),
        # NAT64: the embedded forms of metadata and of IPv4 deny entries are refused too.
        (1000, "64:ff9b::a9fe:a9fe", 80, "tcp", ("refuse", "deny_metadata")),
        (1000, "64:ff9b::cb00:7142", 22, "tcp", ("refuse", "deny[0]")),
        (1000, "64:ff9b::cb00:7142", 80, "tcp", ("refuse", "deny[0]")),  # not handed to the proxy either
        (1000, "64:ff9b::cb00:7143", 443, "tcp", ("refuse", "default")),  # allow[0] is IPv4: NAT64 needs an IPv6 allow
        (1000, "127.0.0.1", 80, "tcp", ("refuse", "default")),  # local destinations are not redirected
        (1000, "::ffff:203.0.113.10", 443, "tcp", ("allow", "allow[0]")),  # sent as IPv4 by the kernel
        (1000, "::ffff:203.0.113.66", 443, "tcp", ("refuse", "deny[0]")),
    ],
)
def test_verdict_and_deciding_line(uid: int, dest: str, port: int | None, proto: str, expected: tuple[str, str]) -> None:
    assert verdict(uid, dest, port, proto) == expected


def test_confine_all_confines_root_but_not_exempt() -> None:
    p = validate({"version": 1, "exempt": {"uids": [1001]}})
    assert verdict(0, "203.0.113.10", 443, policy=p) == ("refuse", "default")
    assert verdict(1001, "203.0.113.10", 443, policy=p) == ("allow", "exempt")


def test_deny_beats_dns_and_loopback() -> None:
    p = validate({"version": 1, "deny": [{"cidr": "198.51.100.0/24"}]})
    assert verdict(1000, "198.51.100.53", 53, "udp", policy=p) == ("refuse", "deny[0]")
    assert verdict(1000, "198.51.100.2", 7000, policy=p) == ("refuse", "deny[0]")


def test_deny_judges_where_a_redirected_connection_was_addressed_not_the_proxy() -> None:
    # Destinations are judged by conntrack's original destination: a deny of loopback refuses
    # direct loopback connections, not the ones the redirect hands to the proxy.
    p = validate({"version": 1, "deny": [{"cidr": "127.0.0.0/8"}], "redirect": [{"ports": [443], "to_port": 8444}]})
    assert verdict(1000, "203.0.113.10", 443, policy=p) == ("redirect", "redirect[0]")
    assert verdict(1000, "127.0.0.1", 8444, policy=p) == ("refuse", "deny[0]")


def test_loopback_deny_still_reaches_the_redirect_target_only() -> None:
    p = validate({"version": 1, "loopback": "deny", "redirect": [{"ports": [443], "to_port": 8444}]})
    assert verdict(1000, "203.0.113.10", 443, policy=p) == ("redirect", "redirect[0]")
    # Only a redirected connection reaches the proxy; a direct one is loopback traffic (denied here).
    assert verdict(1000, "127.0.0.1", 8444, policy=p) == ("refuse", "default")
    listed = validate({"version": 1, "loopback": [8444], "redirect": [{"ports": [443], "to_port": 8444}]})
    assert verdict(1000, "127.0.0.1", 8444, policy=listed) == ("allow", "loopback")
    assert verdict(1000, "127.0.0.2", 8444, policy=p) == ("refuse", "default")
    assert verdict(1000, "127.0.0.1", 8443, policy=p) == ("refuse", "default")


def test_metadata_allowed_when_deny_metadata_is_off() -> None:
    p = validate({"version": 1, "deny_metadata": False, "allow": [{"cidr": "169.254.169.254/32"}]})
    assert verdict(1000, "169.254.169.254", 22, policy=p) == ("allow", "allow[0]")


def test_unresolved_host_entries_match_nothing() -> None:
    p = validate({"version": 1, "allow": [{"host": "gone.test", "optional": True}]})
    assert verdict(1000, "203.0.113.20", 443, policy=p, facts=Facts()) == ("refuse", "default")


def test_refusal_carries_the_policy_action() -> None:
    p = validate({"version": 1, "action": "drop"})
    v = evaluate(p, Facts(), Probe(uid=1000, destination="203.0.113.10", port=443))
    assert (v.verdict, v.action, str(v)) == ("refuse", "drop", "refuse (drop): default")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("203.0.113.5:443/tcp", ("203.0.113.5", 443, "tcp")),
        ("203.0.113.5", ("203.0.113.5", None, "tcp")),
        ("203.0.113.5/icmp", ("203.0.113.5", None, "icmp")),
        ("[2001:db8::1]:53/udp", ("2001:db8::1", 53, "udp")),
        ("2001:db8::1", ("2001:db8::1", None, "tcp")),
        ("2001:db8::1/udp", ("2001:db8::1", None, "udp")),
    ],
)
def test_destination_syntax(text: str, parsed: tuple[str, int | None, str]) -> None:
    assert parse_destination(text) == parsed


@pytest.mark.parametrize("text", ["example.com:443", "203.0.113.5:0", "203.0.113.5:70000", "203.0.113.5:1/sctp",
                                  "[2001:db8::1]:x", "203.0.113.5:22/icmp", ""])
def test_bad_destination_is_a_usage_error(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_destination(text)


def _policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nconfine: {uids: [1000]}\ndns: {resolvers: [198.51.100.53]}\n"
                    "allow:\n  - cidr: 203.0.113.0/24\n    ports: [443]\ndeny:\n  - cidr: 203.0.113.66/32\n")
    return path


@pytest.mark.parametrize(
    ("dest", "line"),
    [("203.0.113.5:443", "allow: allow[0]"), ("203.0.113.66:443", "refuse (reject): deny[0]"),
     ("198.51.100.53:53/udp", "allow: dns"), ("[2001:db8::9]:443", "refuse (reject): default")],
)
def test_explain_command_prints_verdict_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dest: str, line: str
) -> None:
    code = cli.main(["explain", "--policy", str(_policy_file(tmp_path)), "--uid", "1000", dest])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0] == line


def test_explain_command_bad_destination_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "--policy", str(_policy_file(tmp_path)), "--uid", "1000", "nope"]) == 2
    assert "not an IP address" in capsys.readouterr().err


def test_explain_reads_host_addresses_from_a_matching_status_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from egressguard import policy as policy_mod

    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nallow:\n  - host: api.test\n")
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"policy_digest": policy_mod.digest(policy_mod.load_file(path)),
                                  "hosts": {"api.test": ["203.0.113.20"]}}))
    args = argparse.Namespace(policy=str(path), uid=1000, dest="203.0.113.20:443", resolv_conf=tmp_path / "none",
                              status_file=status)
    from egressguard import explain

    assert explain.main(args) == 0
    assert capsys.readouterr().out.splitlines() == ["allow: allow[0]"]


def test_deny_wins_over_redirect_in_the_model() -> None:
    from egressguard.explain import Facts as ExplainFacts
    from egressguard.explain import Probe, evaluate
    from egressguard.policy import validate

    pol = validate({"version": 1, "confine": {"uids": [1000]}, "deny": [{"cidr": "203.0.113.11/32"}],
                    "redirect": [{"ports": [80], "to_port": 8444}]})
    facts = ExplainFacts()
    denied = evaluate(pol, facts, Probe(1000, "203.0.113.11", 80, "tcp"))
    assert (denied.verdict, denied.line) == ("refuse", "deny[0]")
    other = evaluate(pol, facts, Probe(1000, "203.0.113.10", 80, "tcp"))
    assert (other.verdict, other.line) == ("redirect", "redirect[0]")
