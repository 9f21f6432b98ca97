"""tests/CLAIMS.md maps every README claim to the test that proves it: each test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "tests" / "CLAIMS.md"


def test_every_test_the_claims_map_names_exists() -> None:
    text = CLAIMS.read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)+)`", text)  # also Class::test
    assert len(refs) > 60, "the map names too few tests: was it emptied?"
    assert len(refs) == text.count(".py::"), "a test reference the map check cannot read"
    missing = []
    for path, names in refs:
        source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
        *classes, name = names.strip(":").split("::")
        found = all(re.search(rf"^class {re.escape(c)}\b", source, re.M) for c in classes)
        if not found or not re.search(rf"^\s*def {re.escape(name)}\(", source, re.M):
            missing.append(f"{path}{names}")
    assert not missing, "CLAIMS.md names tests that do not exist: " + ", ".join(missing)


def test_every_test_file_the_claims_map_names_exists() -> None:
    for path in set(re.findall(r"`(tests/[\w/]+\.py)`", CLAIMS.read_text())):
        assert (ROOT / path).exists(), path
