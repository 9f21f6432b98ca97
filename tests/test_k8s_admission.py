"""The admission example (examples/kubernetes/admission), evaluated offline: the MutatingAdmissionPolicy's CEL
(cel-python) injects egressguard as the first init container of labelled agent pods, the JSON patch it
returns is applied (jsonpatch), and the ValidatingAdmissionPolicy's CEL then admits the result and refuses
pods that override `command:`, give NET_ADMIN/NET_RAW to anything but the guard by digest, or break the
restricted level. The objects themselves validate strictly against the Kubernetes versions that serve them.

What this cannot show offline: the API server's own CEL type checker (cel-go, with the pod's schema) and
its cost limits; the expressions keep to standard CEL plus the documented JSONPatch type for that reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import jsonpatch
import pytest
import yaml
from celpy import celtypes

ROOT = Path(__file__).resolve().parent.parent
ADMISSION = ROOT / "examples" / "kubernetes" / "admission"
POD = ROOT / "examples" / "kubernetes" / "pod.yaml"


def _docs(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all((ADMISSION / name).read_text()) if d}


MUTATING = _docs("mutating.yaml")["MutatingAdmissionPolicy"]["spec"]
VALIDATING = _docs("validating.yaml")["ValidatingAdmissionPolicy"]["spec"]
_ENV = celpy.Environment(annotations={"JSONPatch": celtypes.MessageType})


def _cel(expression: str, activation: dict[str, Any]) -> Any:
    result = _ENV.program(_ENV.compile(expression)).evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise AssertionError(f"CEL error in {expression!r}: {result}")
    return result


def _activation(spec: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """`object` and the policy's `variables`, each evaluated in order as the API server does."""
    act: dict[str, Any] = {"object": celpy.json_to_cel(pod), "variables": celtypes.MapType({})}
    for var in spec.get("variables", []):
        value = _cel(var["expression"], act)
        act["variables"] = celtypes.MapType({**act["variables"], celtypes.StringType(var["name"]): value})
    return act


def mutate(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod after the MutatingAdmissionPolicy (unchanged when a match condition is false)."""
    act = _activation(MUTATING, pod)
    if not all(_cel(c["expression"], {"object": act["object"]}) for c in MUTATING["matchConditions"]):
        return pod
    patch: list[dict[str, Any]] = []
    for mutation in MUTATING["mutations"]:
        assert mutation["patchType"] == "JSONPatch"
        ops = _cel(mutation["jsonPatch"]["expression"], act)
        patch += _plain(ops)
    return jsonpatch.apply_patch(pod, patch)


def _plain(value: Any) -> Any:
    """CEL values as JSON data (celpy's own encoder leaves booleans inside JSONPatch messages as 0/1)."""
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, cls=celpy.CELJSONEncoder))


def refusals(pod: dict[str, Any]) -> list[str]:
    """The messages of every ValidatingAdmissionPolicy validation the pod fails."""
    act = _activation(VALIDATING, pod)
    failed = []
    for v in VALIDATING["validations"]:
        verdict = _cel(v["expression"], act)
        assert isinstance(verdict, celtypes.BoolType), (v["expression"], verdict)
        if not verdict:
            failed.append(" ".join(v["message"].split()))
    return failed


def admit(pod: dict[str, Any]) -> list[str]:
    return refusals(mutate(pod))


GUARD_IMAGE = _cel(VALIDATING["variables"][0]["expression"], {})

RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def agent_pod(**spec: Any) -> dict[str, Any]:
    """A labelled agent pod as its author writes it: no guard, the app keeps the image's entrypoint."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "labels": {"egressguard.io/agent": "true"}},
            "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1", "args": ["run"],
                                     "securityContext": copy.deepcopy(RESTRICTED)}], **spec}}


def plain_pod() -> dict[str, Any]:
    pod = agent_pod()
    del pod["metadata"]["labels"]
    return pod


def _find(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


# -- the objects ----------------------------------------------------------------------------------------

def _validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
                           "-k", version, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["1.30", "1.33", "1.37"])
def test_validating_policy_and_namespace_validate_strictly(version: str) -> None:
    for name in ("validating.yaml", "namespace.yaml"):
        done = _validate(ADMISSION / name, version)
        assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


@pytest.mark.parametrize("version", ["1.34", "1.35", "1.36", "1.37"])
def test_mutating_policy_validates_strictly(version: str, tmp_path: Path) -> None:
    """v1 from 1.36; the same fields as v1beta1 on 1.34-1.35 (what its header tells users to change)."""
    path = ADMISSION / "mutating.yaml"
    if version in ("1.34", "1.35"):
        path = tmp_path / "mutating-v1beta1.yaml"
        path.write_text((ADMISSION / "mutating.yaml").read_text().replace(
            "apiVersion: admissionregistration.k8s.io/v1\n", "apiVersion: admissionregistration.k8s.io/v1beta1\n"))
    done = _validate(path, version)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def test_strict_validation_refuses_a_misspelt_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ADMISSION / "validating.yaml").read_text().replace("validationActions:", "validationAction:"))
    assert _validate(bad, "1.37").returncode != 0


def test_both_policies_name_the_same_guard_image_by_digest() -> None:
    assert _cel(MUTATING["variables"][0]["expression"], {}) == GUARD_IMAGE
    assert "@sha256:" in GUARD_IMAGE


# -- mutation ---------------------------------------------------------------------------------------------

def test_an_agent_pod_gets_the_guard_as_first_init_container_and_is_admitted() -> None:
    pod = mutate(agent_pod(initContainers=[{"name": "setup", "image": "registry.example/setup:1",
                                            "securityContext": copy.deepcopy(RESTRICTED)}]))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["egressguard", "setup"]
    guard = pod["spec"]["initContainers"][0]
    assert guard["image"] == GUARD_IMAGE and guard["command"] == ["egressguard", "apply"]
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"egressguard-policy", "egressguard-run"}
    assert {"name": "egressguard-run", "mountPath": "/run/egressguard", "readOnly": True} in \
        _find(pod, "agent")["volumeMounts"]
    assert refusals(pod) == []


def test_the_injected_guard_has_the_privileges_of_the_plain_example() -> None:
    """The same securityContext, command and status mount as examples/kubernetes/pod.yaml's init container."""
    example = next(d for d in yaml.safe_load_all(POD.read_text()) if d["kind"] == "Pod")["spec"]["initContainers"][0]
    guard = mutate(agent_pod())["spec"]["initContainers"][0]
    assert guard["securityContext"] == example["securityContext"]
    assert (guard["command"], guard["env"], guard["resources"]) == (example["command"], example["env"],
                                                                    example["resources"])
    assert [m["mountPath"] for m in guard["volumeMounts"]] == [m["mountPath"] for m in example["volumeMounts"]]


def test_injection_keeps_the_authors_volumes_and_mounts_and_adds_only_what_is_missing() -> None:
    pod = agent_pod(volumes=[{"name": "egressguard-policy", "configMap": {"name": "agent-egress-policy-d6k9mbcbmb"}},
                             {"name": "tmp", "emptyDir": {}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    pod["spec"]["containers"].append({"name": "second", "image": "registry.example/agent:1",
                                      "securityContext": copy.deepcopy(RESTRICTED)})
    out = mutate(pod)
    assert [v["name"] for v in out["spec"]["volumes"]] == ["egressguard-policy", "tmp", "egressguard-run"]
    assert out["spec"]["volumes"][0]["configMap"]["name"] == "agent-egress-policy-d6k9mbcbmb"
    assert [m["mountPath"] for m in _find(out, "agent")["volumeMounts"]] == ["/tmp", "/run/egressguard"]
    assert [m["mountPath"] for m in _find(out, "second")["volumeMounts"]] == ["/run/egressguard"]
    assert refusals(out) == []


def test_unlabelled_pods_and_pods_with_a_guard_are_not_mutated() -> None:
    assert mutate(plain_pod()) == plain_pod()
    once = mutate(agent_pod())
    assert mutate(once) == once


# -- validation: what admission refuses -----------------------------------------------------------------

def test_an_agent_container_that_overrides_command_is_refused() -> None:
    pod = agent_pod()
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", "run"]
    assert admit(pod) == ["agent pod: an app container sets command:, which skips the image's entrypoint and "
                          "with it `egressguard probe`; give args instead"]


def test_net_admin_outside_the_guard_is_refused() -> None:
    for cap in ("NET_ADMIN", "NET_RAW", "SYS_ADMIN"):
        pod = agent_pod()
        pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = [cap]
        assert admit(pod) == ["only the first init container, egressguard by digest, may add NET_ADMIN and NET_RAW (the "
                              "egressguard-watch sidecar NET_ADMIN); other containers may add NET_BIND_SERVICE only"], cap


def test_the_guard_by_tag_instead_of_digest_is_refused() -> None:
    """The plain example names its image by tag: admission refuses it until it names a digest."""
    pod = next(d for d in yaml.safe_load_all(POD.read_text()) if d["kind"] == "Pod")
    pod["metadata"]["labels"]["egressguard.io/agent"] = "true"
    failures = admit(pod)
    assert failures[0].startswith("agent pod: the first init container must be egressguard")
    assert any(f.startswith("only the first init container") for f in failures)
    pod["spec"]["initContainers"][0]["image"] = GUARD_IMAGE
    assert admit(pod) == []


def test_the_guard_image_elsewhere_or_doing_something_else_gets_no_capabilities() -> None:
    other = {"name": "egressguard", "image": GUARD_IMAGE, "command": ["egressguard", "apply"],
             "securityContext": {**copy.deepcopy(RESTRICTED), "runAsUser": 0, "runAsNonRoot": False,
                                 "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}}
    second = mutate(agent_pod(initContainers=[{"name": "setup", "image": "registry.example/setup:1",
                                               "securityContext": copy.deepcopy(RESTRICTED)}]))
    second["spec"]["initContainers"].insert(0, second["spec"]["initContainers"].pop(0) | {"name": "first"})
    assert "agent pod: the first init container must be egressguard (the image by digest, command " \
           "[egressguard, apply], no args)" in refusals(second)
    shell = mutate(agent_pod())
    shell["spec"]["initContainers"][0]["command"] = ["sh", "-c", "egressguard apply; nft flush ruleset"]
    assert any(f.startswith("only the first init container") for f in refusals(shell))
    twice = mutate(agent_pod())
    twice["spec"]["initContainers"].append({**twice["spec"]["initContainers"][0], "volumeMounts": []})
    assert refusals(twice) == ["only the first init container, egressguard by digest, may add NET_ADMIN and NET_RAW "
                               "(the egressguard-watch sidecar NET_ADMIN); other containers may add NET_BIND_SERVICE only",
                               "restricted: every container but egressguard runs as non-root (runAsNonRoot: true, "
                               "runAsUser not 0)"]
    as_app = agent_pod()
    as_app["spec"]["containers"].append({**other, "name": "sidecar"})
    assert any(f.startswith("only the first init container") for f in admit(as_app))


@pytest.mark.parametrize("breakage, message", [
    (lambda c, s: c["securityContext"].update(runAsUser=0), "runs as non-root"),
    (lambda c, s: c["securityContext"].update(runAsNonRoot=False), "runs as non-root"),
    (lambda c, s: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda c, s: c["securityContext"].update(privileged=True), "allowPrivilegeEscalation"),
    (lambda c, s: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drops ALL"),
    (lambda c, s: c["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccomp"),
    (lambda c, s: s.update(securityContext={"seccompProfile": {"type": "Unconfined"}}), "seccomp"),
    (lambda c, s: c["securityContext"].update(procMount="Unmasked"), "/proc mount"),
    (lambda c, s: c.update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    (lambda c, s: s.update(hostNetwork=True), "host network"),
    (lambda c, s: s.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "volumes of type"),
    (lambda c, s: s.update(securityContext={"sysctls": [{"name": "net.ipv4.ip_forward", "value": "1"}]}), "sysctls"),
], ids=["uid0", "runAsNonRoot-false", "escalation", "privileged", "no-drop-all", "seccomp-unconfined",
        "pod-seccomp-unconfined", "procMount", "hostPort", "hostNetwork", "hostPath", "sysctls"])
def test_everything_else_is_held_to_the_restricted_level(breakage: Any, message: str) -> None:
    for make in (agent_pod, plain_pod):
        pod = make()
        breakage(pod["spec"]["containers"][0], pod["spec"])
        failures = admit(pod)
        assert len(failures) == 1 and message in failures[0], (make.__name__, failures)


def test_a_restricted_pod_without_the_label_is_admitted_untouched() -> None:
    assert admit(plain_pod()) == []


def test_an_agent_container_without_the_status_mount_is_refused() -> None:
    pod = mutate(agent_pod())
    pod["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = False
    assert refusals(pod) == ["agent pod: every app container mounts the egressguard-run volume read-only at "
                             "/run/egressguard"]


def test_the_watch_sidecar_of_the_example_is_admitted_by_digest_with_net_admin_only() -> None:
    """examples/kubernetes/pod-with-watch.yaml, images by digest: admitted; its reader with NET_RAW, or another
    image, is not."""
    pod = yaml.safe_load((ROOT / "examples" / "kubernetes" / "pod-with-watch.yaml").read_text())
    pod["metadata"]["labels"]["egressguard.io/agent"] = "true"
    for c in pod["spec"]["initContainers"]:
        c["image"] = GUARD_IMAGE
    assert admit(pod) == []
    caps = next(c for c in pod["spec"]["initContainers"] if c["name"] == "egressguard-watch")["securityContext"]["capabilities"]
    caps["add"] = ["NET_ADMIN", "NET_RAW"]
    assert any(f.startswith("only the first init container") for f in admit(pod))
    caps["add"] = ["NET_ADMIN"]
    next(c for c in pod["spec"]["initContainers"] if c["name"] == "egressguard-watch")["image"] = "registry.example/x:1"
    assert any(f.startswith("only the first init container") for f in admit(pod))
