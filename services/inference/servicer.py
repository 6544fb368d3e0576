"""gRPC servicer of the inference stage: convert, await the core, convert back."""

from __future__ import annotations

import time
from typing import Any

import grpc

from services.inference import converters
from services.inference.core import Inference
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """The call's deadline on the monotonic clock; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: Inference) -> None:
        self.core = core

    async def Infer(  # noqa: N802
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        inputs = converters.token_inputs(request)
        model, output = await self.core.infer(
            request.model, inputs.input_ids, inputs.token_type_ids, inputs.cu_seqlens, deadline_of(context)
        )
        return converters.infer_response(model, output)

    async def ListModels(  # noqa: N802
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return converters.list_models_response(self.core.models())

    async def GetModel(  # noqa: N802
        self, request: inference_pb2.GetModelRequest, context: Context
    ) -> inference_pb2.GetModelResponse:
        return converters.get_model_response(self.core.model(request.model))


SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def registrar(core: Inference) -> tuple[Any, str]:
    servicer = InferenceServicer(core)
    return (lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)), SERVICE_NAME
