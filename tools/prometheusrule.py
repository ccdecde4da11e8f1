"""deploy/prometheus/rules.yml as a PrometheusRule for the Prometheus Operator
(deploy/kubernetes/monitoring/prometheusrule.yaml), so the two cannot drift:
tests/test_kubernetes.py fails when the committed file is not what this writes.

    python -m loraserve.tools.prometheusrule    # after editing rules.yml
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
TARGET = REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/rules.yml by `python -m loraserve.tools.prometheusrule`: edit that file,
# then run this. tests/test_kubernetes.py fails when the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: loraserve
  labels:
    release: kube-prometheus-stack  # that chart's default ruleSelector
spec:
"""


def render(rules: str) -> str:
    """The PrometheusRule whose spec is the rule file from its `groups:` line on, comments and all
    (the file's own header is about the file)."""
    lines = rules.splitlines()
    start = lines.index("groups:")
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


def main() -> None:
    if not RULES.exists():  # an installed wheel has no deploy/: this edits a checkout
        raise SystemExit(f"no {RULES}: run this from an editable install of a loraserve checkout")
    TARGET.write_text(render(RULES.read_text()))
    print(f"wrote {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
