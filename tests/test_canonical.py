"""The streamed digest is byte for byte the digest of json.dumps(sort_keys, compact) (pure)."""

from __future__ import annotations

import hashlib
import json
import random

from egressguard.canonical import SLICE, json_sha256


def reference(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["str", "int", "none", "bool", "float", "list", "dict", "big"] if depth < 3 else ["str", "int"])
    if kind == "str":
        return rng.choice(["", "198.51.100.0/24", "2001:db8::/32", 'quote"and\\slash', "ünïcode", "\x00\n"])
    if kind == "int":
        return rng.randint(-5, 70000)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.random()
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        return {rng.choice("abcxyz_") + str(i): random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}
    n = rng.choice([SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 7])  # long lists, streamed in slices
    mixed = rng.random() < 0.3
    return [({"m": i} if mixed and i % 97 == 0 else f"198.18.{i // 256}.{i % 256}/32") for i in range(n)]


def test_streamed_digest_equals_the_digest_of_the_whole_json_text() -> None:
    rng = random.Random(448)
    for _ in range(300):
        value = random_value(rng)
        assert json_sha256(value) == reference(value), value


def test_a_changed_member_deep_in_a_long_list_changes_the_digest() -> None:
    members = [f"198.18.{i // 256}.{i % 256}/32" for i in range(10_000)]
    before = json_sha256({"sets": [{"members": members}]})
    members[7_777] = "198.18.255.255/32"
    assert json_sha256({"sets": [{"members": members}]}) != before
