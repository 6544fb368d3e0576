"""PyTorch backend: a Hugging Face model run eagerly, reduced to the one output tensor the stage serves."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from services.common.repository import ModelVersion, Task
from services.inference.backends.base import Backend, FloatArray, IntArray, cuda_present, output_name


class _SingleOutput(torch.nn.Module):
    """A Hugging Face model reduced to one tensor out, called with keyword arguments.

    Keywords because the positional order of forward() differs between architectures; a single tensor because
    that is all the stage serves, and it gives the ONNX graph exactly one output.
    """

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return getattr(result, self.output)  # type: ignore[no-any-return]


class _SingleOutputNoSegments(torch.nn.Module):
    """The same for models whose forward() takes no token_type_ids (DistilBERT and the like)."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(result, self.output)  # type: ignore[no-any-return]


def torch_dtype(name: str) -> torch.dtype:
    """The torch type of tandem.json's `dtype`."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_hf_model(model: ModelVersion, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The Hugging Face model of a version folder, in eval mode, with the Auto class of its task."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    auto: Any = {
        Task.TEXT_GENERATION: AutoModelForCausalLM,
        Task.EMBEDDING: AutoModel,
        Task.CLASSIFICATION: AutoModelForSequenceClassification,
        Task.RERANK: AutoModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    }[model.task]
    hf = auto.from_pretrained(str(model.path), dtype=dtype, local_files_only=True)
    hf.eval()
    return hf  # type: ignore[no-any-return]


def wrap_single_output(hf: torch.nn.Module, task: Task) -> tuple[torch.nn.Module, bool]:
    """(module with forward(input_ids, attention_mask[, token_type_ids]), whether it takes token_type_ids)."""
    takes_segments = "token_type_ids" in inspect.signature(hf.forward).parameters
    wrapper_type = _SingleOutput if takes_segments else _SingleOutputNoSegments
    return wrapper_type(hf, output_name(task)).eval(), takes_segments


class TorchBackend(Backend):
    """PyTorch eager with inference_mode; on CUDA when one is present and the device setting allows."""

    name = "torch"

    def __init__(self, model: ModelVersion, device: str, threads: int) -> None:
        if device == "cuda" and not cuda_present():
            raise ValueError("device 'cuda' is set but torch sees no CUDA GPU")
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device != "cpu" and cuda_present() else "cpu")
        self.dtype = torch_dtype(model.config.dtype)
        module, self.uses_token_type_ids = wrap_single_output(load_hf_model(model, self.dtype), model.task)
        self.module = module.to(self.device)

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        with torch.inference_mode():
            args = [torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)]
            if self.uses_token_type_ids:
                segments = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
                args.append(torch.from_numpy(segments).to(self.device))
            out = self.module(*args)
            return out.float().cpu().numpy()  # type: ignore[no-any-return]

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
