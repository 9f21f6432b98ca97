"""Hostile input: malformed, huge and tricky policies are refused with exit 2 and one line of error,
in bounded time and memory, and the kernel is left exactly as it was."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressguard import policy as policy_mod
from egressguard.errors import PolicyError
from egressguard.lab import Lab

TIME_LIMIT_S = 3.0  # per policy, in-process
MEMORY_LIMIT = 1024 * 1024 * 1024  # address space of a `plan` subprocess
_counts = {"in_process": 0, "generated": 0, "cli": 0}

VALID = "version: 1\nconfine: {uids: [1000]}\nallow:\n  - cidr: 203.0.113.0/24\n    ports: [443]\n"


def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        lines.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


# name -> policy text (str) or raw bytes
HOSTILE: dict[str, str | bytes] = {
    "empty file": "",
    "only a comment": "# nothing\n",
    "a list, not a mapping": "- version: 1\n",
    "a scalar": "hello\n",
    "version missing": "confine: {uids: [1000]}\n",
    "version 2": "version: 2\n",
    "version as a string": "version: '1'\n",
    "uid as a string": "version: 1\nconfine: {uids: ['1000']}\n",
    "uid negative": "version: 1\nconfine: {uids: [-1]}\n",
    "uid too large": "version: 1\nexempt: {uids: [4294967295]}\n",
    "port as a float": "version: 1\nallow: [{cidr: 203.0.113.0/24, ports: [443.0]}]\n",
    "port zero": "version: 1\nallow: [{cidr: 203.0.113.0/24, ports: [0]}]\n",
    "port as a boolean": "version: 1\nallow: [{cidr: 203.0.113.0/24, ports: [true]}]\n",
    "ports empty": "version: 1\nallow: [{cidr: 203.0.113.0/24, ports: []}]\n",
    "allow is a mapping": "version: 1\nallow: {cidr: 203.0.113.0/24}\n",
    "cidr is a list": "version: 1\nallow: [{cidr: [203.0.113.0/24]}]\n",
    "cidr with host bits": "version: 1\nallow: [{cidr: 203.0.113.1/24}]\n",
    "cidr with a zone index": "version: 1\nallow: [{cidr: 'fe80::1%eth0/128'}]\n",
    "cidr IPv4-mapped IPv6": "version: 1\ndeny: [{cidr: '::ffff:10.0.0.0/104'}]\n",
    "resolver with a zone index": "version: 1\ndns: {resolvers: ['fe80::1%eth0']}\n",
    "resolver IPv4-mapped": "version: 1\ndns: {resolvers: ['::ffff:198.51.100.53']}\n",
    "unknown key": "version: 1\nallwo: []\n",
    "unknown protocol": "version: 1\nallow: [{cidr: 203.0.113.0/24, protocol: sctp}]\n",
    "uid confined and exempt": "version: 1\nconfine: {uids: [1000]}\nexempt: {uids: [1000]}\n",
    "unicode host (IDN)": "version: 1\nallow: [{host: exämple.com}]\n",
    "unicode host (cyrillic homoglyph)": "version: 1\nallow: [{host: \u0435xample.com}]\n",
    "unicode host (right-to-left override)": 'version: 1\nallow: [{host: "exa\\u202emple.com"}]\n',
    "unicode host (zero-width space)": 'version: 1\nallow: [{host: "exa\\u200bmple.com"}]\n',
    "unicode digits in a cidr": "version: 1\nallow: [{cidr: \uff12\uff10\uff13.0.113.0/24}]\n",
    "host too long": "version: 1\nallow: [{host: " + ".".join(["a" * 63] * 5) + "}]\n",
    "host is an address": "version: 1\nallow: [{host: 203.0.113.5}]\n",
    "YAML alias": "version: 1\nconfine: &c {uids: [1000]}\nexempt: *c\n",
    "YAML merge key": "version: 1\nx: &e {cidr: 203.0.113.0/24}\nallow: [{<<: *e}]\n",
    "YAML alias bomb (billion laughs)": _bomb(),
    "YAML python tag": "version: !!python/object/apply:os.system ['true']\n",
    "YAML two documents": "version: 1\n---\nversion: 1\n",
    "duplicate key (YAML)": "version: 1\nallow: []\nallow: [{cidr: 0.0.0.0/0}]\n",
    "duplicate key (JSON)": '{"version": 1, "allow": [], "allow": [{"cidr": "0.0.0.0/0"}]}',
    "duplicate nested key": "version: 1\nallow: [{cidr: 203.0.113.0/24, cidr: 0.0.0.0/0}]\n",
    "NUL byte": "version: 1\x00\nallow: []\n",
    "NUL byte in a host": 'version: 1\nallow: [{host: "a\\0b.test"}]\n',
    "not UTF-8": b"version: 1\nallow: [{host: \xff\xfe.test}]\n",
    "UTF-16": VALID.encode("utf-16"),
    "invalid JSON": '{"version": 1,',
    "JSON NaN": '{"version": NaN}',
    "integer of 5000 digits (YAML)": "version: 1\nconfine: {uids: [" + "9" * 5000 + "]}\n",
    "integer of 5000 digits (JSON)": '{"version": 1, "confine": {"uids": [' + "9" * 5000 + "]}}",
    "deep nesting (YAML flow)": "version: 1\nallow: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep nesting (YAML block)": "version: 1\nx:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(3000)),
    "deep nesting (JSON)": '{"version": 1, "allow": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "10^6 allow entries": '{"version":1,"allow":[' + ",".join(['{"cidr":"1.2.3.4"}'] * 10**6)[: 3_900_000] + "]}",
    "10^6 empty entries": '{"version":1,"allow":[' + ",".join(["{}"] * 10**6) + "]}",
    "10^6 uids": '{"version":1,"exempt":{"uids":[' + ",".join(["1"] * 10**6) + "]}}",
    "2000 distinct uids": '{"version":1,"confine":{"uids":[' + ",".join(map(str, range(2000))) + "]}}",
    "10^6 ports": '{"version":1,"allow":[{"cidr":"203.0.113.0/24","ports":[' + ",".join(["443"] * 10**6) + "]}]}",
    "file over the size cap": "version: 1\n" + "#" * (policy_mod.MAX_POLICY_BYTES + 10) + "\n",
    "a 3 MB line": "version: 1\nallow: [{host: '" + "a" * 3_000_000 + "'}]\n",
}


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / (name.replace(" ", "_").replace("/", "_")[:40] + ".yaml")
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


def _one_line_refusal(path: Path) -> str:
    start = time.perf_counter()
    with pytest.raises(PolicyError) as err:
        policy_mod.load_file(path)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert err.value.exit_code == 2
    assert "\n" not in message and "\r" not in message, message[:500]
    assert message.startswith("policy error:") and len(message) < 4000, message[:500]
    assert elapsed < TIME_LIMIT_S, f"{elapsed:.1f}s"
    return message


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_policy_is_refused_with_one_line(tmp_path: Path, name: str) -> None:
    _one_line_refusal(_write(tmp_path, name, HOSTILE[name]))
    _counts["in_process"] += 1


def test_the_valid_baseline_loads(tmp_path: Path) -> None:
    policy_mod.load_file(_write(tmp_path, "valid", VALID))


@pytest.mark.parametrize("name", ["YAML alias bomb (billion laughs)", "10^6 allow entries", "10^6 uids",
                                  "deep nesting (YAML flow)", "a 3 MB line", "file over the size cap"])
def test_plan_refuses_within_a_memory_and_time_bound(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, HOSTILE[name])

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "egressguard", "plan", "--policy", str(path)],
                          capture_output=True, text=True, timeout=30, preexec_fn=cap)
    assert done.returncode == 2, done.stderr[-500:]
    assert time.perf_counter() - start < 10
    assert len(_human_lines(done.stderr)) == 1, done.stderr


# -- generated input ----------------------------------------------------------------------------

KEYS = ("version", "confine", "exempt", "uids", "action", "loopback", "dns", "resolvers", "deny_metadata",
        "allow", "deny", "redirect", "cidr", "host", "ports", "protocol", "to_port", "optional")
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(("all", "auto", "tcp", "any", "203.0.113.0/24", "::/0",
                                                           "allowed.test", "allow", "deny", "drop")))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)), max_leaves=30)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.one_of(trees, st.dictionaries(st.sampled_from(KEYS), trees, max_size=6).map(lambda d: {"version": 1, **d})))
def test_generated_structures_validate_or_fail_with_one_line(data: Any) -> None:
    _counts["generated"] += 1
    for text in (json.dumps(data, allow_nan=True), _yaml(data)):
        try:
            policy_mod.validate(policy_mod.parse_text(text, "generated"), "generated")
        except PolicyError as exc:
            assert exc.exit_code == 2 and "\n" not in str(exc), str(exc)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(cut=st.integers(0, len(VALID)), junk=st.text(max_size=12))
def test_mangled_text_validates_or_fails_with_one_line(cut: int, junk: str) -> None:
    _counts["generated"] += 1
    text = VALID[:cut] + junk + VALID[cut:]
    try:
        policy_mod.validate(policy_mod.parse_text(text, "mangled"), "mangled")
    except PolicyError as exc:
        assert "\n" not in str(exc), str(exc)


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True)


# -- through the real command, in a lab --------------------------------------------------------

CLI_CASES = ("YAML alias bomb (billion laughs)", "10^6 allow entries", "deep nesting (YAML flow)", "NUL byte",
             "unicode host (IDN)", "duplicate key (YAML)", "uid as a string", "file over the size cap",
             "cidr with a zone index", "integer of 5000 digits (JSON)")


def _human_lines(stderr: str) -> list[str]:
    """stderr lines that are not JSON log events."""
    out = []
    for line in stderr.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                continue
        except ValueError:
            pass
        out.append(line)
    return out


@pytest.fixture(scope="module")
def guarded_lab(module_lab: Lab) -> Lab:
    done = module_lab.apply(VALID)
    assert done.returncode == 0, done.stderr
    return module_lab


@pytest.mark.netns
@pytest.mark.parametrize("name", CLI_CASES)
def test_apply_refuses_hostile_policy_and_leaves_the_kernel_unchanged(guarded_lab: Lab, name: str) -> None:
    before = guarded_lab.ruleset_dump()
    path = _write(guarded_lab.workdir, name, HOSTILE[name])
    path.chmod(0o644)
    start = time.perf_counter()
    done = guarded_lab.egressguard("apply", "--policy", str(path), timeout=60)
    assert done.returncode == 2, done.stderr[-800:]
    assert time.perf_counter() - start < 15
    human = _human_lines(done.stderr)
    assert len(human) == 1 and human[0].startswith("egressguard: policy error:"), done.stderr[-800:]
    assert guarded_lab.ruleset_dump() == before
    _counts["cli"] += 1


@pytest.mark.netns
def test_hostile_inline_json_from_the_environment_is_refused(guarded_lab: Lab) -> None:
    before = guarded_lab.ruleset_dump()
    hostile = '{"version": 1, "allow": [{"cidr": "0.0.0.0/0"}], "allow": []}'
    done = guarded_lab.egressguard("apply", env={"EGRESSGUARD_POLICY_JSON": hostile})
    assert done.returncode == 2, done.stderr[-800:]
    assert len(_human_lines(done.stderr)) == 1
    assert guarded_lab.ruleset_dump() == before
    _counts["cli"] += 1


@pytest.mark.netns
def test_hostile_policy_into_a_fresh_namespace_installs_nothing(lab: Lab) -> None:
    before = lab.ruleset_dump()
    done = lab.apply(_bomb())
    assert done.returncode == 2
    assert lab.ruleset_dump() == before
    assert lab.tcp("203.0.113.10", 22, uid=1000).ok  # nothing was installed, not even a lockdown
    _counts["cli"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report(figures: list[str]) -> Any:
    yield
    total = sum(_counts.values())
    if total:
        figures.append(f"hostile input: {_counts['in_process']} hand-written policies refused in-process, "
                       f"{_counts['generated']} generated ones valid or refused in one line, {_counts['cli']} refused by "
                       f"apply in a namespace (exit 2, one line, kernel unchanged)")
