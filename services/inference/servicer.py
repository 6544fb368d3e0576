"""gRPC servicer of the inference stage: convert, await the core, convert back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common import errors, multiplex, timing
from services.common.errors import Reason
from services.common.logging import request_id
from services.common.metrics import message_metrics
from services.common.server import new_request_id
from services.inference import converters
from services.inference.core import Inference
from services.inference.management import ModelManagement
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.management.v1 import management_pb2, management_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)


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
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: inference_pb2.InferRequest, deadline: float | None) -> inference_pb2.InferResponse:
        inputs = converters.token_inputs(request)
        model, output, pooled = await self.core.infer(
            request.model,
            inputs.input_ids,
            inputs.token_type_ids,
            inputs.cu_seqlens,
            deadline,
            request.tokenizer_fingerprint,
            pool=request.pool,
            priority=converters.priority(request),
        )
        return converters.infer_response(model, output, pooled)

    async def InferStream(  # noqa: N802
        self, request_iterator: AsyncIterator[inference_pb2.InferStreamRequest], context: Context
    ) -> AsyncIterator[inference_pb2.InferStreamResponse]:
        answers = multiplex.answer_each(request_iterator, self._answer, _refuse, self.core.draining)
        async with contextlib.aclosing(answers):  # closing the stream cancels the requests still running at once
            async for answer in answers:
                yield answer

    async def _answer(self, message: inference_pb2.InferStreamRequest) -> inference_pb2.InferStreamResponse:
        """One request of an InferStream, in a task of its own: what Infer would do, its status in the answer.
        Counted as an Infer call (services.common.metrics.MULTIPLEXED); logged under the caller's request id."""
        request_id.set(message.request_id[:128] or new_request_id())
        record = timing.begin()
        counted = message_metrics()
        started = time.perf_counter()
        if counted is not None:
            counted.started()
        code = "CANCELLED"
        try:
            deadline = time.monotonic() + message.timeout_seconds if message.timeout_seconds > 0 else None
            response = await self._infer(message.request, deadline)
            answer = inference_pb2.InferStreamResponse(id=message.id, response=response)
            code = "OK"
        except errors.TandemError as err:
            code = err.code.name
            answer = _failed(message.id, err)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in InferStream")
            code = "INTERNAL"
            answer = _failed(message.id, errors.internal())
        finally:
            if counted is not None:
                counted.finished(code, time.perf_counter() - started)
        answer.timings.update(record.timings)
        return answer

    async def Generate(  # noqa: N802
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        prompt_ids = list(request.prompt_ids)
        model, stream = await self.core.generate(
            request.model,
            prompt_ids,
            converters.requested_params(request.params),
            deadline_of(context),
            request.tokenizer_fingerprint,
        )
        # A cancelled call (the caller went away, or stopped reading after a stop string) closes the stream here,
        # which cancels the sequence in the engine.
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield converters.generate_response(model, len(prompt_ids), chunk)

    async def ListModels(  # noqa: N802
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return converters.list_models_response(self.core.models())

    async def GetModel(  # noqa: N802
        self, request: inference_pb2.GetModelRequest, context: Context
    ) -> inference_pb2.GetModelResponse:
        return converters.get_model_response(self.core.model(request.model))


def _failed(request: int, err: errors.TandemError) -> inference_pb2.InferStreamResponse:
    return inference_pb2.InferStreamResponse(id=request, status=err.to_status_proto().SerializeToString())


def _refuse(message: inference_pb2.InferStreamRequest) -> inference_pb2.InferStreamResponse:
    return _failed(
        message.id,
        errors.unavailable("the inference stage is shutting down", reason=Reason.STAGE_UNAVAILABLE, stage="inference"),
    )


SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def registrar(core: Inference) -> tuple[Any, str]:
    servicer = InferenceServicer(core)
    return (lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)), SERVICE_NAME


class ManagementServicer(management_pb2_grpc.ManagementServiceServicer):
    """The model lifecycle: convert, await the core, convert back."""

    def __init__(self, core: ModelManagement) -> None:
        self.core = core

    async def ListModels(  # noqa: N802
        self, request: management_pb2.ListModelsRequest, context: Context
    ) -> management_pb2.ListModelsResponse:
        statuses = await self.core.statuses()
        return management_pb2.ListModelsResponse(models=[converters.model_status(s) for s in statuses])

    async def LoadModel(  # noqa: N802
        self, request: management_pb2.LoadModelRequest, context: Context
    ) -> management_pb2.LoadModelResponse:
        status = await self.core.load(request.name, request.version, request.wait)
        return management_pb2.LoadModelResponse(model=converters.model_status(status))

    async def UnloadModel(  # noqa: N802
        self, request: management_pb2.UnloadModelRequest, context: Context
    ) -> management_pb2.UnloadModelResponse:
        status = await self.core.unload(request.name, request.version, request.wait)
        return management_pb2.UnloadModelResponse(model=converters.model_status(status))

    async def SetAlias(  # noqa: N802
        self, request: management_pb2.SetAliasRequest, context: Context
    ) -> management_pb2.SetAliasResponse:
        status = await self.core.set_alias(request.name, request.alias, request.version)
        return management_pb2.SetAliasResponse(model=converters.model_status(status))

    async def DeleteAlias(  # noqa: N802
        self, request: management_pb2.DeleteAliasRequest, context: Context
    ) -> management_pb2.DeleteAliasResponse:
        status = await self.core.delete_alias(request.name, request.alias)
        return management_pb2.DeleteAliasResponse(model=converters.model_status(status))

    async def ReloadModel(  # noqa: N802
        self, request: management_pb2.ReloadModelRequest, context: Context
    ) -> management_pb2.ReloadModelResponse:
        statuses = await self.core.reload(request.name, request.wait)
        return management_pb2.ReloadModelResponse(models=[converters.model_status(s) for s in statuses])


MANAGEMENT_SERVICE_NAME = management_pb2.DESCRIPTOR.services_by_name["ManagementService"].full_name


def management_registrar(core: Inference) -> tuple[Any, str]:
    servicer = ManagementServicer(core.management)
    return (
        lambda server: management_pb2_grpc.add_ManagementServiceServicer_to_server(servicer, server)
    ), MANAGEMENT_SERVICE_NAME
