"""Golden files: compare an output with its committed file; UPDATE_GOLDEN=1 rewrites the file and
fails (review the diff, then run again), never under CI."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest


def assert_matches_golden(golden: Path, got: str, differs: str) -> None:
    """`got` must equal `golden`'s text; `differs`: how a difference is announced, e.g.
    "plan output differs from" (the golden file's path and the diff follow)."""
    if os.environ.get("UPDATE_GOLDEN") == "1" and os.environ.get("CI") != "true":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got)
        pytest.fail(f"{golden} rewritten: review the diff, then run again without UPDATE_GOLDEN")
    assert golden.exists(), f"no golden file {golden}: run with UPDATE_GOLDEN=1"
    want = golden.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), str(golden), "got"))
        pytest.fail(f"{differs} {golden} (UPDATE_GOLDEN=1 to accept):\n{diff}")
