"""Every policy's verdict over a fixed corpus, pinned: the digest of what is accepted, the exact
one-line message of what is refused. A change of wording, of location, of what is accepted or of
the digest is a visible diff of tests/golden/policy_verdicts.txt (UPDATE_GOLDEN=1 to rewrite it).

The corpus: every field of a valid policy replaced in turn by each value of a pool of tricky values,
pairs and triples of such replacements (several errors on one line), unknown keys, non-string
keys, and random trees; and the hand-written hostile policies of tests/test_hostile_input.py.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from goldenfile import assert_matches_golden
from test_hostile_input import HOSTILE

from egressguard import policy as policy_mod
from egressguard.errors import PolicyError

GOLDEN = Path(__file__).resolve().parent / "golden" / "policy_verdicts.txt"

BASE: dict[str, Any] = {
    "version": 1,
    "confine": {"uids": [1000]},
    "exempt": {"uids": [1001]},
    "action": "reject",
    "loopback": "allow",
    "dns": {"resolvers": ["198.51.100.53"], "max_addresses_per_host": 64},
    "deny_metadata": True,
    "allow": [{"cidr": "203.0.113.0/24", "ports": [443], "protocol": "tcp"},
              {"host": "api.example.test", "ports": [443], "optional": True}],
    "deny": [{"cidr": "10.0.0.0/8", "protocol": "any"}],
    "redirect": [{"ports": [80, 443], "to_port": 8444}],
}

POOL: tuple[Any, ...] = (
    None, True, False, 0, 1, 2, -1, 443, 65535, 65536, 4294967294, 4294967295, 2**64, 1.0, 1.5, 443.0,
    math.inf, "", " ", "x", "1", "443", "true", "yes", "on", "off", "0", "all", "auto", "allow", "deny", "tcp",
    "udp", "icmp", "any", "drop", "reject", "203.0.113.0/24", "203.0.113.1/24", "::/0", "::ffff:1.2.3.4",
    "fe80::1%eth0", "198.51.100.53", "1.2.3", "Example.COM.", "bad_name!", "a..b", "\u0435xample.com",
    [], [1], [0], [1, 1], [True], [1.0], ["a"], ["198.51.100.53"], [[]], [{}], [None],
    [{"cidr": "203.0.113.0/24"}], {}, {"a": 1}, {"uids": [5]}, {"cidr": "192.0.2.0/24"},
)

EXTRA_KEYS = ("bogus", "ports", "cidr", "uids", "allow", "to_port", "Version", "")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replaced(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    data = json.loads(json.dumps(data))
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


def _random_tree(rng: random.Random, depth: int = 0) -> Any:
    if depth > 3 or rng.random() < 0.4:
        return rng.choice(POOL)
    if rng.random() < 0.5:
        return [_random_tree(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = (*BASE, "uids", "resolvers", "cidr", "host", "ports", "protocol", "to_port", "optional", *EXTRA_KEYS)
    return {rng.choice(keys): _random_tree(rng, depth + 1) for _ in range(rng.randrange(5))}


def _where(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, dict)) else repr(value)


def corpus() -> list[tuple[str, Any]]:
    """(what the case is, relative to BASE where it is a change of BASE; the data)."""
    rng = random.Random(20261130)
    paths = _paths(BASE)
    cases: list[tuple[str, Any]] = [("BASE", BASE), ("minimal", {"version": 1}),
                                    ("DEFAULT_POLICY", policy_mod.DEFAULT_POLICY)]
    for path in paths:
        cases += [(f"{_where(path)}={_text(v)}", _replaced(BASE, path, v)) for v in POOL]
    for _ in range(400):
        data, label = BASE, []
        for path in rng.sample(paths, rng.choice((2, 3, 4))):
            value = rng.choice(POOL)
            try:
                data = _replaced(data, path, value)
                label.append(f"{_where(path)}={_text(value)}")
            except (KeyError, IndexError, TypeError):
                pass  # an earlier replacement removed this path
        cases.append((", ".join(label), data))
    for path in [(), *(p for p in paths if isinstance(_get(BASE, p), dict))]:
        for key in EXTRA_KEYS:
            cases.append((f"{_where((*path, key))}=1", _replaced(BASE, (*path, key), 1) if path else {**BASE, key: 1}))
    for key in (1, None, True, 1.5):  # YAML allows keys of any type
        cases += [(f"key {key!r}=1", {**BASE, key: 1}),
                  (f"confine={{{key!r}: 1, uids: [1]}}", _replaced(BASE, ("confine",), {key: 1, "uids": [1]}))]
    for _ in range(300):
        path, tree = rng.choice(paths), _random_tree(rng, 1)
        cases.append((f"{_where(path)}={_text(tree)}", _replaced(BASE, path, tree)))
    for _ in range(200):
        tree = _random_tree(rng, 1)
        data = {"version": 1, **tree} if isinstance(tree, dict) and rng.random() < 0.7 else tree
        cases.append((f"tree {_text(data)}", data))
    for name in sorted(HOSTILE):
        text = HOSTILE[name]
        if isinstance(text, str) and len(text) < 2000:
            cases.append((f"hostile {name}", {"hostile": name}))
    return cases


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


def verdict(case: Any) -> str:
    try:
        if isinstance(case, dict) and set(case) == {"hostile"}:
            text = HOSTILE[case["hostile"]]
            assert isinstance(text, str)
            data = policy_mod.parse_text(text, "p")
        else:
            data = case
        return "ok " + policy_mod.digest(policy_mod.validate(data, "p"))
    except PolicyError as exc:
        return str(exc)


def test_every_verdict_of_the_corpus_is_unchanged() -> None:
    got = "".join(f"{label}\n    -> {verdict(case)}\n" for label, case in corpus())
    assert_matches_golden(GOLDEN, got, "policy verdicts differ from")
