"""GGUF files as a model source: a version folder that holds one .gguf file (tandem.json's `gguf_file`) is converted
once, with transformers, into an ordinary Hugging Face folder in a cache, and that folder is what every stage reads.

Cache layout: `<cache>/<model>-<sha256[:16]>-tf<transformers version>/` holding config.json, generation_config.json,
model.safetensors (or shards and their index), the tokenizer files (chat template included) and, written last,
`tandem-gguf.json` (the marker: source file name, its sha256 and size, the transformers version, every file's size).
A folder without a valid marker, or whose files do not match it, is torn and converted again. A conversion is built
in a temporary folder beside the target and renamed into place, under a file lock per target, so that of several
processes starting at once one converts and the others wait and reuse its result.

Every failure is a ValueError naming its cause (the repository turns it into FAILED_PRECONDITION, MODEL_BROKEN).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.repository import files

log = logging.getLogger(__name__)

MARKER_FILE = "tandem-gguf.json"
# Files a converted folder must have besides the weights (model.safetensors, or its shards and their index).
REQUIRED_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
LOCKS_FOLDER = ".locks"

# ggml type ids of plain floats (F32, F16, BF16): every loader reads these.
_FLOAT_TYPES = frozenset({0, 1, 30})
# GGUF architecture names that transformers' legacy loader renames before its support check.
_LEGACY_RENAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}

_hashes: dict[tuple[str, int, int], str] = {}
_hashes_lock = threading.Lock()


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks; remembered per (path, size, mtime), so computed once per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hashes_lock:
        known = _hashes.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hashes_lock:
        _hashes[key] = value
    return value


def default_cache() -> Path:
    """<home>/gguf of the default home (~/.cache/tandem/gguf): for repositories made without a cache folder."""
    from services.common.settings import default_home

    return default_home() / "gguf"


def cache_folder(cache: Path, name: str, sha256: str) -> Path:
    """Where the conversion of a GGUF file with this hash is kept for model `name`."""
    return cache / f"{name}-{sha256[:16]}-tf{transformers_version()}"


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says: its architecture and each tensor's ggml type (id and name)."""

    architecture: str
    tensor_types: dict[str, tuple[int, str]]


def inspect_gguf(path: Path) -> GgufInfo:
    """Reads a GGUF file's header; ValueError when it is missing, not GGUF, truncated or corrupt."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ValueError("reading GGUF files needs the gguf package: pip install 'tandem[cpu]' (or [gpu])") from exc
    if not path.is_file():
        raise ValueError(f"GGUF file {path.name!r} is not in the version folder")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path, "r")
        field = reader.get_field("general.architecture")
        architecture = field.contents() if field is not None else None
        tensors = [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    except Exception as exc:  # the reader fails in many ways on a damaged file (ValueError, IndexError, struct...)
        raise ValueError(f"GGUF file {path.name!r} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"GGUF file {path.name!r} has no general.architecture")
    types: dict[str, tuple[int, str]] = {}
    for name, tensor_type, offset, n_bytes in tensors:
        if offset + n_bytes > size:
            raise ValueError(
                f"GGUF file {path.name!r} is truncated: tensor {name!r} ends at byte {offset + n_bytes}, the file has "
                f"{size}"
            )
        types[name] = (int(tensor_type), getattr(tensor_type, "name", str(tensor_type)))
    return GgufInfo(architecture, types)


def _architecture_supported(architecture: str) -> bool | None:
    """Whether this transformers reads the architecture from GGUF (its new loader or the legacy one); None when
    its tables cannot be read (then the conversion itself decides)."""
    try:
        from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    if architecture in GGUF_CONFIG_ARCHS and architecture in GGUF_ARCHS:
        return True
    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return architecture in legacy or _LEGACY_RENAMES.get(architecture, architecture) in legacy


def _dequantizable(architecture: str) -> Container[int] | None:
    """ggml type ids transformers can turn into floats for this architecture; None when that cannot be told."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        if architecture in GGUF_ARCHS:  # the new loader de-quantizes with its own kernels
            from transformers.integrations.gguf.dequant import GGML_BLOCK

            return _FLOAT_TYPES | {int(t) for t in GGML_BLOCK}
        from gguf import quants  # the legacy loader calls gguf.dequantize

        traits = getattr(quants, "_type_traits", None)
    except ImportError:
        return None
    if not isinstance(traits, dict):
        return None
    return _FLOAT_TYPES | {int(t) for t in traits}


def check_supported(info: GgufInfo) -> None:
    """ValueError naming the architecture or the quantization type this transformers cannot convert."""
    version = transformers_version()
    if _architecture_supported(info.architecture) is False:
        raise ValueError(f"GGUF architecture {info.architecture!r} is not supported by transformers {version}")
    known = _dequantizable(info.architecture)
    if known is None:
        return
    for tensor, (type_id, type_name) in info.tensor_types.items():
        if type_id not in known:
            raise ValueError(
                f"GGUF tensor {tensor!r} is quantized as {type_name}, which transformers {version} cannot de-quantize"
            )


def _listing(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER_FILE
    }


def cache_problem(folder: Path, sha256: str) -> str | None:
    """Why a cache folder cannot be used for a GGUF file with this hash (None: it can)."""
    if not folder.is_dir():
        return "not converted yet"
    try:
        marker = files.read_json(folder / MARKER_FILE)
    except (OSError, ValueError) as exc:
        return f"no valid {MARKER_FILE} ({exc})"
    if marker.get("sha256") != sha256:
        return f"{MARKER_FILE} names another file (sha256 {str(marker.get('sha256'))[:16]})"
    if marker.get("transformers") != transformers_version():
        return f"converted by transformers {marker.get('transformers')}"
    listed = marker.get("files")
    if not isinstance(listed, dict):
        return f"{MARKER_FILE} lists no files"
    for name in REQUIRED_FILES:
        if name not in listed:
            return f"no {name}"
    if not any(name in listed for name in WEIGHT_FILES):
        return "no model weights"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantizes the GGUF file into a float32 Hugging Face folder: tokenizer, model, generation config."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise ValueError(f"converting GGUF files needs torch and transformers: {exc}") from exc
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain float32 weights, never packed GGUF modules (those could not be saved).
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are plain floats now, but the model still says it is GGUF-quantized and refuses to be saved
    # ("The model is quantized with gguf and is not serializable") unless told otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)


def _readable_by_all_like_config(folder: Path) -> None:
    """Gives every file the mode config.json got from the umask: some are written through private temporary files
    (model.safetensors comes out 0600), which stages running as other users of the same volume could not read."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


def _remove(folder: Path) -> None:
    """Removes a folder by renaming it aside first, so that nobody ever sees it half deleted under its name."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _leftovers(cache: Path, target: Path) -> Iterator[Path]:
    """Temporary folders of conversions of this target that died (only called under the target's lock)."""
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        yield from (p for p in cache.glob(f"{prefix}*") if p.is_dir())


@contextlib.contextmanager
def _target_lock(cache: Path, target: Path) -> Iterator[None]:
    folder = cache / LOCKS_FOLDER / target.name
    folder.mkdir(parents=True, exist_ok=True)
    with files.locked(folder):
        yield


def converted_folder(name: str, source: Path, gguf_file: str, cache: Path) -> Path:
    """The Hugging Face folder made from `source/gguf_file` for model `name`, converting it first when the cache has
    no valid copy (waiting for another process that converts it now). ValueError naming what is wrong otherwise."""
    gguf_path = source / gguf_file
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file {gguf_file!r} is not in the version folder")
    sha256 = file_sha256(gguf_path)
    target = cache_folder(cache, name, sha256)
    if cache_problem(target, sha256) is None:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _target_lock(cache, target):
        problem = cache_problem(target, sha256)
        if problem is None:  # another process converted it while this one waited
            return target
        info = inspect_gguf(gguf_path)
        check_supported(info)
        for leftover in _leftovers(cache, target):
            shutil.rmtree(leftover, ignore_errors=True)
        size = gguf_path.stat().st_size
        log.info(
            "converting GGUF %s (%s, %.1f MB; cache: %s) into %s",
            gguf_path,
            info.architecture,
            size / 1e6,
            problem,
            target,
        )
        started = time.monotonic()
        tmp = cache / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            try:
                _convert(gguf_path, tmp)
            except Exception as exc:  # transformers fails in many ways on files it cannot read
                raise ValueError(_conversion_error(gguf_file, info, exc)) from exc
            _readable_by_all_like_config(tmp)
            marker: dict[str, Any] = {
                "source": gguf_file,
                "sha256": sha256,
                "source_bytes": size,
                "architecture": info.architecture,
                "transformers": transformers_version(),
                "files": _listing(tmp),
            }
            files.write_json_atomic(tmp / MARKER_FILE, marker)
            _remove(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted GGUF %s in %.1f s into %s", gguf_path, time.monotonic() - started, target)
    return target


def _conversion_error(gguf_file: str, info: GgufInfo, exc: Exception) -> str:
    version = transformers_version()
    text = str(exc)
    if "architecture" in text and "not supported" in text:
        return f"GGUF architecture {info.architecture!r} is not supported by transformers {version}"
    return f"GGUF file {gguf_file!r} cannot be converted by transformers {version}: {type(exc).__name__}: {text}"
