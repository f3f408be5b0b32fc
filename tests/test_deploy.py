"""The KubeRay manifests are valid against the KubeRay CRD schemas (OpenAPI v3) shipped in shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = [ROOT.parent / "shared/data/kuberay-crds", Path("/work/shared/data/kuberay-crds")]


def crd_schema(kind_file: str, version: str) -> dict:
    base = next((p for p in CRDS if (p / kind_file).exists()), None)
    if base is None:
        pytest.skip("KubeRay CRDs not available")
    crd = yaml.safe_load((base / kind_file).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def test_raycluster_manifest_matches_crd():
    jsonschema = pytest.importorskip("jsonschema")
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    jsonschema.validate(cluster, crd_schema("ray.io_rayclusters.yaml", "v1"))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "accordion serve" in " ".join(head["args"]) and "--api-key-file" in " ".join(head["args"])
    assert head["readinessProbe"]["grpc"]["port"] == 50051


def test_ray_ports_are_reachable_only_from_the_clusters_own_pods():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    own = {"ray.io/cluster": cluster["metadata"]["name"]}
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["spec"]["podSelector"]["matchLabels"] == own and policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    from_own = [r for r in rules if "from" in r]
    assert from_own and all(p["podSelector"]["matchLabels"] == own for r in from_own for p in r["from"])
    assert all("ports" not in r for r in from_own)
    open_ports = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
    assert open_ports == {50051, 9400}  # the gRPC API and metrics; no Ray port (6379, 8265, 10001, ...)
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
