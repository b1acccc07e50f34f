"""Offline checks of k8s/: every kustomize target renders, validates against the Kubernetes
schemas, meets the restricted Pod Security Standard, and has no security finding beyond the
accepted ones in k8s/security-exceptions.yaml.

    .venv/bin/python -m pytest -q tests/unit/test_k8s_manifests.py

The security checks are explicit code, not checkov: checkov runs offline (2.5 s on these
manifests) but pulls ~60 packages and downgrades packaging/python-dateutil in graft's venv.
The check ids follow checkov's, so `checkov -d <rendered dir> --framework kubernetes` in its
own venv reports the same CKV_K8S_* findings (last run: exactly the exceptions file's).
"""

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).parents[2] / "k8s"
TARGETS = ["base", "overlays/kind", "overlays/gke"]
K8S_VERSION = "1.32.0"  # kubectl here is 1.32; kind/cluster.yaml pins kindest/node:v1.32.2
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Volume types the restricted profile allows (hostPath, for one, is not).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}  # fmt: skip


def kubectl_path() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is missing, and the k8s/ checks render with `kubectl kustomize`: "
            "`apt-get install kubectl` (make test does it where apt exists and you are root)"
        )
    return kubectl


def render_dir(path: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl_path(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def _rendered(target: str) -> str:
    return yaml.safe_dump_all(render_dir(K8S / target))


def render(target: str) -> list[dict]:
    return list(yaml.safe_load_all(_rendered(target)))  # a fresh copy per caller


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objects if o["kind"] in WORKLOADS]  # fmt: skip


def security_findings(objects: list[dict]) -> set[tuple[str, str]]:
    """(check id, Kind/name) for every rule an object breaks."""
    found = set()
    for obj in objects:
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Namespace":
            enforce = obj["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
            if enforce != "restricted":
                found.add(("PSS_NAMESPACE_ENFORCE", ref))
            continue
        if obj["metadata"].get("namespace", "default") == "default":
            found.add(("CKV_K8S_21", ref))  # the default namespace should not be used
        if obj["kind"] not in WORKLOADS:
            continue
        spec = obj["spec"]["template"]["spec"]
        if spec.get("automountServiceAccountToken") is not False:
            found.add(("CKV_K8S_38", ref))
        for key, check in (("hostPID", "CKV_K8S_17"), ("hostIPC", "CKV_K8S_18"),
                           ("hostNetwork", "CKV_K8S_19")):  # fmt: skip
            if spec.get(key):
                found.add((check, ref))
        for volume in spec.get("volumes", []):
            if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
                found.add(("PSS_RESTRICTED_VOLUME", ref))
        pod_user = spec.get("securityContext", {}).get("runAsUser")
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            if "@sha256:" not in image:
                found.add(("CKV_K8S_43", ref))
                if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                    found.add(("CKV_K8S_14", ref))  # image tag fixed, not latest or blank
            if container.get("imagePullPolicy") != "Always":
                found.add(("CKV_K8S_15", ref))
            resources = container.get("resources", {})
            for part, resource, check in (("requests", "cpu", "CKV_K8S_10"),
                                          ("limits", "cpu", "CKV_K8S_11"),
                                          ("requests", "memory", "CKV_K8S_12"),
                                          ("limits", "memory", "CKV_K8S_13")):  # fmt: skip
                if resource not in resources.get(part, {}):
                    found.add((check, ref))
            if "livenessProbe" not in container:
                found.add(("CKV_K8S_8", ref))
            if "readinessProbe" not in container:
                found.add(("CKV_K8S_9", ref))
            user = container.get("securityContext", {}).get("runAsUser", pod_user)
            if user is None or user < 10000:
                found.add(("CKV_K8S_40", ref))  # high uid, no clash with host users
    return found


def accepted_exceptions(target: str) -> set[tuple[str, str]]:
    entries = yaml.safe_load((K8S / "security-exceptions.yaml").read_text())["exceptions"]
    for entry in entries:
        assert entry["why"].strip(), f"exception {entry['check']} has no reason"
        assert set(entry["targets"]) <= set(TARGETS), entry["targets"]
    return {(e["check"], e["object"]) for e in entries if target in e["targets"]}


@pytest.mark.parametrize("target", TARGETS)
def test_target_renders_and_validates_against_kubernetes_schemas(target):
    objects = render(target)
    assert {o["kind"] for o in objects} >= {"Namespace", "Deployment", "Service", "ConfigMap",
                                            "NetworkPolicy", "ServiceAccount"}  # fmt: skip
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    names = [o["metadata"]["name"] for o in objects]
    assert "graft-model" not in names, "the build-time values must not reach the cluster"


@pytest.mark.parametrize("target", TARGETS)
def test_security_findings_are_exactly_the_accepted_exceptions(target):
    assert security_findings(render(target)) == accepted_exceptions(target)


def test_security_checks_catch_what_they_look_for():
    (deployment,) = [o for o in render("base") if o["kind"] == "Deployment"]
    deployment["metadata"]["namespace"] = "default"
    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    spec["securityContext"]["runAsUser"] = 1000
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    del spec["containers"][0]["resources"]["limits"]["memory"]
    assert security_findings([deployment]) - accepted_exceptions("base") == {
        ("CKV_K8S_21", "Deployment/tf-serving"),
        ("CKV_K8S_19", "Deployment/tf-serving"),
        ("CKV_K8S_40", "Deployment/tf-serving"),
        ("PSS_RESTRICTED_VOLUME", "Deployment/tf-serving"),
        ("CKV_K8S_13", "Deployment/tf-serving"),
    }


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_template_meets_the_restricted_pod_security_standard(target):
    specs = pod_specs(render(target))
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] >= 10000, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{name} container {container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context.get("privileged", False) is False, where
            assert context.get("runAsNonRoot", True) is True, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"


@pytest.mark.parametrize("target", ["base", "overlays/gke"])
def test_namespace_enforces_restricted_outside_kind(target):
    (namespace,) = [o for o in render(target) if o["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in render(target) if o["kind"] != "Namespace"} == {
        "graft"
    }


@pytest.mark.parametrize("target", TARGETS)
def test_tf_serving_pins_its_image_probes_model_metadata_and_sets_resources(target):
    ((_, spec),) = pod_specs(render(target))
    (container,) = spec["containers"]
    assert container["image"] == "tensorflow/serving:2.20.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/models/graft/metadata",
                                                      "port": "http"}  # fmt: skip
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][part])
    args = container["args"]
    assert "--port=8500" in args and "--rest_api_port=8501" in args
    assert "--batching_parameters_file=/config/batching.config" in args


def _models_config(objects: list[dict]) -> str:
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert "max_batch_size { value: 32 }" in config["data"]["batching.config"]
    return config["data"]["models.config"]


def test_kind_serves_graft_from_the_host_folder_mounted_by_the_cluster_config():
    objects = render("overlays/kind")
    assert 'name: "graft"' in _models_config(objects)
    assert 'base_path: "/models/graft"' in _models_config(objects)
    ((_, spec),) = pod_specs(objects)
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    cluster = yaml.safe_load((K8S / "kind" / "cluster.yaml").read_text())
    (node,) = cluster["nodes"]
    major_minor = K8S_VERSION.rsplit(".", 1)[0]
    assert re.fullmatch(rf"kindest/node:v{major_minor}\.\d+@sha256:[0-9a-f]{{64}}", node["image"])
    (mount,) = node["extraMounts"]
    assert models["hostPath"]["path"] == mount["containerPath"]
    assert mount["hostPath"] == ".graft/kind-models"
    host_paths = [v for t in TARGETS for _, s in pod_specs(render(t)) for v in s["volumes"]
                  if "hostPath" in v]  # fmt: skip
    assert host_paths == [models], "hostPath belongs to the kind overlay only"


def test_gke_reads_models_from_gcs_autoscales_and_uses_workload_identity():
    objects = render("overlays/gke")
    assert 'base_path: "gs://YOUR_BUCKET/models/graft"' in _models_config(objects)
    kinds = {o["kind"] for o in objects}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )


def test_model_name_is_set_in_one_place_and_reaches_config_and_probe(tmp_path):
    overlay = tmp_path / "flowers"
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "base")],
                "components": [str(rel / "components" / "model")],
                "configMapGenerator": [
                    {
                        "name": "graft-model",
                        "behavior": "merge",
                        "literals": ["name=flowers", "base_path=gs://b/m/flowers"],
                    }
                ],
            }
        )
    )
    objects = render_dir(overlay)
    config = _models_config(objects)
    assert 'name: "flowers"' in config and 'base_path: "gs://b/m/flowers"' in config
    ((_, spec),) = pod_specs(objects)
    assert (
        spec["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/v1/models/flowers/metadata"
    )


def test_network_policy_admits_only_labelled_clients_on_serving_ports():
    for target in TARGETS:
        objects = render(target)
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"graft.dev/client": "true"}}}]
        assert sorted(p["port"] for p in rule["ports"]) == [8500, 8501]


def test_missing_kubectl_fails_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="apt-get install kubectl"):
        kubectl_path()


def test_the_canary_component_points_tf_serving_at_the_repositorys_models_config(tmp_path):
    overlay = tmp_path / "canary"
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "base")],
                "components": [
                    str(rel / "components" / "model"),
                    str(rel / "components" / "canary"),
                ],  # fmt: skip
                "configMapGenerator": [
                    {
                        "name": "graft-model",
                        "behavior": "merge",
                        "literals": [
                            "base_path=gs://b/m/graft",
                            "model_config_file=gs://b/m/graft/models.config",
                        ],  # fmt: skip
                    }
                ],
            }
        )
    )
    ((_, spec),) = pod_specs(render_dir(overlay))
    args = spec["containers"][0]["args"]
    assert "--model_config_file=gs://b/m/graft/models.config" in args
    assert "--model_config_file_poll_wait_seconds=10" in args
    assert "--allow_version_labels_for_unavailable_models=true" in args
    assert not any(a.startswith("--model_config_file=/config") for a in args)
    # without the component, the ConfigMap's latest-policy config as before
    ((_, plain),) = pod_specs(render("base"))
    assert "--model_config_file=/config/models.config" in plain["containers"][0]["args"]
