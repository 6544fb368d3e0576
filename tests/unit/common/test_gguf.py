"""GGUF files as a model source, without converting anything: tandem.json's gguf_file, the errors a file that cannot
be converted gives (FAILED_PRECONDITION, MODEL_BROKEN, naming the cause), the file hash cache, the cache folder's
checks, and the convert-once protocol (lock, reuse, torn folders rebuilt) with the conversion itself replaced by a
stub that writes the files a real one does."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from services.common import errors
from services.common.errors import Reason
from services.common.repository import ModelConfig, ModelRepository, gguf_source
from tests.fixtures import tiny_gguf

GGUF = "tiny.Q4_1.gguf"


def make_model(
    root: Path, gguf_file: str = GGUF, write: bool = True, architecture: str = "llama", quantize_type: int | None = None
) -> Path:
    """A text-generation model `gen` whose version 1 holds a tiny GGUF file; the version folder."""
    version_dir = root / "gen" / "1"
    version_dir.mkdir(parents=True)
    config = {"task": "text-generation", "backend": "torch", "gguf_file": gguf_file}
    (root / "gen" / "tandem.json").write_text(json.dumps(config))
    if write:
        tiny_gguf.write_llama(version_dir / gguf_file, architecture=architecture, quantize_type=quantize_type)
    return version_dir


def load_error(root: Path, cache: Path) -> errors.TandemError:
    with pytest.raises(errors.TandemError) as caught:
        ModelRepository(root, gguf_cache=cache).load("gen", "1")
    err = caught.value
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_BROKEN)
    return err


def converted(cache: Path) -> list[str]:
    """Folders in the cache other than locks and temporaries."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def fake_convert(calls: list[Path], delay_s: float = 0.0) -> Callable[[Path, Path], None]:
    """A stand-in for the transformers conversion: the files it writes, counted."""

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay_s)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
        (out / "tokenizer.json").write_text("{}")
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "generation_config.json").write_text("{}")

    return convert


# ----------------------------------------------------------------------------------------------------------------------
# tandem.json


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"task": "embedding", "gguf_file": "m.gguf"}, "gguf_file is for text-generation models, not embedding"),
        ({"task": "text-generation", "backend": "torch", "gguf_file": "../m.gguf"}, "no folders"),
        ({"task": "text-generation", "backend": "torch", "gguf_file": "sub/m.gguf"}, "no folders"),
        ({"task": "text-generation", "backend": "torch", "gguf_file": "m.bin"}, "names a .gguf file"),
    ],
)
def test_gguf_file_is_a_gguf_file_of_a_text_generation_model(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        ModelConfig.model_validate(config)


def test_gguf_file_is_optional() -> None:
    config = {"task": "text-generation", "backend": "torch"}
    assert ModelConfig.model_validate(config).gguf_file is None
    assert ModelConfig.model_validate({**config, "gguf_file": "M.Q4_1.GGUF"}).gguf_file == "M.Q4_1.GGUF"


# ----------------------------------------------------------------------------------------------------------------------
# Files that cannot be converted: FAILED_PRECONDITION, MODEL_BROKEN, naming the cause, nothing cached


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    make_model(tmp_path / "repo", architecture="foo")
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert f"GGUF architecture 'foo' is not supported by transformers {gguf_source.transformers_version()}" in (
        err.message
    )
    assert "gen:1" in err.message
    assert converted(tmp_path / "cache") == []


def test_quantization_type_transformers_cannot_dequantize_is_named(tmp_path: Path) -> None:
    make_model(tmp_path / "repo", quantize_type=9)  # Q8_1: llama.cpp's intermediate type, no de-quantizer
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert "GGUF tensor 'blk.0.attn_q.weight' is quantized as Q8_1, which transformers" in err.message
    assert "cannot de-quantize" in err.message


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    version_dir = make_model(tmp_path / "repo")
    tiny_gguf.truncate(version_dir / GGUF, keep)
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert f"GGUF file '{GGUF}' is" in err.message
    assert "truncated" in err.message
    assert converted(tmp_path / "cache") == []


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    version_dir = make_model(tmp_path / "repo", write=False)
    (version_dir / GGUF).write_bytes(os.urandom(4096))
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert f"GGUF file '{GGUF}' is corrupt or truncated" in err.message


def test_missing_file(tmp_path: Path) -> None:
    make_model(tmp_path / "repo", write=False)
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert f"GGUF file '{GGUF}' is not in the version folder" in err.message


def test_conversion_failure_is_model_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("tensor shapes do not match")

    monkeypatch.setattr(gguf_source, "_convert", broken)
    make_model(tmp_path / "repo")
    err = load_error(tmp_path / "repo", tmp_path / "cache")
    assert "cannot be converted by transformers" in err.message
    assert "RuntimeError: tensor shapes do not match" in err.message
    assert converted(tmp_path / "cache") == []  # the half-written temporary folder is gone
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]


# ----------------------------------------------------------------------------------------------------------------------
# The file hash and the cache folder


def test_hash_is_computed_once_per_path_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a" * 1000)
    first = gguf_source.file_sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; put the old mtime back: the remembered hash is used, no read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_source.file_sha256(path) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert gguf_source.file_sha256(path) != first


def test_cache_folder_names_model_hash_and_transformers(tmp_path: Path) -> None:
    folder = gguf_source.cache_folder(tmp_path, "gen", "0123456789abcdef" * 4)
    assert folder == tmp_path / f"gen-0123456789abcdef-tf{gguf_source.transformers_version()}"


def test_torn_cache_folders_are_told_apart(tmp_path: Path) -> None:
    folder, sha = tmp_path / "gen", "ab" * 32
    assert gguf_source.cache_problem(folder, sha) == "not converted yet"
    folder.mkdir()
    fake_convert([])(tmp_path / "x.gguf", folder)
    assert "no valid tandem-gguf.json" in str(gguf_source.cache_problem(folder, sha))
    marker = {"sha256": sha, "transformers": gguf_source.transformers_version(), "files": gguf_source._listing(folder)}
    (folder / gguf_source.MARKER_FILE).write_text(json.dumps(marker))
    assert gguf_source.cache_problem(folder, sha) is None
    assert "names another file" in str(gguf_source.cache_problem(folder, "cd" * 32))
    (folder / "model.safetensors").write_bytes(b"weight")
    assert gguf_source.cache_problem(folder, sha) == "model.safetensors has 6 bytes, not 7"
    (folder / "model.safetensors").unlink()
    assert gguf_source.cache_problem(folder, sha) == "model.safetensors is missing"
    (folder / gguf_source.MARKER_FILE).write_text(json.dumps({**marker, "transformers": "0.1"}))
    assert gguf_source.cache_problem(folder, sha) == "converted by transformers 0.1"


# ----------------------------------------------------------------------------------------------------------------------
# Convert once, reuse, rebuild (conversion stubbed)


def test_version_path_is_the_converted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_source, "_convert", fake_convert(calls))
    version_dir = make_model(tmp_path / "repo")
    (version_dir / "metadata.json").write_text(json.dumps({"task": "text-generation", "source": "hand-made"}))
    model = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1")
    sha = gguf_source.file_sha256(version_dir / GGUF)
    assert model.path == gguf_source.cache_folder(tmp_path / "cache", "gen", sha)
    assert model.source_path == version_dir
    assert (model.max_length, model.chat_template) == (128, True)
    assert model.metadata is not None and model.metadata.source == "hand-made"  # read from the version folder
    marker = json.loads((model.path / gguf_source.MARKER_FILE).read_text())
    assert (marker["source"], marker["sha256"], marker["source_bytes"]) == (
        GGUF,
        sha,
        (version_dir / GGUF).stat().st_size,
    )
    assert set(marker["files"]) == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "generation_config.json",
    }
    assert len(calls) == 1
    # Another process (a new repository object, as each stage has its own) reuses it.
    again = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1")
    assert again.path == model.path
    assert len(calls) == 1


@pytest.mark.parametrize(
    "tear",
    [
        lambda folder: (folder / "model.safetensors").unlink(),
        lambda folder: (folder / gguf_source.MARKER_FILE).unlink(),
        lambda folder: (folder / "tokenizer.json").write_text("{ torn"),
        lambda folder: (folder / gguf_source.MARKER_FILE).write_text(
            json.dumps({**json.loads((folder / gguf_source.MARKER_FILE).read_text()), "sha256": "0" * 64})
        ),
    ],
    ids=["no-weights", "no-marker", "torn-file", "marker-of-another-file"],
)
def test_torn_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tear: Callable[[Path], object]) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_source, "_convert", fake_convert(calls))
    make_model(tmp_path / "repo")
    first = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1").path
    tear(first)
    second = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1").path
    assert second == first
    assert len(calls) == 2
    assert (
        gguf_source.cache_problem(second, json.loads((second / gguf_source.MARKER_FILE).read_text())["sha256"]) is None
    )
    assert converted(tmp_path / "cache") == [first.name]


def test_changed_file_converts_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_source, "_convert", fake_convert(calls))
    version_dir = make_model(tmp_path / "repo")
    first = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1").path
    tiny_gguf.write_llama(version_dir / GGUF, seed=1)
    second = ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1").path
    assert second != first
    assert len(calls) == 2
    assert converted(tmp_path / "cache") == sorted([first.name, second.name])


def test_loads_at_once_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six stages starting together (threads here; the lock is a file lock, so processes alike): one converts, the
    others wait for it and reuse its folder."""
    calls: list[Path] = []
    monkeypatch.setattr(gguf_source, "_convert", fake_convert(calls, delay_s=0.3))
    make_model(tmp_path / "repo")
    paths: list[Path] = []
    failures: list[BaseException] = []

    def load() -> None:
        try:
            paths.append(ModelRepository(tmp_path / "repo", gguf_cache=tmp_path / "cache").load("gen", "1").path)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert len(calls) == 1
    assert len(paths) == 6 and len(set(paths)) == 1


def test_default_cache_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.common.settings import ServiceSettings

    assert ServiceSettings(home=tmp_path).gguf_cache_folder() == tmp_path / "gguf"
    assert (
        ServiceSettings(home=tmp_path, gguf_cache=tmp_path / "elsewhere").gguf_cache_folder() == tmp_path / "elsewhere"
    )
    settings = ServiceSettings.from_args(["--home", str(tmp_path), "--gguf-cache", str(tmp_path / "g")], "tandem")
    assert settings.gguf_cache_folder() == tmp_path / "g"
