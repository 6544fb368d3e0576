"""`tandem models prune` and `tandem models distill` on tiny models made here: smaller real models that transformers
loads, students closer to their parent than before training, seeds and resumed runs that reproduce, the promote gate,
provenance (in metadata.json, and served by GetModel), and refusals that leave the repository as it was."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from services.common.repository import ModelRepository, read_metadata
from services.inference.export import pruning
from services.inference.export.distillation import pool
from tandem.gateway.v1 import gateway_pb2
from tandem.model.v1 import model_pb2
from tandem.sdk import AsyncTandemClient
from tests.fixtures import tiny_models
from tests.harness import serve_stack
from tests.service.test_models_cli import Result, run

STEPS = ["--steps", "24", "--batch-size", "8", "--lr", "3e-3", "--checkpoint-every", "10", "--device", "cpu"]


@dataclass(frozen=True)
class Setup:
    repo: Path
    home: Path
    texts: Path  # held-out texts
    corpus: Path


def _files(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """emb:1, a random tiny BERT embedding model (2 layers, hidden 32, 2 heads, FFN 64)."""
    base = tmp_path_factory.mktemp("compression")
    tiny_models.make_embedding_model(base / "src", name="emb")
    repo, home = base / "repo", base / "home"
    assert run(repo, home, "add", "emb", "--from", str(base / "src" / "emb" / "1"), "--task", "embedding").code == 0
    texts, corpus = base / "texts.txt", base / "corpus.jsonl"
    texts.write_text("\n".join(tiny_models.embedding_texts(seed=4, n=8)) + "\n")
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_models.embedding_texts(seed=9, n=96)))
    return Setup(repo, home, texts, corpus)


def _copy(setup: Setup, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(setup.repo, repo)
    return repo


def _embed(model: torch.nn.Module, folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")


def test_prune_makes_a_smaller_model_that_transformers_loads(setup: Setup, tmp_path: Path) -> None:
    repo = _copy(setup, tmp_path)
    done = run(repo, setup.home, "prune", "emb", "--ffn", "0.5", "--layers", "1", "--texts", str(setup.texts))
    assert done.code == 0, done.err
    assert "created emb:2 (prune of emb:1, fp32)" in done.out and "speed against emb:1" in done.out
    folder = repo / "emb" / "2"
    parent = AutoModel.from_pretrained(str(repo / "emb" / "1"))
    pruned = AutoModel.from_pretrained(str(folder))
    assert (pruned.config.intermediate_size, pruned.config.num_hidden_layers) == (32, 1)
    assert pruning.parameter_count(pruned) < pruning.parameter_count(parent)
    texts = tiny_models.embedding_texts(seed=5, n=3)
    assert _embed(pruned, folder, texts).shape == _embed(parent, repo / "emb" / "1", texts).shape
    metadata = read_metadata(folder)
    assert metadata is not None and metadata.derivation is not None and metadata.speed is not None
    assert metadata.accuracy is not None and metadata.accuracy.reference == "emb:1"
    derivation = metadata.derivation
    assert (derivation.method, derivation.parent, derivation.corpus) == ("prune", "emb:1", "builtin:python-docs")
    assert derivation.parameters["intermediate_size"] == 32 and len(derivation.parameters["kept_layers"]) == 1
    assert derivation.corpus_sha256.startswith("sha256:") and derivation.corpus_texts > 0
    assert derivation.parameter_count == pruning.parameter_count(pruned)
    assert metadata.speed.size_bytes < metadata.speed.parent_size_bytes
    assert (folder / "model.onnx").is_file(), "the version carries the graph serving loads"
    listing = run(repo, setup.home, "list").out
    assert "prune of emb:1" in listing and "speed" in listing


def _distill(repo: Path, setup: Setup, *extra: str) -> Result:
    return run(repo, setup.home, "distill", "emb", "--layers", "1", "--corpus", str(setup.corpus), *STEPS, *extra)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_distilled_student_is_closer_to_its_parent_and_its_seed_reproduces_it(setup: Setup, tmp_path: Path) -> None:
    repo = _copy(setup, tmp_path)
    first = _distill(repo, setup, "--texts", str(setup.texts))
    assert first.code == 0, first.err
    assert "created emb:2 (distill of emb:1, fp32)" in first.out and "distill: 100%" in first.err
    metadata = read_metadata(repo / "emb" / "2")
    assert metadata is not None and metadata.derivation is not None
    kept = metadata.derivation.parameters["kept_layers"]
    assert kept in ([0], [1])  # the layer whose model alone is closer to the parent's embeddings
    parent = AutoModel.from_pretrained(str(repo / "emb" / "1"))
    before = copy.deepcopy(parent)
    pruning.keep_layers(before, kept)
    after = AutoModel.from_pretrained(str(repo / "emb" / "2"))
    held_out = tiny_models.embedding_texts(seed=11, n=16)
    want = _embed(parent, repo / "emb" / "1", held_out)

    def distance(model: torch.nn.Module) -> float:
        got = _embed(model, repo / "emb" / "1", held_out)
        return float((1 - torch.nn.functional.cosine_similarity(got, want)).mean())

    assert distance(after) < 0.5 * distance(before)
    assert (metadata.derivation.method, metadata.derivation.steps, metadata.derivation.corpus_texts) == (
        "distill",
        24,
        96,
    )
    assert not (setup.home / "checkpoints" / "emb").exists() or not any((setup.home / "checkpoints" / "emb").iterdir())

    again = _distill(repo, setup)
    assert again.code == 0, again.err
    one, two = _weights(repo / "emb" / "2"), _weights(repo / "emb" / "3")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    other = _distill(repo, setup, "--seed", "1")
    assert other.code == 0
    three = _weights(repo / "emb" / "4")
    assert not all(torch.equal(one[k], three[k]) for k in one)


async def test_get_model_says_how_the_version_was_made(setup: Setup, tmp_path: Path) -> None:
    """Provenance as callers see it, over real servers on port 0: GetModel (and ListModels, and the SDK) on the
    gateway gives a pruned and a distilled version's derivation and accuracy as their metadata.json has them, a
    version added by `tandem models add` its source only, and a version folder made by hand none."""
    repo = _copy(setup, tmp_path)
    corpus = ["--corpus", str(setup.corpus), "--texts", str(setup.texts)]
    pruned = run(repo, setup.home, "prune", "emb", "--ffn", "0.5", "--layers", "1", *corpus)
    assert pruned.code == 0, pruned.err
    distilled = run(repo, setup.home, "distill", "emb", "--layers", "1", *corpus, "--steps", "2", *STEPS[2:])
    assert distilled.code == 0, distilled.err
    config_file = repo / "emb" / "tandem.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "version_policy": {"all": True}}))
    shutil.copytree(repo / "emb" / "1", repo / "hand" / "1", ignore=shutil.ignore_patterns("metadata.json"))
    (repo / "hand" / "tandem.json").write_text(json.dumps({"task": "embedding"}))

    async with serve_stack(repo, tmp_path / "home") as stack:

        async def info(ref: str) -> model_pb2.ModelInfo:
            return (await stack.stub.GetModel(gateway_pb2.GetModelRequest(model=ref))).model

        for version, method in (("2", model_pb2.DERIVATION_METHOD_PRUNE), ("3", model_pb2.DERIVATION_METHOD_DISTILL)):
            metadata = read_metadata(repo / "emb" / version)
            assert metadata is not None and metadata.derivation is not None and metadata.accuracy is not None
            made = await info(f"emb:{version}")
            assert (made.version, made.ready) == (version, True), made.reason
            provenance = made.provenance
            assert (provenance.derived_from, provenance.precision) == ("emb:1", model_pb2.PRECISION_FP32)
            assert provenance.source == metadata.source and metadata.created is not None
            assert provenance.create_time.ToDatetime(tzinfo=UTC) == metadata.created
            derivation, recorded = provenance.derivation, metadata.derivation
            assert (derivation.method, derivation.parent) == (method, "emb:1")
            assert {k: json.loads(v) for k, v in derivation.parameters.items()} == recorded.parameters
            assert json.loads(derivation.parameters["kept_layers"]) == recorded.parameters["kept_layers"]
            assert (derivation.corpus, derivation.corpus_sha256, derivation.corpus_texts) == (
                str(setup.corpus),
                recorded.corpus_sha256,
                96,
            )
            assert derivation.seconds == pytest.approx(recorded.seconds)
            assert derivation.parameter_count == recorded.parameter_count
            assert derivation.parent_parameter_count == recorded.parent_parameter_count
            assert derivation.parameter_count < derivation.parent_parameter_count
            assert derivation.HasField("steps") == (method == model_pb2.DERIVATION_METHOD_DISTILL)
            accuracy = provenance.accuracy
            assert (accuracy.reference, accuracy.texts) == ("emb:1", 8)
            assert (accuracy.min_cosine, accuracy.mean_cosine) == (
                metadata.accuracy.min_cosine,
                metadata.accuracy.mean_cosine,
            )
            assert not accuracy.HasField("top1_agreement")
        assert (await info("emb:3")).provenance.derivation.steps == 2
        assert json.loads((await info("emb:2")).provenance.derivation.parameters["intermediate_size"]) == 32

        added = (await info("emb:1")).provenance
        assert added.source and not added.derived_from and added.HasField("create_time")
        assert not added.HasField("derivation") and not added.HasField("accuracy")
        assert not (await info("hand")).HasField("provenance")
        listed = {m.name: m for m in (await stack.stub.ListModels(gateway_pb2.ListModelsRequest())).models}
        assert listed["emb"].provenance == (await info(f"emb:{listed['emb'].version}")).provenance
        assert not listed["hand"].HasField("provenance")

        async with AsyncTandemClient(stack.gateway.address) as client:
            typed = (await client.get_model("emb:2")).provenance
            assert (await client.get_model("hand")).provenance is None
        recorded_metadata = read_metadata(repo / "emb" / "2")
        assert recorded_metadata is not None and recorded_metadata.derivation is not None
        assert typed is not None and typed.derivation is not None and typed.accuracy is not None
        assert (typed.derived_from, typed.precision, typed.created) == ("emb:1", "fp32", recorded_metadata.created)
        assert (typed.derivation.method, typed.derivation.parameters) == (
            "prune",
            recorded_metadata.derivation.parameters,
        )
        assert (typed.derivation.steps, typed.accuracy.reference, typed.accuracy.top1_agreement) == (
            None,
            "emb:1",
            None,
        )


class _Interrupted:
    """A tqdm stand-in that interrupts the run (as Ctrl-C would) after `stop` steps."""

    stop = 15

    def __init__(self, total: int, initial: int, **_: Any) -> None:
        self.n = initial

    def set_postfix(self, **_: Any) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n
        if self.n == self.stop:
            raise KeyboardInterrupt

    def close(self) -> None:
        pass


def test_an_interrupted_run_leaves_no_version_and_resume_continues_it(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _copy(setup, tmp_path)
    reference = _copy(setup, tmp_path / "reference")
    home = tmp_path / "home"
    before = _files(repo)
    with monkeypatch.context() as patched:
        patched.setattr("tqdm.tqdm", _Interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(repo, home, "distill", "emb", "--layers", "1", "--corpus", str(setup.corpus), *STEPS)
    assert _files(repo) == before, "no half-written version, and no alias left pinned"
    (checkpoint,) = (home / "checkpoints" / "emb").glob("*/checkpoint.pt")
    assert torch.load(checkpoint, weights_only=False)["step"] == 10
    resumed = run(repo, home, "distill", "emb", "--layers", "1", "--corpus", str(setup.corpus), *STEPS, "--resume")
    assert resumed.code == 0, resumed.err
    assert "resumed at step 10" in resumed.out
    assert not checkpoint.exists()
    whole = run(reference, tmp_path / "home2", "distill", "emb", "--layers", "1", "--corpus", str(setup.corpus), *STEPS)
    assert whole.code == 0
    one, two = _weights(repo / "emb" / "2"), _weights(reference / "emb" / "2")
    assert all(torch.equal(one[k], two[k]) for k in one), "a resumed run gives the student an unbroken run gives"


def test_the_gate_keeps_requests_on_the_parent_until_promotion(setup: Setup, tmp_path: Path) -> None:
    repo = _copy(setup, tmp_path)
    assert _distill(repo, setup).code == 0
    repository = ModelRepository(repo, rescan_s=0)
    assert repository.resolve("emb").version == "1"
    refused = run(repo, setup.home, "promote", "emb", "2", "--min-cosine", "0.9999")
    assert refused.code == 1 and "refusing to promote emb:2: min cosine" in refused.err
    assert ModelRepository(repo, rescan_s=0).resolve("emb").version == "1"
    # The model's own threshold (tandem.json) stands in for the flag's default, and the flag overrides it.
    config_file = repo / "emb" / "tandem.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "promote": {"min_cosine": 0.9999}}))
    refused = run(repo, setup.home, "promote", "emb", "2")
    assert refused.code == 1 and "below 0.9999" in refused.err
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "promote": {"min_cosine": 0.1}}))
    assert run(repo, setup.home, "promote", "emb", "2").code == 0
    assert ModelRepository(repo, rescan_s=0).resolve("emb").version == "2"


def _classifier(repo: Path, home: Path, tmp_path: Path) -> None:
    src = tmp_path / "sent-src"
    tokenizer = tiny_models.build_tokenizer(src)
    labels = tiny_models.SENTIMENT_LABELS
    config = tiny_models._config(tokenizer, num_labels=3, id2label=dict(enumerate(labels)))
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(src))
    assert run(repo, home, "add", "sent", "--from", str(src), "--task", "classification").code == 0


def test_distill_then_quantize_a_classifier_reports_against_the_original(setup: Setup, tmp_path: Path) -> None:
    repo, home = tmp_path / "repo", tmp_path / "home"
    _classifier(repo, home, tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t for t, _ in tiny_models.classifier_examples(seed=2, n=12)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in tiny_models.classifier_examples(seed=3, n=96)))
    done = run(repo, home, "distill", "sent", "--layers", "1", "--corpus", str(corpus), "--texts", str(texts), *STEPS)
    assert done.code == 0, done.err
    report = read_metadata(repo / "sent" / "2").accuracy  # type: ignore[union-attr]
    assert report is not None and report.top1_agreement is not None and report.min_cosine is None
    quantized = run(repo, home, "quantize", "sent:2", "--mode", "int8", "--texts", str(texts))
    assert quantized.code == 0, quantized.err
    metadata = read_metadata(repo / "sent" / "3")
    assert metadata is not None and metadata.accuracy is not None and metadata.speed is not None
    assert (metadata.accuracy.reference, metadata.speed.parent) == ("sent:1", "sent:2")


def _llama(repo: Path, home: Path, tmp_path: Path) -> None:
    """A random tiny Llama (3 layers, 4 query heads in 2 key/value groups) with the tiny WordPiece tokenizer."""
    src = tmp_path / "llama-src"
    tokenizer = tiny_models.build_tokenizer(src)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(src))
    assert run(repo, home, "add", "chat", "--from", str(src), "--task", "text-generation").code == 0


def test_text_generation_layers_kept_and_distilled_and_heads_pruned(setup: Setup, tmp_path: Path) -> None:
    repo, home = tmp_path / "repo", tmp_path / "home"
    _llama(repo, home, tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(tiny_models.embedding_texts(seed=4, n=6)))
    args = ["--corpus", str(setup.corpus), "--texts", str(texts)]
    done = run(repo, home, "distill", "chat", "--layers", "2", *args, *STEPS)
    assert done.code == 0, done.err
    metadata = read_metadata(repo / "chat" / "2")
    assert metadata is not None and metadata.accuracy is not None and metadata.speed is not None
    assert metadata.accuracy.top1_agreement is not None and metadata.derivation is not None
    assert metadata.derivation.parameters["kept_layers"] == [0, 2]
    student = AutoModelForCausalLM.from_pretrained(str(repo / "chat" / "2"))
    assert student.config.num_hidden_layers == 2
    pruned = run(repo, home, "prune", "chat:1", "--heads", "0.5", "--ffn", "0.25", *args)
    assert pruned.code == 0, pruned.err
    model = AutoModelForCausalLM.from_pretrained(str(repo / "chat" / "3"))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (
        2,
        2,
        48,
    )
    ids = torch.tensor([[2, 5, 6, 7]])
    assert model(input_ids=ids).logits.shape == (1, 4, model.config.vocab_size)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "emb", "--heads", "1"], "--heads is the fraction to remove"),
        (["prune", "emb", "--heads", "0.5"], "fewer heads would not load"),
        (["prune", "emb", "--layers", "0"], "--layers must be between 1 and 2"),
        (["prune", "emb", "--layers", "3"], "--layers must be between 1 and 2"),
        (["prune", "emb"], "nothing to prune"),
        (["prune", "emb", "--ffn", "0.5", "--corpus", "EMPTY"], "holds no texts"),
        (["distill", "emb", "--layers", "0"], "--layers must be between 1 and 2"),
        (["distill", "emb"], "give the student"),
        (["distill", "emb", "--layers", "1", "--corpus", "/no/such/file"], "cannot be read"),
        (["distill", "emb", "--layers", "1", "--corpus", "EMPTY"], "holds no texts"),
        (["distill", "emb", "--layers", "1", "--corpus", "BADJSON"], "is not JSON"),
        (["distill", "emb", "--student", "OTHER"], "tokenizer fingerprint differs"),
        (["distill", "emb:9", "--layers", "1"], "has no version 9"),
    ],
)
def test_refusals_leave_the_repository_as_it_was(setup: Setup, tmp_path: Path, args: list[str], message: str) -> None:
    repo = _copy(setup, tmp_path)
    empty, bad = tmp_path / "empty.txt", tmp_path / "bad.jsonl"
    empty.write_text("\n \n")
    bad.write_text('{"text": "fine"}\n{not json\n')
    other = tmp_path / "other"
    shutil.copytree(repo / "emb" / "1", other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["extra"] = len(tokenizer["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    places = {"EMPTY": str(empty), "BADJSON": str(bad), "OTHER": str(other)}
    before = _files(repo)
    result = run(repo, setup.home, *[places.get(a, a) for a in args])
    assert result.code == 1
    assert result.err.startswith("tandem models: ") and message in result.err, result.err
    assert _files(repo) == before


def test_a_terminated_run_cleans_up_like_an_interrupted_one(setup: Setup, tmp_path: Path) -> None:
    """SIGTERM (a killed job) mid-training: the command exits, no staging folder of the half-made version remains,
    and `stable` is as it was."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests import ROOT

    repo = _copy(setup, tmp_path)
    before = _files(repo)
    args = ["distill", "emb", "--layers", "1", "--corpus", str(setup.corpus), "--steps", "1000000", "--device", "cpu"]
    places = ["--model-repository", str(repo), "--home", str(tmp_path / "home"), "--threads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli.models", *args, *places],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    seen = b""
    while b"distill:" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += os.read(process.stderr.fileno(), 4096)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert b"distill:" in seen
    assert _files(repo) == before
