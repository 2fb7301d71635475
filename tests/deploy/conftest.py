"""Rendering deploy/k8s as `kubectl apply -k` would, offline: every overlay, in a copy of the
tree where the files a user supplies (the gpu tokens, TLS certificates) are stand-ins."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TOKENS = "inference rendered-test-inference-token\nadmin rendered-test-admin-token\n"
# What the tests render: the two overlays, the laptop one with TLS on, the GPU one behind an
# Istio gateway, and each in a mesh (the laptop's Istio, the GPU's Linkerd).
RENDERINGS = ("cpu", "gpu", "cpu-tls", "gpu-istio", "cpu-mesh-istio", "gpu-mesh-linkerd")
# deploy/k8s itself renders the laptop overlay.
DEFAULT = "default"


def _prepare(root: Path) -> None:
    shutil.copytree(K8S, root)
    (root / "overlays" / "gpu" / "tokens").write_text(TOKENS)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (root / "components" / "tls" / name).write_text(f"stand-in {name}\n")
    tls = root / "overlays" / "cpu-tls"
    tls.mkdir()
    (tls / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../cpu]\ncomponents: [../../components/tls]\n"
    )
    for name, overlay, component in (
        ("gpu-istio", "gpu", "inference-gateway-istio"),
        ("cpu-mesh-istio", "cpu", "mesh-istio"),
        ("gpu-mesh-linkerd", "gpu", "mesh-linkerd"),
    ):
        (root / "overlays" / name).mkdir()
        (root / "overlays" / name / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [../{overlay}]\ncomponents: [../../components/{component}]\n"
        )


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """rendering name -> the objects `kubectl kustomize` prints for it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are rendered with `kubectl kustomize`")
    root = tmp_path_factory.mktemp("deploy") / "k8s"
    _prepare(root)
    out = {}
    for name in RENDERINGS:
        run = subprocess.run([kubectl, "kustomize", str(root / "overlays" / name)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"kubectl kustomize overlays/{name} failed:\n{run.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    run = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{run.stderr}"
    out[DEFAULT] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return out


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def tandem_workloads(objects: list[dict]) -> list[dict]:
    """The Deployment and StatefulSet that run `tandem serve`."""
    return [
        o for o in objects
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["labels"].get("app.kubernetes.io/name") == "tandem"
    ]


def container(workload: dict, name: str = "tandem") -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def config_map(objects: list[dict]) -> dict[str, str]:
    """The TANDEM_* variables every Tandem pod gets."""
    (cm,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("tandem-config-")]
    return cm["data"]
