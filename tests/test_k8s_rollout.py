"""The policy rollout base (examples/kubernetes/rollout): kustomize generates the ConfigMap with a content
hash in its name, and the digest the agent expects is egressguard's digest of that same policy, so a
policy change renames the ConfigMap and changes the digest in step, and the Deployment's pods roll."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kustomize
import pytest
import yaml

from egressguard import policy as policy_mod

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "examples" / "kubernetes" / "rollout"
POD = ROOT / "examples" / "kubernetes" / "pod.yaml"
EGRESSGUARD = Path(sys.executable).parent / "egressguard"


def expected_digest_file(directory: Path) -> str:
    (line,) = (directory / "policy-digest.env").read_text().splitlines()
    name, _, value = line.partition("=")
    assert name == "EGRESSGUARD_EXPECT_DIGEST"
    return value


def digest_of(policy_text: str) -> str:
    """The digest egressguard computes (and writes into its status) for this policy."""
    return policy_mod.digest(policy_mod.validate(yaml.safe_load(policy_text)))


def regenerate(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / "policy-digest"), str(directory)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EGRESSGUARD": str(EGRESSGUARD)})


def _agent(deployment: dict[str, Any]) -> dict[str, Any]:
    (agent,) = deployment["spec"]["template"]["spec"]["containers"]
    return agent


def _configmap_refs(deployment: dict[str, Any]) -> set[str]:
    spec = deployment["spec"]["template"]["spec"]
    refs = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
    refs |= {e["valueFrom"]["configMapKeyRef"]["name"] for c in spec["containers"] + spec["initContainers"]
             for e in c.get("env", []) if "valueFrom" in e}
    return refs


@pytest.fixture()
def base_copy(tmp_path: Path) -> Path:
    shutil.copytree(BASE, tmp_path / "rollout")
    return tmp_path / "rollout"


def test_committed_digest_is_egressguards_digest_of_the_committed_policy() -> None:
    assert expected_digest_file(BASE) == digest_of((BASE / "policy.yaml").read_text()), (
        "policy.yaml changed without its digest: run scripts/policy-digest"
    )


def test_the_digest_script_derives_what_egressguard_computes(base_copy: Path) -> None:
    (base_copy / "policy-digest.env").write_text("EGRESSGUARD_EXPECT_DIGEST=sha256:stale\n")
    done = regenerate(base_copy)
    assert done.returncode == 0, done.stderr
    assert expected_digest_file(base_copy) == digest_of((base_copy / "policy.yaml").read_text())


def test_the_digest_script_refuses_a_bad_policy_and_writes_nothing(base_copy: Path) -> None:
    (base_copy / "policy.yaml").write_text("version: 1\nallow:\n  - cidr: 203.0.113.0/33\n")
    before = (base_copy / "policy-digest.env").read_text()
    done = regenerate(base_copy)
    assert done.returncode == 2 and "allow[0]" in done.stderr, done.stderr
    assert (base_copy / "policy-digest.env").read_text() == before


def test_the_built_configmap_is_hash_named_and_carries_the_digest_of_its_own_policy() -> None:
    built = kustomize.build(BASE)
    assert set(built) == {"ConfigMap", "Deployment"}
    cm = built["ConfigMap"]
    name = cm["metadata"]["name"]
    assert name.startswith("agent-egress-policy-") and len(name) > len("agent-egress-policy-")
    assert cm["data"]["EGRESSGUARD_EXPECT_DIGEST"] == digest_of(cm["data"]["policy.yaml"])
    # Both the init container's policy volume and the agent's expected digest name that ConfigMap.
    assert _configmap_refs(built["Deployment"]) == {name}
    (digest_env,) = [e for e in _agent(built["Deployment"])["env"] if e["name"] == "EGRESSGUARD_EXPECT_DIGEST"]
    assert digest_env["valueFrom"]["configMapKeyRef"]["key"] == "EGRESSGUARD_EXPECT_DIGEST"


def test_a_policy_change_renames_the_configmap_and_changes_the_digest_in_step(base_copy: Path) -> None:
    before = kustomize.build(base_copy)
    policy = yaml.safe_load((base_copy / "policy.yaml").read_text())
    policy["allow"].append({"cidr": "198.51.100.0/24", "ports": [443]})
    (base_copy / "policy.yaml").write_text(yaml.safe_dump(policy))
    assert regenerate(base_copy).returncode == 0
    after = kustomize.build(base_copy)

    old_cm, new_cm = before["ConfigMap"], after["ConfigMap"]
    assert new_cm["metadata"]["name"] != old_cm["metadata"]["name"]
    assert new_cm["data"]["EGRESSGUARD_EXPECT_DIGEST"] != old_cm["data"]["EGRESSGUARD_EXPECT_DIGEST"]
    assert new_cm["data"]["EGRESSGUARD_EXPECT_DIGEST"] == digest_of(new_cm["data"]["policy.yaml"])
    # The pod template changed (it names the new ConfigMap), so the Deployment rolls its pods.
    assert _configmap_refs(after["Deployment"]) == {new_cm["metadata"]["name"]}
    assert after["Deployment"]["spec"]["template"] != before["Deployment"]["spec"]["template"]


def test_a_policy_edited_without_its_digest_is_caught(base_copy: Path) -> None:
    """What CI catches: the committed digest no longer matches (the pods would refuse to start)."""
    (base_copy / "policy.yaml").write_text((base_copy / "policy.yaml").read_text().replace("[443]", "[443, 8443]"))
    assert expected_digest_file(base_copy) != digest_of((base_copy / "policy.yaml").read_text())


def test_the_deployment_runs_the_pod_of_the_plain_example() -> None:
    """pod.yaml's checks (tests/test_k8s_manifest.py) hold for the Deployment: same spec but the digest's source."""
    pod_docs = {d["kind"]: d for d in yaml.safe_load_all(POD.read_text()) if d}
    deployment = yaml.safe_load((BASE / "deployment.yaml").read_text())
    template = copy.deepcopy(deployment["spec"]["template"]["spec"])
    for e in _agent({"spec": {"template": {"spec": template}}})["env"]:
        if e["name"] == "EGRESSGUARD_EXPECT_DIGEST":
            e.pop("valueFrom")
            e["value"] = expected_digest_file(BASE)
    assert template == pod_docs["Pod"]["spec"]
    assert (BASE / "policy.yaml").read_text() == pod_docs["ConfigMap"]["data"]["policy.yaml"]
