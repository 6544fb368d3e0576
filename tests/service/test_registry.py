"""The management API on the inference stage and through the gateway: states, aliases, live load and unload,
broken versions, names that leave the repository, and tokenizer fingerprints between the stages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import tensors
from services.common.repository import files as repository_files
from services.common.repository import tokenizer_fingerprint
from tandem.gateway.v1 import gateway_pb2
from tandem.inference.v1 import inference_pb2
from tandem.management.v1 import management_pb2, management_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tandem.tokenizer.v1 import tokenizer_pb2
from tests.fixtures import reference, tiny_models
from tests.harness import Stack, serve_stack
from tests.status import details_of

MiB = 1024 * 1024
TEXTS = tiny_models.embedding_texts(seed=21, n=12)
M = management_pb2


# ----------------------------------------------------------------------------------------------------------------------
# Model folders and an in-process stack of all four services


@dataclass(frozen=True)
class Sources:
    """Version folders to copy into repositories: two embedding models with the same tokenizer, one with another."""

    v1: Path
    v2: Path
    other_tokenizer: Path


def build_sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    root = tmp_path_factory.mktemp("registry-sources")
    tiny_models.make_embedding_model(root, name="a", seed=0)
    tiny_models.make_embedding_model(root, name="b", seed=1)
    other = root / "other"
    shutil.copytree(root / "a" / "1", other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False  # the same vocabulary, but "Anna" no longer finds "anna"
    (other / "tokenizer.json").write_text(json.dumps(data))
    return Sources(root / "a" / "1", root / "b" / "1", other)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return build_sources(tmp_path_factory)


def add_version(model_dir: Path, source: Path, version: int) -> Path:
    """Copies a version in under a hidden name and renames it, as operators must (the stages never see half)."""
    staging = model_dir / f".{version}.incoming"
    shutil.copytree(source, staging)
    os.rename(staging, model_dir / str(version))
    return model_dir / str(version)


def make_model(root: Path, name: str, versions: dict[int, Path], **config: Any) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True)
    (model_dir / "tandem.json").write_text(json.dumps({"task": "embedding", "backend": "torch", **config}))
    for version, source in versions.items():
        add_version(model_dir, source, version)
    return model_dir


async def embed(stack: Stack, model: str, texts: list[str] = TEXTS) -> gateway_pb2.EmbedResponse:
    return await stack.stub.Embed(gateway_pb2.EmbedRequest(model=model, inputs=texts), timeout=30)


async def model_status(stack: Stack, name: str) -> management_pb2.ModelStatus:
    models = (await stack.management.ListModels(M.ListModelsRequest(), timeout=30)).models
    return next(m for m in models if m.name == name)


def running_stack(
    repo: Path,
    home: Path,
    *,
    tokenizer_repo: Path | None = None,
    watch_s: float | None = None,
    unload_idle_s: float = 0.5,
    model_cache_ttl_s: float = 0.2,
) -> contextlib.AbstractAsyncContextManager[Stack]:
    """Tokenizer, inference (with the management API), postprocess and a gateway (forwarding it), on port 0."""
    return serve_stack(
        repo,
        home,
        tokenizer_repository=tokenizer_repo,
        preload_tokenizer=False,
        inference_options={"watch_s": watch_s, "unload_idle_s": unload_idle_s},
        pipeline_options={"model_cache_ttl_s": model_cache_ttl_s},
    )


def vectors(reply: gateway_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


def assert_same_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.sum(got * want, axis=1).min() >= 0.9999


def states(status: management_pb2.ModelStatus) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    return {v.version: (M.VersionState.Name(v.state), tuple(v.aliases), v.is_default) for v in status.versions}


async def until(condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> None:
    """Polls; the bound only stops a hang and is never asserted on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------------------------------------------------
# Listing, aliases, load and unload


async def test_models_versions_aliases_and_states(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1, 2: sources.v2}, version_policy={"latest": 1})
    (model_dir / "aliases.json").write_text(json.dumps({"canary": "1"}))
    async with running_stack(repo, tmp_path / "home") as stack:
        # The policy loads version 2; the alias loads version 1 as well.
        status = await model_status(stack, "emb")
        assert states(status) == {
            "1": ("VERSION_STATE_READY", ("canary",), False),
            "2": ("VERSION_STATE_READY", (), True),
        }
        assert (status.default_version, dict(status.aliases), status.version_policy.latest) == ("2", {"canary": "1"}, 1)
        v1 = status.versions[0]
        assert v1.tokenizer_fingerprint == tokenizer_fingerprint(sources.v1)
        assert (v1.precision, v1.backend, v1.reason, v1.in_flight) == (M.PRECISION_FP32, "torch", "", 0)
        # The stage itself answers the same.
        direct = (await stack.stage_management.ListModels(M.ListModelsRequest())).models
        assert [states(m) for m in direct] == [states(status)]

        for ref, version, source in (
            ("emb", "2", sources.v2),
            ("emb@canary", "1", sources.v1),
            ("emb:1", "1", sources.v1),
        ):
            reply = await embed(stack, ref)
            assert (reply.model, reply.model_version) == ("emb", version)
            assert_same_embeddings(vectors(reply), reference.reference_embeddings(source, TEXTS))


async def test_set_alias_moves_bare_requests_and_delete_moves_them_back(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1, 2: sources.v2})
    async with running_stack(repo, tmp_path / "home") as stack:
        status = await model_status(stack, "emb")
        assert states(status)["1"][0] == "VERSION_STATE_UNLOADED"
        assert "outside the version policy (the latest 1)" in status.versions[0].reason

        # "stable" is what bare names get: the version loads and warms up before the alias moves.
        reply = await stack.management.SetAlias(M.SetAliasRequest(name="emb", alias="stable", version="1"))
        assert states(reply.model) == {
            "1": ("VERSION_STATE_READY", ("stable",), True),
            "2": ("VERSION_STATE_READY", (), False),
        }
        assert json.loads((model_dir / "aliases.json").read_text()) == {"stable": "1"}
        assert (await embed(stack, "emb")).model_version == "1"
        assert (await embed(stack, "emb@stable")).model_version == "1"

        deleted = await stack.management.DeleteAlias(M.DeleteAliasRequest(name="emb", alias="stable"))
        assert deleted.model.default_version == "2" and dict(deleted.model.aliases) == {}

        async def on_version_2() -> bool:
            # The gateway keeps what it pinned for its model cache's 0.2 s.
            return (await embed(stack, "emb")).model_version == "2"

        await until(on_version_2, "bare requests to move to version 2")
        # Version 1 is outside the policy again and nothing names it: it unloads once idle.

        async def unloaded() -> bool:
            return states(await model_status(stack, "emb"))["1"][0] == "VERSION_STATE_UNLOADED"

        await until(unloaded, "version 1 to unload")


async def test_unload_and_load_on_request(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_model(repo, "emb", {1: sources.v1, 2: sources.v2}, version_policy={"all": True})
    async with running_stack(repo, tmp_path / "home") as stack:
        reply = await stack.management.UnloadModel(M.UnloadModelRequest(name="emb", version="2", wait=True))
        assert states(reply.model)["2"][0] == "VERSION_STATE_UNLOADED"
        assert reply.model.default_version == "1"
        assert "unloaded on request" in reply.model.versions[1].reason
        # Bare requests moved to the version left; the unloaded one is refused until loaded again.
        assert (await embed(stack, "emb")).model_version == "1"
        request = inference_pb2.InferRequest(model="emb:2", batch=token_batch([[2, 7, 3]]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.inference.Infer(request)
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED")
        assert "emb:2 is not loaded: unloaded on request" in d.message
        # The policy does not bring it back by itself.
        await stack.management.ReloadModel(M.ReloadModelRequest(name="emb", wait=True))
        assert states(await model_status(stack, "emb"))["2"][0] == "VERSION_STATE_UNLOADED"

        loaded = await stack.management.LoadModel(M.LoadModelRequest(name="emb", version="2", wait=True))
        assert states(loaded.model)["2"] == ("VERSION_STATE_READY", (), True)
        assert (await stack.inference.Infer(request)).version == "2"

        # Without a version: every version, until LoadModel without a version.
        reply = await stack.management.UnloadModel(M.UnloadModelRequest(name="emb", wait=True))
        assert {s for s, _, _ in states(reply.model).values()} == {"VERSION_STATE_UNLOADED"}
        assert reply.model.default_version == ""
        loaded = await stack.management.LoadModel(M.LoadModelRequest(name="emb", wait=True))
        assert {s for s, _, _ in states(loaded.model).values()} == {"VERSION_STATE_READY"}


async def test_a_version_outside_the_policy_is_not_loaded_by_a_request(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_model(repo, "emb", {1: sources.v1, 2: sources.v2}, version_policy={"specific": [1]})
    async with running_stack(repo, tmp_path / "home") as stack:
        assert (await embed(stack, "emb")).model_version == "1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.inference.Infer(inference_pb2.InferRequest(model="emb:2", batch=token_batch([[2, 7, 3]])))
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED")
        assert "outside the version policy (versions 1)" in d.message
        # GetModel describes it rather than failing, so that probes see "not ready", and says why.
        info = (await stack.inference.GetModel(inference_pb2.GetModelRequest(model="emb:2"))).model
        assert (info.version, info.ready) == ("2", False)
        assert "outside the version policy (versions 1)" in info.reason
        # Through the gateway, the same answer as the stage's: retrying would not help, so not UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(stack, "emb:2")
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED")


async def test_metadata_shows_in_the_listing(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1})
    metadata = {
        "task": "embedding",
        "source": "package:example",
        "precision": "int8",
        "tokenizer_fingerprint": tokenizer_fingerprint(sources.v1),
        "created": "2025-06-01T12:00:00Z",
        "derived_from": "emb:0",
        "accuracy": {"reference": "emb:0", "texts": 36, "min_cosine": 0.97, "mean_cosine": 0.993},
    }
    (model_dir / "1" / "metadata.json").write_text(json.dumps(metadata))
    async with running_stack(repo, tmp_path / "home") as stack:
        (version,) = (await model_status(stack, "emb")).versions
        assert (version.precision, version.source, version.create_time.ToJsonString()) == (
            M.PRECISION_INT8,
            "package:example",
            "2025-06-01T12:00:00Z",
        )
        accuracy = version.accuracy
        assert (accuracy.reference, accuracy.texts, accuracy.min_cosine, accuracy.mean_cosine) == (
            "emb:0",
            36,
            0.97,
            0.993,
        )
        assert not accuracy.HasField("top1_agreement")


# ----------------------------------------------------------------------------------------------------------------------
# Broken versions: FAILED with a reason, the others keep serving


def _corrupt_weights(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return "Error"


def _corrupt_onnx(folder: Path) -> str:
    # This version says (metadata.json) it is ONNX, whatever tandem.json says; its graph is garbage.
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    (folder / "metadata.json").write_text(json.dumps({"task": "embedding", "backend": "onnx"}))
    return "onnx"


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "has no config.json"


@pytest.mark.parametrize("breakage", [_corrupt_weights, _corrupt_onnx, _no_config], ids=["weights", "onnx", "config"])
async def test_a_broken_version_fails_while_the_other_serves(
    sources: Sources, tmp_path: Path, breakage: Callable[[Path], str]
) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1})
    async with running_stack(repo, tmp_path / "home") as stack:
        assert (await embed(stack, "emb")).model_version == "1"
        staging = tmp_path / "v2"
        shutil.copytree(sources.v2, staging)
        expected = breakage(staging)
        os.rename(staging, model_dir / "2")
        reply = await stack.management.ReloadModel(M.ReloadModelRequest(name="emb", wait=True))
        (status,) = reply.models
        assert states(status) == {"1": ("VERSION_STATE_READY", (), True), "2": ("VERSION_STATE_FAILED", (), False)}
        assert expected in status.versions[1].reason
        assert_same_embeddings(vectors(await embed(stack, "emb")), reference.reference_embeddings(sources.v1, TEXTS))

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.management.LoadModel(M.LoadModelRequest(name="emb", version="2", wait=True))
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_BROKEN")
        assert expected in d.message
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.inference.Infer(inference_pb2.InferRequest(model="emb:2", batch=token_batch([[2, 7, 3]])))
        d = details_of(caught.value)
        if breakage is _no_config:
            assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_BROKEN")
        else:
            assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
            assert "emb:2 is failed" in d.message
        assert (await embed(stack, "emb")).model_version == "1"


async def test_a_failed_newest_version_at_start_falls_back_to_the_previous(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1, 2: sources.v2})
    _corrupt_weights(model_dir / "2")
    async with running_stack(repo, tmp_path / "home") as stack:
        status = await model_status(stack, "emb")
        assert states(status) == {"1": ("VERSION_STATE_READY", (), True), "2": ("VERSION_STATE_FAILED", (), False)}
        assert (await embed(stack, "emb")).model_version == "1"


# ----------------------------------------------------------------------------------------------------------------------
# Errors: unknown names, and names that try to leave the repository (refused before anything is read)


def token_batch(seqs: list[list[int]]) -> tensor_pb2.TokenBatch:
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum([len(s) for s in seqs], out=cu[1:])
    return tensor_pb2.TokenBatch(
        input_ids=tensors.encode(np.array([t for s in seqs for t in s], dtype=np.int64)), cu_seqlens=tensors.encode(cu)
    )


CALLS: dict[str, Callable[[management_pb2_grpc.ManagementServiceAsyncStub], Any]] = {
    "load-unknown-model": lambda s: s.LoadModel(M.LoadModelRequest(name="nope")),
    "load-unknown-version": lambda s: s.LoadModel(M.LoadModelRequest(name="emb", version="9")),
    "unload-unknown-model": lambda s: s.UnloadModel(M.UnloadModelRequest(name="nope")),
    "alias-unknown-version": lambda s: s.SetAlias(M.SetAliasRequest(name="emb", alias="x", version="9")),
    "alias-bad-name": lambda s: s.SetAlias(M.SetAliasRequest(name="emb", alias="9lives", version="1")),
    "delete-unknown-alias": lambda s: s.DeleteAlias(M.DeleteAliasRequest(name="emb", alias="nope")),
    "reload-unknown-model": lambda s: s.ReloadModel(M.ReloadModelRequest(name="nope")),
    "load-dotdot": lambda s: s.LoadModel(M.LoadModelRequest(name="../outside")),
    "load-absolute": lambda s: s.LoadModel(M.LoadModelRequest(name="/etc")),
    "load-nested": lambda s: s.LoadModel(M.LoadModelRequest(name="emb/1")),
    "load-version-dotdot": lambda s: s.LoadModel(M.LoadModelRequest(name="emb", version="../1")),
    "load-symlinked-model": lambda s: s.LoadModel(M.LoadModelRequest(name="linked", wait=True)),
    "load-symlinked-version": lambda s: s.LoadModel(M.LoadModelRequest(name="emb", version="7", wait=True)),
    "reload-symlinked-model": lambda s: s.ReloadModel(M.ReloadModelRequest(name="linked")),
    "alias-symlinked-version": lambda s: s.SetAlias(M.SetAliasRequest(name="emb", alias="x", version="7")),
}
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("via", ["gateway", "stage"])
@pytest.mark.parametrize(
    ("call", "code", "reason", "fields", "message"),
    [
        ("load-unknown-model", NOT_FOUND, "MODEL_NOT_FOUND", [], "model 'nope' not found"),
        ("load-unknown-version", NOT_FOUND, "MODEL_NOT_FOUND", [], "has no version 9"),
        ("unload-unknown-model", NOT_FOUND, "MODEL_NOT_FOUND", [], "model 'nope' not found"),
        ("alias-unknown-version", NOT_FOUND, "MODEL_NOT_FOUND", [], "has no version 9"),
        ("alias-bad-name", INVALID, "INVALID_INPUT", ["alias"], "alias must be a letter"),
        ("delete-unknown-alias", NOT_FOUND, "MODEL_NOT_FOUND", [], "has no alias 'nope'"),
        ("reload-unknown-model", NOT_FOUND, "MODEL_NOT_FOUND", [], "model 'nope' not found"),
        ("load-dotdot", INVALID, "INVALID_INPUT", ["name"], "model name must be 1-128 ASCII letters"),
        ("load-absolute", INVALID, "INVALID_INPUT", ["name"], "model name must be 1-128 ASCII letters"),
        ("load-nested", INVALID, "INVALID_INPUT", ["name"], "model name must be 1-128 ASCII letters"),
        ("load-version-dotdot", INVALID, "INVALID_INPUT", ["version"], "version must be a number from 1 to"),
        ("load-symlinked-model", INVALID, "INVALID_INPUT", ["name"], "points outside the repository"),
        ("load-symlinked-version", INVALID, "INVALID_INPUT", ["version"], "points outside the repository"),
        ("reload-symlinked-model", INVALID, "INVALID_INPUT", ["name"], "points outside the repository"),
        ("alias-symlinked-version", INVALID, "INVALID_INPUT", ["version"], "points outside the repository"),
    ],
)
async def test_management_errors(
    escape_stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    via: str,
    call: str,
    code: grpc.StatusCode,
    reason: str,
    fields: list[str],
    message: str,
) -> None:
    read: list[Path] = []
    real_read_json = repository_files.read_json

    def recording_read_json(path: Path) -> dict[str, Any]:
        read.append(Path(path))
        return real_read_json(path)

    before = states(await model_status(escape_stack, "emb"))
    monkeypatch.setattr(repository_files, "read_json", recording_read_json)
    stub = escape_stack.management if via == "gateway" else escape_stack.stage_management
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await CALLS[call](stub)
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (code, reason, fields)
    assert message in d.message
    if code == INVALID:
        # Refused from the names and links alone: not a file of the repository (or outside it) was read. (Stacks
        # of other tests in this process watch their own repositories meanwhile: only this one's folder counts.)
        assert [p for p in read if escape_stack.repository.parent in p.parents] == []
    outside = escape_stack.repository.parent / "outside"
    assert not [p for p in read if p.resolve().is_relative_to(outside)]
    monkeypatch.undo()
    assert states(await model_status(escape_stack, "emb")) == before


@pytest.fixture(scope="module")
async def escape_stack(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """emb (version 1; version 7 a symlink to a version folder outside the repository) and `linked`, a model
    folder that is a symlink to a model outside the repository."""
    base = tmp_path_factory.mktemp("escape")
    repo = base / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1}, version_policy={"specific": [1]})
    outside = make_model(base / "outside", "evil", {1: sources.v2})
    os.symlink(outside / "1", model_dir / "7")
    os.symlink(outside, repo / "linked")
    # The stage's own scan follows what the operator put in the folder (so `linked` is served); only requests
    # from the API are held to the repository.
    async with running_stack(repo, base / "home") as stack:
        yield stack


async def test_reflection_lists_the_management_service_on_both(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_model(repo, "emb", {1: sources.v1})
    async with running_stack(repo, tmp_path / "home") as stack:
        for server in (stack.gateway, stack.stages["inference"]):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                services = {s.name async for reply in call for s in reply.list_services_response.service}
            assert "tandem.management.v1.ManagementService" in services


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer fingerprints: the stages must agree on which tokenizer made the ids


async def test_the_fingerprint_travels_from_tokenizer_to_inference(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_model(repo, "emb", {1: sources.v1, 2: sources.other_tokenizer}, version_policy={"all": True})
    async with running_stack(repo, tmp_path / "home") as stack:
        tokenized = await stack.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(model="emb:1", texts=TEXTS[:2]))
        v1_fingerprint = tokenized.tokenizer_fingerprint
        assert (
            v1_fingerprint
            == tokenizer_fingerprint(sources.v1)
            == (await model_status(stack, "emb")).versions[0].tokenizer_fingerprint
        )
        other = tokenizer_fingerprint(sources.other_tokenizer)
        assert other != v1_fingerprint

        request = inference_pb2.InferRequest(model="emb:1", batch=tokenized.batch, tokenizer_fingerprint=v1_fingerprint)
        assert (await stack.inference.Infer(request)).version == "1"
        request.tokenizer_fingerprint = ""  # callers that do not know it are not checked
        assert (await stack.inference.Infer(request)).version == "1"

        # Ids made by version 1's tokenizer sent to version 2, whose tokenizer differs.
        request.model, request.tokenizer_fingerprint = "emb:2", v1_fingerprint
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.inference.Infer(request)
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKENIZER_MISMATCH")
        assert v1_fingerprint in d.message and other in d.message


async def test_stages_that_read_different_tokenizers_are_refused(sources: Sources, tmp_path: Path) -> None:
    """The tokenizer stage reads another folder for emb:1 (another volume, or a version changed in place)."""
    repo = tmp_path / "repo"
    make_model(repo, "emb", {1: sources.v1})
    skewed = tmp_path / "skewed"
    make_model(skewed, "emb", {1: sources.other_tokenizer})
    async with running_stack(repo, tmp_path / "home", tokenizer_repo=skewed) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(stack, "emb")
        d = details_of(caught.value)
        assert (d.code, d.reason, d.fields) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKENIZER_MISMATCH", [])
        assert "emb:1" in d.message
