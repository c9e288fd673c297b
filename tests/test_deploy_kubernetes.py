"""The Kubernetes manifests against the real schemas (issue 22.3), as `kubectl apply` checks them.

- Built-in kinds (the ConfigMap) against the OpenAPI schemas of Kubernetes
  :data:`KUBERNETES_VERSION` (the ``kubernetes-validate`` package, strict: an unknown field is
  an error, as with kubectl's default ``--validate=strict``).
- ``DaskJob`` and ``DaskWorkerGroup`` against the CustomResourceDefinitions that the installed
  dask-kubernetes ships (its Helm chart's ``crds/``), made strict the way the API server is:
  an object schema with ``properties`` admits no other field unless it says
  ``x-kubernetes-preserve-unknown-fields`` or ``additionalProperties``. Their ``metadata``
  is checked as an ObjectMeta.
- The pod templates inside them (runner, scheduler, workers) and the scheduler's service are
  checked as a ``Pod`` / ``Service`` of :data:`KUBERNETES_VERSION` too: the operator creates
  those objects, so a field the CRD's older PodSpec admits but the cluster does not would only
  fail when the job runs.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from xd_dask.jobs.config import load_config
from xd_dask.jobs.render import render_job

# the test extra installs them (kubernetes-validate brings jsonschema and referencing)
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

REPO = Path(__file__).resolve().parents[1]
#: The Kubernetes API version the manifests are validated against.
KUBERNETES_VERSION = "1.33"
EXAMPLES = ["deploy/kubernetes/gaia-dr3-k256.yaml", "deploy/kubernetes/gaia-dr3-k256-gpu.yaml"]


def _crd_dir() -> Path:
    spec = importlib.util.find_spec("dask_kubernetes")  # the files only: no import
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("dask-kubernetes is not installed: pip install -e '.[test]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _strict(schema: Any) -> Any:
    """A structural schema as the API server applies it with strict field validation."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> a validator of the resource without apiVersion, kind, metadata."""
    out = {}
    for name in ("daskjob.yaml", "daskworkergroup.yaml"):
        crd = yaml.load((_crd_dir() / name).read_text(), Loader=_LOADER)  # 12,000 lines
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schema = _strict(version["schema"]["openAPIV3Schema"])
            out[key] = jsonschema.Draft4Validator(schema)
    return out


CRDS = _crd_validators()


@functools.cache
def _k8s_validator(kind: str) -> jsonschema.Validator:
    """kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) for a core/v1 kind,
    with the 1.4 MB of definitions read once rather than per call."""
    utils = kubernetes_validate.utils
    versions = {v for v in utils.all_versions() if v.rsplit(".", 1)[0] == KUBERNETES_VERSION}
    (version,) = versions
    base = f"kubernetes-json-schema/v{version}-local-strict"
    schema = utils.schema_contents(f"{base}/{kind.lower()}-v1.json", version)
    resource = referencing.Resource.from_contents
    definitions = resource(utils.schema_contents(f"{base}/_definitions.json", version))
    registry = definitions @ (resource(schema) @ referencing.Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _k8s(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "v1", doc["apiVersion"]  # core kinds only here
    _k8s_validator(doc["kind"]).validate(doc)


def _as(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]
    if doc["kind"] == "DaskJob":
        yield "Pod", spec["job"]["spec"]
        cluster = spec["cluster"]["spec"]
        yield "Pod", cluster["scheduler"]["spec"]
        yield "Service", cluster["scheduler"]["service"]
        yield "Pod", cluster["worker"]["spec"]
    elif doc["kind"] == "DaskWorkerGroup":
        yield "Pod", spec["worker"]["spec"]


def validate_manifest(docs: list[dict[str, Any]]) -> None:
    """Raise jsonschema.ValidationError for the first document that the cluster would refuse."""
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRDS:  # a built-in kind
            _k8s(doc)
            continue
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        CRDS[key].validate(body)
        _k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
        for kind, spec in _pod_templates(doc):
            _k8s(_as(kind, spec))


def test_the_schemas_are_there():
    """The pinned Kubernetes version and both CRDs are there (a failure, not a skip), and the
    cached validator is kubernetes-validate's own check."""
    docs = list(yaml.safe_load_all((REPO / EXAMPLES[0]).read_text()))
    assert kubernetes_validate.validate(docs[0], KUBERNETES_VERSION, strict=True) == "1.33"
    _k8s(docs[0])
    assert set(CRDS) == {
        ("kubernetes.dask.org/v1", "DaskJob"),
        ("kubernetes.dask.org/v1", "DaskWorkerGroup"),
    }
    assert importlib.metadata.version("dask-kubernetes")


@pytest.mark.parametrize("example", EXAMPLES)
def test_shipped_manifests_validate(example):
    docs = list(yaml.safe_load_all((REPO / example).read_text()))
    assert [d["kind"] for d in docs][:2] == ["ConfigMap", "DaskJob"]
    validate_manifest(docs)


def test_rendered_manifest_without_a_volume_claim_validates():
    over = {"catalog.path": "s3://bucket/gaia", "deploy.n_workers": 3, "deploy.gpu_workers": 1}
    text = render_job(load_config(overrides=over, environ={}), "kubernetes")
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["ConfigMap", "DaskJob", "DaskWorkerGroup"]
    validate_manifest(docs)


def _set(doc: dict[str, Any], path: str, mutate) -> None:
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    mutate(node, leaf)


def _rename(new: str):
    def mutate(node, leaf):
        node[new] = node.pop(leaf)

    return mutate


def _value(value: Any):
    def mutate(node, leaf):
        node[leaf] = value

    return mutate


@pytest.mark.parametrize(
    ("index", "path", "mutate", "field"),
    [
        # the DaskJob itself (the CRD)
        (1, "spec.cluster.spec.worker.replicas", _rename("replica"), "replica"),
        (1, "spec.cluster.spec.worker.replicas", _value("6"), "'6'"),
        (1, "spec.job.spec.restartPolicy", _rename("restartpolicy"), "restartpolicy"),
        (1, "metadata.namespace", _rename("namepsace"), "namepsace"),
        # a container of the worker pods (the CRD's PodSpec and the Kubernetes Pod)
        (
            1,
            "spec.cluster.spec.worker.spec.containers.0.imagePullPolicy",
            _rename("imagePullPolicyy"),
            "imagePullPolicyy",
        ),
        (1, "spec.cluster.spec.scheduler.service.type", _rename("typ"), "typ"),
        # the GPU worker group and the ConfigMap (built-in)
        (2, "spec.worker.spec.containers.0.resources", _rename("resource"), "resource"),
        (2, "spec.cluster", _rename("clusterName"), "'cluster' is a required property"),
        (0, "data", _rename("date"), "date"),
    ],
)
def test_a_misspelt_or_mistyped_field_fails(index, path, mutate, field):
    docs = list(yaml.safe_load_all((REPO / EXAMPLES[1]).read_text()))
    validate_manifest(docs)  # as shipped: valid
    bad = copy.deepcopy(docs)
    _set(bad[index], path, mutate)
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_manifest(bad)
    assert field in str(err.value.message), err.value.message


def test_the_pod_templates_are_checked_against_kubernetes_itself():
    """Without the CRD: each pod template and the service, as the objects the operator makes."""
    docs = list(yaml.safe_load_all((REPO / EXAMPLES[0]).read_text()))
    templates = list(_pod_templates(docs[1]))
    assert [kind for kind, _ in templates] == ["Pod", "Pod", "Service", "Pod"]
    for kind, spec in templates:
        _k8s(_as(kind, spec))
    runner = copy.deepcopy(templates[0][1])
    runner["containers"][0]["volumeMount"] = runner["containers"][0].pop("volumeMounts")
    with pytest.raises(jsonschema.ValidationError, match="volumeMount"):
        _k8s(_as("Pod", runner))
