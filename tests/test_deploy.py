"""deploy/kubernetes validates against the Kubernetes OpenAPI schema (kubernetes-validate, offline), and keeps
the properties the design relies on: /readyz readiness, a read-only bundle volume, an HPA and an indexer Job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

DEPLOY = ROOT / "deploy" / "kubernetes"
VERSION = "1.30.0"


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def test_every_manifest_validates_against_the_kubernetes_schema() -> None:
    documents = _documents()
    assert {d["kind"] for _, d in documents} >= {"Deployment", "HorizontalPodAutoscaler", "Job", "Service"}
    for _, doc in documents:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises ValidationError naming the field
    # the validator does reject what Kubernetes would: a wrong type, an unknown (misspelt) field
    deployment = next(d for _, d in documents if d["kind"] == "Deployment")
    for bad in (
        {**deployment, "spec": {**deployment["spec"], "replicas": "two"}},
        {**deployment, "spec": {**deployment["spec"], "replica": 2}},
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSION, strict=True)


def test_the_design_properties_hold() -> None:
    by_kind = {d["kind"]: d for _, d in _documents()}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    api = pod["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert all(m["readOnly"] for m in api["volumeMounts"])  # the server never writes a bundle
    assert all(v["persistentVolumeClaim"]["readOnly"] for v in pod["volumes"])
    assert (
        by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == by_kind["Deployment"]["metadata"]["name"]
    )
    job = by_kind["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:3] == ["sift", "index", "build"]
    assert not any(m.get("readOnly") for m in job["volumeMounts"])
