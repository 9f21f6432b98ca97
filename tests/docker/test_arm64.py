"""The linux/arm64 image (Graviton and other arm64 nodes), built from the same Dockerfile and wheel house as the
amd64 one and run here under binfmt emulation (qemu-user-static): an aarch64 userland whose Python loads both
back ends' libraries, including python-iptables' C part compiled in the build stage, and plans exactly what
egressguard plans on this host. `scripts/test` builds it (scripts/build-image) when the
kernel can run aarch64 binaries: one `podman build --platform linux/amd64,linux/arm64` of Dockerfile.base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dockerbed import HERE, docker

pytestmark = pytest.mark.docker

ARM64 = os.environ.get("EG_IMAGE_ARM64", "egressguard:ci-multi-arm64")
EM_AARCH64 = 183  # ELF e_machine of AArch64


@pytest.fixture(scope="module")
def image() -> str:
    if docker("image", "inspect", ARM64, check=False).returncode:
        pytest.skip(f"image {ARM64} missing (EG_PLATFORM=linux/amd64,linux/arm64 EG_IMAGE=egressguard:ci-multi "
                    "scripts/build-image builds it)")
    return ARM64


def _run(image: str, entrypoint: str, *args: str, volumes: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return docker("run", "--rm", "--platform", "linux/arm64", "--network", "none", *volumes,
                  "--entrypoint", entrypoint, image, *args, timeout=300)


def test_the_image_is_arm64_and_runs_an_aarch64_userland(image: str) -> None:
    assert docker("image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", image).stdout.strip() == "linux/arm64"
    assert _run(image, "uname", "-m").stdout.strip() == "aarch64"


def test_its_python_loads_both_back_ends_with_an_aarch64_python_iptables(image: str) -> None:
    probe = (
        "import glob, json, sys, iptc, yaml\n"
        "from egressguard.backends.nftables import transport\n"
        "transport.load()\n"
        "wrapper = glob.glob(sys.prefix + '/lib/python3*/site-packages/libxtwrapper*.so')\n"
        "head = open(wrapper[0], 'rb').read(20)\n"
        "print(json.dumps({'wrapper': wrapper[0], 'e_machine': int.from_bytes(head[18:20], 'little')}))\n"
    )
    p = _run(image, "/opt/egressguard/bin/python", "-c", probe)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["e_machine"] == EM_AARCH64, report


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_it_plans_exactly_what_this_host_plans(image: str, backend: str) -> None:
    policy = HERE / "policy.yaml"
    args = ("plan", "--backend", backend, "--json", "--policy", "/p/policy.yaml")
    inside = _run(image, "egressguard", *args, volumes=("-v", f"{policy}:/p/policy.yaml:ro"))
    here = subprocess.run([str(Path(sys.executable).parent / "egressguard"), *args[:-1], str(policy)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(inside.stdout) == json.loads(here.stdout)
    assert json.loads(inside.stdout)["tables" if backend == "iptables" else "script"]
