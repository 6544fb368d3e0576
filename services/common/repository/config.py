"""What a model folder says about itself: the schemas of tandem.json and metadata.json, and the resolved
ModelVersion every stage works with."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_FILE = "tandem.json"
ALIASES_FILE = "aliases.json"
METADATA_FILE = "metadata.json"


class Task(StrEnum):
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"
    TOKEN_CLASSIFICATION = "token-classification"
    RERANK = "rerank"
    TEXT_GENERATION = "text-generation"


class VersionPolicy(BaseModel):
    """Which versions are loaded: the newest `latest`, `specific` ones, or `all`; latest 1 when none is given."""

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(default=None, ge=1, description="the newest N versions that load")
    specific: list[int] | None = Field(default=None, min_length=1, description="exactly these versions")
    all: bool = Field(default=False, description="every version")

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        given = sum((self.latest is not None, self.specific is not None, self.all))
        if given > 1:
            raise ValueError("version_policy takes one of latest, specific, all")
        if given == 0:
            self.latest = 1
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError("version_policy.specific holds version numbers (1 or more)")
        return self

    def select(self, versions: Sequence[str], failed: Container[str] = ()) -> list[str]:
        """The versions (ascending) this policy loads; `latest` skips versions that failed, so an older one serves."""
        if self.all:
            return list(versions)
        if self.specific is not None:
            wanted = {str(v) for v in self.specific}
            return [v for v in versions if v in wanted]
        usable = [v for v in versions if v not in failed]
        return usable[-(self.latest or 1) :]

    def describe(self) -> str:
        if self.all:
            return "all versions"
        if self.specific is not None:
            return "versions " + ", ".join(str(v) for v in self.specific)
        return f"the latest {self.latest}"


class GenerationSettings(BaseModel):
    """The `generation` block of tandem.json (text-generation models): the decode loop's sizes and the default answer
    length. The KV cache grows with the running batch, up to about kv_cache_tokens x layers x KV heads x head size x
    2 (keys and values) x 4 bytes (float32), e.g. 46 KB per token for SmolLM2-135M."""

    model_config = ConfigDict(extra="forbid")

    default_max_new_tokens: int = Field(
        256, ge=1, description="max_new_tokens of a request that sets none (cut to what the context leaves)"
    )
    kv_cache_tokens: int = Field(
        8192,
        ge=16,
        description="the KV cache budget over all running sequences, in tokens; a request reserves prompt + "
        "max_new_tokens of it, and one that does not fit now gets RESOURCE_EXHAUSTED with RetryInfo",
    )
    page_size: int = Field(32, ge=4, description="unit of the KV reservations: a sequence reserves whole pages")
    max_running: int = Field(32, ge=1, le=1024, description="sequences decoded together in one step")
    max_step_tokens: int = Field(
        512,
        ge=16,
        description="padded prompt tokens prefilled together between two decode steps (at least one prompt), which "
        "bounds what joining prompts add to the running sequences' inter-token latency",
    )
    max_waiting: int = Field(
        256, ge=0, description="admitted sequences waiting for a place in the running batch before RESOURCE_EXHAUSTED"
    )


class PromoteGate(BaseModel):
    """The `promote` block of tandem.json: the accuracy a derived version (exported, quantised, pruned, distilled)
    needs before `tandem models promote` points an alias at it."""

    model_config = ConfigDict(extra="forbid")

    min_cosine: float | None = Field(None, le=1, description="embeddings: lowest min cosine (default 0.99)")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="classifiers and text generation: lowest top-1 agreement (default 0.98)"
    )
    max_probability_difference: float | None = Field(None, ge=0, description="classifiers: largest allowed")


class ModelConfig(BaseModel):
    """Contents of <model>/tandem.json."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    task: Task
    backend: Literal["onnx", "torch"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="torch backend: the weights' and activations' type. float16 / bfloat16 halve the memory and on a "
        "GPU run several times faster (outputs are returned as float32 either way); on CPU float32 is the fast one",
    )
    max_length: int | None = Field(None, gt=1, description="token limit; default from the model's own files")
    pooling: Literal["mean", "cls", "max"] | None = Field(None, description="default from 1_Pooling/config.json")
    max_batch_size: int = Field(32, ge=1, description="sequences per model call")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per model call")
    # 0: an idle model starts at once; requests that arrive while it runs form the next batch (as in TEI).
    max_queue_delay_ms: float = Field(0.0, ge=0, description="longest wait for more work before a call")
    max_queue_size: int = Field(2048, ge=1, description="sequences waiting before RESOURCE_EXHAUSTED")
    batch_call_cost_tokens: float | None = Field(
        None,
        ge=0,
        description="the model's fixed cost per call in padded tokens: a round is cut into separate calls where "
        "padding would cost more. Default: measured when the version loads",
    )
    instances: int | None = Field(
        None,
        ge=1,
        le=64,
        description="model calls that run at once, each on its own worker thread; on CPU the stage's threads are "
        "shared out among them. Default: 2 on CPU with 2 or more threads (two single-thread calls side by side "
        "give 15-20% more throughput than one two-thread call under load), else 1",
    )
    high_priority_instances: int = Field(
        1,
        ge=0,
        le=64,
        description="instances kept free for high-priority work while it comes and keeps the model busy (its calls "
        "took a tenth of an instance's time or more over the last second or so): calls of other levels run on the "
        "rest only, so a high-priority request does not wait for one of theirs to end. At most instances - 1 (one is "
        "always left for the rest); 0 turns it off",
    )
    run_alone: bool | None = Field(
        None,
        description="on CPU with instances splitting the threads: a call that has the model to itself (nothing "
        "queued, no other call running) runs on a second session with all of the stage's threads (one text at a "
        "time 2-3.5 ms faster on 2 cores). Costs a second copy of the weights in memory. Default: on",
    )
    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(), description="which versions load")
    default: bool = Field(
        False,
        description="requests that name no model get this one, in a repository of several models where the service "
        "sets no --default-model (one model alone is the default anyway; two marked default: none is)",
    )
    generation: GenerationSettings | None = Field(
        None, description="text-generation models: engine sizes and defaults (defaults when absent)"
    )
    matryoshka_dimensions: list[int] | None = Field(
        None,
        description="embedding models trained with Matryoshka representation learning: the sizes their embeddings "
        "may be cut to (EmbedRequest.dimensions takes any size up to the model's for such a model, and needs "
        "force_dimensions for others)",
    )
    gguf_file: str | None = Field(
        None,
        description="text-generation models: the .gguf file in each version folder that is the model (converted "
        "once into a cached Hugging Face folder, which every stage then reads; docs/models.md, GGUF files)",
    )
    promote: PromoteGate | None = Field(
        None, description="this model's thresholds for `tandem models promote` (the command's flags override them)"
    )

    @model_validator(mode="after")
    def _dtype_fits_backend(self) -> ModelConfig:
        if self.dtype != "float32" and self.backend != "torch":
            raise ValueError(
                f"dtype {self.dtype} is for the torch backend; an ONNX model's precision is its graph's "
                "(tandem models quantize --mode fp16)"
            )
        return self

    @model_validator(mode="after")
    def _generation_fits_task(self) -> ModelConfig:
        if self.task is Task.TEXT_GENERATION:
            if self.backend != "torch":
                raise ValueError('text-generation models are served by the torch backend: set "backend": "torch"')
            if self.generation is None:
                self.generation = GenerationSettings()
        elif self.generation is not None:
            raise ValueError(f"a generation block is for text-generation models, not {self.task.value}")
        return self

    @model_validator(mode="after")
    def _matryoshka_fits_task(self) -> ModelConfig:
        if self.matryoshka_dimensions is None:
            return self
        if self.task is not Task.EMBEDDING:
            raise ValueError(f"matryoshka_dimensions is for embedding models, not {self.task.value}")
        if not self.matryoshka_dimensions or min(self.matryoshka_dimensions) < 1:
            raise ValueError("matryoshka_dimensions must list sizes of at least 1")
        return self

    @model_validator(mode="after")
    def _gguf_fits_task(self) -> ModelConfig:
        if self.gguf_file is None:
            return self
        if self.task is not Task.TEXT_GENERATION:
            raise ValueError(f"gguf_file is for text-generation models, not {self.task.value}")
        name = self.gguf_file
        if "/" in name or "\\" in name or name.startswith(".") or not name.lower().endswith(".gguf"):
            raise ValueError(f"gguf_file names a .gguf file in the version folder (no folders), got {name!r}")
        return self


class AccuracyReport(BaseModel):
    """How closely a derived version reproduces its source model on held-out texts."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="source model as name:version, run with transformers in float32")
    texts: int = Field(ge=0, description="held-out texts compared")
    min_cosine: float | None = None
    mean_cosine: float | None = None
    top1_agreement: float | None = None
    max_probability_difference: float | None = None


class SpeedReport(BaseModel):
    """A derived version's speed and size against its parent, measured in one run on one machine: median
    milliseconds per text in-process with each version's serving backend (CPU), one text at a time and in padded
    batches, and the bytes of what the backend loads (the ONNX graph, or the weights)."""

    model_config = ConfigDict(extra="forbid")

    parent: str = Field(description="the version compared with, as name:version")
    texts: int = Field(ge=0, description="held-out texts timed")
    threads: int = Field(ge=1, description="CPU threads of both backends")
    batch_size: int = Field(ge=1)
    ms_per_text_single: float
    parent_ms_per_text_single: float
    ms_per_text_batch: float
    parent_ms_per_text_batch: float
    size_bytes: int
    parent_size_bytes: int


class Derivation(BaseModel):
    """How a pruned or distilled version was made (its provenance)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["prune", "distill"]
    parent: str = Field(description="the version pruned or distilled (the teacher), as name:version")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the command's settings")
    corpus: str = Field(description="calibration or training texts: a file, or builtin:python-docs")
    corpus_sha256: str
    corpus_texts: int = Field(ge=0)
    steps: int | None = Field(None, description="training steps (distillation)")
    seconds: float = Field(ge=0, description="time the pruning or training took")
    parameter_count: int | None = None
    parent_parameter_count: int | None = None


Precision = Literal["fp32", "fp16", "int8"]


class VersionMetadata(BaseModel):
    """Contents of <model>/<version>/metadata.json, written by `tandem models`; folders made by hand have none."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    task: Task
    source: str = ""
    # Overrides tandem.json's backend for this version (an exported or quantised version is ONNX whatever the
    # model's default is).
    backend: Literal["onnx", "torch"] | None = None
    precision: Precision = "fp32"
    tokenizer_fingerprint: str = ""
    max_length: int | None = None
    dimension: int | None = None
    labels: list[str] = Field(default_factory=list)
    created: datetime | None = None
    derived_from: str | None = Field(
        None, description="name:version this version was exported, quantised, pruned or distilled from"
    )
    accuracy: AccuracyReport | None = None
    speed: SpeedReport | None = None
    derivation: Derivation | None = None
    notes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model, with what every stage needs to know about it."""

    name: str
    version: str
    path: Path
    config: ModelConfig
    hf_config: dict[str, Any] = field(repr=False)
    max_length: int
    labels: tuple[str, ...]
    multi_label: bool
    hidden_size: int
    pooling: str
    metadata: VersionMetadata | None = None
    # Text-generation models: whether the tokenizer has a chat template (Generate then takes messages).
    chat_template: bool = False
    # The version folder in the repository when `path` is elsewhere (a GGUF version: `path` is its converted folder).
    source_path: Path | None = None
    # Embedding models: named instruction prefixes (config_sentence_transformers.json), and the one used by default.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""

    @property
    def task(self) -> Task:
        return self.config.task

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"
