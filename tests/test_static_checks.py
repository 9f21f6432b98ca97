"""Static gates: the lint and type gate on the code (ruff on the package, the tests and the bench, mypy on the
package; configured in pyproject.toml), and what a platform team runs before adopting the image and
the examples: every shell script passes shellcheck, Dockerfile.base passes hadolint, every
Kubernetes manifest validates strictly against the Kubernetes versions users run, the compose
example is accepted by compose. The tools come with the test extras."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kustomize
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHELL_SCRIPTS = sorted([*(ROOT / "scripts").iterdir(), ROOT / "entrypoint.sh", ROOT / ".ci" / "run"])
MANIFESTS = sorted((ROOT / "examples").rglob("*.yaml"))
# A kustomize base is validated as it is built; the admission policies against the versions that serve them
# (tests/test_k8s_admission.py).
KUSTOMIZE_BASES = sorted(k.parent for k in (ROOT / "examples").rglob("kustomization.yaml"))
K8S_MANIFESTS = [m for m in MANIFESTS if "kubernetes" in m.parts and "admission" not in m.parts
                 and not any(base in m.parents for base in KUSTOMIZE_BASES)]
K8S_VERSIONS = ("1.25", "1.29", "1.33", "1.37")  # oldest still met in the field .. newest the schemas know
_NEEDS = re.compile(r"Kubernetes >= (\d+)\.(\d+)")  # a manifest that says so is checked from that version on


def _manifests_for(version: str) -> list[Path]:
    want = tuple(map(int, version.split(".")))
    return [m for m in K8S_MANIFESTS
            if not (needs := _NEEDS.search(m.read_text())) or tuple(map(int, needs.groups())) <= want]


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (scripts/bootstrap installs it with the test extras)")
    return str(path)


def test_there_is_something_to_check() -> None:
    assert len(SHELL_SCRIPTS) >= 5 and K8S_MANIFESTS and KUSTOMIZE_BASES and (ROOT / "examples" / "compose.yaml").exists()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_passes_shellcheck(script: Path) -> None:
    done = subprocess.run([_tool("shellcheck"), "--severity=info", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile.base")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version: str, tmp_path: Path) -> None:
    built = []
    for base in KUSTOMIZE_BASES:
        built.append(tmp_path / f"{base.name}.yaml")
        built[-1].write_text(kustomize.build_text(base))
    done = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                           *map(str, _manifests_for(version) + built)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_compose_example_is_accepted_by_compose() -> None:
    compose = shutil.which("docker-compose")
    if not compose:
        pytest.skip("docker-compose not installed (scripts/docker-up installs it)")
    done = subprocess.run([compose, "-f", str(ROOT / "examples" / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", "egressguard", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


def test_mypy_finds_nothing_in_the_package() -> None:
    done = subprocess.run([_tool("mypy"), "--no-incremental", "--cache-dir", "/dev/null", "egressguard"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
