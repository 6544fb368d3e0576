"""Writes deploy/components/alerts/prometheus-rule.yaml: the rules of deploy/prometheus/tandem-alerts.yaml as a
PrometheusRule (monitoring.coreos.com/v1), for clusters run by the Prometheus Operator.

    python scripts/sync_alerts.py            rewrite it after editing the rules file
    python scripts/sync_alerts.py --check    exit 1 if it is out of date (tests/deploy/test_alerts.py runs this)

The rules file is the one to edit; its text, comments included, becomes the PrometheusRule's `spec`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "tandem-alerts.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "components" / "alerts" / "prometheus-rule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/tandem-alerts.yaml by scripts/sync_alerts.py: edit that file, then run the script.
# What each alert means and what to do: docs/operations.md, "Alerts".
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: tandem-alerts
  namespace: tandem
  labels:
    app.kubernetes.io/name: tandem
    app.kubernetes.io/component: alerts
    app.kubernetes.io/part-of: tandem
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule manifest: the rules file below its opening comment, indented under `spec:`."""
    lines = rules_text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines)
    return HEADER + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the PrometheusRule is up to date")
    opts = parser.parse_args(argv)
    wanted = render(RULES.read_text())
    if opts.check:
        if PROMETHEUS_RULE.exists() and PROMETHEUS_RULE.read_text() == wanted:
            return 0
        print(f"{PROMETHEUS_RULE.relative_to(ROOT)} is out of date: run python scripts/sync_alerts.py")
        return 1
    PROMETHEUS_RULE.write_text(wanted)
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
