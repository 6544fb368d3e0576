"""The alerting rules: valid for Prometheus, each one proved by promtool's unit tests, the same in the rules file and
the PrometheusRule of deploy/components/alerts, and documented. A live Prometheus runs them in
tests/e2e/test_alerts_e2e.py."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests import ROOT

RULES = ROOT / "deploy" / "prometheus" / "tandem-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tandem-alerts.test.yaml"
COMPONENT = ROOT / "deploy" / "components" / "alerts"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus; scripts/setup.sh --dev does it as root)",
)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate_deploy = _load("validate_deploy")
sync_alerts = _load("sync_alerts")


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False, cwd=RULES.parent, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


@needs_promtool
def test_every_rule_passes_its_unit_tests() -> None:
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alerts()}
    assert len(names) == 7
    assert firing == names and quiet == names


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_prometheus_rule_holds_the_same_rules() -> None:
    assert sync_alerts.main(["--check"]) == 0, "run python scripts/sync_alerts.py"
    (rule,) = yaml.safe_load_all((COMPONENT / "prometheus-rule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def with_component(overlay: Path, folder: Path) -> Path:
    """An operator's own overlay: one of ours with the alerts component on top (kustomize wants relative paths)."""
    folder.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay, folder)],
        "components": [os.path.relpath(COMPONENT, folder)],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return folder


def test_the_component_renders_on_every_overlay_and_validates(tmp_path: Path) -> None:
    for overlay in validate_deploy.overlays():
        objects = validate_deploy.render(with_component(overlay, tmp_path / overlay.name))
        (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
        assert rule["metadata"]["namespace"] == "tandem"
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
        assert validate_deploy.schema_errors(rule, ["1.30"]) == []
        # Everything else is what the overlay renders alone.
        assert len(objects) == len(validate_deploy.render(overlay)) + 1


def test_the_prometheus_rule_schema_refuses_a_typo() -> None:
    (rule,) = yaml.safe_load_all((COMPONENT / "prometheus-rule.yaml").read_text())
    first = rule["spec"]["groups"][0]["rules"][0]
    first["expression"] = first.pop("expr")
    problems = validate_deploy.schema_errors(rule, ["1.30"])
    assert problems and all(
        p.startswith("PrometheusRule/tandem-alerts is invalid at spec.groups.0.rules.0") for p in problems
    )
    assert any("'expr' is a required property" in p for p in problems)
    assert any("'expression' was unexpected" in p for p in problems)


def test_the_rules_name_only_metrics_tandem_exports() -> None:
    exported = {
        # services/common/metrics.py (the e2e test finds every one in a live Prometheus)
        "tandem_requests_total",
        "tandem_request_duration_seconds_bucket",
        "tandem_inference_queue_depth",
        "tandem_inference_queue_capacity",
        "tandem_model_state",
        "tandem_serving",
        # prometheus_client's process collector, in every service
        "process_start_time_seconds",
    }
    for rule in alerts():
        used = set(re.findall(r"\b((?:tandem|process)_[a-z_]+)", rule["expr"]))
        assert any(name.startswith("tandem_") for name in used), rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)


def test_every_alert_is_documented() -> None:
    text = OPERATIONS.read_text()
    assert "## Alerts" in text
    section = text.split("## Alerts", 1)[1].split("\n## ", 1)[0]
    for rule in alerts():
        assert f"`{rule['alert']}`" in section, rule["alert"]
    assert "deploy/components/alerts" in section


def test_setup_installs_promtool_for_the_dev_tools() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "dpkg -s prometheus" in setup and "apt-get install" in setup
