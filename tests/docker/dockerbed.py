"""Helpers for the container tests: reach the private Docker daemon, find the image, read reports.

The container tests skip cleanly without DOCKER_HOST, a reachable daemon, docker-compose or the image:
`.ci/run` provides them (scripts/docker-up, scripts/build-image); a developer can run the rest alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE = os.environ.get("EG_IMAGE", "egressguard:ci")
ALLOWED4, DENIED4, ALLOWED6, DENIED6 = "198.19.7.10", "198.19.7.11", "2001:db8:7::10", "2001:db8:7::11"
DOCKER_TIMEOUT_S = 120


@cache
def docker_problem() -> str | None:
    """Why the container tests cannot run here, or None."""
    if not os.environ.get("DOCKER_HOST"):
        return "DOCKER_HOST not set (scripts/docker-up starts a private daemon and prints it)"
    for tool in ("docker", "docker-compose"):
        if not shutil.which(tool):
            return f"{tool} not installed (scripts/docker-up installs it)"
    try:
        if subprocess.run(["docker", "version"], capture_output=True, timeout=20).returncode:
            return f"no Docker daemon answers at {os.environ['DOCKER_HOST']}"
    except subprocess.TimeoutExpired:
        return f"the Docker daemon at {os.environ['DOCKER_HOST']} does not answer"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=20).returncode:
        return f"image {IMAGE} missing (scripts/build-image builds it)"
    return None


def docker(*args: str, check: bool = True, timeout: float = DOCKER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"docker {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def inspect(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container).stdout)[0]


def report_of(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON report inside.py printed (the last stdout line)."""
    lines = p.stdout.strip().splitlines()
    assert lines, f"the command printed nothing (exit {p.returncode}); stderr: {p.stderr[-2000:]}"
    return json.loads(lines[-1])


@dataclass(frozen=True)
class Bed:
    """The running compose project: its name, network and pod containers."""

    project: str
    network: str
    markers: Path
    expect_digest: str

    def container(self, service: str) -> str:
        out = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(out) == 1, f"expected one {service} container in {self.project}, got {out}"
        return out[0]
