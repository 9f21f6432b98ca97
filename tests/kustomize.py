"""`kustomize build` for the tests: the kustomize binary, or kubectl's built-in copy (`kubectl kustomize`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml


def build_text(directory: Path) -> str:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed (no PyPI or Debian package ships kustomize)")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def build(directory: Path) -> dict[str, dict[str, Any]]:
    """The built objects, by kind."""
    return {d["kind"]: d for d in yaml.safe_load_all(build_text(directory)) if d}
