"""tests/CLAIMS.md maps every README claim to the test that proves it: each test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "tests" / "CLAIMS.md"


def test_every_test_the_claims_map_names_exists() -> None:
    text = CLAIMS.read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(refs) > 60, "the map names too few tests: was it emptied?"
    missing = []
    for path, name in refs:
        source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
        if not re.search(rf"^\s*def {re.escape(name)}\(", source, re.M):
            missing.append(f"{path}::{name}")
    assert not missing, "CLAIMS.md names tests that do not exist: " + ", ".join(missing)


def test_every_test_file_the_claims_map_names_exists() -> None:
    for path in set(re.findall(r"`(tests/[\w/]+\.py)`", CLAIMS.read_text())):
        assert (ROOT / path).exists(), path
