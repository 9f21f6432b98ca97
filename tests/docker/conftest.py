"""Fixtures for the container tests: the compose test bed (pytest-docker) and marker directories.

Everything here skips cleanly without DOCKER_HOST, a reachable daemon, docker-compose or the image:
`.ci/run` provides them (scripts/docker-up, scripts/build-image); a developer can run the rest alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerbed import HERE, IMAGE, Bed, docker_problem

from egressguard import policy as policy_mod


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    docker_items = [i for i in items if "docker" in i.keywords]
    if docker_items and docker_problem():
        for item in docker_items:
            item.add_marker(pytest.mark.skip(reason=docker_problem()))


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """A host directory the container's command (uid 1000) can write its marker file into."""
    d = tmp_path / "markers"
    d.mkdir()
    d.chmod(0o777)
    return d


# -- the compose test bed, through pytest-docker (docker-compose v1: no `--wait`) ------------------


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(HERE / "docker-compose.yaml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"egtest{os.getpid()}"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 2"]


@pytest.fixture(scope="session")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        docker_compose_project_name: str) -> Iterator[Bed]:
    """Servers + the pod (pause, init, agent) up; compose itself waited for init to exit 0."""
    if docker_problem():
        pytest.skip(docker_problem())
    markers = tmp_path_factory.mktemp("pod-markers")
    markers.chmod(0o777)
    digest = policy_mod.digest(policy_mod.load_file(HERE / "policy.yaml"))
    env = {"EG_IMAGE": IMAGE, "EG_CHECKS": str(HERE), "EG_MARKERS": str(markers), "EG_EXPECT_DIGEST": digest}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # docker-compose interpolates ${...} from its environment
    try:
        request.getfixturevalue("docker_services")
        yield Bed(project=docker_compose_project_name, network=f"{docker_compose_project_name}_lab",
                  markers=markers, expect_digest=digest)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
