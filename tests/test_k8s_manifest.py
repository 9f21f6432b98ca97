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


# -- Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards) ------------
# The checks that apply to these containers, per level; a container meets a level when none fails.
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def _pss_failures(pod: dict[str, Any], container: dict[str, Any], level: str) -> list[str]:
    sc, psc = container.get("securityContext", {}), pod.get("securityContext", {})
    caps = sc.get("capabilities", {})
    fails = []
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        fails.append("host namespaces")
    if sc.get("privileged"):
        fails.append("privileged")
    if set(caps.get("add", [])) - _BASELINE_CAPS:
        fails.append(f"capabilities {sorted(set(caps.get('add', [])) - _BASELINE_CAPS)}")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        fails.append("hostPath volume")
    if any(p.get("hostPort") for p in container.get("ports", [])):
        fails.append("hostPort")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        fails.append("seccomp Unconfined")
    if level == "baseline":
        return fails
    if any(not (set(v) - {"name"}) <= _RESTRICTED_VOLUMES for v in pod.get("volumes", [])):
        fails.append("volume type")
    if sc.get("allowPrivilegeEscalation", True) is not False:
        fails.append("allowPrivilegeEscalation not false")
    if not sc.get("runAsNonRoot", psc.get("runAsNonRoot", False)):
        fails.append("runAsNonRoot not true")
    if sc.get("runAsUser", psc.get("runAsUser")) == 0:
        fails.append("runAsUser 0")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        fails.append("seccomp profile not set")
    if "ALL" not in caps.get("drop", []):
        fails.append("capabilities not dropped")
    if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
        fails.append(f"capabilities added {caps.get('add')}")
    return fails


def test_the_agent_container_meets_the_restricted_level(pod: dict[str, Any], agent: dict[str, Any]) -> None:
    assert _pss_failures(pod, agent, "restricted") == []


def test_the_init_container_needs_the_privileged_level_for_net_admin_and_net_raw(
    pod: dict[str, Any], init: dict[str, Any]
) -> None:
    """What the README and the manifest say: baseline forbids exactly the two capabilities egressguard needs."""
    assert _pss_failures(pod, init, "baseline") == ["capabilities ['NET_ADMIN', 'NET_RAW']"]
    header = MANIFEST.read_text()
    assert "pod-security.kubernetes.io/enforce: privileged" in header and "meets `restricted`" in header


def test_the_pss_check_fails_what_it_should() -> None:
    """The checker itself: each rule trips on a container that breaks it."""
    ok = {"securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}
    assert _pss_failures({}, ok, "restricted") == []
    for change, level in ((("privileged", True), "baseline"), (("runAsUser", 0), "restricted"),
                          (("allowPrivilegeEscalation", True), "restricted"), (("runAsNonRoot", False), "restricted")):
        bad = {"securityContext": {**ok["securityContext"], change[0]: change[1]}}
        assert _pss_failures({}, bad, level), change
    assert _pss_failures({"hostNetwork": True}, ok, "baseline")
    assert _pss_failures({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, ok, "baseline")


# -- dns.mode proxy: the forwarder as a native sidecar (examples/kubernetes/pod-dns-proxy.yaml) --------

DNS_MANIFEST = MANIFEST.parent / "pod-dns-proxy.yaml"


@pytest.fixture(scope="module")
def dns_docs() -> dict[str, dict[str, Any]]:
    with DNS_MANIFEST.open() as fh:
        return {d["kind"]: d for d in yaml.safe_load_all(fh) if d}


def test_dns_sidecar_policy_is_proxy_mode_and_the_agent_expects_its_digest(dns_docs: dict[str, dict[str, Any]]) -> None:
    policy = policy_mod.validate(yaml.safe_load(dns_docs["ConfigMap"]["data"]["policy.yaml"]))
    assert policy.proxy_dns and policy.dns.forwarder_uid in policy.exempt.uids
    (agent,) = dns_docs["Pod"]["spec"]["containers"]
    assert _env(agent)["EGRESSGUARD_EXPECT_DIGEST"] == policy_mod.digest(policy)


def test_dns_forwarder_is_a_native_sidecar_after_the_apply(dns_docs: dict[str, dict[str, Any]]) -> None:
    apply_c, dns_c = dns_docs["Pod"]["spec"]["initContainers"]
    assert apply_c["command"][:2] == ["egressguard", "apply"] and "restartPolicy" not in apply_c
    assert dns_c["command"] == ["egressguard", "dns"] and dns_c["restartPolicy"] == "Always"
    assert dns_c["startupProbe"]["exec"]["command"] == ["egressguard", "dns", "--check"]


def test_dns_containers_hold_only_what_they_need(dns_docs: dict[str, dict[str, Any]]) -> None:
    apply_c, dns_c = dns_docs["Pod"]["spec"]["initContainers"]
    (agent,) = dns_docs["Pod"]["spec"]["containers"]
    assert apply_c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    # root only long enough to become uid 1002 with CAP_NET_ADMIN alone (egressguard dns drops the rest)
    assert dns_c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SETUID", "SETGID", "SETPCAP"]}
    assert dns_c["securityContext"]["allowPrivilegeEscalation"] is False
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]} and agent["securityContext"]["runAsUser"] == 1000

# -- the native sidecar example (issue 14) -------------------------------------------------------

WATCH_MANIFEST = MANIFEST.parent / "pod-with-watch.yaml"


@pytest.fixture(scope="module")
def watch_pod() -> dict[str, Any]:
    with WATCH_MANIFEST.open() as fh:
        (doc,) = [d for d in yaml.safe_load_all(fh) if d]
    assert doc["kind"] == "Pod"
    return dict(doc["spec"])


def test_the_watch_example_is_pod_yaml_plus_one_native_sidecar(pod: dict[str, Any], watch_pod: dict[str, Any]) -> None:
    apply_init, watch = watch_pod["initContainers"]
    assert apply_init == pod["initContainers"][0]  # applies first: the sidecar starts after the rules
    rest = {k: v for k, v in watch_pod.items() if k != "initContainers"}
    assert rest == {k: v for k, v in pod.items() if k != "initContainers"}
    assert watch["restartPolicy"] == "Always" and watch["command"] == ["egressguard", "watch"]
    assert "Kubernetes >= 1.29" in WATCH_MANIFEST.read_text()  # native sidecars; the validation gate reads it


def test_the_watch_sidecar_runs_as_nobody_with_only_net_admin(watch_pod: dict[str, Any]) -> None:
    sc = watch_pod["initContainers"][1]["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (65534, 65534, True)
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert _pss_failures(watch_pod, watch_pod["initContainers"][1], "baseline") == ["capabilities ['NET_ADMIN']"]
