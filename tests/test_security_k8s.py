"""NetworkPolicies admit only pinned peers and keep the Ray dashboard to the operator (issue 11 item 3):
k8s/validate.py's rule passes the real manifests and fails each broken one."""

from __future__ import annotations

import copy

import pytest
import test_k8s
from test_k8s import V, _obj, with_jobs

kubectl, rendered = test_k8s.kubectl, test_k8s.rendered  # test_k8s's fixtures: the overlays rendered once


def _dns_peer(docs) -> dict:
    return _obj(docs, "NetworkPolicy", "allow-dns")["spec"]["egress"][0]["to"][0]


BROKEN = {
    "any namespace": (lambda d: _dns_peer(d).update({"namespaceSelector": {}}), "must pin the namespace"),
    "a forgeable namespace label": (
        lambda d: _dns_peer(d).update({"namespaceSelector": {"matchLabels": {"team": "platform"}}}),
        "must pin the namespace"),
    "every pod of a namespace": (lambda d: _dns_peer(d).pop("podSelector"), "add a podSelector"),
    "the trainer reaches the Ray dashboard": (
        lambda d: _obj(d, "NetworkPolicy", "ray-head")["spec"]["ingress"][0]["ports"].append(
            {"protocol": "TCP", "port": "dashboard"}),
        "reaches the Ray dashboard port"),
    "rollout workers reach every head port": (
        lambda d: _obj(d, "NetworkPolicy", "ray")["spec"]["ingress"][0].pop("ports"),
        "reaches the Ray dashboard port"),
    "Ray auth off": (lambda d: _obj(d, "RayCluster", "chatrl-ray")["spec"].pop("authOptions"),
                     "authOptions.mode must be token"),
}


@pytest.mark.parametrize("overlay", V.OVERLAYS)
def test_the_manifests_pin_every_peer(rendered, overlay):
    docs = with_jobs(rendered, overlay)
    assert V.check_peer_isolation(docs, V.pod_templates(docs)) == []


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_policy_fails(rendered, case):
    mutate, expected = BROKEN[case]
    docs = copy.deepcopy(with_jobs(rendered, "cpu"))
    mutate(docs)
    problems = V.cross_reference(docs)
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"
