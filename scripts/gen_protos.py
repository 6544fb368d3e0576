"""Generates the Python code for every proto under protos/ (the one code generator; `--check` fails on drift)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Generated modules live where their proto file lies: tandem/tokenizer/v1/*.proto -> tandem/tokenizer/v1/ (the
# Open Inference Protocol's file, proto package `inference`, lies in tandem/oip/v2/). Those folders hold generated
# code only; hand-written code lives in other subpackages of tandem/ (sdk, cli, bench).
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# Top-level packages that also hold hand-written code (and their own __init__.py), which generation leaves alone.
HAND_WRITTEN_PACKAGES = {Path("tandem")}


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugins, installed beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return found


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generated_roots() -> list[str]:
    """Top-level folders that hold generated code: one per top-level folder of protos/."""
    return sorted(p.name for p in PROTOS.iterdir() if p.is_dir())


def generate(out: Path) -> list[Path]:
    """Runs protoc over every proto into `out`; returns the generated files relative to `out`."""
    sources = [str(p.relative_to(PROTOS)) for p in proto_files()]
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        "--mypy_opt=quiet",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        # Typed stubs for the generated servicers and stubs, so that mypy --strict checks their use.
        "--mypy_grpc_opt=generate_concrete_servicer_stubs,quiet",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = [p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    # Each generated folder is a regular package so that mypy and setuptools see it.
    for rel in list(files):
        for parent in rel.parents:
            if parent == Path("."):
                continue
            init = out / parent / "__init__.py"
            if not init.exists() and parent not in HAND_WRITTEN_PACKAGES:
                init.write_text("")
                files.append(parent / "__init__.py")
    return sorted(set(files))


def existing_generated(root: Path) -> list[Path]:
    """Generated files currently in the tree (so that stale ones from deleted protos are found)."""
    found = [
        p.relative_to(root)
        for name in generated_roots()
        if (root / name).is_dir()
        for p in (root / name).rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    ]
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs from the protos")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        if opts.check:
            drift = [
                str(rel)
                for rel in generated
                if not (ROOT / rel).exists() or not filecmp.cmp(out / rel, ROOT / rel, shallow=False)
            ]
            stale = [str(rel) for rel in existing_generated(ROOT) if rel not in generated]
            if drift or stale:
                print("generated code is out of date; run: python scripts/gen_protos.py", file=sys.stderr)
                for name in drift:
                    print(f"  differs: {name}", file=sys.stderr)
                for name in stale:
                    print(f"  stale:   {name}", file=sys.stderr)
                return 1
            print(f"generated code matches {len(proto_files())} protos")
            return 0
        for rel in existing_generated(ROOT):
            if rel not in generated:
                (ROOT / rel).unlink()
        for rel in generated:
            target = ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, target)
        print(f"generated {len(generated)} files from {len(proto_files())} protos")
        return 0


if __name__ == "__main__":
    sys.exit(main())
