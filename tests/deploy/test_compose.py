"""compose.yaml read as data: the four roles wired and locked down as deploy/base wires them (the check script runs it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("gateway", "tokenizer", "inference", "postprocess")


def _services() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    return data


def _config_env() -> dict[str, str]:
    lines = (ROOT / "deploy/base/config.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_every_role_runs_its_own_command_locked_down() -> None:
    services = _services()
    assert set(services) == {f"tandem-{role}" for role in ROLES}, "named like the Kubernetes Services"
    for role in ROLES:
        service = services[f"tandem-{role}"]
        assert service["command"] == [role]
        assert service["read_only"] is True
        assert service["user"] == "10001:10001", "the image's numeric non-root user"
        assert "/home/tandem/.cache:mode=1777" in service["tmpfs"]
        assert service["cap_drop"] == ["ALL"]
    assert services["tandem-inference"]["image"].startswith("${TANDEM_IMAGE"), "only inference needs the full image"
    for role in ("gateway", "tokenizer", "postprocess"):
        assert services[f"tandem-{role}"]["image"].startswith("${TANDEM_LIGHT_IMAGE")


def test_every_role_gets_the_manifests_config_and_only_the_repository_differs() -> None:
    manifests = _config_env()
    for role in ROLES:
        service = _services()[f"tandem-{role}"]
        assert service["env_file"] == "deploy/base/config.env", "the same settings the pods get with envFrom"
        overrides = service["environment"]
        assert set(overrides) <= {f"TANDEM_{r.upper()}_MODEL_REPOSITORY" for r in ROLES}
        assert all(value == "/opt/tandem/repository" for value in overrides.values())
    for stage in ("tokenizer", "inference", "postprocess"):
        assert manifests[f"TANDEM_GATEWAY_{stage.upper()}"].startswith(f"dns:///tandem-{stage}:"), (
            "the gateway finds each stage by the name compose gives it too"
        )


def test_the_compose_prometheus_loads_the_shipped_alert_rules() -> None:
    """compose.metrics.yaml mounts deploy/prometheus/tandem-alerts.yaml where its prometheus.yml looks for rules."""
    metrics = yaml.safe_load((ROOT / "compose.metrics.yaml").read_text())["services"]["prometheus"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in metrics["volumes"])
    config = yaml.safe_load((ROOT / "deploy/compose/prometheus.yml").read_text())
    (rules,) = config["rule_files"]
    assert {source: target for source, target in mounts.items() if target == rules} == {
        "./deploy/prometheus/tandem-alerts.yaml": rules
    }
    assert (ROOT / "deploy/prometheus/tandem-alerts.yaml").is_file()
