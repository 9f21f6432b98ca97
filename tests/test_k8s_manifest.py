"""The Kubernetes example (examples/kubernetes/pod.yaml) grants exactly the privileges the README documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from egressguard import policy as policy_mod

MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "kubernetes" / "pod.yaml"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    with MANIFEST.open() as fh:
        return {d["kind"]: d for d in yaml.safe_load_all(fh) if d}


@pytest.fixture(scope="module")
def pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["Pod"]["spec"]


@pytest.fixture(scope="module")
def init(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["initContainers"]
    return container


@pytest.fixture(scope="module")
def agent(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return container


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_manifest_holds_a_configmap_and_a_pod(docs: dict[str, dict[str, Any]]) -> None:
    assert set(docs) == {"ConfigMap", "Pod"}
    assert all(d["apiVersion"] == "v1" for d in docs.values())


def test_configmap_policy_is_valid(docs: dict[str, dict[str, Any]]) -> None:
    policy_mod.validate(yaml.safe_load(docs["ConfigMap"]["data"]["policy.yaml"]), "ConfigMap policy.yaml")


def test_agent_expects_the_digest_of_the_configmap_policy(docs: dict[str, dict[str, Any]], agent: dict[str, Any]) -> None:
    policy = policy_mod.validate(yaml.safe_load(docs["ConfigMap"]["data"]["policy.yaml"]))
    assert _env(agent)["EGRESSGUARD_EXPECT_DIGEST"] == policy_mod.digest(policy), (
        "update EGRESSGUARD_EXPECT_DIGEST in examples/kubernetes/pod.yaml to the `policy_digest` that "
        "`egressguard plan --json` prints for the ConfigMap's policy"
    )


def test_init_and_agent_run_the_same_image(init: dict[str, Any], agent: dict[str, Any]) -> None:
    assert init["image"] == agent["image"]


def test_init_container_runs_apply_as_root_with_only_net_admin_and_net_raw(init: dict[str, Any]) -> None:
    assert init["command"] == ["egressguard", "apply"]
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False


def test_agent_runs_as_uid_1000_with_every_capability_dropped(agent: dict[str, Any]) -> None:
    sc = agent["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"]) == (1000, True)
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False


def test_agent_keeps_the_image_entrypoint_so_probe_gates_its_command(agent: dict[str, Any]) -> None:
    assert "command" not in agent
    assert agent["args"]


def test_seccomp_is_runtime_default_everywhere(pod: dict[str, Any], init: dict[str, Any], agent: dict[str, Any]) -> None:
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in (init, agent):
        assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_policy_comes_from_the_configmap(docs: dict[str, dict[str, Any]], pod: dict[str, Any], init: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = _mounts(init)["/etc/egressguard"]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert _env(init)["EGRESSGUARD_POLICY"] == "/etc/egressguard/policy.yaml"


def test_status_is_shared_by_an_emptydir_read_only_for_the_agent(pod: dict[str, Any], init: dict[str, Any],
                                                                 agent: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    written, read = _mounts(init)["/run/egressguard"], _mounts(agent)["/run/egressguard"]
    assert written["name"] == read["name"] and "emptyDir" in volumes[read["name"]]
    assert not written.get("readOnly") and read["readOnly"] is True


def test_pod_shares_nothing_with_the_node(pod: dict[str, Any]) -> None:
    for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
        assert not pod.get(key)
    assert pod["automountServiceAccountToken"] is False
