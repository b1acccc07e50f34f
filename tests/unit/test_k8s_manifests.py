"""Offline checks of k8s/: every overlay renders, validates against the Kubernetes schemas,
and meets the restricted Pod Security Standard plus graft's own security rules."""

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[2] / "k8s"
TARGETS = ["base", "overlays/kind", "overlays/gke"]
K8S_VERSION = "1.32.0"


def render(target: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is missing: `apt-get install kubectl` (make test installs it where apt exists)"
        )
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / target)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(target):
    objects = render(target)
    assert {o["kind"] for o in objects} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "NetworkPolicy",
        "ServiceAccount",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_template_meets_the_restricted_pod_security_standard(target):
    specs = pod_specs(render(target))
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert (
            not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        ), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "add" not in context["capabilities"], container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert not context.get("privileged"), container["name"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp must be an emptyDir"


@pytest.mark.parametrize("target", TARGETS)
def test_images_pinned_resources_and_probes_set(target):
    for _, spec in pod_specs(render(target)):
        for container in spec["containers"]:
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), image
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/graft"
            assert "livenessProbe" in container


def test_hostpath_only_in_kind_and_listed_as_an_accepted_exception():
    exceptions = yaml.safe_load((ROOT / "security-exceptions.yaml").read_text())["exceptions"]
    assert all(e["why"] for e in exceptions)
    for target in TARGETS:
        host_paths = [
            v for _, spec in pod_specs(render(target)) for v in spec["volumes"] if "hostPath" in v
        ]
        assert bool(host_paths) == (target == "overlays/kind")
    assert any(e["check"] == "hostpath-volume" for e in exceptions)


def test_network_policy_admits_only_labelled_clients_on_serving_ports():
    (policy,) = [o for o in render("base") if o["kind"] == "NetworkPolicy"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"graft.dev/client": "true"}}}]
    assert sorted(p["port"] for p in rule["ports"]) == [8500, 8501]


def test_gke_overlay_reads_models_from_gcs_and_autoscales():
    objects = render("overlays/gke")
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["models.config"]
    assert 'base_path: "gs://' in config
    assert any(o["kind"] == "HorizontalPodAutoscaler" for o in objects)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
