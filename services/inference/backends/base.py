"""The backend interface: padded int64 batches in, one float32 array out; and the options every backend shares."""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from services.common.repository import ModelVersion, Task

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def token_level(task: Task) -> bool:
    """Token-level tasks answer one row per token; the others one row per sequence."""
    return task in (Task.EMBEDDING, Task.TOKEN_CLASSIFICATION)


def output_name(task: Task) -> str:
    """The name of the one output the stage serves from a model of this task."""
    return "last_hidden_state" if task is Task.EMBEDDING else "logits"


class Backend(ABC):
    """A loaded model: padded int64 batches in, one float32 array out. Called from the batcher's instance threads,
    one call per instance at a time (so run and run_alone may run at once)."""

    name: str
    uses_token_type_ids: bool
    # True when run_alone is faster than run for a call that has the machine to itself (see OnnxBackend).
    runs_alone: bool = False

    @abstractmethod
    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        """[b, s] inputs -> [b, s, h] (token-level tasks) or [b, L] (sequence-level tasks)."""

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        """The same as run, for a call that had the model to itself when it started: may use every thread."""
        return self.run(input_ids, attention_mask, token_type_ids)

    @property
    def io_binding(self) -> bool:
        """Whether calls run with ONNX Runtime's I/O binding (see OnnxBackend)."""
        return False

    def close(self) -> None:
        """Frees what the backend holds; the default has nothing to free."""
        return None


@dataclass(frozen=True)
class BackendOptions:
    """Process-wide choices that every backend shares."""

    home: Path
    intra_op_threads: int
    # Overrides every model's tandem.json "device" when set.
    device: str | None = None
    # ONNX Runtime's pool threads spin briefly for the next piece of work. Measured on 2 quiet cores with MiniLM,
    # one text: 3.9 ms with spinning, 7.5 ms without; on cores shared with busy neighbours spinning can cost more
    # than it saves, so it can be turned off (--no-intra-op-spinning).
    spinning: bool = True
    # Overrides every model's tandem.json "instances" when set.
    instances: int | None = None
    # Overrides every model's tandem.json "run_alone" when set.
    run_alone: bool | None = None
    # A lone call expected to take at most this long runs on the event loop's thread (Batcher.inline_s); 0: never.
    inline_lone_ms: float = 0.0

    def instances_of(self, model: ModelVersion) -> int:
        """Model calls that run at once for this version: the stage's override, tandem.json's, or by device.

        On CPU two calls of half the threads each run side by side: measured with all-MiniLM-L6-v2 on 2 cores,
        batches of 16-32, 396-447 texts/s against 321-407 for one two-thread call at a time, and far less lost to
        busy neighbours (no thread waits at a barrier for one that was preempted). One text alone takes longer
        (5.0 ms against 3.0 ms), so a latency-bound deployment sets instances to 1.
        """
        configured = self.instances or model.config.instances
        if configured:
            return configured
        return 2 if self._on_cpu(model) and self.intra_op_threads >= 2 else 1

    def _on_cpu(self, model: ModelVersion) -> bool:
        device = self.device or model.config.device
        return device == "cpu" or (device == "auto" and not cuda_present())

    def threads_of(self, model: ModelVersion) -> int:
        """Threads inside one model call: the stage's threads shared out among the version's instances."""
        return max(1, self.intra_op_threads // self.instances_of(model))

    def alone_threads_of(self, model: ModelVersion) -> int:
        """Threads of a call that has the model to itself (0: no separate session, it runs like any other).

        On CPU with instances splitting the threads, a lone call gets all of them. Measured end to end on 2 cores
        (all-MiniLM-L6-v2, `tandem serve`, alternating runs): one text at a time p50 9.9-10.8 ms against 11.8-14.5
        without; mixed-length texts 12.7-13.2 against 16.3-16.4; throughput at 4 x 1, 32 x 1 and 4 x 32 unchanged
        within the runs' noise.
        """
        alone = model.config.run_alone if self.run_alone is None else self.run_alone
        if alone is False or self.threads_of(model) >= self.intra_op_threads or not self._on_cpu(model):
            return 0
        return self.intra_op_threads


def cuda_present() -> bool:
    return bool(torch.cuda.is_available())


def lower_priority(nice: int) -> None:
    """Makes the calling thread `nice` steps less urgent (Linux: niceness is per thread, and inherited by the
    threads it starts). Model threads run niced so that the event loop beside them — admission, health, the
    refusals that must come back fast — and the light stages on the same cores are served first."""
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19)
            )
