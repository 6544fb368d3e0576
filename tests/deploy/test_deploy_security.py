"""Who may reach the services on Kubernetes, checked offline: the base's NetworkPolicies (evaluated for the pods the
overlays really render) keep the stages behind the gateway; the mtls component sets the TLS settings the services
read, from a Secret mounted into every pod, and its exec probes pass over mTLS; the otlp component points every
service at a collector and lets the spans out."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import GatewaySettings
from services.common import tls
from services.common.server import start_server
from services.common.settings import ServiceSettings
from services.inference.settings import InferenceSettings
from services.postprocess.settings import PostprocessSettings
from services.tokenizer.settings import TokenizerSettings
from tandem.cli import devcerts
from tests import ROOT
from tests.deploy.test_deploy import METRICS_PORT, NAMESPACE, OVERLAYS, PORTS, ROLES, STAGES, Rendered, validate_deploy

Manifest = dict[str, Any]

COMPONENTS = ROOT / "deploy" / "components"
OPTIONAL = ("mtls", "otlp")
SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "tokenizer": TokenizerSettings,
    "inference": InferenceSettings,
    "postprocess": PostprocessSettings,
}
TLS_SECRET = "tandem-tls"
# The keys cert-manager writes into a Certificate's Secret.
TLS_KEYS = {"cert": "tls.crt", "key": "tls.key", "ca": "ca.crt"}
# The scraper the base admits by default (tandem-metrics-scrape): the Prometheus Operator's pods in `monitoring`.
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})


@functools.cache
def rendered_with(overlay: str, *components: str) -> Rendered:
    return Rendered(
        validate_deploy.render(ROOT / "deploy" / "overlays" / overlay, [COMPONENTS / c for c in components])
    )


def settings_configmap(r: Rendered) -> Manifest:
    """The ConfigMap of TANDEM_* settings (the mtls component adds another, for its probe script)."""
    (configmap,) = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].startswith("tandem-config-")]
    return configmap


def config(r: Rendered) -> dict[str, str]:
    data: dict[str, str] = settings_configmap(r)["data"]
    return data


def role_settings(role: str, data: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The role's settings exactly as its container reads them: the ConfigMap as the environment, no flags."""
    with monkeypatch.context() as env:
        for name in [*os.environ]:
            if name.startswith(("TANDEM_", "OTEL_")):
                env.delenv(name)
        for name, value in data.items():
            env.setenv(name, value)
        return SETTINGS[role].from_args([], f"tandem {role}")


# ----------------------------------------------------------------------------------------------------------------------
# NetworkPolicy, evaluated: the rules Kubernetes applies, for the subset of the API the manifests use


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (namespace and labels), or an address outside the cluster (namespace None)."""

    namespace: str | None
    labels: Mapping[str, str]

    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


OUTSIDE = Peer(None, {})


def selects(selector: Manifest, labels: Mapping[str, str]) -> bool:
    """A label selector ({} selects everything); only the operators the manifests use."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, f"unexpected selector {selector}"
    if not dict(selector.get("matchLabels", {})).items() <= dict(labels).items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] in ("In", "NotIn", "Exists"), expression
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and not (present and value in expression["values"]):
            return False
        if expression["operator"] == "NotIn" and present and value in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
    return True


def peer_matches(rule_peer: Manifest, peer: Peer, policy_namespace: str) -> bool:
    """One entry of a rule's `from`/`to`: podSelector alone means the policy's namespace; with namespaceSelector,
    pods in the namespaces it selects; ipBlock is not used here."""
    assert set(rule_peer) <= {"podSelector", "namespaceSelector"}, f"unexpected peer {rule_peer}"
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"], peer.namespace_labels()):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return selects(rule_peer.get("podSelector", {}), peer.labels)


def port_matches(rule: Manifest, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        assert isinstance(entry.get("port"), int), f"ports are numbers here, not names: {entry}"
        if entry.get("protocol", "TCP") == protocol and entry["port"] == port:
            return True
    return False


def direction_allows(
    policies: list[Manifest], direction: str, pod: Peer, other: Peer, port: int, protocol: str
) -> bool:
    """Whether `pod` may send to (Egress) or receive from (Ingress) `other` on port: isolated only if some policy of
    that direction selects it, and then allowed only if some rule of such a policy admits `other` on the port."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in p["spec"]["policyTypes"]
        and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(key, []):
            if not port_matches(rule, port, protocol):
                continue
            if peers not in rule or any(peer_matches(p, other, policy["metadata"]["namespace"]) for p in rule[peers]):
                return True
    return False


def connects(policies: list[Manifest], source: Peer, target: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether source may open a connection to target's port. Only Tandem's namespace has policies here, so a peer
    elsewhere is limited by the other end's policies alone."""
    return direction_allows(policies, "Egress", source, target, port, protocol) and direction_allows(
        policies, "Ingress", target, source, port, protocol
    )


def pod_of(r: Rendered, role: str) -> Peer:
    labels: dict[str, str] = r.deployment(role)["spec"]["template"]["metadata"]["labels"]
    return Peer(r.deployment(role)["metadata"]["namespace"], labels)


@functools.cache
def base_policies(overlay: str) -> list[Manifest]:
    return rendered_with(overlay).of_kind("NetworkPolicy")


def test_the_evaluator_reads_selectors_as_kubernetes_does() -> None:
    assert selects({}, {"a": "b"})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b", "c"]}]}, {"a": "c"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}, {})
    both = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}, "podSelector": {}}
    assert peer_matches(both, Peer("x", {}), "tandem") and not peer_matches(both, Peer("y", {}), "tandem")
    assert not peer_matches({"podSelector": {}}, Peer("x", {}), "tandem"), "a podSelector alone is its own namespace"
    deny = {"metadata": {"namespace": "n"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not connects([deny], OUTSIDE, Peer("n", {}), 80)
    assert connects([deny], Peer("n", {}), Peer("m", {}), 80), "egress is not isolated by an Ingress-only policy"


# ----------------------------------------------------------------------------------------------------------------------
# The base's NetworkPolicies, in every overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_denies_by_default(overlay: str) -> None:
    policies = base_policies(overlay)
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in policies)
    deny = rendered_with(overlay).named("NetworkPolicy", "tandem-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # A pod that is not Tandem's (tools/model-loader.yaml) gets nothing in and nothing out but DNS.
    stranger = Peer(NAMESPACE, {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "model-loader"})
    for role in ROLES:
        assert not connects(policies, stranger, pod_of(rendered_with(overlay), role), PORTS[role])
    assert not connects(policies, OUTSIDE, stranger, 8080)
    assert not connects(policies, stranger, OUTSIDE, 443)
    assert connects(policies, stranger, OUTSIDE, 53, "UDP")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stages_admit_only_gateway_pods_on_their_port(overlay: str) -> None:
    r = rendered_with(overlay)
    policies = base_policies(overlay)
    gateway = pod_of(r, "gateway")
    for stage in STAGES:
        target = pod_of(r, stage)
        assert connects(policies, gateway, target, PORTS[stage])
        for port in {*PORTS.values(), METRICS_PORT} - {PORTS[stage]}:
            assert not connects(policies, gateway, target, port), f"gateway -> {stage}:{port}"
        others = [pod_of(r, s) for s in STAGES if s != stage]
        # Gateway labels on a pod of another namespace do not make it the gateway.
        impostor = Peer("default", dict(gateway.labels))
        for source in [*others, impostor, Peer("default", {}), OUTSIDE]:
            assert not connects(policies, source, target, PORTS[stage]), f"{source} -> {stage}"
        # The rule itself names the gateway by the labels its pods carry, and only it.
        (rule,) = r.named("NetworkPolicy", f"tandem-{stage}")["spec"]["ingress"]
        (peer,) = rule["from"]
        assert peer.keys() == {"podSelector"}
        assert r.pods_selected(peer["podSelector"]["matchLabels"]) == ["tandem-gateway"]
        assert rule["ports"] == [{"protocol": "TCP", "port": PORTS[stage]}]
        assert r.container(stage)["ports"][0] == {"name": "grpc", "containerPort": PORTS[stage]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_is_open_on_its_grpc_port_only(overlay: str) -> None:
    r = rendered_with(overlay)
    policies = base_policies(overlay)
    gateway = pod_of(r, "gateway")
    for source in (OUTSIDE, Peer("default", {}), Peer("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})):
        assert connects(policies, source, gateway, PORTS["gateway"])
        assert not connects(policies, source, gateway, METRICS_PORT)
    for stage in STAGES:
        assert not connects(policies, pod_of(r, stage), gateway, PORTS["gateway"]), "stages call nobody"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_scraper_reads_metrics(overlay: str) -> None:
    r = rendered_with(overlay)
    policies = base_policies(overlay)
    prometheus = Peer(*PROMETHEUS)
    for role in ROLES:
        pod = pod_of(r, role)
        assert r.container(role)["ports"][1] == {"name": "metrics", "containerPort": METRICS_PORT}
        assert connects(policies, prometheus, pod, METRICS_PORT)
        assert not connects(policies, Peer(PROMETHEUS[0], {"app.kubernetes.io/name": "grafana"}), pod, METRICS_PORT)
        assert not connects(policies, Peer("default", PROMETHEUS[1]), pod, METRICS_PORT)
        if role != "gateway":
            assert not connects(policies, prometheus, pod, PORTS[role])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_reach_dns_and_nothing_else_outside(overlay: str) -> None:
    r = rendered_with(overlay)
    policies = base_policies(overlay)
    for role in ROLES:
        pod = pod_of(r, role)
        kube_dns = Peer("kube-system", {"k8s-app": "kube-dns"})
        assert connects(policies, pod, kube_dns, 53, "UDP") and connects(policies, pod, kube_dns, 53, "TCP")
        for port in (443, 4317, 80):
            assert not connects(policies, pod, OUTSIDE, port), f"{role} -> outside:{port}"


# ----------------------------------------------------------------------------------------------------------------------
# The optional components render and validate on every overlay


def test_every_optional_component_is_validated() -> None:
    for overlay in validate_deploy.overlays():
        optional = {c.name for c in validate_deploy.optional_components(overlay)}
        assert set(OPTIONAL) <= optional
        assert "seed-default-model" not in optional, "already in every overlay"
    variants = validate_deploy.variants(validate_deploy.overlays())
    names = {(v.overlay.name, tuple(c.name for c in v.components)) for v in variants}
    for overlay in OVERLAYS:
        assert {(overlay, ()), *((overlay, (c,)) for c in OPTIONAL)} <= names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_components_together_are_valid(overlay: str) -> None:
    variant = validate_deploy.Variant(ROOT / "deploy" / "overlays" / overlay, tuple(COMPONENTS / c for c in OPTIONAL))
    assert validate_deploy.check_overlay(variant, validate_deploy.DEFAULT_VERSIONS) == []


@pytest.mark.parametrize("component", OPTIONAL)
def test_validate_deploy_renders_a_component_on_an_overlay(component: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "validate_deploy.py"),
            str(ROOT / "deploy" / "overlays" / "gpu"),
            "-c",
            str(COMPONENTS / component),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   deploy/overlays/gpu + deploy/components/{component}:" in done.stdout
    assert "1 of 1 overlays valid" in done.stdout


# ----------------------------------------------------------------------------------------------------------------------
# mTLS


def tls_mount(r: Rendered, role: str) -> Path:
    """Where the role's container has the tandem-tls Secret (and that it has it, read-only)."""
    volumes = {v["name"]: v for v in r.pod(role)["volumes"]}
    (mount,) = [
        m
        for m in r.container(role)["volumeMounts"]
        if volumes[m["name"]].get("secret", {}).get("secretName") == TLS_SECRET
    ]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert "items" not in secret, "every key of the Secret, under its own name"
    assert secret["defaultMode"] == 0o440, "the key readable by the pod's group only"
    return Path(mount["mountPath"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mtls_mounts_the_secret_and_sets_the_settings_the_services_read(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rendered_with(overlay, "mtls")
    data = config(r)
    for role in ROLES:
        mount = tls_mount(r, role)
        settings = role_settings(role, data, monkeypatch)
        assert settings.tls_cert == mount / TLS_KEYS["cert"]
        assert settings.tls_key == mount / TLS_KEYS["key"]
        if role == "gateway":
            # TLS on the links to the stages, showing the gateway's certificate; callers show API keys, not certs.
            assert settings.tls_ca == mount / TLS_KEYS["ca"]
            assert settings.tls_client_ca is None
        else:
            assert settings.tls_client_ca == mount / TLS_KEYS["ca"], f"{role} must require client certificates"
        # The stages are reached by the names the certificate carries (no override needed).
        assert settings.tls_server_name is None and settings.tls_client_cert is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mtls_replaces_every_grpc_probe_with_the_exec_probe(overlay: str) -> None:
    r = rendered_with(overlay, "mtls")
    plain = rendered_with(overlay)
    (configmap,) = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].startswith("tandem-health-probe-")]
    assert configmap["metadata"]["namespace"] == NAMESPACE
    script = COMPONENTS / "mtls" / "health_probe.py"
    assert configmap["data"] == {script.name: script.read_text()}
    for role in ROLES:
        container = r.container(role)
        volumes = {v["name"]: v for v in r.pod(role)["volumes"]}
        (probe_mount,) = [
            m
            for m in container["volumeMounts"]
            if volumes[m["name"]].get("configMap", {}).get("name") == configmap["metadata"]["name"]
        ]
        expected = [
            "python",
            f"{probe_mount['mountPath']}/{script.name}",
            "--address",
            f"127.0.0.1:{PORTS[role]}",
            "--server-name",
            f"tandem-{role}",
            "--tls-dir",
            str(tls_mount(r, role)),
        ]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            before = plain.container(role).get(kind)
            if before is None or "grpc" not in before:
                assert container.get(kind) == before, f"{role} {kind} is left as it was"
                continue
            probe = container[kind]
            assert "grpc" not in probe and probe["exec"]["command"] == expected, f"{role} {kind}"
            assert probe["timeoutSeconds"] >= 5
            assert probe["failureThreshold"] == before["failureThreshold"], "thresholds stay the overlay's"
    assert r.container("gateway")["livenessProbe"]["tcpSocket"] == {"port": PORTS["gateway"]}
    for role in ROLES:
        (port,) = r.named("Service", f"tandem-{role}")["spec"]["ports"]
        assert "appProtocol" not in port, "not cleartext HTTP/2 any more"


def certificate_example() -> list[Manifest]:
    text = (COMPONENTS / "mtls" / "certificate.example.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_the_certificate_example_names_every_service_and_fills_the_secret() -> None:
    objects = certificate_example()
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)
    (certificate,) = [o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == TLS_SECRET]
    spec = certificate["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"]), "served, and shown by the gateway to the stages"
    r = rendered_with("cpu", "mtls")
    data = config(r)
    for role in ROLES:
        names = {f"tandem-{role}", f"tandem-{role}.{NAMESPACE}", f"tandem-{role}.{NAMESPACE}.svc"}
        assert names <= set(spec["dnsNames"]), role
        r.named("Service", f"tandem-{role}")
    for stage in STAGES:
        # The gateway checks each stage's certificate for the host of its target.
        host = data[f"TANDEM_GATEWAY_{stage.upper()}"].removeprefix("dns:///").rsplit(":", 1)[0]
        assert host in spec["dnsNames"]
    issuer = spec["issuerRef"]["name"]
    (ca_issuer,) = [o for o in objects if o["kind"] == "Issuer" and o["metadata"]["name"] == issuer]
    assert "ca" in ca_issuer["spec"], "a CA issuer, which writes ca.crt into the Secret"


@pytest.fixture
def pod_tls_dir(tmp_path: Path) -> Path:
    """A Secret's files as cert-manager writes them, for a certificate with the Services' names."""
    made = devcerts.generate(tmp_path / "made", names=[f"tandem-{role}" for role in ROLES])
    folder = tmp_path / "tls"
    folder.mkdir()
    shutil.copy(made.server_cert, folder / TLS_KEYS["cert"])
    shutil.copy(made.server_key, folder / TLS_KEYS["key"])
    shutil.copy(made.ca, folder / TLS_KEYS["ca"])
    return folder


async def run_probe(command: list[str], address: str, script: Path, tls_dir: Path) -> tuple[int, str]:
    """The rendered probe command, run here: this Python, the component's script, the test's address and files."""
    args = list(command)
    args[0], args[1] = sys.executable, str(script)
    args[args.index("--address") + 1] = address
    args[args.index("--tls-dir") + 1] = str(tls_dir)
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.parametrize("role", ["tokenizer", "gateway"])
async def test_the_exec_probe_checks_health_over_mtls_with_the_pods_settings(
    role: str, pod_tls_dir: Path, certs: devcerts.DevCerts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started from the role's rendered TLS settings (paths moved to this test's files) answers the rendered
    probe; NOT_SERVING fails it, and so does a client certificate from another CA."""
    r = rendered_with("cpu", "mtls")
    mount = str(tls_mount(r, role))
    data = {k: v.replace(mount, str(pod_tls_dir)) for k, v in config(r).items()}
    settings = role_settings(role, data, monkeypatch)
    credentials = tls.load(settings)
    assert credentials.server is not None
    if role == "gateway":
        assert credentials.channels is not None, "TLS with a client certificate on the links to the stages"
    command = r.container(role)["readinessProbe"]["exec"]["command"]
    script = COMPONENTS / "mtls" / "health_probe.py"
    running = await start_server("127.0.0.1:0", [], credentials=credentials.server)
    try:
        assert await run_probe(command, running.address, script, pod_tls_dir) == (0, "")
        await running.set_serving(False)
        code, out = await run_probe(command, running.address, script, pod_tls_dir)
        assert code == 1 and "NOT_SERVING" in out
        await running.set_serving(True)
        stranger = pod_tls_dir.parent / "stranger"
        stranger.mkdir()
        shutil.copy(certs.server_cert, stranger / TLS_KEYS["cert"])
        shutil.copy(certs.server_key, stranger / TLS_KEYS["key"])
        shutil.copy(pod_tls_dir / TLS_KEYS["ca"], stranger / TLS_KEYS["ca"])
        code, out = await run_probe(command, running.address, script, stranger)
        if role == "gateway":
            assert code == 0, "the gateway's public port asks for no client certificate: " + out
        else:
            assert code == 1 and "UNAVAILABLE" in out, out
    finally:
        await running.server.stop(None)


# ----------------------------------------------------------------------------------------------------------------------
# OTLP


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_otlp_points_every_service_at_the_collector(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = rendered_with(overlay, "otlp")
    data = config(r)
    endpoint = data["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.startswith("http://") and endpoint.endswith(":4317")
    configmap_name = settings_configmap(r)["metadata"]["name"]
    for role in ROLES:
        (source,) = r.container(role)["envFrom"]
        assert source["configMapRef"]["name"] == configmap_name, f"{role} reads the settings"
        assert role_settings(role, data, monkeypatch).otlp_endpoint == endpoint
    # And the spans may leave: every service to the collector's port, and still nothing else.
    policies = r.of_kind("NetworkPolicy")
    for role in ROLES:
        assert connects(policies, pod_of(r, role), OUTSIDE, 4317)
        assert not connects(policies, pod_of(r, role), OUTSIDE, 443)
    assert not connects(policies, Peer(NAMESPACE, {"app.kubernetes.io/component": "model-loader"}), OUTSIDE, 4317)


def documented_overlay(component: str) -> Manifest:
    """The kustomization a component's own comment tells the operator to write."""
    lines = (COMPONENTS / component / "kustomization.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   resources:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    kustomization: Manifest = yaml.safe_load("\n".join(block))
    return kustomization


def test_the_otlp_endpoint_is_set_the_way_the_component_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kustomization = documented_overlay("otlp")
    assert kustomization["resources"] == ["../tandem/deploy/overlays/cpu"]
    assert kustomization["components"] == ["../tandem/deploy/components/otlp"]
    (patch,) = kustomization["patches"]
    wanted = yaml.safe_load(patch["patch"])["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    # The same kustomization, with this checkout where the comment has ../tandem.
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "tandem").symlink_to(ROOT)
    (mine / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    r = Rendered(validate_deploy.render(mine))
    data = config(r)
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == wanted
    assert wanted != config(rendered_with("cpu", "otlp"))["OTEL_EXPORTER_OTLP_ENDPOINT"], "not the placeholder"
    for role in ROLES:
        assert role_settings(role, data, monkeypatch).otlp_endpoint == wanted
