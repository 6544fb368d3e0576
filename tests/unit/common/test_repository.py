"""The model repository's registry features on disk: references, aliases, version policies, metadata, tokenizer
fingerprints, and names that try to leave the repository."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from services.common import errors
from services.common.errors import Reason
from services.common.repository import (
    ModelRepository,
    Reference,
    VersionPolicy,
    parse_reference,
    tokenizer_fingerprint,
)
from services.common.repository import files as repository_files
from tests.fixtures import tiny_models


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny embedding model version folder (random weights: only its files matter here)."""
    root = tmp_path_factory.mktemp("registry-source")
    tiny_models.make_embedding_model(root, name="emb")
    return root / "emb" / "1"


def make_repo(root: Path, source: Path, versions: tuple[int, ...], **config: object) -> Path:
    model_dir = root / "emb"
    for version in versions:
        shutil.copytree(source, model_dir / str(version))
    (model_dir / "tandem.json").write_text(json.dumps({"task": "embedding", "backend": "torch", **config}))
    return model_dir


def assert_error(err: errors.TandemError, code: grpc.StatusCode, reason: str, message: str, field: str | None) -> None:
    assert (err.code, err.reason) == (code, reason)
    assert message in err.message
    assert [v.field for v in err.violations] == ([field] if field else [])


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("emb", Reference("emb")),
        ("emb:12", Reference("emb", version="12")),
        ("emb@stable", Reference("emb", alias="stable")),
        ("emb@canary-2.b_x", Reference("emb", alias="canary-2.b_x")),
        ("", Reference("")),
        (":3", Reference("", version="3")),
    ],
)
def test_references(ref: str, expected: Reference) -> None:
    assert parse_reference(ref) == expected


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("emb:x", "model version must be a number"),
        ("emb@", "alias must be a letter"),
        ("emb@1", "alias must be a letter"),
        ("emb@a/b", "alias must be a letter"),
        ("emb:1@stable", "name a version or an alias, not both"),
    ],
)
def test_bad_references_are_invalid_argument(ref: str, message: str) -> None:
    with pytest.raises(errors.TandemError) as caught:
        parse_reference(ref)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, message, "model")


def test_version_policies() -> None:
    versions = ["1", "2", "3", "5"]
    assert VersionPolicy().select(versions) == ["5"]
    assert VersionPolicy(latest=2).select(versions) == ["3", "5"]
    # A failed newest version leaves the next older one to serve.
    assert VersionPolicy().select(versions, failed={"5"}) == ["3"]
    assert VersionPolicy(specific=[1, 5, 9]).select(versions) == ["1", "5"]
    assert VersionPolicy(all=True).select(versions) == versions
    with pytest.raises(ValueError, match="one of latest, specific, all"):
        VersionPolicy(latest=1, all=True)


def test_an_invalid_policy_makes_the_config_invalid(tmp_path: Path, source: Path) -> None:
    make_repo(tmp_path, source, (1,), version_policy={"latest": 0})
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(tmp_path).resolve("emb")
    assert_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_CONFIG_INVALID, "tandem.json", None)


def test_bare_names_follow_stable_then_the_policy(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1, 2, 3), version_policy={"specific": [1, 2]})
    repo = ModelRepository(tmp_path, rescan_s=0)
    assert repo.resolve("emb").version == "2"  # newest version the policy loads, not the newest folder
    repo.set_alias("emb", "stable", "1")
    repo.set_alias("emb", "canary", "3")
    assert json.loads((model_dir / "aliases.json").read_text()) == {"canary": "3", "stable": "1"}
    assert [p.name for p in model_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert repo.resolve("emb").version == "1"
    assert repo.resolve("emb@canary").version == "3"
    (model_dir / "aliases.json").write_text('{"stable": 1, "canary": 3}')  # numbers, as typed by hand
    assert (repo.resolve("emb").version, repo.resolve("emb@canary").version) == ("1", "3")
    assert repo.resolve("emb:2").version == "2"
    repo.delete_alias("emb", "stable")
    assert repo.resolve("emb").version == "2"
    assert json.loads((model_dir / "aliases.json").read_text()) == {"canary": "3"}


@pytest.mark.parametrize(
    ("call", "code", "reason", "message", "field"),
    [
        (lambda r: r.resolve("emb@nope"), grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, "no alias 'nope'", None),
        (lambda r: r.resolve("emb:7"), grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, "no version 7", None),
        (
            lambda r: r.resolve("nope@stable"),
            grpc.StatusCode.NOT_FOUND,
            Reason.MODEL_NOT_FOUND,
            "'nope' not found",
            None,
        ),
        (
            lambda r: r.set_alias("emb", "x", "7"),
            grpc.StatusCode.NOT_FOUND,
            Reason.MODEL_NOT_FOUND,
            "no version 7",
            None,
        ),
        (
            lambda r: r.set_alias("emb", "9x", "1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "alias must be",
            "alias",
        ),
        (
            lambda r: r.delete_alias("emb", "nope"),
            grpc.StatusCode.NOT_FOUND,
            Reason.MODEL_NOT_FOUND,
            "no alias 'nope'",
            None,
        ),
    ],
    ids=[
        "unknown-alias",
        "unknown-version",
        "unknown-model",
        "alias-to-missing-version",
        "bad-alias",
        "delete-unknown",
    ],
)
def test_alias_errors(
    tmp_path: Path,
    source: Path,
    call: Callable[[ModelRepository], object],
    code: grpc.StatusCode,
    reason: str,
    message: str,
    field: str | None,
) -> None:
    make_repo(tmp_path, source, (1,))
    with pytest.raises(errors.TandemError) as caught:
        call(ModelRepository(tmp_path, rescan_s=0))
    assert_error(caught.value, code, reason, message, field)


def test_an_alias_to_a_removed_version_is_not_found(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1, 2))
    repo = ModelRepository(tmp_path, rescan_s=0)
    repo.set_alias("emb", "canary", "2")
    shutil.rmtree(model_dir / "2")
    with pytest.raises(errors.TandemError) as caught:
        repo.resolve("emb@canary")
    assert_error(caught.value, grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, "names version 2", None)


def test_a_corrupt_aliases_file_is_reported(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1,))
    (model_dir / "aliases.json").write_text('{"canary": 2, "stable": "one"}')
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(tmp_path).resolve("emb@stable")
    assert_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_CONFIG_INVALID, "aliases.json", None)


def test_a_pinned_version_added_since_the_listing_was_read_is_found(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1,))
    repo = ModelRepository(tmp_path, rescan_s=3600)
    assert repo.resolve("emb").version == "1"
    shutil.copytree(source, model_dir / "2")
    # Another stage pinned emb:2 before this one's listing expired: it is read again rather than refused.
    assert repo.resolve("emb:2").version == "2"


def test_metadata_is_read_and_overrides_the_backend(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1, 2))
    metadata = {
        "task": "embedding",
        "source": "emb:1 (quantize int8)",
        "backend": "onnx",
        "precision": "int8",
        "tokenizer_fingerprint": tokenizer_fingerprint(source),
        "created": "2025-01-02T03:04:05Z",
        "derived_from": "emb:1",
        "accuracy": {"reference": "emb:1", "texts": 3, "min_cosine": 0.99, "mean_cosine": 0.995},
    }
    (model_dir / "2" / "metadata.json").write_text(json.dumps(metadata))
    repo = ModelRepository(tmp_path)
    v1, v2 = repo.resolve("emb:1"), repo.resolve("emb:2")
    assert (v1.config.backend, v1.metadata) == ("torch", None)
    assert v2.config.backend == "onnx" and v2.metadata is not None
    assert (v2.metadata.precision, v2.metadata.accuracy and v2.metadata.accuracy.min_cosine) == ("int8", 0.99)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"task": "classification"}', "says task classification"),
        ('{"task": "embedding", "precision": "int4"}', "invalid"),
    ],
)
def test_bad_metadata_makes_the_version_broken(tmp_path: Path, source: Path, content: str, message: str) -> None:
    model_dir = make_repo(tmp_path, source, (1,))
    (model_dir / "1" / "metadata.json").write_text(content)
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(tmp_path).resolve("emb")
    assert_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_BROKEN, message, None)


def test_tokenizer_fingerprint_is_canonical(tmp_path: Path, source: Path) -> None:
    want = tokenizer_fingerprint(source)
    assert want.startswith("sha256:") and len(want) == len("sha256:") + 64
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    # Key order, formatting and the runtime truncation/padding settings do not change which ids a text gets.
    data["truncation"] = {"max_length": 7, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    (copy / "tokenizer.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
    assert tokenizer_fingerprint(copy) == want

    data["normalizer"]["lowercase"] = not data["normalizer"]["lowercase"]
    (copy / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_fingerprint(copy) != want

    shutil.copy(source / "tokenizer.json", copy / "tokenizer.json")
    specials = json.loads((copy / "special_tokens_map.json").read_text())
    specials["unk_token"] = "[MASK]"
    (copy / "special_tokens_map.json").write_text(json.dumps(specials))
    assert tokenizer_fingerprint(copy) != want

    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_fingerprint(empty) == ""


@pytest.mark.parametrize(
    ("name", "version", "field", "message"),
    [
        ("..", None, "name", "model name must be 1-128 ASCII letters"),
        ("../emb", None, "name", "model name must be 1-128 ASCII letters"),
        ("/etc", None, "name", "model name must be 1-128 ASCII letters"),
        ("emb/1", None, "name", "model name must be 1-128 ASCII letters"),
        (".hidden", None, "name", "model name must be 1-128 ASCII letters"),
        ("emb", "../1", "version", "version must be a number from 1 to"),
        ("emb", "/1", "version", "version must be a number from 1 to"),
        ("outside", None, "name", "points outside the repository"),
        ("emb", "9", "version", "points outside the repository"),
    ],
)
def test_names_that_leave_the_repository_are_invalid(
    tmp_path: Path, source: Path, name: str, version: str | None, field: str, message: str
) -> None:
    root = tmp_path / "repo"
    model_dir = make_repo(root, source, (1,))
    elsewhere = make_repo(tmp_path / "elsewhere", source, (1,))
    os.symlink(elsewhere, root / "outside")
    os.symlink(elsewhere / "1", model_dir / "9")
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(root).contained_folder(name, version)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, message, field)


def test_symlinks_inside_the_repository_are_fine(tmp_path: Path, source: Path) -> None:
    model_dir = make_repo(tmp_path, source, (1,))
    os.symlink(model_dir / "1", model_dir / "2")
    assert ModelRepository(tmp_path).contained_folder("emb", "2") == model_dir / "2"


def test_a_read_only_repository_refuses_alias_changes(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_repo(tmp_path, source, (1,))

    def read_only(path: Path, data: object) -> None:
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(repository_files, "write_json_atomic", read_only)
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(tmp_path).set_alias("emb", "stable", "1")
    assert_error(
        caught.value, grpc.StatusCode.FAILED_PRECONDITION, Reason.REPOSITORY_NOT_WRITABLE, "Read-only file system", None
    )


def _model(root: Path, name: str, **config: object) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "tandem.json").write_text(json.dumps({"task": "embedding", **config}))


def test_default_model_is_the_only_one_or_the_one_marked_default(tmp_path: Path) -> None:
    from services.common.repository import ModelRepository

    _model(tmp_path / "one", "alone")
    assert ModelRepository(tmp_path / "one").default_model == "alone"
    _model(tmp_path / "two", "a")
    _model(tmp_path / "two", "b", default=True)
    assert ModelRepository(tmp_path / "two").default_model == "b"
    assert ModelRepository(tmp_path / "two", default_model="a").default_model == "a"  # the setting wins
    _model(tmp_path / "three", "a", default=True)
    _model(tmp_path / "three", "b", default=True)
    _model(tmp_path / "three", "c")
    assert ModelRepository(tmp_path / "three").default_model is None  # two marked: requests must name one
    _model(tmp_path / "none", "a")
    _model(tmp_path / "none", "b")
    assert ModelRepository(tmp_path / "none").default_model is None


def test_the_built_in_repository_marks_the_embedder_default(tmp_path: Path) -> None:
    from services.common.default_model import DEFAULT_MODEL_NAME, ensure_default_repository
    from services.common.repository import ModelRepository

    repository = ensure_default_repository(tmp_path, chat_model=True)
    assert ModelRepository(repository).default_model == DEFAULT_MODEL_NAME
