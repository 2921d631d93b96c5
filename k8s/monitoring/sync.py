"""Regenerate prometheusrule.yaml (the Prometheus Operator's PrometheusRule) from chatrl-rules.yaml, the
plain rules file promtool checks. ``--check`` exits 1 when the committed file is stale.

    python k8s/monitoring/sync.py           # rewrite prometheusrule.yaml
    python k8s/monitoring/sync.py --check   # verify it (the tests do this too)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "chatrl-rules.yaml"
OUT = HERE / "prometheusrule.yaml"
HEADER = ("# GENERATED from chatrl-rules.yaml by `python k8s/monitoring/sync.py` — edit that file, not this one.\n"
          "# The Prometheus Operator loads it when its ruleSelector matches (kube-prometheus-stack: set\n"
          "# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false, see k8s/README.md).\n")


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "chatrl", "labels": {"app.kubernetes.io/component": "monitoring"}},
           "spec": {"groups": groups}}
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python k8s/monitoring/sync.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
