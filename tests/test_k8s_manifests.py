"""deploy/k8s/*.yaml, validated offline: the Kubernetes resources against the API's schemas (PyPI
kubernetes-validate, strict: no unknown fields), KubeRay's RayService by its parts (its pod templates as
PodTemplates against the same schemas; its Serve config against our application builder), and what the files
say against the worker (ports, probes, the metric the HPA scales on, the drain fitting the grace period)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.33.0"  # the oldest Kubernetes these files must work on (preStop `sleep` is GA/on by default from 1.30)


def docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(name):
    return {d["kind"]: d for d in docs(name)}


def validate(doc):
    try:
        kv.validate(doc, VERSION, strict=True)
    except kv.ValidationError as e:
        raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')}: {e.message} at {list(e.path)}") from None


@pytest.mark.parametrize("name", ["worker.yaml", "hpa.yaml"])
def test_kubernetes_resources_validate_strictly(name):
    for d in docs(name):
        validate(d)


def test_negative_control_an_unknown_field_fails():
    d = by_kind("worker.yaml")["Deployment"]
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(AssertionError, match="httpGett"):
        validate(d)


def test_worker_probes_drain_and_service_fit_the_worker():
    from llorch_cpud.server.runner import DRAIN_TIMEOUT_S

    k = by_kind("worker.yaml")
    pod = k["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    port = int(args[args.index("--port") + 1])
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, "liveness must ride out long prefills"
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300, "model load"
    assert pod["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + DRAIN_TIMEOUT_S + 5
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
    threads = {e["name"]: e.get("value") for e in c["env"]}["OMP_NUM_THREADS"]
    assert threads == c["resources"]["limits"]["cpu"]
    svc = k["Service"]
    assert svc["spec"]["selector"] == k["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_hpa_scales_the_worker_on_a_metric_it_exports():
    hpa = by_kind("hpa.yaml")["HorizontalPodAutoscaler"]
    dep = by_kind("worker.yaml")["Deployment"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    (m,) = hpa["spec"]["metrics"]
    name = m["pods"]["metric"]["name"]
    runner = (ROOT / "llorch_cpud" / "server" / "runner.py").read_text()
    assert re.search(rf'gauge\("{name}"', runner), f"the worker exports no gauge {name}"
    assert name in (K8S / "hpa.yaml").read_text().split("apiVersion")[0], "the adapter rule names the metric"


def test_rayservice():
    (rs,) = docs("rayservice.yaml")
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:  # each pod template, as Kubernetes will see it
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": g["template"]})
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
    for w in cluster["workerGroupSpecs"]:
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] and w["groupName"]
    assert set(cluster) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs",
                            "autoscalerOptions", "headServiceAnnotations"}
    assert set(rs["spec"]) <= {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                               "deploymentUnhealthySecondThreshold", "upgradeStrategy", "excludeHeadPodFromServeSvc"}
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module == "llorch_cpud.server.ray_serve" and attr == "build_app"
    assert (ROOT / "llorch_cpud" / "server" / "ray_serve.py").exists()
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        pytest.skip("ray[serve] not installed: the Serve config's arguments are not checked")
    from llorch_cpud.server import ray_serve

    seen = {}
    real = ray_serve.bind
    ray_serve.bind = lambda cfg, opts: seen.update(cfg=cfg, opts=opts)
    try:
        ray_serve.build_app(app["args"])
    finally:
        ray_serve.bind = real
    opts = seen["opts"]
    assert opts.replicas is None and opts.max_replicas >= opts.min_replicas >= 1  # autoscaling
    worker = cluster["workerGroupSpecs"][0]
    cpus = int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus % opts.threads == 0, "whole replicas per worker pod"
    assert cluster["rayVersion"].split(".")[:2] >= ["2", "60"]
