"""End to end: a real Prometheus (Debian's `prometheus` package) scrapes a live `tandem serve`, evaluates the shipped
alerting rules, and raises TandemStageDown for the inference stage once its process is killed.

Everything listens on loopback; Prometheus scrapes and evaluates every second and keeps its data in a temporary
folder. The rules are deploy/prometheus/tandem-alerts.yaml with only their `for:` shortened. `tandem serve` restarts
a stage that dies (within a second, much faster than the alert's minute), so the test freezes the supervisor first
(SIGSTOP): the stage stays down as it would when a node is lost or a pod cannot be scheduled again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests import ROOT
from tests.e2e.deployment import tandem_serve
from tests.e2e.test_cli_chat import free_port

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
RULES = ROOT / "deploy" / "prometheus" / "tandem-alerts.yaml"
ROLES = ("gateway", "tokenizer", "inference", "postprocess")
# How long any one wait below may take: scrapes and evaluations are every second.
WAIT_S = 60.0

T = TypeVar("T")

if PROMETHEUS is None:
    pytest.skip(
        "prometheus not installed (Debian/Ubuntu: apt-get install prometheus; scripts/setup.sh --dev does it as root)",
        allow_module_level=True,
    )


@dataclass
class Prometheus:
    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return alerts

    def last_evaluation(self) -> str:
        (group,) = self.get("/api/v1/rules")["groups"]
        evaluated: str = group["lastEvaluation"]
        return evaluated


def wait_for(what: str, check: Callable[[], T | None], prometheus: Prometheus) -> T:
    """The first truthy result of `check`, polled; fails with Prometheus' log when WAIT_S passes first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    log = prometheus.log.read_text()[-3000:] if prometheus.log.exists() else ""
    raise AssertionError(f"{what} within {WAIT_S:.0f}s; Prometheus log:\n{log}")


def rules_for_the_test(folder: Path) -> Path:
    """The shipped rules with every `for:` at 2 s (the expressions are the shipped ones, checked here)."""
    shipped = yaml.safe_load(RULES.read_text())
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    assert [r["expr"] for g in rules["groups"] for r in g["rules"]] == [
        r["expr"] for g in shipped["groups"] for r in g["rules"]
    ]
    path = folder / "tandem-alerts.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    return {role: free_port() for role in ROLES}


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, metrics_ports: dict[str, int]
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    extra = [arg for role, port in metrics_ports.items() for arg in (f"--{role}-args", f"--metrics-port {port}")]
    with tandem_serve(tmp_path_factory.mktemp("home"), extra=extra) as served:
        # One call before Prometheus starts, so the request metrics exist at its first scrape and no rate over them
        # includes this first call (however slow a cold call is on a busy machine).
        with grpc.insecure_channel(served[0]) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            assert stub.Embed(gateway_pb2.EmbedRequest(inputs=["hello"]), timeout=60).embeddings
        yield served


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, metrics_ports: dict[str, int]) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_for_the_test(folder))],
        "scrape_configs": [
            {"job_name": "tandem", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in metrics_ports.values()]}]}
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_for("Prometheus ready", ready, server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_running(parent: int, module: str) -> int:
    """The pid of the supervisor's child that runs `python -m module`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and module.encode() in command:
            return int(entry.name)
    raise LookupError(f"no child of {parent} runs {module}")


def serving(prometheus: Prometheus) -> set[str]:
    return {s["metric"]["service"] for s in prometheus.query("tandem_serving == 1")}


def firing(prometheus: Prometheus, name: str) -> set[str]:
    return {
        a["labels"].get("service", "")
        for a in prometheus.alerts()
        if a["labels"]["alertname"] == name and a["state"] == "firing"
    }


def test_killing_the_inference_stage_fires_stage_down(
    served: tuple[str, subprocess.Popen[str]], prometheus: Prometheus
) -> None:
    _, supervisor = served
    # Every stage scraped and SERVING, and every metric the rules read is in Prometheus.
    wait_for("all four services SERVING", lambda: serving(prometheus) == set(ROLES) or None, prometheus)
    exprs = " ".join(r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"])
    used = set(re.findall(r"\b((?:tandem|process)_[a-z_]+)", exprs))

    def names() -> bool:
        return used <= set(prometheus.get("/api/v1/label/__name__/values"))

    wait_for(f"the metrics {sorted(used)} scraped", names, prometheus)
    (capacity,) = prometheus.query('tandem_inference_queue_capacity{model="all-MiniLM-L6-v2"}')
    assert float(capacity["value"][1]) > 0
    # A whole evaluation after that, no rule fires on a healthy deployment.
    seen = prometheus.last_evaluation()
    wait_for("a rule evaluation", lambda: prometheus.last_evaluation() != seen or None, prometheus)
    assert prometheus.alerts() == []

    inference = child_running(supervisor.pid, "services.inference")
    os.kill(supervisor.pid, signal.SIGSTOP)
    try:
        os.kill(inference, signal.SIGKILL)

        def inference_down() -> set[str] | None:
            down = firing(prometheus, "TandemStageDown")
            return down if "inference" in down else None

        down = wait_for("TandemStageDown firing for inference", inference_down, prometheus)
        # The gateway follows its stages' health, so it may be down too; the other stages are not.
        assert down <= {"inference", "gateway"}
        labels = {"alertname": "TandemStageDown", "service": "inference", "severity": "critical"}
        (alert,) = [a for a in prometheus.alerts() if a["labels"] == labels]
        assert alert["annotations"]["summary"] == "inference has no healthy replica"
    finally:
        os.kill(supervisor.pid, signal.SIGCONT)
